"""Video generation costs side by side in one run, on a tiny random Wan 2.1 pipeline (CPU):

(a) the video job's step (``mmrl train``'s diffusion job with ``diffusion.frames``: rollout,
    VAE decode, reward, update) at a few frame counts: time and peak RSS per step, and how
    they grow with frames;
(b) mmrl's SDE sampler with log-probs (``sample_sde`` over the Wan adapter) vs diffusers' own
    loop (``WanPipeline.__call__(output_type="latent")``) at equal steps, same model, same
    CFG, same precomputed prompt embeddings (goal <= 1.1x);
(c) tree sampling (``sample_tree``, 16 leaves) vs 16 independent trajectories on video
    latents: NFE and wall time (goal NFE <= 0.5x).

    .venv/bin/python benchmarks/bench_video_gen.py            # a few minutes on one core
    .venv/bin/python benchmarks/bench_video_gen.py --frames 5,9,17,33 --size 32 --no-plot

Prints one line per comparison with the ratio; writes ``docs/video_gen_bench.json`` and, when
matplotlib imports, ``docs/video_gen_bench.png`` (step time and peak RSS against frames).

How it measures: (a) one process per frame count (a fresh RSS baseline each), the job run by
``mmrl.diffusion.job.run`` and timed between the starts of consecutive rollouts after a
warm-up (``bench_vs_flow_grpo.Clock``: wall and CPU time, peak RSS above the level at the
first timed rollout, sampled every ms); NFE is the policy's own count. (b), (c): in this
process, the two sides alternating, best of ``--repeats`` (``bench_samplers.timed_pair``).
One torch thread everywhere: the machine is shared and timings with more threads are noise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DOCS = HERE.parent / "docs"
PROMPTS = ["a white square moving left", "a white square moving right",
           "a white square moving up", "a white square moving down"]


def tiny_wan(work: Path, size: int) -> str:
    """The tiny Wan 2.1 pipeline of the family's own builder, saved once under ``work``."""
    from mmrl.diffusion.models import adapter_class
    return str(adapter_class("wan").build_tiny(work / f"tiny-wan-{size}", size=size))


def load_flow(a, frames: int, finetune: str = "none"):
    from mmrl.diffusion.models import adapter_class
    return adapter_class("wan").from_pretrained(a.model, height=a.size, width=a.size,
                                                frames=frames, guidance_scale=a.guidance,
                                                finetune=finetune, max_sequence_length=16)


# ------------------------------------------------------------------ (a) the job vs frames
def job_config(a, frames: int) -> dict:
    """The video job of the demo's kind at ``frames`` (LoRA, CFG, the full SDE sampler)."""
    n = a.prompts * a.group
    return {
        "job": "diffusion",
        "algo": {"preset": "grpo", "beta": 0.0},
        "train": {"steps": a.warmup + a.steps + 1, "prompts_per_step": a.prompts,
                  "group_size": a.group, "micro_batch_size": n, "lr": 1e-3, "seed": 0,
                  "device": "cpu", "progress": False, "log_every": 10**6,
                  "output_dir": str(Path(a.work) / f"job-{frames}"), "resume": "never",
                  "overwrite": True, "export": False},
        "diffusion": {"model": a.model, "pipeline": "wan", "dtype": "float32",
                      "finetune": "lora", "lora_rank": 8, "lora_alpha": 16,
                      "max_sequence_length": 16, "height": a.size, "width": a.size,
                      "frames": frames, "guidance_scale": a.guidance,
                      "num_steps": a.num_steps, "sampler": "full", "kind": "flow_grpo",
                      "noise_level": 0.7, "reward": a.reward, "prompts": PROMPTS},
    }


