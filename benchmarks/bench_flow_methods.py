"""Flow-GRPO and its successors side by side: held-out reward vs transformer evaluations (NFE)
and vs wall time, on the prompt-following colour task, tiny SD3, CPU.

    # every method of flow_methods.yaml, 3 seeds (~20 min on 2 shared cores); writes
    # docs/flow_methods.{png,json} and, with --write-docs, the table in docs/diffusion_train.md
    .venv/bin/python benchmarks/bench_flow_methods.py --write-docs
    .venv/bin/python benchmarks/bench_flow_methods.py --quick    # 1 seed, 6 steps: a smoke run
    # only new methods, joined to the committed runs of the others:
    .venv/bin/python benchmarks/bench_flow_methods.py --only nft,awm \
        --merge docs/flow_methods.json --write-docs
    .venv/bin/python benchmarks/bench_flow_methods.py --report docs/flow_methods.json  # no runs

Task: the ``prompt_color`` reward (``-||mean RGB - the colour the prompt names|| / sqrt3``, no
weights) on ``configs/diffusion/prompts/color_train.txt``; the evaluation is the job's own ODE
evaluation on the 16 held-out colour-object pairs of ``color_eval.txt`` (``eval.jsonl``'s
``reward_mean``), at step 0, every ``diffusion.eval_every`` steps and after the last. Model: the
tiny random SD3 pipeline of :func:`mmrl.diffusion.models.sd3.build_tiny_sd3` (8x8 images) with
its VAE's last conv scaled so that colours can move (``flow_bench_common``), LoRA r4.

The methods are data (``benchmarks/flow_methods.yaml``: dotted config overrides per method, on a
shared ``base``), so a new objective or sampler is a new entry there or a ``--method`` flag.

Measured per run, outside the job's code (patched in this process only):
- NFE: rows through the SD3 transformer's ``forward`` during training (rollout sampling and the
  loss's re-scoring forwards, the reference's and any old model's too), not during evaluation.
  Deterministic for a method and config, hence the primary x-axis.
- time: training wall time (seconds between the end of one evaluation and the start of the
  next, summed), and the process's CPU time over the same spans (one torch thread: steadier
  than wall time under other processes' load). Noisy on a shared machine: read them as a rough
  second opinion.

Printed: a markdown table per method (final reward mean and min..max over seeds, total NFE,
time) and the ratios ``NFE to reach the reference's final mean reward / the reference's total
NFE`` (and the same in time), the crossing found by linear interpolation between evaluations
of the seed-mean curve. Written: a PNG (two panels, mean and min..max band over seeds) and the
raw points as JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
PROMPTS = ROOT / "configs" / "diffusion" / "prompts"


def base_config(model: str, out: str, size: int) -> dict:
    """The benchmark's config before ``base`` and the method's overrides."""
    return {
        "job": "diffusion",
        "algo": {"preset": "grpo"},
        "train": {"steps": 30, "prompts_per_step": 4, "group_size": 4, "lr": 1e-2, "seed": 0,
                  "device": "cpu", "progress": False, "output_dir": out, "resume": "never",
                  "overwrite": True, "log_every": 10**6, "export": False},
        "diffusion": {"model": model, "pipeline": "auto", "dtype": "float32", "lora_rank": 4,
                      "lora_alpha": 8, "max_sequence_length": 8, "height": size, "width": size,
                      "resolution_multiple": 1, "guidance_scale": 1.0, "num_steps": 6,
                      "eval_num_steps": 6, "eval_every": 5, "eval_batch_size": 16,
                      "reward": "prompt_color",
                      "prompt_file": str(PROMPTS / "color_train.txt"),
                      "eval_prompt_file": str(PROMPTS / "color_eval.txt")},
    }


def load_methods(path: str, only: Optional[str], extra: List[str]):
    """``(base_overrides, {name: overrides})`` from the YAML file, ``--only`` and ``--method``."""
    import yaml
    data = yaml.safe_load(Path(path).read_text())
    methods = {k: list(v or []) for k, v in (data.get("methods") or {}).items()}
    for item in extra:
        name, _, rest = item.partition("=")
        if not name or not rest:
            raise SystemExit(f"--method {item!r}: expected 'name=key=value key=value ...'")
        methods[name] = rest.split()
    if only:
        want = [m.strip() for m in only.split(",") if m.strip()]
        missing = [m for m in want if m not in methods]
        if missing:
            raise SystemExit(f"--only: unknown method(s) {missing}; known: {sorted(methods)}")
        methods = {m: methods[m] for m in want}
    return list(data.get("base") or []), methods


class Meter:
    """Counts transformer rows and training time; records one point per evaluation."""

    def __init__(self):
        self.nfe, self.train_s, self.cpu_s, self.counting, self.points = 0, 0.0, 0.0, True, []
        self._since = self._cpu_since = None

    @contextlib.contextmanager
    def installed(self):
        from diffusers import SD3Transformer2DModel

        from mmrl.diffusion.evaluate import Evaluator
        forward, evaluate, meter = SD3Transformer2DModel.forward, Evaluator.__call__, self

        def counted_forward(model, *args, **kwargs):
            if meter.counting:
                h = kwargs.get("hidden_states", args[0] if args else None)
                meter.nfe += int(h.shape[0])
            return forward(model, *args, **kwargs)

        def timed_eval(evaluator, step):
            now, cpu = time.perf_counter(), time.process_time()
            if meter._since is not None:
                meter.train_s += now - meter._since
                meter.cpu_s += cpu - meter._cpu_since
            meter.counting = False
            try:
                record = evaluate(evaluator, step)
            finally:
                meter.counting = True
            meter.points.append({"step": step, "nfe": meter.nfe, "time": meter.train_s,
                                 "cpu": meter.cpu_s, "reward": record["reward_mean"]})
            meter._since, meter._cpu_since = time.perf_counter(), time.process_time()
            return record

        SD3Transformer2DModel.forward, Evaluator.__call__ = counted_forward, timed_eval
        try:
            yield self
        finally:
            SD3Transformer2DModel.forward, Evaluator.__call__ = forward, evaluate


def run_one(model: str, work: Path, size: int, overrides: List[str]) -> List[dict]:
    """Train one (method, seed) with the diffusion job in this process; its evaluation points."""
    from mmrl.config.core import apply_overrides
    from mmrl.config.schema import config_from_dict
    from mmrl.diffusion.job import run

    data = base_config(model, str(work), size)
    problems = apply_overrides(data, overrides)
    if problems:
        raise SystemExit("; ".join(problems))
    config = config_from_dict(data, source="bench_flow_methods")
    with Meter().installed() as meter:
        run(config)
    return meter.points


def seed_mean(runs: List[List[dict]]) -> List[dict]:
    """Evaluation points averaged over seeds (the k-th evaluation of every seed)."""
    n = min(len(r) for r in runs)
    out = []
    for k in range(n):
        pts = [r[k] for r in runs]
        rewards = [p["reward"] for p in pts]
        out.append({"step": pts[0]["step"], "nfe": statistics.fmean(p["nfe"] for p in pts),
                    "time": statistics.fmean(p["time"] for p in pts),
                    "cpu": statistics.fmean(p.get("cpu", float("nan")) for p in pts),
                    "reward": statistics.fmean(rewards), "lo": min(rewards), "hi": max(rewards)})
    return out


def reach(curve: List[dict], target: float, key: str) -> Optional[float]:
    """The first ``key`` (nfe or time) at which the curve reaches ``target`` (linear between
    evaluations), or None if it never does."""
    for a, b in zip(curve, curve[1:]):
        if b["reward"] >= target:
            if a["reward"] >= target:
                return a[key]
            f = (target - a["reward"]) / (b["reward"] - a["reward"])
            return a[key] + f * (b[key] - a[key])
    return curve[0][key] if len(curve) == 1 and curve[0]["reward"] >= target else None


def report(curves: Dict[str, List[dict]], reference: str) -> List[str]:
    """The markdown table lines (also printed): per method the seed-mean evaluation at step 0
    and at the end, cost, and the NFE / time ratios to reach (a) the reference's final reward
    and (b) 90 % of the reference's gain (step 0 -> final; less sensitive to where a curve that
    has plateaued happens to end)."""
    ref = curves.get(reference)
    lines = ["| method | eval reward, step 0 | final eval reward: mean (min..max over seeds) "
             "| training NFE | training time (s): wall, CPU | NFE to ref. final / ref. NFE "
             "| wall, CPU time to ref. final / ref. time | NFE to 90 % of ref. gain / ref. NFE |",
             "|---|---|---|---|---|---|---|---|"]
    for name, c in curves.items():
        first, last = c[0], c[-1]
        cells = [name, f"{first['reward']:.4f}",
                 f"{last['reward']:.4f} ({last['lo']:.4f}..{last['hi']:.4f})",
                 f"{last['nfe']:.0f}", f"{last['time']:.1f}, {last['cpu']:.1f}"]
        if ref is None:
            cells += ["-", "-", "-"]
        else:
            final = ref[-1]["reward"]
            gain90 = ref[0]["reward"] + 0.9 * (final - ref[0]["reward"])
            ratio = {}
            for target, key in ((final, "nfe"), (final, "time"), (final, "cpu"), (gain90, "nfe")):
                hit = reach(c, target, key)
                ratio[key, target] = ("not reached" if hit is None
                                      else f"{hit / ref[-1][key]:.2f}x")
            cells += [ratio["nfe", final], f"{ratio['time', final]}, {ratio['cpu', final]}",
                      ratio["nfe", gain90]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(curves: Dict[str, List[dict]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, c in curves.items():
        for ax, key in zip(axes, ("nfe", "time")):
            x = [p[key] for p in c]
            line, = ax.plot(x, [p["reward"] for p in c], marker="o", ms=3, label=name)
            ax.fill_between(x, [p["lo"] for p in c], [p["hi"] for p in c], alpha=0.15,
                            color=line.get_color())
    axes[0].set_xlabel("training transformer evaluations (NFE, rows)")
    axes[1].set_xlabel("training wall time, s (shared machine: noisy)")
    for ax in axes:
        ax.set_ylabel("held-out eval reward (prompt_color)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods-file", default=str(ROOT / "benchmarks" / "flow_methods.yaml"))
    p.add_argument("--only", default=None, help="comma-separated subset of the methods")
    p.add_argument("--method", action="append", default=[],
                   help="add a method: 'name=key=value key=value ...' (config overrides)")
    p.add_argument("--set", nargs="*", default=[],
                   help="overrides for every method, after base (e.g. train.steps=60)")
    p.add_argument("--reference", default="flow_grpo", help="the method ratios divide by")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--size", type=int, default=8, help="image side of the tiny SD3 (pixels)")
    p.add_argument("--vae-gain", type=float, default=4.0,
                   help="multiply the tiny VAE decoder's last conv by this (flow_bench_common)")
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 6 steps, evaluation every 3: a smoke run (~1 min)")
    p.add_argument("--work", default="/tmp/mmrl-bench-flow-methods",
                   help="the tiny pipeline and the runs' output folders")
    p.add_argument("--plot", default=None,
                   help="PNG (default: docs/flow_methods.png; --quick: WORK/quick.png)")
    p.add_argument("--json", default=None,
                   help="raw points (default: docs/flow_methods.json; --quick: WORK/quick.json)")
    p.add_argument("--report", default=None,
                   help="no runs: table, plot (and --write-docs) from a points JSON")
    p.add_argument("--merge", default=None,
                   help="a points JSON whose other methods join this run's (e.g. re-run only "
                        "new methods: --only nft,awm --merge docs/flow_methods.json)")
    p.add_argument("--write-docs", action="store_true",
                   help="replace the bench_flow_methods block of docs/diffusion_train.md")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: a shared machine's timings are noise otherwise)")
    args = p.parse_args(argv)
    where = Path(args.work) if args.quick else ROOT / "docs"
    args.plot = args.plot or str(where / ("quick.png" if args.quick else "flow_methods.png"))
    args.json = args.json or str(where / ("quick.json" if args.quick else "flow_methods.json"))
    if args.report:
        record = json.loads(Path(args.report).read_text())
    else:
        record = measure(args)
    publish(args, record)


def measure(args) -> dict:
    """Run every (method, seed); the record written as JSON (``runs``: points per seed)."""
    import torch
    from flow_bench_common import build_color_sd3
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    model = build_color_sd3(work / f"tiny_sd3_{args.size}_gain{args.vae_gain:g}", args.size,
                            args.vae_gain)
    base, methods = load_methods(args.methods_file, args.only, args.method)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    extra = args.set + (["train.steps=6", "diffusion.eval_every=3"] if args.quick else [])
    runs: Dict[str, List[List[dict]]] = {}
    failed: Dict[str, str] = {}
    for name, overrides in methods.items():
        for seed in seeds:
            start = time.perf_counter()
            try:
                pts = run_one(model, work / "runs" / f"{name}_seed{seed}", args.size,
                              base + overrides + extra + [f"train.seed={seed}"])
            except Exception as err:  # one broken method must not lose the others' numbers
                failed[name] = f"{type(err).__name__}: {err}"
                print(f"{name} seed {seed}: FAILED {failed[name]}", file=sys.stderr, flush=True)
                break
            runs.setdefault(name, []).append(pts)
            print(f"{name} seed {seed}: final eval reward {pts[-1]['reward']:.4f}, NFE "
                  f"{pts[-1]['nfe']}, train {pts[-1]['time']:.1f}s "
                  f"(run {time.perf_counter() - start:.0f}s)", flush=True)
    record = {"head": f"tiny SD3 {args.size}x{args.size} (VAE gain {args.vae_gain:g}), "
                      f"prompt_color, seeds {seeds}, torch threads {torch.get_num_threads()}; "
                      f"overrides `{' '.join(base + extra)}`",
              "methods": methods, "failed": failed,
              "runs": {k: v for k, v in runs.items() if k not in failed}}
    if args.merge:  # earlier runs of the methods not re-run now (same settings assumed)
        old = json.loads(Path(args.merge).read_text())
        record["methods"] = {**old["methods"], **record["methods"]}
        record["runs"] = {**old["runs"], **record["runs"]}
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=1))
    print(f"points: {json_path}")
    return record


def publish(args, record: dict) -> None:
    """Print the table and ratios, draw the plot, and with --write-docs update the docs."""
    curves = {name: seed_mean(r) for name, r in record["runs"].items()}
    lines = [record["head"] + f"; reference: {args.reference}", ""]
    lines += report(curves, args.reference)
    lines += [f"FAILED {name}: {err}" for name, err in record["failed"].items()]
    print("\n" + "\n".join(lines))
    if curves:
        plot(curves, Path(args.plot), "tiny SD3, prompt_color, held-out eval (mean over seeds, "
                                      "min..max band)")
        print(f"plot: {args.plot}")
    if args.write_docs:
        from flow_bench_common import write_docs_block
        write_docs_block(ROOT / "docs" / "diffusion_train.md", "bench_flow_methods", lines)


if __name__ == "__main__":
    main()
