"""Guidance in the rollout-budget simulator: GHPO, Scaf-GRPO, Guide and XRPO seeding against
plain GRPO, at equal rollout budget and after equal steps, and how the answer moves with the
model's two invented constants (hint gain g, transfer τ; mmrl.budget.sim_guidance).

Seeded and deterministic; about a minute on one core (3 seeds).

    .venv/bin/python benchmarks/bench_sim_guidance.py [--seeds 3] [--plot docs/budget_sim_guidance.png]
"""
import argparse
import dataclasses

import numpy as np

from mmrl.budget.sim import SimSettings, format_table, plot, run_budget_sim, summarize

MODES = ("none", "ghpo", "scaf", "guide", "xrpo_seed")
SWEEP = {"default (g 1.5, τ 0.5)": {},
         "τ = 0 (hinted context learns alone)": {"hint_transfer": 0.0},
         "τ = 1 (all of it transfers)": {"hint_transfer": 1.0},
         "weak hints (g 0.5)": {"hint_gain": 0.5}, "strong hints (g 3)": {"hint_gain": 3.0}}
STEP = 150  # success "after N steps": every guided run has at least this many


def at_step(runs, step: int) -> float:
    return float(np.mean([r["history"][step - 1][3] for r in runs]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--plot", default=None, help="PNG of the uniform runs per mode")
    args = parser.parse_args()
    seeds = range(args.seeds)
    results = run_budget_sim(SimSettings(), ("uniform", "knapsack"), seeds, guidance=MODES)
    print(format_table(summarize(results)))
    print(f"\n| run | zero-adv groups | mean success after {STEP} steps | after the budget "
          f"(steps) | rescued / all-fail | extra rollouts |")
    print("|---|---|---|---|---|---|")
    for label, runs in results.items():
        zero = [1 - r["effective_groups"] / r["groups"] for r in runs]
        end = [r["success_end"] for r in runs]
        steps = np.mean([r["steps"] for r in runs])
        rescued = sum(r["guided_rescued"] for r in runs)
        print(f"| {label} | {np.mean(zero):.3f} ± {np.std(zero):.3f} | {at_step(runs, STEP):.3f}"
              f" | {np.mean(end):.3f} ± {np.std(end):.3f} ({steps:.0f})"
              f" | {rescued} / {sum(r['guided_groups'] for r in runs)}"
              f" | {np.mean([r['guided_rollouts'] / r['rollouts'] for r in runs]):.3f} |")
    if args.plot:
        print("plot:", plot({k: v for k, v in results.items() if k.startswith("uniform")},
                            args.plot))
    print("\n| setting (uniform prompts) | " + " | ".join(MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    for label, change in SWEEP.items():
        res = run_budget_sim(dataclasses.replace(SimSettings(), **change), ("uniform",), seeds,
                             guidance=MODES)
        cells = [f"{np.mean([r['success_end'] for r in runs]):.3f}" for runs in res.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