def run_job(a) -> dict:
    """(internal, one process) The job at ``a.frames``, timed per step."""
    from bench_vs_flow_grpo import Clock

    from mmrl.config.schema import config_from_dict
    from mmrl.diffusion.job import run
    from mmrl.diffusion.policy import DiffusionGroupPolicy

    clock, nfe = Clock(a.steps, a.warmup), []
    rollout = DiffusionGroupPolicy.rollout

    def timed_rollout(self, *args, **kwargs):
        clock.tick()
        nfe.append(self.last_nfe)
        return rollout(self, *args, **kwargs)

    DiffusionGroupPolicy.rollout = timed_rollout
    run(config_from_dict(job_config(a, a.frames), source="bench_video_gen"))
    out = clock.result("mmrl")
    del out["nfe_per_step"]  # the Clock counts SD3 rows; Wan's NFE is the policy's own
    return {**out, "frames": a.frames, "nfe_per_step": nfe[-1]}


def frame_sweep(a) -> list:
    """``run_job`` in a fresh process per frame count."""
    rows = []
    for frames in a.frame_counts:
        cmd = [sys.executable, __file__, "--side", "job", "--frames-one", str(frames),
               "--model", a.model] + a.passthrough
        out = subprocess.run(cmd, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode:
            raise SystemExit(f"the job at {frames} frames failed:\n{out.stderr[-4000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({k: row[k] for k in ("frames", "step_s", "cpu_step_s", "peak_delta_mb",
                                         "max_rss_mb", "nfe_per_step")})
        base = rows[0]
        print(f"{'job step at ' + str(frames) + ' frames':<44} wall {row['step_s']:7.3f}s "
              f"({row['step_s'] / base['step_s']:5.2f}x)  cpu {row['cpu_step_s']:7.3f}s "
              f"({row['cpu_step_s'] / base['cpu_step_s']:5.2f}x)  peak +RSS "
              f"{row['peak_delta_mb']:7.1f} MB  vs {base['frames']} frames", flush=True)
    return rows


# ------------------------------------------------------------------ (b) sampler vs diffusers
def sampler_vs_pipeline(a) -> dict:
    """``sample_sde`` (SDE on T-1 steps, log-probs) vs ``WanPipeline.__call__`` at T steps.

    Both get the same noise, CFG scale and prompt embeddings computed once beforehand (the
    adapter's prompt cache; ``pipe.encode_prompt`` for the pipeline), so both time the
    denoising loop. The ODE sampler's final latents are compared with the pipeline's as a check
    that the two loops do the same work (same schedule, same model calls).
    """
    import torch
    from bench_samplers import timed_pair

    from mmrl.diffusion import sample_sde

    flow = load_flow(a, a.cmp_frames)
    pipe = flow.pipe
    pipe.set_progress_bar_config(disable=True)
    prompts = PROMPTS[:a.cmp_batch]
    cond = flow.encode_prompt(prompts)
    emb, neg = pipe.encode_prompt(prompts, negative_prompt=[""] * len(prompts),
                                  do_classifier_free_guidance=a.guidance > 1,
                                  max_sequence_length=16)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((len(prompts), *flow.latent_shape()), generator=g)
    sigmas = flow.sigmas(a.num_steps)

    def diffusers_loop():
        return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=a.size, width=a.size,
                    num_frames=a.cmp_frames, num_inference_steps=a.num_steps,
                    guidance_scale=a.guidance, latents=noise.clone(), output_type="latent",
                    return_dict=False)[0]

    with torch.no_grad():
        ode = sample_sde(flow, noise, sigmas, cond, sde_steps=[]).final
        gap = float((ode - diffusers_loop().float()).abs().max())
    mm, _, t_mm, t_df = timed_pair(
        lambda: sample_sde(flow, noise, sigmas, cond, generator=torch.Generator().manual_seed(1)),
        diffusers_loop, "cpu", a.repeats)
    ratio = t_mm / t_df
    print(f"{'sample_sde (log-probs) vs WanPipeline loop':<44} {a.num_steps} steps x "
          f"{len(prompts)} videos of {a.cmp_frames} frames: wall {t_mm:7.3f}s vs {t_df:7.3f}s = "
          f"{ratio:5.2f}x  (ODE vs pipeline final latents: max |diff| {gap:.1e})", flush=True)
    return {"frames": a.cmp_frames, "videos": len(prompts), "num_steps": a.num_steps,
            "scheduler": type(pipe.scheduler).__name__, "mmrl_s": t_mm, "diffusers_s": t_df,
            "ratio": ratio, "goal": 1.1, "met": ratio <= 1.1, "ode_vs_pipeline_max_abs": gap,
            "transitions_with_logp": int(mm.num_transitions)}


