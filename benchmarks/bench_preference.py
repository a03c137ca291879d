"""GRPO alone vs GRPO + DPO stages (VerIPO's loop) vs DPO on online pairs vs DPO on a fixed pair
file, on the tiny video task and the tiny image task: held-out reward after the same number of
steps, 3 seeds. Prints a markdown table and writes docs/preference_compare.png.

Every method samples the same number of completions per step (prompts_per_step x group_size)
except ``dpo_file``, whose pairs come from a file and which samples none; the table says how many
completions each method sampled. The pair files are offline preference data a user would have:
for the video task (which way does the red square move?) the right letter against a wrong one,
for the image task (brightness reward) a light image against a dark one.

    .venv/bin/python benchmarks/bench_preference.py [--seeds 3] [--video-steps 80]
        [--image-steps 20] [--out runs/bench-preference]

About 20 minutes on 2 CPU cores with the defaults (the figures in docs/preference.md).
"""
import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

from mmrl.config.jobs import get_job
from mmrl.config.schema import config_from_dict, load_config

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
METHODS = {  # name -> pref section
    "grpo": {},
    "veripo": {"mode": "veripo", "grpo_steps": 3, "dpo_steps": 1},
    "dpo_online": {"mode": "dpo"},
    "dpo_file": {"mode": "dpo", "pairs": "file"},
}


def video_pairs(folder: str, seed: int) -> str:
    """The synthetic direction task's records, each with its right letter as ``chosen`` and a
    wrong letter as ``rejected`` (absolute media paths) -> the JSONL path."""
    from mmrl.video.synthetic_task import write_synthetic_task
    src = write_synthetic_task(os.path.join(folder, "synthetic"), 128, kind="direction", seed=seed)
    rng = random.Random(seed)
    out = os.path.join(folder, "pairs.jsonl")
    with open(src) as f, open(out, "w") as g:
        for line in f:
            rec = json.loads(line)
            right = rec["solution"].replace("<answer>", "").replace("</answer>", "").strip()
            wrong = rng.choice([c for c in "ABCD" if c != right])
            rec["path"] = os.path.join(os.path.dirname(src), rec["path"])
            g.write(json.dumps({**rec, "chosen": right, "rejected": wrong}) + "\n")
    return out


