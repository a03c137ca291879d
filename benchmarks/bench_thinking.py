"""Thinking control and length on the tiny video task: mean completion length and accuracy after
GRPO with and without TON, Kimi's length reward, GRPO-λ, S-GRPO's decaying reward, KAT's mode
reward and DRPO, a few seeds each.

The task is the video demo's ("which way does the red square move?", configs/demo/video_tiny.yaml,
tiny Qwen2.5-VL built from config) with room to think: decoding may use the four answer letters
and a space, a completion stops after its first letter (``video.stop``), so a completion is
``k`` spaces (its thought, ``video.think_style: filler``) and a letter. The accuracy reward reads
the stripped completion, so thinking neither helps nor hurts the answer: what a method should do
here is shorten the thought without losing accuracy.

A fresh tiny model thinks little (a space is one of six tokens), so every run starts from a
"thinking" warm start: a few SFT steps on targets of 6-10 spaces and a random letter (format and
length only, no answer), as a reasoning model's SFT stage would leave it. TON's warm start drops
the thought of each target with p = 0.5 (thought dropout) and then runs plain GRPO, as TON does.

Each run is evaluated before RL (after the warm start) and after: 4 sampled completions for each
of the 64 prompts; accuracy is the share of correct letters, length the completion's tokens (the
letter and end token included), think the share of completions with a thought.

    python benchmarks/bench_thinking.py --seeds 0 1 2 --steps 80 --workers 16 \\
        --out docs/thinking.json --plot docs/thinking.png
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List

VARIANTS: Dict[str, Dict[str, Any]] = {
    "grpo": {},
    "ton": {"dropout": 0.5},
    "kimi": {"video": {"length_reward": "kimi"}},
    "grpo_lambda": {"video": {"length_reward": "grpo_lambda", "length_switch_accuracy": 0.5}},
    "s_grpo": {"video": {"length_reward": "serial_decay", "serial_decay": 0.5}},
    "kat_mode": {"video": {"mode_reward": True}},
    "drpo": {"algo": {"preset": "drpo"}},
}
LETTERS = ["A", "B", "C", "D"]
MAX_NEW = 12


def make_config(variant: str, seed: int, steps: int, model: str, data: str, out: str):
    from mmrl.config.schema import config_from_dict
    v = VARIANTS[variant]
    algo = {"preset": "grpo", "beta": 0.1, **v.get("algo", {})}
    video = {"model": model, "data": data, "template": "plain", "finetune": "full",
             "freeze_vision": False, "dtype": "float32", "temperature": 1.0,
             "rewards": {"accuracy": {"weight": 1.0, "answer_source": "tag_or_text"}},
             "max_new_tokens": MAX_NEW, "allowed_answers": LETTERS + [" "], "stop": LETTERS,
             "think_style": "filler", "video_mode": "slow_fast", "fps": 4.0, "max_frames": 8,
             "token_budget": 64, "min_tokens": 4, "max_tokens": 16, **v.get("video", {})}
    train = {"steps": steps, "prompts_per_step": 8, "group_size": 8, "lr": 1.5e-3,
             "max_grad_norm": 1.0, "seed": seed, "device": "cpu", "log_every": 10 ** 6,
             "sample_log_every": 0, "save_every": 0, "output_dir": out, "resume": "never",
             "overwrite": True, "progress": False, "export": False}
    return config_from_dict({"job": "video", "algo": algo, "train": train, "video": video})


def warm_start(policy, records, seed: int, dropout: float, steps: int = 30, lr: float = 3e-3):
    """SFT on ``k`` spaces + a random letter (k uniform in 6..10), TON's thought dropout with
    probability ``dropout``: the token-mean log-likelihood of the targets, Adam."""
    import torch

    from mmrl.video.thinking import thought_dropout
    rng = random.Random(1000 + seed)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    for _ in range(steps):
        batch = []
        for r in rng.sample(records, 16):
            target = thought_dropout(" " * rng.randint(6, 10) + rng.choice(LETTERS), dropout,
                                     rng, "filler")
            other = LETTERS[(LETTERS.index(target[-1]) + 1) % 4]  # unused row, must differ
            batch.append({**r, "chosen": target, "rejected": target[:-1] + other})
        ro, chosen, _ = policy.pair_rollout(batch)
        T = ro.mask.shape[1]
        logp = policy.logp(ro, chosen, 0, T)
        mask = ro.mask[chosen].to(logp.device)
        # token mean, as SFT: a short (dropped) target's first token weighs as a long one's
        loss = -torch.where(mask, logp, 0.0).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def evaluate(policy, prompts, metadata, seed: int, n: int = 4) -> Dict[str, float]:
    """Accuracy, mean completion tokens and think share of ``n`` samples per prompt."""
    import torch

    from mmrl.video.thinking import thinks
    from mmrl.video.vl_rewards import Accuracy
    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        ro = policy.rollout(list(prompts), list(metadata), n, gen)
    acc = Accuracy(answer_source="tag_or_text")(ro.samples, ro.prompts, ro.metadata)
    return {"accuracy": float(acc.nan_to_num(0.0).mean()),
            "length": float(ro.mask.sum(-1).float().mean()),
            "think": sum(thinks(s, "filler") for s in ro.samples) / len(ro.samples)}


def _curve(out: str) -> List[Dict[str, float]]:
    rows = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if "tokens" in m and m.get("samples"):
                rows.append({"step": m.get("step"), "length": m["tokens"] / m["samples"],
                             "reward": m.get("reward_mean")})
    return rows


def run_one(job) -> Dict[str, Any]:
    """One (variant, seed): warm start, evaluate, GRPO for ``steps``, evaluate."""
    variant, seed, steps, model, data, root = job
    import torch
    torch.set_num_threads(1)
    from mmrl.train.runner import run_training
    from mmrl.video.job import build_augmenters, build_data, build_policy
    from mmrl.video.thinking import thinking_columns
    from mmrl.video.vl_rewards import build_vl_reward
    out = os.path.join(root, f"{variant}-{seed}")
    config = make_config(variant, seed, steps, model, data, out)
    c = config.task
    torch.manual_seed(seed)
    prompts, metadata, _, records = build_data(c, out, seed)
    reward = build_vl_reward(c.rewards)
    config.algo.reward_weights = {**reward.weights, **thinking_columns(c.length_reward,
                                                                        c.mode_reward)}
    spec = config.algo.resolve()
    policy = build_policy(c, out, "cpu")  # no reference yet: it is the warm-started model
    jsonl = [json.loads(line) for line in open(data)]
    for j in jsonl:
        j["path"] = os.path.join(os.path.dirname(data), j["path"])
    t0 = time.time()
    warm_start(policy, jsonl, seed, VARIANTS[variant].get("dropout", 0.0))
    if spec.needs_ref:
        policy.enable_reference()  # KL (beta 0.1, as the demo) to the warm-started model
    before = evaluate(policy, prompts, metadata, seed)
    run_training(config, policy, reward, prompts, metadata,
                 augmenters=build_augmenters(c, records, config.algo.reward_weights))
    after = evaluate(policy, prompts, metadata, seed)
    return {"variant": variant, "seed": seed, "before": before, "after": after,
            "curve": _curve(out), "seconds": time.time() - t0}


def summarize(runs: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Per variant: the mean (and min / max over seeds) of the after-RL numbers."""
    out: Dict[str, Dict[str, float]] = {}
    for v in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == v]
        row: Dict[str, float] = {"seeds": len(mine)}
        for when in ("before", "after"):
            for k in ("accuracy", "length", "think"):
                xs = [r[when][k] for r in mine]
                row[f"{when}_{k}"] = sum(xs) / len(xs)
                if when == "after":
                    row[f"after_{k}_min"], row[f"after_{k}_max"] = min(xs), max(xs)
        out[v] = row
    return out


