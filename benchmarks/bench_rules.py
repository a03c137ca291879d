"""Rewarding the Unlikely, XRPO's novelty sharpening and RiskPO's mixed VaR against GRPO on the
toy job, 3 seeds.

    .venv/bin/python benchmarks/bench_rules.py [--steps 60 --seeds 3] [--out DIR]

The toy policy (mmrl.demo.toy, 2 layers, d_model 64) learns to reverse 4-digit strings over 5
digits, trained on the toy job's dense reward (share of right digits: an exact-answer reward
gives a random policy no signal at all on this task, every group zero-std); the papers use
binary verifiable rewards, so "correct" here is graded. 8 prompts per step, groups of 8, lr 3e-3, everything else the toy job's
defaults; only ``algo.advantage`` changes. Reported per rule (mean ± std over seeds): dense
reward of the first and last 10 steps, share of zero-std groups over the run, and the exact-answer rate
of a fresh sample of 8 per prompt on 64 held-in prompts at the end (pass@1 estimate and
pass@8: a prompt counts when any of its 8 is right).
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
from mmrl.demo.toy import TASKS, ToyPolicy, digit_reward, exact_reward, make_prompts  # noqa: E402
from mmrl.train.runner import run_training  # noqa: E402

RULES = ("grpo", "unlikeliness", "novelty_sharpen", "mixed_var")


def run(rule: str, seed: int, steps: int, out: Path):
    """``rule``: an ``algo.advantage``, for mixed_var optionally ``mixed_var:MODE`` (its
    ``algo.riskpo_quantile_mode``: batch, tracked or mix, the default)."""
    adv, _, mode = rule.partition(":")
    algo = {"preset": "grpo", "advantage": adv, **({"riskpo_quantile_mode": mode} if mode else {})}
    cfg = config_from_dict({
        "job": "toy", "algo": algo,
        "train": {"steps": steps, "prompts_per_step": 8, "group_size": 8, "lr": 3e-3,
                  "seed": seed, "device": "cpu", "progress": False, "log_every": 1000,
                  "output_dir": str(out / f"{rule.replace(':', '_')}_{seed}")},
        "toy": {"length": 4, "digits": 5, "num_prompts": 256}})
    c = cfg.task
    policy = ToyPolicy(c, seed=seed)
    prompts = make_prompts(c, seed)
    metadata = [{"target": TASKS[c.task](p)} for p in prompts]
    summary = run_training(cfg, policy, digit_reward, prompts, metadata)
    hist = summary["history"]
    with torch.no_grad():
        ro = policy.rollout(prompts[:64], metadata[:64], 8, torch.Generator().manual_seed(99))
    right = exact_reward(ro.samples, ro.prompts, ro.metadata).reshape(64, 8)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"first": mean([h["reward_mean"] for h in hist[:10]]),
            "last": mean([h["reward_mean"] for h in hist[-10:]]),
            "zero_std": mean([h.get("zero_std_frac", float("nan")) for h in hist]),
            "pass1": float(right.mean()), "pass8": float((right.max(1).values > 0).float().mean())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rules", default=",".join(RULES), help="e.g. mixed_var:batch,"
                    "mixed_var:tracked,mixed_var:mix (RiskPO's quantile modes)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    print("| advantage | reward, first 10 steps | last 10 steps | zero-std groups | pass@1 | "
          "pass@8 |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for rule in args.rules.split(","):
            runs = [run(rule, s, args.steps, Path(tmp)) for s in range(args.seeds)]
            results[rule] = runs
            cell = lambda k: (f"{torch.tensor([r[k] for r in runs]).mean():.3f} ± "  # noqa: E731
                              f"{torch.tensor([r[k] for r in runs]).std():.3f}")
            print(f"| {rule} | {cell('first')} | {cell('last')} | {cell('zero_std')} | "
                  f"{cell('pass1')} | {cell('pass8')} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
