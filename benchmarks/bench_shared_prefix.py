"""Shared-prefix sampling and training vs TRL's GRPOTrainer and vs mmrl's unshared path, with
prompts of thousands of visual tokens.

    .venv/bin/python benchmarks/bench_shared_prefix.py --peers /work/bench_peers:.peers \\
        [--tokens 2000 --prompts 2 --group 8 --new-tokens 64 --steps 3] [--plot PATH]

Model: a Qwen2.5-VL-architecture model built offline (``build_tiny_qwen_vl``, hidden 256, 4
layers, random weights), loaded by path on every side. A prompt is one random square image of
side 28·k pixels (k = round(sqrt(tokens)): one merged visual token per 28x28 pixels, so ~k^2
image tokens) and the question of ``bench_vs_trl.py``. Every side: full fine-tuning (vision tower
included), AdamW, beta 0, one update per rollout, temperature 1, the reward of
``bench_vs_trl.py``, and exactly ``--new-tokens`` tokens per completion: the end tokens
(``<|im_end|>``, ``<|endoftext|>``, the tokenizer's EOS) are banned from sampling on every side,
next to the vision placeholders each side bans anyway (TRL: ``generation_kwargs.suppress_tokens``;
mmrl: the policy's banned ids), so no completion stops early; tokens per step are printed.
TRL keeps its ``GRPOConfig`` defaults otherwise, gradient checkpointing included (TRL's default:
less memory, one more forward); mmrl runs without it unless ``--checkpointing``.

1. Main point (``--tokens``, ``--prompts``, ``--group``): TRL 1.16 ``GRPOTrainer``, mmrl
   ``shared_prefix=True`` and mmrl ``shared_prefix=False``, each in its own process: median
   step time over steps 2..N, peak RSS rise during those steps (``bench_vs_trl.PeakRSS``),
   generation time (TRL: ``_generate_and_score_completions``; mmrl: ``policy.rollout``) and, for
   mmrl, the training pass alone on the last rollout (``train_s``: ``policy.logp`` of all rows,
   forward + backward, median of ``--train-reps`` after one untimed). Ratios printed.
2. Scaling (``--scale-tokens`` at G = ``--group``, ``--scale-groups`` at ``--tokens``;
   ``--no-scaling`` skips it): mmrl shared vs unshared, the training pass alone in a fresh
   process per side on ``--scale-prompts`` prompts with random ``--new-tokens``-token responses
   (no sampling: the pass's cost does not depend on the tokens): forward + backward
   (``train_s``, ``train_peak_mb``: RSS rise) then forward alone under no_grad (``fwd_s``).
   Above ``--backward-max-tokens`` the unshared side runs the forward alone (its backward
   would take too long on a small CPU machine); compare ``fwd_s`` there.

trl and ``datasets`` are benchmark-only dependencies: ``--peers`` (``os.pathsep``-separated
folders, default: the repository's ``.peers``) is prepended to ``sys.path`` in the TRL process.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_vs_trl import QUESTION, PeakRSS, reward_letters, trl_step_clock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SIDES = ("trl", "shared", "unshared")


def image_side(tokens: int) -> int:
    """Side in pixels of a square image of ~``tokens`` merged visual tokens (28x28 each)."""
    return 28 * max(2, round(math.sqrt(tokens)))


def _images(n: int, side: int):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
            for _ in range(n)]


def _end_ids(proc, model) -> list:
    """Every id that ends a completion on either side: mmrl's adapter end tokens, TRL's
    (generation config + tokenizer EOS)."""
    from mmrl.video.models import adapter_for
    ids = set(adapter_for(model.config.model_type).end_token_ids(proc.tokenizer))
    gen = model.generation_config.eos_token_id
    ids.update([gen] if isinstance(gen, int) else list(gen or []))
    if proc.tokenizer.eos_token_id is not None:
        ids.add(proc.tokenizer.eos_token_id)
    return sorted(ids)


def run_mmrl(a) -> dict:
    import torch

    from mmrl.video.policy import VLMPolicy, load_vlm
    torch.manual_seed(0)
    model, proc = load_vlm(a.model, finetune="full", freeze_vision=False,
                           gradient_checkpointing=a.checkpointing)
    pol = VLMPolicy(model, proc, max_new_tokens=a.new_tokens, shared_prefix=a.side == "shared")
    # end tokens banned like the vision placeholders: every completion is new_tokens long
    pol.banned = torch.tensor(sorted(set(pol.banned.tolist()) | set(_end_ids(proc, model))))
    msgs = [[{"role": "user", "content": [{"type": "image", "image": im},
                                          {"type": "text", "text": QUESTION}]}]
            for im in _images(a.prompts, image_side(a.tokens))]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    out = {"side": a.side, "tokens_target": a.tokens, "prompts": a.prompts, "group": a.group,
           "new_tokens": a.new_tokens, "checkpointing": a.checkpointing}
    if a.train_only:
        ro = _random_rollout(pol, msgs, a.group, a.new_tokens)
        if not a.forward_only:
            out.update(_pass(pol, opt, ro, 1, backward=True, warm=False))
        out.update(_pass(pol, opt, ro, 1, backward=False, warm=False))
    else:
        ro = _steps(pol, opt, msgs, a, out)
        if a.train_reps:
            out.update(_pass(pol, opt, ro, a.train_reps, backward=True, warm=True))
    cache = ro.data["prompt_cache"]
    out.update(prompt_len=int(cache.ids.shape[1]),
               image_tokens=int((cache.ids[0] == model.config.image_token_id).sum()),
               completion_tokens=int(ro.mask.sum()),
               params=sum(p.numel() for p in model.parameters()))
    return out


def _steps(pol, opt, msgs, a, out: dict):
    """``--steps`` GRPO steps (the first untimed) -> the last rollout; fills ``out``."""
    import torch

    from mmrl.algo.losses import PolicyLoss
    from mmrl.train.loop import LoopSettings, train_step
    meta, prompts = [{"messages": m} for m in msgs], [QUESTION] * len(msgs)
    loss_fn, gen = PolicyLoss("grpo"), torch.Generator().manual_seed(0)
    fn = lambda s, p, m: torch.tensor(reward_letters(s))  # noqa: E731
    settings = LoopSettings(group_size=a.group)
    rollouts, gen_times, rollout = [], [], pol.rollout

    def timed_rollout(*args, **kw):
        tic = time.perf_counter()
        rollouts[:] = [rollout(*args, **kw)]
        gen_times.append(time.perf_counter() - tic)
        return rollouts[0]
    pol.rollout = timed_rollout
    times, tokens = [], []
    train_step(pol, opt, loss_fn, fn, prompts, meta, settings, gen)  # warm-up
    with PeakRSS() as mem:
        for _ in range(a.steps - 1):
            tic = time.perf_counter()
            m = train_step(pol, opt, loss_fn, fn, prompts, meta, settings, gen)
            times.append(time.perf_counter() - tic)
            tokens.append(m["tokens"])
    out.update(step_s=statistics.median(times), peak_mb=mem.delta_mb,
               gen_s=statistics.median(gen_times[1:]), tokens_per_step=statistics.mean(tokens))
    return rollouts[0]


def _random_rollout(pol, msgs, group: int, new_tokens: int):
    """A rollout of ``group`` uniformly random ``new_tokens``-token responses per prompt (never
    a banned token), without sampling: the training pass's cost does not depend on which
    tokens they are."""
    import torch

    from mmrl.train.rollout import Rollout
    cache, kept = pol.encode_prompts(msgs)
    B = len(kept) * group
    ok = torch.ones(pol.model.get_output_embeddings().out_features, dtype=torch.bool)
    ok[pol.banned] = False
    vocab = ok.nonzero().flatten()
    g = torch.Generator().manual_seed(0)
    resp = vocab[torch.randint(len(vocab), (B, new_tokens), generator=g)]  # [B, T]
    groups = torch.arange(len(kept)).repeat_interleave(group)  # [B]
    return Rollout([""] * B, [QUESTION] * B, [{}] * B, groups,
                   torch.ones(B, new_tokens, dtype=torch.bool),
                   {"prompt_index": groups, "response": resp, "prompt_cache": cache})


def _pass(pol, opt, ro, reps: int, backward: bool, warm: bool) -> dict:
    """``logp`` of all rows: forward + backward (``train_s``) or forward alone under no_grad
    (``fwd_s``); median of ``reps`` (after an untimed one when ``warm``). ``train_peak_mb``
    / ``fwd_peak_mb``: the RSS rise while the timed ones run (meaningful in a fresh process
    only: after earlier passes the allocator reuses what it holds)."""
    import torch
    rows, T = torch.arange(len(ro)), ro.mask.shape[1]

    def once():
        opt.zero_grad(set_to_none=True)
        tic = time.perf_counter()
        if backward:
            pol.logp(ro, rows, 0, T).sum().backward()
        else:
            with torch.no_grad():
                pol.logp(ro, rows, 0, T)
        return time.perf_counter() - tic
    if warm:
        once()
    with PeakRSS() as mem:
        times = [once() for _ in range(reps)]
    key = "train" if backward else "fwd"
    return {f"{key}_s": statistics.median(times), f"{key}_peak_mb": mem.delta_mb}


def run_trl(a) -> dict:
    sys.path[:0] = [p for p in a.peers.split(os.pathsep) if p]
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import GRPOConfig, GRPOTrainer
    torch.manual_seed(0)
    proc = AutoProcessor.from_pretrained(a.model)
    model = AutoModelForImageTextToText.from_pretrained(a.model, dtype=torch.float32)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": QUESTION}]}], "image": im}
        for im in _images(a.prompts, image_side(a.tokens))] * (a.steps + 1))
    times, lengths, gen_times, mem = [], [], [], PeakRSS()

    class Clock(trl_step_clock(times, mem)):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs and state.global_step > 1:
                lengths.append(logs["completions/mean_length"])

    ban = sorted({model.config.image_token_id, model.config.video_token_id,
                  model.config.vision_start_token_id, model.config.vision_end_token_id,
                  *_end_ids(proc, model)})
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.prompts * a.group,
                     num_generations=a.group, max_completion_length=a.new_tokens,
                     max_steps=a.steps, learning_rate=1e-5, beta=0.0, temperature=1.0,
                     use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
                     bf16=False, seed=0, shuffle_dataset=False,
                     generation_kwargs={"suppress_tokens": ban})
    trainer = GRPOTrainer(model=model, reward_funcs=reward_letters, args=cfg, train_dataset=ds,
                          processing_class=proc, callbacks=[Clock()])
    generate = trainer._generate_and_score_completions

    def timed_generate(*args, **kw):
        tic = time.perf_counter()
        res = generate(*args, **kw)
        gen_times.append(time.perf_counter() - tic)
        return res
    trainer._generate_and_score_completions = timed_generate
    trainer.train()
    mem.__exit__()
    return {"side": "trl", "tokens_target": a.tokens, "prompts": a.prompts, "group": a.group,
            "new_tokens": a.new_tokens, "step_s": statistics.median(times),
            "peak_mb": mem.delta_mb, "gen_s": statistics.median(gen_times[1:]),
            "tokens_per_step": statistics.mean(lengths) * a.prompts * a.group}


def _run_side(a, side: str, tokens: int, group: int, prompts: int, train_only: bool = False,
              forward_only: bool = False) -> dict:
    """One side in its own process; its JSON line (also printed)."""
    cmd = [sys.executable, __file__, "--side", side, "--model", a.model, "--tokens", str(tokens),
           "--prompts", str(prompts), "--group", str(group), "--new-tokens",
           str(a.new_tokens), "--steps", str(a.steps), "--train-reps", str(a.train_reps),
           "--peers", a.peers, "--threads", str(a.threads)]
    cmd += ["--checkpointing"] if a.checkpointing and side != "trl" else []
    cmd += (["--train-only"] if train_only else []) + (["--forward-only"] if forward_only else [])
    # glibc's default mmap threshold grows after frees, so a process keeps freed activations and
    # a second pass shows no RSS rise; a fixed 1 MiB threshold returns them (RSS tracks live
    # memory; every side pays the same page faults)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    tic = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"side {side} (tokens {tokens}, G {group}) failed; see above")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - tic
    print(json.dumps(res), flush=True)
    return res


def _ratio(x: dict, y: dict, key: str):
    return x[key] / y[key] if key in x and key in y and y[key] > 0 else None


def main_point(a) -> dict:
    """The three sides at ``--tokens``, G = ``--group``; their ratios."""
    res = {s: _run_side(a, s, a.tokens, a.group, a.prompts) for s in a.sides}
    sh = res["shared"]
    for other in (s for s in a.sides if s != "shared"):
        print(json.dumps({"ratio": f"shared/{other}",
                          **{k: _ratio(sh, res[other], k) for k in
                             ("step_s", "peak_mb", "gen_s", "train_s", "train_peak_mb")}}))
    return res


def scaling(a) -> list:
    """mmrl shared vs unshared training pass (fresh process, random responses, no sampling)
    over prompt lengths (G = --group) and over G (at --tokens), ``--scale-prompts`` prompts;
    unshared forward + backward is skipped above ``--backward-max-tokens`` (forward only)."""
    shapes = [(t, a.group) for t in a.scale_tokens] + [(a.tokens, g) for g in a.scale_groups
                                                       if g != a.group]
    rows = []
    for tokens, group in shapes:
        pair = {s: _run_side(a, s, tokens, group, a.scale_prompts, train_only=True,
                             forward_only=s == "unshared" and tokens > a.backward_max_tokens)
                for s in ("shared", "unshared")}
        print(json.dumps({"ratio": "shared/unshared", "tokens": tokens, "group": group,
                          **{k: _ratio(pair["shared"], pair["unshared"], k)
                             for k in ("train_s", "train_peak_mb", "fwd_s", "fwd_peak_mb")}}))
        rows.append(pair)
    return rows


def plot(rows: list, main: dict, group: int, tokens: int, path: str) -> None:
    """Training-pass time (forward + backward, and forward alone) vs prompt length (at G =
    ``group``) and vs G (at ``tokens``), shared vs unshared; the main point's whole steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    panels = [("prompt length (tokens)", "prompt_len", "group", group),
              ("G (completions per prompt)", "group", "tokens_target", tokens)]
    for ax, (label, key, fixed, value) in zip(axes, panels):
        sel = sorted((r for r in rows if r["shared"][fixed] == value),
                     key=lambda r: r["shared"][key])
        for side, color in (("shared", "tab:blue"), ("unshared", "tab:red")):
            for metric, style, what in (("train_s", "-o", "forward + backward"),
                                        ("fwd_s", ":^", "forward")):
                pts = [(r["shared"][key], r[side][metric]) for r in sel if metric in r[side]]
                if pts:
                    ax.plot(*zip(*pts), style, color=color, label=f"mmrl {side}, {what}")
        for side, mark in (("shared", "bs"), ("unshared", "rs"), ("trl", "k*")):
            if side in main:
                ax.plot([main["shared"][key]], [main[side]["step_s"]], mark, ms=9,
                        mfc="none" if side != "trl" else "k",
                        label=f"{'TRL GRPOTrainer' if side == 'trl' else 'mmrl ' + side}: "
                              f"whole step, {main[side]['prompts']} prompts")
        ax.set(xlabel=label, ylabel="seconds", xscale="log", yscale="log")
        xs = [r["shared"][key] for r in sel]
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"G = {group}")
    axes[1].set_title(f"~{tokens} visual tokens")
    axes[1].legend(fontsize=7)
    fig.suptitle("Training pass (1 prompt) and whole GRPO step: shared prefix vs unshared vs TRL"
                 " (Qwen2.5-VL arch., hidden 256, 4 layers, 2 CPU cores)", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _ints(s: str) -> list:
    return [int(x) for x in s.split(",") if x]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--tokens", type=int, default=2000, help="visual tokens of the main point")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="G of the main point")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="steps per side (the first untimed)")
    p.add_argument("--train-reps", type=int, default=2,
                   help="main point: timed training passes after the steps (0: none)")
    p.add_argument("--sides", default=",".join(SIDES), help="main point's sides (shared needed)")
    p.add_argument("--scale-tokens", default="500,2000,8000")
    p.add_argument("--scale-groups", default="4,8,16")
    p.add_argument("--scale-prompts", type=int, default=1, help="prompts of the scaling shapes")
    p.add_argument("--backward-max-tokens", type=int, default=4000,
                   help="scaling shapes with more visual tokens: unshared forward only")
    p.add_argument("--checkpointing", action="store_true",
                   help="mmrl sides with gradient checkpointing (TRL's GRPOConfig default)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per side (0: default)")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--no-main", action="store_true")
    p.add_argument("--reuse-main", help="take the main point from this earlier --json (plot)")
    p.add_argument("--plot", help="write the scaling plot (PNG) here")
    p.add_argument("--json", help="write every result here")
    p.add_argument("--peers", default=str(ROOT / ".peers"),
                   help="folders (os.pathsep-separated) prepended to sys.path in the TRL process")
    p.add_argument("--side", choices=SIDES, help="(internal) run one side")
    p.add_argument("--train-only", action="store_true", help="(internal) training pass only")
    p.add_argument("--forward-only", action="store_true", help="(internal) no backward pass")
    p.add_argument("--model", help="model folder (built when omitted)")
    a = p.parse_args(argv)
    if a.side:
        if a.threads:
            import torch
            torch.set_num_threads(a.threads)
        print(json.dumps(run_trl(a) if a.side == "trl" else run_mmrl(a)))
        return 0
    a.sides, a.scale_tokens, a.scale_groups = (a.sides.split(","), _ints(a.scale_tokens),
                                               _ints(a.scale_groups))
    if not a.model:
        from mmrl.video.tiny import build_tiny_qwen_vl
        k = max(round(math.sqrt(t)) for t in [a.tokens, *a.scale_tokens])
        a.model = build_tiny_qwen_vl(os.path.join(tempfile.mkdtemp(), "qwen25vl"),
                                     hidden_size=256, layers=4, max_pixels=(28 * k) ** 2)
    main = (json.loads(Path(a.reuse_main).read_text())["main"] if a.reuse_main
            else {} if a.no_main else main_point(a))
    rows = [] if a.no_scaling else scaling(a)
    if a.json:
        Path(a.json).write_text(json.dumps({"main": main, "scaling": rows}, indent=1))
    if a.plot and rows:
        plot(rows, main, a.group, a.tokens, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
