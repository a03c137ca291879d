"""Dynamic reward weighting (arXiv 2509.11452: hypervolume-guided and gradient-based) against
fixed weights on the toy job with two conflicting objectives, 3 seeds.

    .venv/bin/python benchmarks/bench_reward_weighting.py [--steps 40 --seeds 3]

Objectives (reward columns): ``digits``, the toy job's share of right digits of the reversed
4-digit prompt; ``sorted``, the share of adjacent answer digits in ascending order (0 for fewer
than 2 digits). The reversed prompt is rarely sorted, so the two conflict in part. Starting
weights 0.5 / 0.5 for every mode:
``fixed`` (the plain weighted sum), ``hypervolume`` (multiplier m from each step's hypervolume
gain, both maximized), ``gradient`` (w ← softmax(log w + η·I/1e-5), η = 1e-6, the release's
actor learning rate, not the toy's 3e-3: at 3e-3 one step sends a weight to 0). The modes are
the shared option ``algo.reward_weighting`` (the runner appends
:class:`mmrl.train.reward_weighting.DynamicRewardWeights` last). Reported:
each objective's mean over the last 10 steps, the final weights (gradient) and the mean
multiplier (hypervolume).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrl.config.schema import config_from_dict  # noqa: E402
from mmrl.demo.toy import TASKS, ToyPolicy, digit_reward, make_prompts  # noqa: E402
from mmrl.train import checkpoint as ckpt  # noqa: E402
from mmrl.train.runner import run_training  # noqa: E402


def _sortedness(answer) -> float:
    pairs = list(zip(answer[:-1], answer[1:]))
    return sum(a < b for a, b in pairs) / len(pairs) if pairs else 0.0


def two_objectives(samples, prompts, metadata):
    return {"digits": digit_reward(samples, prompts, metadata),
            "sorted": torch.tensor([_sortedness(list(s)) for s in samples])}


def run(mode: str, seed: int, steps: int, out: Path, advantage: str = "grpo"):
    cfg = config_from_dict({
        "job": "toy", "algo": {"preset": "grpo", "advantage": advantage,
                               "reward_weights": {"digits": 0.5, "sorted": 0.5},
                               "reward_weighting": "none" if mode == "fixed" else mode,
                               "reward_weighting_lr": 1e-6},
        "train": {"steps": steps, "prompts_per_step": 8, "group_size": 8, "lr": 3e-3,
                  "seed": seed, "device": "cpu", "progress": False, "log_every": 1000,
                  "output_dir": str(out / f"{mode}_{seed}")},
        "toy": {"length": 4, "digits": 5, "num_prompts": 256}})
    c = cfg.task
    policy = ToyPolicy(c, seed=seed)
    prompts = make_prompts(c, seed)
    metadata = [{"target": TASKS[c.task](p)} for p in prompts]
    hist = run_training(cfg, policy, two_objectives, prompts, metadata)["history"]
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / f"{mode}_{seed}" / "checkpoints"))
    augs = saved["state"]["augmenters"]  # the weighting's state after the last step
    tail = hist[-10:]
    mean = lambda k: sum(h[k] for h in tail) / len(tail)  # noqa: E731
    return {"digits": mean("reward/digits"), "sorted": mean("reward/sorted"),
            "w_digits": (float(augs[-1]["weights"][0]) if augs else 0.5),
            "multiplier": (sum(h.get("reward_multiplier", 1.0) for h in hist) / len(hist))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--advantage", default="grpo", help="algo.advantage (rloo: unnormalized, "
                    "where the hypervolume multiplier is not divided away)")
    ap.add_argument("--modes", default="fixed,hypervolume,gradient")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    print("| weighting | digits, last 10 steps | sorted, last 10 steps | final w_digits | "
          "mean multiplier |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            runs = [run(mode, s, args.steps, Path(tmp), args.advantage)
                    for s in range(args.seeds)]
            out[mode] = runs
            cell = lambda k: (f"{torch.tensor([r[k] for r in runs]).mean():.3f} ± "  # noqa: E731
                              f"{torch.tensor([r[k] for r in runs]).std():.3f}")
            print(f"| {mode} | {cell('digits')} | {cell('sorted')} | {cell('w_digits')} | "
                  f"{cell('multiplier')} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
