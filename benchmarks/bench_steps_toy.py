"""GRPO vs GiGPO vs SPO-chain on the toy job (``algo.step_advantage``), 3 seeds.

    .venv/bin/python benchmarks/bench_steps_toy.py [--steps 200 --seeds 5]
        [--out docs/steps_toy_bench.json] [--plot docs/steps_toy_bench.png] [--replot JSON]

The toy job (configs/demo/toy.yaml: a tiny transformer reverses digit strings, reward = the
fraction of answer digits right) has natural steps: one answer digit = one step with its own
reward (digit right / answer length), the state before step t = prompt ⊕ the t digits emitted so
far (identical prefixes within a group = GiGPO's anchor states). Each run trains with the same
model, prompts, seed and budget of steps; only ``algo.step_advantage`` differs:

- ``grpo``: none (the row's GRPO advantage on every token);
- ``gigpo``: A^E + ω·A^S, γ = 0.95, ω = 1, mean_std_norm;
- ``spo_chain``: cut points at p < 0.9, every K = 5th, M = 4 continuations per cut point.

Reported per method (mean ± std over seeds): the training reward of the first and last 10 steps,
the first step whose 10-step mean reward reaches ``--target``, the wall time and the policy's
generated tokens (rollouts + SPO's continuations, ``spo_continuations`` rows of T tokens).
"""
from __future__ import annotations

import argparse
import json
import statistics as st
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmrl.config.jobs import get_job  # noqa: E402
from mmrl.config.schema import load_config  # noqa: E402

METHODS = {"grpo": "none", "gigpo": "gigpo", "spo_chain": "spo_chain"}


def run_one(method: str, seed: int, args, out_dir: Path) -> dict:
    overrides = [f"algo.step_advantage={METHODS[method]}", f"train.steps={args.steps}",
                 f"train.seed={seed}", f"train.prompts_per_step={args.prompts}",
                 f"train.group_size={args.group}", f"toy.length={args.length}",
                 "train.log_every=1000", f"train.output_dir={out_dir / f'{method}-{seed}'}",
                 "train.overwrite=true"]
    config = load_config(ROOT / "configs/demo/toy.yaml", overrides)
    t0 = time.perf_counter()
    get_job("toy").run(config)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out_dir / f"{method}-{seed}" / "metrics.jsonl").open()]
    rows = [r for r in rows if "reward_mean" in r]
    curve = [r["reward_mean"] for r in rows]
    cont = sum(r.get("spo_continuations", 0.0) for r in rows)
    tokens = sum(r.get("tokens", 0.0) for r in rows)
    return {"curve": curve, "wall_s": wall, "continuation_rows": cont, "train_tokens": tokens}


def first_reach(curve, target, window=10):
    for i in range(window, len(curve) + 1):
        if sum(curve[i - window:i]) / window >= target:
            return i
    return None


def summary(runs, target):
    def ms(xs):
        xs = [x for x in xs if x is not None]
        if not xs:
            return "never"
        return f"{st.mean(xs):.3f} ± {st.pstdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
    reach = [first_reach(r["curve"], target) for r in runs]
    return {"first10": ms([st.mean(r["curve"][:10]) for r in runs]),
            "last10": ms([st.mean(r["curve"][-10:]) for r in runs]),
            "reach": f"{sum(x is not None for x in reach)}/{len(reach)} runs, step "
                     + ms([float(x) for x in reach if x is not None]),
            "wall_s": ms([r["wall_s"] for r in runs]),
            "continuation_rows": ms([r["continuation_rows"] for r in runs])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--length", type=int, default=5)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--methods", default="grpo,gigpo,spo_chain")
    ap.add_argument("--runs", default="/tmp/bench_steps_toy")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--replot", default=None, help="a JSON this script wrote: plot it, run nothing")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        return plot(saved["runs"], list(saved["runs"]), args.plot)
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    results = {m: [] for m in methods}
    for seed in range(args.seeds):  # seed-major: load on the machine spreads over methods
        for m in methods:
            results[m].append(run_one(m, seed, args, Path(args.runs)))
            r = results[m][-1]
            print(f"{m:10s} seed {seed}: last10 {st.mean(r['curve'][-10:]):.3f} "
                  f"wall {r['wall_s']:.1f}s", flush=True)
    table = {m: summary(results[m], args.target) for m in methods}
    for m, row in table.items():
        print(f"| {m} | {row['first10']} | {row['last10']} | {row['reach']} | {row['wall_s']} "
              f"| {row['continuation_rows']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "table": table,
                                              "runs": results}) + "\n")
    if args.plot:
        plot(results, methods, args.plot)


def plot(results, methods, path):
    """Mean train reward (5-step moving mean over seeds) against step and against wall time
    (each run's steps spread evenly over its wall time)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    seeds = len(results[methods[0]])
    for m in methods:
        curves = torch.tensor([r["curve"] for r in results[m]])
        mean = torch.nn.functional.avg_pool1d(curves[:, None], 5, 1)[:, 0].mean(0)
        ax[0].plot(range(5, 5 + len(mean)), mean, label=m)
        wall = st.mean(r["wall_s"] for r in results[m])
        ax[1].plot(torch.linspace(0, wall, len(mean)), mean, label=m)
    ax[0].set_xlabel("step")
    ax[1].set_xlabel("wall seconds (2 shared CPU cores)")
    for a in ax:
        a.set_ylabel(f"train reward (5-step mean, {seeds} seeds)")
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