# ------------------------------------------------------------------ (c) tree vs independent
def tree_vs_independent(a) -> dict:
    """``sample_tree`` with binary splits at ``--tree-splits`` (16 leaves) vs ``sample_sde`` on
    16 rows from the same root noise: NFE (per-sample model evaluations) and wall time."""
    import torch
    from bench_samplers import timed_pair

    from mmrl.diffusion import sample_sde, sample_tree
    from mmrl.diffusion.samplers import take_cond

    flow = load_flow(a, a.cmp_frames)
    splits, leaves = [int(s) for s in a.tree_splits.split(",")], 2 ** len(a.tree_splits.split(","))
    cond1 = flow.encode_prompt(PROMPTS[:1])
    cond_n = take_cond(cond1, torch.zeros(leaves, dtype=torch.long))
    noise = torch.randn((1, *flow.latent_shape()), generator=torch.Generator().manual_seed(0))
    sigmas = flow.sigmas(a.tree_steps)
    tree, ind, t_tree, t_ind = timed_pair(
        lambda: sample_tree(flow, noise, sigmas, cond1, split_steps=splits, branching=2),
        lambda: sample_sde(flow, noise.expand(leaves, *noise.shape[1:]), sigmas, cond_n),
        "cpu", a.repeats)
    ratio = tree.nfe / ind.nfe
    print(f"{'tree (splits ' + a.tree_splits + ', b=2) vs ' + str(leaves) + ' independent':<44} "
          f"NFE {tree.nfe:>5} vs {ind.nfe:>5} = {ratio:5.2f}x   wall {t_tree:7.3f}s vs "
          f"{t_ind:7.3f}s = {t_tree / t_ind:5.2f}x  ({a.cmp_frames} frames)", flush=True)
    return {"frames": a.cmp_frames, "leaves": leaves, "num_steps": a.tree_steps,
            "split_steps": splits, "tree_nfe": tree.nfe, "independent_nfe": ind.nfe,
            "nfe_ratio": ratio, "tree_s": t_tree, "independent_s": t_ind,
            "time_ratio": t_tree / t_ind, "goal": 0.5, "met": ratio <= 0.5}


