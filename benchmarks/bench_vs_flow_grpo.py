"""One Flow-GRPO step, mmrl's diffusion job vs flow_grpo's own training loop, on the same tiny
SD3 pipeline, batch, group, steps and LoRA: step time and peak memory, as ratios mmrl / flow_grpo.

    # flow_grpo's public code, outside this repository (github:yifan123/flow_grpo), and its one
    # config dependency that mmrl's stack lacks, installed into a folder outside the repository:
    pip install --no-deps --target /tmp/fg_deps ml_collections
    .venv/bin/python benchmarks/bench_vs_flow_grpo.py --flow-grpo-root /path/to/flow_grpo \\
        --deps /tmp/fg_deps [--prompts 2 --group 4 --num-steps 6 --size 16 --steps 8 --rounds 2] \
        [--write-docs]

flow_grpo side: ``scripts/train_sd3.py``'s ``main()`` run unchanged in its own process, from the
root given (its ``config/base.py`` config, with the fields below set in a generated config file
under ``--work``); ``wandb`` is a no-op stub module written under ``--work`` (never installed);
``flow_grpo.rewards.multi_score`` is replaced by the same ``prompt_color`` reward mmrl uses.
mmrl side: ``mmrl.diffusion.job.run`` in its own process. Nothing of flow_grpo is imported by
mmrl or copied into this repository.

Shared settings: the tiny SD3 of ``flow_bench_common`` with a tiny T5 (flow_grpo requires
``text_encoder_3``; its T5 length is fixed at 128, so mmrl's ``max_sequence_length`` is 128 too),
``--size`` px, fp32 on CPU, CFG ``--guidance`` in sampling and training with the same gradient
(flow_grpo's ``train_sd3.py`` detaches the unconditional prediction; mmrl runs
``diffusion.cfg_uncond_grad: false``, the unconditional rows in a no-grad forward), ``--num-steps``
SDE steps (flow_grpo kind, noise level 0.7), the first T-1 trained (flow_grpo:
``timestep_fraction`` with int(T * f) = T - 1), one optimizer step per rollout over every sample
and trained step (flow_grpo: one micro-batch of all samples, a forward per step, gradients
accumulated over the steps; mmrl: ``t_chunk=1``, ``micro_batch_size`` = all samples, one
mini-batch), LoRA r32 / alpha 64 (flow_grpo's fixed values) on the transformer, AdamW lr 3e-4, beta
``--beta`` (0: no reference forward).

Measured the same way on both sides: a step is the time between the starts of consecutive
rollouts (flow_grpo: its sampler's ``set_epoch`` call at the start of each epoch's sampling;
mmrl: ``DiffusionGroupPolicy.rollout``), so it holds sampling, decoding, reward, advantages and
the update; the first ``--warmup`` steps are not timed (flow_grpo's epoch-0 evaluation runs
before them); ``--rounds`` processes per side, alternating flow_grpo / mmrl, each timing
``--steps`` steps; the median of all timed steps is reported
in wall time and in the process's CPU time (``time.process_time``, threads included), and the
per-round CPU medians whose ratio, mmrl's round i over flow_grpo's round i, pairs runs made
under about the same load: the primary figure on a shared machine (wall time moves 2-3x with
other processes' load within one process, CPU time by ~20 % between rounds), with the
transformer rows per step
(NFE, counted on both sides by the same patch of ``SD3Transformer2DModel.forward``) to show that
both sides do the same work. Peak memory: the highest RSS above the RSS at the
start of the timed steps, sampled every millisecond (``bench_vs_trl.PeakRSS``), and the highest
RSS itself. CPU timings on a shared machine are noisy: both sides run under the same load, one
after the other; re-run for a second opinion.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PROMPTS = HERE.parent / "configs" / "diffusion" / "prompts"

WANDB_STUB = '''"""No-op stand-in for wandb (written by mmrl's bench_vs_flow_grpo.py)."""
def init(*a, **k): return None
def log(*a, **k): return None
class Image:
    def __init__(self, *a, **k): pass
'''


class Clock:
    """Timestamps at the start of each rollout, the peak RSS and the transformer rows (NFE) from
    the end of the warm-up on."""

    def __init__(self, steps: int, warmup: int):
        from bench_vs_trl import PeakRSS
        from diffusers import SD3Transformer2DModel
        self.stamps, self.steps, self.warmup, self.mem = [], steps, warmup, PeakRSS()
        self.rows, self.counting = 0, False
        forward, clock = SD3Transformer2DModel.forward, self

        def counted(model, *args, **kwargs):
            if clock.counting:
                clock.rows += int(kwargs.get("hidden_states", args[0] if args else None).shape[0])
            return forward(model, *args, **kwargs)

        SD3Transformer2DModel.forward = counted

    def tick(self) -> bool:
        """Record a rollout start; True once the timed steps are over."""
        self.stamps.append((time.perf_counter(), time.process_time()))
        if len(self.stamps) == self.warmup + 1:
            self.counting = True
            self.mem.__enter__()
        if len(self.stamps) == self.warmup + self.steps + 1:
            self.counting = False
            self.mem.__exit__()
            return True
        return False

    def result(self, side: str) -> dict:
        import resource
        s = self.stamps[self.warmup:]
        times = [b[0] - a[0] for a, b in zip(s, s[1:])]
        cpu = [b[1] - a[1] for a, b in zip(s, s[1:])]
        return {"side": side, "step_s": statistics.median(times), "steps_s": times,
                "cpu_step_s": statistics.median(cpu), "cpu_steps_s": cpu,
                "nfe_per_step": self.rows / self.steps,
                "peak_delta_mb": self.mem.delta_mb, "peak_rss_mb": self.mem.peak / 2**20,
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def rewards_fn():
    """``prompt_color`` on images in [0, 1], as both sides call it."""
    from mmrl.rewards import load
    return load("prompt_color")


def run_flow_grpo(a) -> dict:
    import importlib.util

    import numpy as np
    work = Path(a.work)
    (work / "stubs" / "wandb").mkdir(parents=True, exist_ok=True)
    (work / "stubs" / "wandb" / "__init__.py").write_text(WANDB_STUB)
    data = work / "fg_dataset"
    data.mkdir(exist_ok=True)
    (data / "train.txt").write_text((PROMPTS / "color_train.txt").read_text())
    (data / "test.txt").write_text("".join(p + "\n" for p in
                                           (PROMPTS / "color_eval.txt").read_text().split("\n")[:4]))
    n = a.prompts * a.group
    cfg_file = work / "fg_config.py"
    cfg_file.write_text(textwrap.dedent(f"""
        import importlib.util, os
        spec = importlib.util.spec_from_file_location("fg_base", os.path.join({str(a.flow_grpo_root)!r}, "config", "base.py"))
        base = importlib.util.module_from_spec(spec); spec.loader.exec_module(base)
        def get_config():
            c = base.get_config()
            c.logdir = {str(work / 'fg_logs')!r}; c.save_dir = {str(work / 'fg_save')!r}
            c.seed = 0; c.mixed_precision = "no"; c.allow_tf32 = False; c.use_lora = True
            c.save_freq = 10**9; c.eval_freq = 10**9
            c.dataset = {str(data)!r}; c.prompt_fn = "general_ocr"; c.resolution = {a.size}
            c.pretrained.model = {a.model!r}
            c.sample.num_steps = {a.num_steps}; c.sample.eval_num_steps = {a.num_steps}
            c.sample.guidance_scale = {a.guidance}; c.sample.noise_level = 0.7
            c.sample.train_batch_size = {n}; c.sample.num_image_per_prompt = {a.group}
            c.sample.num_batches_per_epoch = 1; c.sample.test_batch_size = 4
            c.train.batch_size = {n}; c.train.gradient_accumulation_steps = 1
            c.train.timestep_fraction = {(a.num_steps - 1) / a.num_steps + 1e-6}
            c.train.cfg = {a.guidance > 1}; c.train.beta = {a.beta}; c.train.learning_rate = 3e-4
            c.train.num_inner_epochs = 1; c.train.ema = False
            c.reward_fn = {{"prompt_color": 1.0}}
            return c
    """))
    sys.path[:0] = [str(work / "stubs"), str(a.flow_grpo_root)] + ([a.deps] if a.deps else [])
    os.chdir(a.flow_grpo_root)
    import flow_grpo.rewards
    score = rewards_fn()

    def multi_score(device, score_dict):
        def fn(images, prompts, metadata, only_strict=True):
            r = score(images.float().cpu(), list(prompts)).numpy()
            return {"avg": r, "prompt_color": r}, {}
        return fn

    flow_grpo.rewards.multi_score = multi_score
    spec = importlib.util.spec_from_file_location(
        "fg_train_sd3", Path(a.flow_grpo_root) / "scripts" / "train_sd3.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    clock = Clock(a.steps, a.warmup)
    set_epoch = train.DistributedKRepeatSampler.set_epoch

    class Done(Exception):
        pass

    def timed_set_epoch(self, epoch):
        if clock.tick():
            raise Done
        return set_epoch(self, epoch)

    train.DistributedKRepeatSampler.set_epoch = timed_set_epoch
    train.FLAGS([sys.argv[0], f"--config={cfg_file}"])
    np.random.seed(0)
    try:
        train.main(None)
    except Done:
        pass
    return clock.result("flow_grpo")


def run_mmrl(a) -> dict:
    from mmrl.config.schema import config_from_dict
    from mmrl.diffusion.job import run
    from mmrl.diffusion.policy import DiffusionGroupPolicy
    n = a.prompts * a.group
    data = {
        "job": "diffusion",
        "algo": {"preset": "grpo", "advantage": "batch_std", "eps_low": 1e-4, "eps_high": 1e-4,
                 "adv_clip": 5.0, "beta": a.beta, "aggregation": "token_mean"},
        "train": {"steps": a.warmup + a.steps + 1, "prompts_per_step": a.prompts, "group_size": a.group,
                  "inner_epochs": 1, "num_mini_batches": 1, "micro_batch_size": n,
                  "t_chunk": 1, "lr": 3e-4, "weight_decay": 1e-4, "max_grad_norm": 1.0,
                  "seed": 0, "device": "cpu", "progress": False, "log_every": 10**6,
                  "output_dir": str(Path(a.work) / "mmrl_run"), "resume": "never",
                  "overwrite": True, "export": False},
        "diffusion": {"model": a.model, "pipeline": "sd3", "dtype": "float32",
                      "finetune": "lora", "lora_rank": 32, "lora_alpha": 64,
                      "max_sequence_length": 128, "height": a.size, "width": a.size,
                      "resolution_multiple": 1, "guidance_scale": a.guidance,
                      "cfg_uncond_grad": False,  # train_sd3.py detaches noise_pred_uncond
                      "num_steps": a.num_steps, "sampler": "full", "kind": "flow_grpo",
                      "noise_level": 0.7, "kl": "flow_grpo", "reward": "prompt_color",
                      "prompt_file": str(PROMPTS / "color_train.txt")},
    }
    clock = Clock(a.steps, a.warmup)
    rollout = DiffusionGroupPolicy.rollout

    def timed_rollout(self, *args, **kwargs):
        clock.tick()
        return rollout(self, *args, **kwargs)

    DiffusionGroupPolicy.rollout = timed_rollout
    run(config_from_dict(data, source="bench_vs_flow_grpo"))
    return clock.result("mmrl")


def combine(results) -> dict:
    """One side's rounds: medians over all timed steps, per-round medians, the largest peaks."""
    steps = [t for r in results for t in r["steps_s"]]
    cpu = [t for r in results for t in r["cpu_steps_s"]]
    return {"step_s": statistics.median(steps), "cpu_step_s": statistics.median(cpu),
            "round_cpu_s": [statistics.median(r["cpu_steps_s"]) for r in results],
            "nfe_per_step": results[0]["nfe_per_step"],
            "peak_delta_mb": max(r["peak_delta_mb"] for r in results),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}


def table(a, m: dict, f: dict, ratios: dict):
    """The markdown lines for docs/diffusion_train.md."""
    head = (f"{a.prompts} prompts x {a.group} images, T = {a.num_steps} (T-1 trained), "
            f"{a.size}x{a.size} px, CFG {a.guidance:g}, beta {a.beta:g}, LoRA r32/a64, fp32 CPU, "
            f"{a.threads} torch thread(s); {a.rounds} alternating rounds per side, each "
            f"{a.steps} timed steps after {a.warmup} warm-up")
    rows = [("CPU time per step (s, median)", "cpu_step_s", "cpu_time_ratio", "{:.3f}"),
            ("wall time per step (s, median)", "step_s", "step_time_ratio", "{:.3f}"),
            ("peak RSS above the step start (MB)", "peak_delta_mb", "peak_delta_mem_ratio",
             "{:.1f}"),
            ("peak RSS (MB)", "peak_rss_mb", "peak_rss_ratio", "{:.0f}")]
    out = [head, "", "| | mmrl | flow_grpo | mmrl / flow_grpo |", "|---|---|---|---|"]
    for name, key, ratio, fmt in rows:
        out.append(f"| {name} | {fmt.format(m[key])} | {fmt.format(f[key])} | "
                   f"{ratios[ratio]:.2f}x |")
    rounds = " / ".join(f"{x:.3f}" for x in m["round_cpu_s"]), \
        " / ".join(f"{x:.3f}" for x in f["round_cpu_s"])
    out.insert(5, f"| CPU time per step, per round (s, median) | {rounds[0]} | {rounds[1]} | "
                  f"{ratios['paired_cpu_time_ratio']:.2f}x (mean of the rounds' ratios) |")
    out.append(f"| transformer rows per step (NFE) | {m['nfe_per_step']:.0f} | "
               f"{f['nfe_per_step']:.0f} | {m['nfe_per_step'] / f['nfe_per_step']:.2f}x |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--flow-grpo-root", required=True,
                   help="a checkout of github:yifan123/flow_grpo (outside this repository)")
    p.add_argument("--deps", default=None,
                   help="a folder with ml_collections (pip install --no-deps --target DIR)")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=6, help="denoising steps T")
    p.add_argument("--size", type=int, default=16, help="image side (pixels)")
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=8, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--rounds", type=int, default=2,
                   help="processes per side, alternating flow_grpo / mmrl")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="/tmp/mmrl-bench-vs-flow-grpo")
    p.add_argument("--write-docs", action="store_true",
                   help="replace the bench_vs_flow_grpo block of docs/diffusion_train.md")
    p.add_argument("--side", choices=["mmrl", "flow_grpo"], help="(internal) run one side")
    p.add_argument("--model", help="(internal) the shared pipeline folder")
    a = p.parse_args(argv)
    a.flow_grpo_root = str(Path(a.flow_grpo_root).resolve())
    if not (Path(a.flow_grpo_root) / "scripts" / "train_sd3.py").is_file():
        raise SystemExit(f"--flow-grpo-root {a.flow_grpo_root}: no scripts/train_sd3.py there; "
                         f"expected a checkout of github:yifan123/flow_grpo")
    if a.side:
        import torch
        torch.set_num_threads(a.threads)
        torch.manual_seed(0)
        print(json.dumps(run_mmrl(a) if a.side == "mmrl" else run_flow_grpo(a)))
        return 0
    from flow_bench_common import build_color_sd3
    Path(a.work).mkdir(parents=True, exist_ok=True)
    a.model = build_color_sd3(Path(a.work) / f"tiny_sd3_t5_{a.size}", a.size, t5=True)
    runs = {"flow_grpo": [], "mmrl": []}
    for _ in range(a.rounds):  # alternating sides: both see the same mix of machine load
        for side in ("flow_grpo", "mmrl"):
            cmd = [sys.executable, __file__, "--side", side, "--model", a.model,
                   "--flow-grpo-root", a.flow_grpo_root, "--prompts", str(a.prompts),
                   "--group", str(a.group), "--num-steps", str(a.num_steps), "--size",
                   str(a.size), "--guidance", str(a.guidance), "--beta", str(a.beta), "--steps",
                   str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads),
                   "--work", a.work] + (["--deps", a.deps] if a.deps else [])
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
            if out.returncode:
                print(out.stderr[-4000:], file=sys.stderr)
                return 1
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[side][-1]), flush=True)
    res = {side: combine(r) for side, r in runs.items()}
    m, f = res["mmrl"], res["flow_grpo"]
    paired = [a / b for a, b in zip(m["round_cpu_s"], f["round_cpu_s"])]
    ratios = {"cpu_time_ratio": m["cpu_step_s"] / f["cpu_step_s"],
              "paired_cpu_time_ratio": statistics.fmean(paired),
              "step_time_ratio": m["step_s"] / f["step_s"],
              "peak_delta_mem_ratio": m["peak_delta_mb"] / max(f["peak_delta_mb"], 1e-9),
              "peak_rss_ratio": m["peak_rss_mb"] / f["peak_rss_mb"]}
    print(json.dumps({**ratios, "prompts": a.prompts, "group": a.group,
                      "num_steps": a.num_steps, "size": a.size, "guidance": a.guidance,
                      "beta": a.beta}))
    if a.write_docs:
        from flow_bench_common import write_docs_block
        write_docs_block(HERE.parent / "docs" / "diffusion_train.md", "bench_vs_flow_grpo",
                         table(a, m, f, ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