def image_pairs(folder: str, prompts, seed: int) -> str:
    """One light and one dark 16x16 image per prompt (random texture) -> the JSONL path."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, "pairs.jsonl")
    with open(out, "w") as f:
        for i, prompt in enumerate(prompts):
            noise = torch.rand(16, 16, 3, generator=g)
            paths = []
            for name, level in (("light", 0.6 + 0.4 * noise), ("dark", 0.4 * noise)):
                path = os.path.join(folder, f"{name}{i}.png")
                Image.fromarray((level * 255).byte().numpy()).save(path)
                paths.append(path)
            f.write(json.dumps({"prompt": prompt, "chosen": paths[0], "rejected": paths[1]}) + "\n")
    return out


def video_eval(config, out: str, num: int = 32, group: int = 4) -> float:
    """Mean accuracy of ``group`` samples on each of the first ``num`` records, final weights."""
    from mmrl.train.loop import score
    from mmrl.video.job import build_data, build_policy
    from mmrl.video.vl_rewards import build_vl_reward
    c = config.task
    prompts, metadata, _, _ = build_data(c, out, config.train.seed)
    policy = build_policy(c, out, "cpu")
    policy.load_state_dict(torch.load(os.path.join(out, "final.pt"), weights_only=True))
    reward = build_vl_reward(c.rewards)
    with torch.no_grad():
        ro = policy.rollout(prompts[:num], metadata[:num], group, torch.Generator().manual_seed(7))
    rewards, _ = score(reward, ro, 0, None)
    return float(rewards.weighted_sum(dict(reward.weights)).mean())


def run_video(method: str, seed: int, steps: int, root: str) -> dict:
    out = os.path.join(root, "video", method, f"seed{seed}")
    pref = dict(METHODS[method])
    if method == "dpo_file":
        pref["pairs_file"] = video_pairs(os.path.join(root, "video", "pairs", f"seed{seed}"), seed)
    if pref:
        pref.update(beta=0.1)
    overrides = [f"train.steps={steps}", f"train.seed={seed}", f"train.output_dir={out}",
                 "train.overwrite=true", "train.progress=false", "train.log_every=1000",
                 "train.sample_log_every=0", "train.export=false"]
    overrides += [f"pref.{k}={v}" for k, v in pref.items()]
    config = load_config(os.path.join(ROOT, "configs/demo/video_tiny.yaml"), overrides)
    tic = time.time()
    summary = get_job("video").run(config)
    seconds = time.time() - tic
    return {"reward": video_eval(config, out), "seconds": seconds,
            "sampled": _sampled(method, config, steps), "steps": summary.get("steps")}


def run_image(method: str, seed: int, steps: int, root: str) -> dict:
    base = load_config(os.path.join(ROOT, "configs/demo/diffusion_tiny.yaml"),
                       [f"diffusion.model={os.path.join(root, 'tiny-sd3')}"])
    out = os.path.join(root, "image", method, f"seed{seed}")
    pref = dict(METHODS[method])
    if method == "dpo_file":
        pref["pairs_file"] = image_pairs(os.path.join(root, "image", "pairs", f"seed{seed}"),
                                         base.task.prompts, seed)
    if pref:
        pref.update(preset="diffusion_dpo")
    data = {"job": "diffusion", "algo": {"preset": "grpo"},
            "train": {"steps": steps, "prompts_per_step": 4, "group_size": 8, "lr": 3e-3,
                      "seed": seed, "device": "cpu", "progress": False, "log_every": 1000,
                      "output_dir": out, "overwrite": True, "resume": "never", "export": False,
                      "max_grad_norm": 1.0},
            "diffusion": {**{k: getattr(base.task, k) for k in (
                "model", "pipeline", "dtype", "finetune", "max_sequence_length", "height",
                "width", "resolution_multiple", "guidance_scale", "num_steps", "eval_num_steps",
                "sampler", "kind", "noise_level", "reward", "prompts", "eval_prompts")},
                          "eval_every": steps}}
    if pref:
        data["pref"] = pref
    config = config_from_dict(data)
    tic = time.time()
    summary = get_job("diffusion").run(config)
    seconds = time.time() - tic
    ev = summary["eval"]
    return {"reward": float(ev["reward_mean"]),
            "seconds": seconds, "sampled": _sampled(method, config, steps),
            "steps": summary.get("steps")}


def _sampled(method: str, config, steps: int) -> int:
    return 0 if method == "dpo_file" else steps * config.train.prompts_per_step * \
        config.train.group_size


def _row(task, method, results):
    r = [x["reward"] for x in results]
    mean = statistics.mean(r)
    sd = statistics.stdev(r) if len(r) > 1 else 0.0
    return {"task": task, "method": method, "mean": mean, "sd": sd, "per_seed": r,
            "sampled": results[0]["sampled"],
            "seconds": statistics.mean(x["seconds"] for x in results)}


def plot(rows, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6))
    for ax, task in zip(axes if len(tasks) > 1 else [axes], tasks):
        sub = [r for r in rows if r["task"] == task]
        ax.bar([r["method"] for r in sub], [r["mean"] for r in sub],
               yerr=[r["sd"] for r in sub], capsize=4, color="#4c72b0")
        for i, r in enumerate(sub):
            ax.scatter([i] * len(r["per_seed"]), r["per_seed"], color="black", s=10, zorder=3)
        ax.set_title(f"{task}: held-out reward after the same steps")
        ax.set_ylabel("reward (mean of 3 seeds, dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--video-steps", type=int, default=80)
    parser.add_argument("--image-steps", type=int, default=20)
    parser.add_argument("--tasks", default="video,image")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-preference"))
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "preference_compare.png"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    tasks = args.tasks.split(",")
    if "image" in tasks:
        from mmrl.diffusion.models.sd3 import SD3Adapter
        SD3Adapter.build_tiny(os.path.join(args.out, "tiny-sd3"), size=16, seed=0,
                              overwrite=True)
    for task in tasks:
        fn, steps = (run_video, args.video_steps) if task == "video" else \
            (run_image, args.image_steps)
        for method in METHODS:
            results = [fn(method, seed, steps, args.out) for seed in range(args.seeds)]
            rows.append(_row(task, method, results))
            r = rows[-1]
            print(f"{task} {method}: {r['mean']:.3f} ± {r['sd']:.3f} "
                  f"({', '.join(f'{x:.3f}' for x in r['per_seed'])}), {r['seconds']:.0f} s/run",
                  file=sys.stderr, flush=True)
    print("| task | method | held-out reward (mean ± sd, 3 seeds) | vs grpo | completions sampled"
          " | s / run |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        grpo = next(x for x in rows if x["task"] == r["task"] and x["method"] == "grpo")
        print(f"| {r['task']} | {r['method']} | {r['mean']:.3f} ± {r['sd']:.3f} | "
              f"{r['mean'] - grpo['mean']:+.3f} | {r['sampled']} | {r['seconds']:.0f} |")
    plot(rows, args.plot)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