def plot(runs, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, v in enumerate(dict.fromkeys(r["variant"] for r in runs)):
        curves = [r["curve"] for r in runs if r["variant"] == v and r["curve"]]
        n = min(len(c) for c in curves)
        mean = [sum(c[k]["length"] for c in curves) / len(curves) for k in range(n)]
        ax.plot(range(n), mean, label=v, color=f"C{i}")
    ax.set_xlabel("step")
    ax.set_ylabel("mean completion tokens (training rollouts)")
    ax.set_title("Tiny video task: completion length during GRPO (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--num", type=int, default=64, help="synthetic videos (prompts)")
    ap.add_argument("--root", default=None, help="run folders (default: a temp dir)")
    ap.add_argument("--out", default="thinking.json")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    from mmrl.video.models import build_default_tiny
    from mmrl.video.synthetic_task import write_synthetic_task
    root = args.root or tempfile.mkdtemp(prefix="bench_thinking_")
    model = build_default_tiny("tiny", root)
    data = write_synthetic_task(os.path.join(root, "synthetic"), args.num, kind="direction")
    # seed-major: a run stopped early still holds every variant for its first seeds
    jobs = [(v, s, args.steps, model, data, root) for s in args.seeds for v in args.variants]
    start = time.time()
    runs: List[Dict[str, Any]] = []
    with ProcessPoolExecutor(max(args.workers, 1)) as pool:
        for run in pool.map(run_one, jobs):  # in job order; the JSON is rewritten after each
            runs.append(run)
            result = {"steps": args.steps, "seeds": args.seeds, "num_prompts": args.num,
                      "max_new_tokens": MAX_NEW, "wall_seconds": time.time() - start,
                      "complete": len(runs) == len(jobs), "summary": summarize(runs),
                      "runs": runs}
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    for v, row in result["summary"].items():
        print(f"{v:12s} acc {row['before_accuracy']:.2f} -> {row['after_accuracy']:.2f}  "
              f"len {row['before_length']:.1f} -> {row['after_length']:.1f}  "
              f"think {row['before_think']:.2f} -> {row['after_think']:.2f}", flush=True)
    if args.plot:
        plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
