"""Sensitivity of the rollout-budget strategies to the simulator's settings.

Runs ``mmrl.budget.sim`` for the default settings and a few one-at-a-time changes, and prints, per
setting, each strategy's effective-gradient ratio (over groups and over rollouts) relative to
uniform allocation at equal rollout budget. Seeded and deterministic; about 20 s on 2 idle
cores (3 seeds).

    .venv/bin/python benchmarks/bench_budget.py [--seeds 3]
"""
import argparse
import dataclasses
import time

from mmrl.budget.sim import SimSettings, run_budget_sim, summarize

VARIANTS = {
    "default": {},
    "no drift": {"drift_std": 0.0},
    "wider difficulty (std 3)": {"difficulty_std": 3.0},
    "static population (lr 0, no drift)": {"lr": 0.0, "drift_std": 0.0},
    "group size 16": {"group_size": 16},
}
STRATEGIES = ("uniform", "vade", "knapsack", "vade_knapsack", "knapsack_oracle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print("| setting | strategy | eff. ratio, groups (vs uniform) | eff. ratio, rollouts "
          "(vs uniform) | mean success end |")
    print("|---|---|---|---|---|")
    for label, change in VARIANTS.items():
        t0 = time.perf_counter()
        s = dataclasses.replace(SimSettings(), **change)
        rows = summarize(run_budget_sim(s, STRATEGIES, range(args.seeds)))
        for r in rows:
            print(f"| {label} | {r['strategy']} | {r['eff_ratio'][0]:.3f} "
                  f"({100 * r['eff_ratio_vs_uniform']:+.1f} %) | {r['eff_rollout_share'][0]:.3f} "
                  f"({100 * r['eff_rollout_share_vs_uniform']:+.1f} %) | "
                  f"{r['success_end'][0]:.3f} |", flush=True)
        print(f"<!-- {label}: {time.perf_counter() - t0:.1f}s -->", flush=True)


if __name__ == "__main__":
    main()
