"""TON's two stages on the tiny video task: SFT with thought dropout (the job's SFT stage,
``video.sft_steps`` / ``video.thought_dropout``), then GRPO; against SFT without dropout and
GRPO alone.

The task is configs/demo/video_tiny_thinking.yaml's: the video demo ("which way does the red
square move?", tiny Qwen2.5-VL built from config) where decoding may use the four answer
letters and a space and a completion stops after its first letter, so a completion is ``k``
spaces (its thought, ``video.think_style: filler``) and a letter. The SFT targets are the job's
(:mod:`mmrl.video.sft`): 6-10 spaces and the record's answer letter, the thought dropped with
probability p. Accuracy reads the stripped completion: thinking neither helps nor hurts.

Variants: ``grpo`` (no SFT: every step GRPO), ``sft_p0`` (SFT, p = 0, then GRPO), ``ton``
(SFT, p = 0.5, then GRPO). GRPO: beta 0 (the reference would be the model before SFT, see
docs/seed_methods.md B), 8 prompts x 8 samples, lr 1.5e-3; SFT: the same rows a step, lr 3e-3.
Every variant runs the same number of GRPO steps. Reported: after SFT = the first GRPO step's
64 training rollouts (think share, tokens, reward); after = 4 samples for every prompt at the
end (``bench_thinking.evaluate``).

    python benchmarks/bench_sft.py --seeds 0 1 2 3 4 --sft-steps 30 --steps 50 --workers 2 \\
        --out docs/sft.json --plot docs/sft.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS: Dict[str, Dict[str, Any]] = {
    "grpo": {"sft_steps": 0},
    "sft_p0": {"dropout": 0.0},
    "ton": {"dropout": 0.5},
}


def make_config(variant: str, seed: int, sft_steps: int, steps: int, model: str, data: str,
                out: str):
    from bench_thinking import LETTERS, MAX_NEW

    from mmrl.config.schema import config_from_dict
    v = VARIANTS[variant]
    n_sft = v.get("sft_steps", sft_steps)
    video = {"model": model, "data": data, "template": "plain", "finetune": "full",
             "freeze_vision": False, "dtype": "float32", "temperature": 1.0,
             "rewards": {"accuracy": {"weight": 1.0, "answer_source": "tag_or_text"}},
             "max_new_tokens": MAX_NEW, "allowed_answers": LETTERS + [" "], "stop": LETTERS,
             "think_style": "filler", "video_mode": "slow_fast", "fps": 4.0, "max_frames": 8,
             "token_budget": 64, "min_tokens": 4, "max_tokens": 16, "sft_steps": n_sft,
             "thought_dropout": v.get("dropout", 0.0), "sft_lr": 3e-3}
    train = {"steps": n_sft + steps, "prompts_per_step": 8, "group_size": 8, "lr": 1.5e-3,
             "max_grad_norm": 1.0, "seed": seed, "device": "cpu", "log_every": 10 ** 6,
             "sample_log_every": 0, "save_every": 0, "output_dir": out, "resume": "never",
             "overwrite": True, "progress": False, "export": False}
    return config_from_dict({"job": "video", "algo": {"preset": "grpo", "beta": 0.0},
                             "train": train, "video": video})


def run_one(job) -> Dict[str, Any]:
    """One (variant, seed): SFT stage and GRPO in one run, then the evaluation."""
    variant, seed, sft_steps, steps, model, data, root = job
    import torch
    torch.set_num_threads(1)
    from bench_thinking import evaluate

    from mmrl.train.runner import run_training
    from mmrl.video.job import build_data, build_policy
    from mmrl.video.sft import build_sft_stage
    from mmrl.video.thinking import ThinkingRounds
    from mmrl.video.vl_rewards import build_vl_reward
    out = os.path.join(root, f"{variant}-{seed}")
    config = make_config(variant, seed, sft_steps, steps, model, data, out)
    c, t = config.task, config.train
    torch.manual_seed(seed)
    prompts, metadata, _, records = build_data(c, out, seed)
    reward = build_vl_reward(c.rewards)
    config.algo.reward_weights = dict(reward.weights)
    policy = build_policy(c, out, "cpu")
    sft = build_sft_stage(c, records, t.prompts_per_step, t.group_size, seed)
    t0 = time.time()
    summary = run_training(config, policy, reward, prompts, metadata, sft=sft,
                           augmenters=[ThinkingRounds("none", False, "filler")])
    after = evaluate(policy, prompts, metadata, seed)
    hist = summary["history"]
    rl = [m for m in hist if not m.get("sft_step")]
    curve = [{"step": k, "think": m.get("think_frac"), "reward": m.get("reward_mean"),
              "length": m["tokens"] / m["samples"] if m.get("samples") else None}
             for k, m in enumerate(rl)]
    sft_rows = [m for m in hist if m.get("sft_step")]
    return {"variant": variant, "seed": seed, "after_sft": curve[0], "after": after,
            "curve": curve, "sft_loss": [m["loss"] for m in sft_rows],
            "sft_think_frac": (sum(m["sft_think_frac"] for m in sft_rows) / len(sft_rows)
                               if sft_rows else None),
            "seconds": time.time() - t0}


def summarize(runs: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    out: Dict[str, Dict[str, float]] = {}
    for v in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == v]
        row: Dict[str, float] = {"seeds": len(mine)}
        for k in ("think", "length", "reward"):
            row[f"after_sft_{k}"] = sum(r["after_sft"][k] for r in mine) / len(mine)
        for k in ("accuracy", "length", "think"):
            xs = [r["after"][k] for r in mine]
            row[f"after_{k}"] = sum(xs) / len(xs)
            row[f"after_{k}_min"], row[f"after_{k}_max"] = min(xs), max(xs)
        out[v] = row
    return out


def plot(runs, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, v in enumerate(dict.fromkeys(r["variant"] for r in runs)):
        curves = [r["curve"] for r in runs if r["variant"] == v]
        n = min(len(c) for c in curves)
        for ax, key in zip(axes, ("think", "length")):
            mean = [sum(c[k][key] for c in curves) / len(curves) for k in range(n)]
            ax.plot(range(n), mean, label=v, color=f"C{i}")
    axes[0].set_ylabel("think share (training rollouts)")
    axes[1].set_ylabel("mean completion tokens")
    for ax in axes:
        ax.set_xlabel("GRPO step (after the SFT stage)")
        ax.legend(fontsize=8)
    fig.suptitle("Tiny video task: TON's SFT stage (thought dropout) then GRPO, mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(paths: List[str], out: str, plot_path=None) -> int:
    """Join result files of the same settings (e.g. seeds run apart) into one."""
    parts = [json.load(open(p)) for p in paths]
    runs = [r for part in parts for r in part["runs"]]
    result = {**{k: parts[0][k] for k in ("sft_steps", "steps", "num_prompts")},
              "seeds": sorted({s for part in parts for s in part["seeds"]}),
              "wall_seconds": sum(part["wall_seconds"] for part in parts),
              "complete": all(part["complete"] for part in parts),
              "summary": summarize(runs), "runs": runs}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    if plot_path:
        plot(runs, plot_path)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--sft-steps", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40, help="GRPO steps (every variant)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--num", type=int, default=32, help="synthetic videos (prompts)")
    ap.add_argument("--root", default=None)
    ap.add_argument("--out", default="sft.json")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--merge", nargs="+", default=None,
                    help="join the runs of these result files into --out (and --plot)")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.plot)
    from mmrl.video.models import build_default_tiny
    from mmrl.video.synthetic_task import write_synthetic_task
    root = args.root or tempfile.mkdtemp(prefix="bench_sft_")
    model = build_default_tiny("tiny", root)
    data = write_synthetic_task(os.path.join(root, "synthetic"), args.num, kind="direction")
    jobs = [(v, s, args.sft_steps, args.steps, model, data, root) for s in args.seeds
            for v in args.variants]
    start = time.time()
    runs: List[Dict[str, Any]] = []
    with ProcessPoolExecutor(max(args.workers, 1)) as pool:
        for run in pool.map(run_one, jobs):
            runs.append(run)
            result = {"sft_steps": args.sft_steps, "steps": args.steps, "seeds": args.seeds,
                      "num_prompts": args.num, "wall_seconds": time.time() - start,
                      "complete": len(runs) == len(jobs), "summary": summarize(runs),
                      "runs": runs}
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    for v, row in result["summary"].items():
        print(f"{v:8s} after SFT: think {row['after_sft_think']:.2f} len "
              f"{row['after_sft_length']:.1f} reward {row['after_sft_reward']:.2f} | after: "
              f"acc {row['after_accuracy']:.2f} len {row['after_length']:.1f} think "
              f"{row['after_think']:.2f}", flush=True)
    if args.plot:
        plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