# ------------------------------------------------------------------ outputs
def plot(rows, path: Path) -> bool:
    """Step time and peak RSS against frames -> ``path``; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    frames = [r["frames"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(frames, [r["cpu_step_s"] for r in rows], "o-", label="CPU time")
    ax1.plot(frames, [r["step_s"] for r in rows], "s--", label="wall time")
    ax1.set(xlabel="frames per video", ylabel="s per job step", title="step time")
    ax1.legend()
    ax2.plot(frames, [r["peak_delta_mb"] for r in rows], "o-")
    ax2.set(xlabel="frames per video", ylabel="MB above the step start", title="peak RSS")
    for ax in (ax1, ax2):
        ax.set_xticks(frames)
        ax.grid(alpha=0.3)
    fig.suptitle("tiny Wan 2.1 video job on CPU (one thread)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def growth(rows) -> dict:
    """Cost at the most frames over the fewest, and the log-log slope (1 = linear in frames)."""
    import math
    first, last = rows[0], rows[-1]
    span = math.log(last["frames"] / first["frames"])
    out = {}
    for key in ("cpu_step_s", "step_s", "peak_delta_mb"):
        ratio = last[key] / first[key] if first[key] > 0 else float("nan")
        out[key] = {"ratio": ratio, "loglog_slope": math.log(ratio) / span
                    if span and ratio > 0 else float("nan")}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--frames", default="5,9,17,33", help="frame counts for (a), each 4k + 1")
    p.add_argument("--size", type=int, default=32, help="video side in pixels (multiple of 16)")
    p.add_argument("--num-steps", type=int, default=8, help="denoising steps T for (a) and (b)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale (Wan: 5.0)")
    p.add_argument("--prompts", type=int, default=2, help="(a) prompts per step")
    p.add_argument("--group", type=int, default=4, help="(a) videos per prompt")
    p.add_argument("--reward", default="motion_direction", help="(a) the job's reward")
    p.add_argument("--steps", type=int, default=3, help="(a) timed steps per frame count")
    p.add_argument("--warmup", type=int, default=1, help="(a) untimed first steps")
    p.add_argument("--cmp-frames", type=int, default=17, help="frames for (b) and (c)")
    p.add_argument("--cmp-batch", type=int, default=4, help="(b) videos per sampling call")
    p.add_argument("--tree-steps", type=int, default=10, help="(c) denoising steps")
    p.add_argument("--tree-splits", default="2,4,6,8", help="(c) binary split steps")
    p.add_argument("--repeats", type=int, default=3, help="(b), (c) runs per side, best kept")
    p.add_argument("--work", default="/tmp/mmrl-bench-video-gen")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print only; docs/ untouched")
    p.add_argument("--side", choices=["job"], help="(internal) one frame count's job")
    p.add_argument("--frames-one", type=int, help="(internal)")
    p.add_argument("--model", help="(internal) the tiny pipeline's folder")
    a = p.parse_args(argv)
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    torch.set_num_threads(1)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if a.side:
        a.frames = a.frames_one
        print(json.dumps(run_job(a)))
        return 0
    a.frame_counts = [int(f) for f in a.frames.split(",")]
    a.passthrough = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in (
        "size", "num_steps", "guidance", "prompts", "group", "reward", "steps", "warmup",
        "work")]
    Path(a.work).mkdir(parents=True, exist_ok=True)
    a.model = tiny_wan(Path(a.work), a.size)
    print(f"tiny Wan 2.1 ({a.model}), {a.size}x{a.size} px, T={a.num_steps}, CFG "
          f"{a.guidance:g}, torch threads 1, torch {torch.__version__}", flush=True)
    rows = frame_sweep(a)
    result = {"setup": {k: getattr(a, k) for k in (
        "size", "num_steps", "guidance", "prompts", "group", "reward", "steps", "warmup",
        "cmp_frames", "cmp_batch", "tree_steps", "repeats")},
        "job_vs_frames": rows, "growth": growth(rows),
        "sampler_vs_diffusers": sampler_vs_pipeline(a), "tree_vs_independent":
        tree_vs_independent(a)}
    g = result["growth"]["cpu_step_s"]
    span = f"job step, {rows[-1]['frames']} vs {rows[0]['frames']} frames"
    print(f"{span:<44} CPU time {g['ratio']:5.2f}x (log-log slope {g['loglog_slope']:.2f}; "
          f"{rows[-1]['frames'] / rows[0]['frames']:.1f}x the frames)")
    for key, name in (("sampler_vs_diffusers", "sampler vs diffusers <= 1.1x"),
                      ("tree_vs_independent", "tree NFE <= 0.5x independent")):
        r = result[key]
        print(f"goal {name}: {'met' if r['met'] else 'NOT met'} "
              f"({r.get('ratio', r.get('nfe_ratio')):.2f}x)")
    if not a.no_write:
        (DOCS / "video_gen_bench.json").write_text(json.dumps(result, indent=1) + "\n")
        drawn = not a.no_plot and plot(rows, DOCS / "video_gen_bench.png")
        print(f"wrote docs/video_gen_bench.json{' and docs/video_gen_bench.png' if drawn else ''}"
              f"{'' if drawn or a.no_plot else ' (no matplotlib: no plot)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
