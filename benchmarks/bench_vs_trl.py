"""One GRPO step, mmrl vs TRL's GRPOTrainer, on the same tiny Qwen2.5-VL, batch, group and lengths.

    .venv/bin/python benchmarks/bench_vs_trl.py [--prompts 4 --group 4 --new-tokens 32 --steps 3]

Both sides: the tiny Qwen2.5-VL of :mod:`mmrl.video.tiny` loaded by path, full fine-tuning with
AdamW, beta = 0 (no reference model), one update per rollout, image prompts (TRL's GRPOTrainer
takes images, not videos), the same reward (letters 'A' in the completion), sampling at
temperature 1 up to ``--new-tokens`` tokens. Each side runs in its own process; the step time is
the median over steps 2..N (step 1 warms up), the peak memory is the highest RSS seen while the
timed steps run minus the RSS before them (sampled every millisecond from /proc). trl is a
benchmark-only dependency. Prints one JSON line per side and the ratios mmrl / TRL.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest RSS above the level at ``start()``, sampled every millisecond."""

    def __init__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __enter__(self):
        self.base = self.peak = _rss()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _images(n: int):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) for _ in range(n)]


QUESTION = "Which letter fits this picture best? Answer with A, B, C or D."


def reward_letters(completions, **kw):
    """Share of 'A' characters in each completion (TRL signature)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [t.count("A") / max(len(t), 1) for t in texts]


def run_mmrl(a) -> dict:
    import torch

    from mmrl.train.loop import LoopSettings, train_step
    from mmrl.algo.losses import PolicyLoss
    from mmrl.video.policy import QwenVLPolicy, load_qwen_vl
    torch.manual_seed(0)
    model, proc = load_qwen_vl(a.model, finetune="full", freeze_vision=False)
    pol = QwenVLPolicy(model, proc, max_new_tokens=a.new_tokens)
    msgs = [[{"role": "user", "content": [{"type": "image", "image": im},
                                          {"type": "text", "text": QUESTION}]}]
            for im in _images(a.prompts)]
    meta = [{"messages": m} for m in msgs]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_fn, gen = PolicyLoss("grpo"), torch.Generator().manual_seed(0)
    fn = lambda s, p, m: torch.tensor(reward_letters(s))  # noqa: E731
    times, tokens = [], []
    settings = LoopSettings(group_size=a.group)
    train_step(pol, opt, loss_fn, fn, [QUESTION] * a.prompts, meta, settings, gen)  # warm-up
    with PeakRSS() as mem:
        for _ in range(a.steps - 1):
            tic = time.perf_counter()
            m = train_step(pol, opt, loss_fn, fn, [QUESTION] * a.prompts, meta, settings, gen)
            times.append(time.perf_counter() - tic)
            tokens.append(m["tokens"])
    return {"side": "mmrl", "step_s": statistics.median(times), "peak_mb": mem.delta_mb,
            "tokens_per_step": statistics.mean(tokens)}


def trl_step_clock(times: list, mem: PeakRSS):
    """A ``transformers.TrainerCallback`` class that starts ``mem`` at step 1 and appends the
    time of steps 2..N to ``times`` (step 1 warms up)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                mem.__enter__()
            self.tic = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step > 1:
                times.append(time.perf_counter() - self.tic)
    return Clock


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import GRPOConfig, GRPOTrainer
    torch.manual_seed(0)
    proc = AutoProcessor.from_pretrained(a.model)
    model = AutoModelForImageTextToText.from_pretrained(a.model, dtype=torch.float32)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": QUESTION}]}], "image": im}
        for im in _images(a.prompts)] * (a.steps + 1))
    times, mem = [], PeakRSS()
    Clock = trl_step_clock(times, mem)
    out = tempfile.mkdtemp()
    cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=a.prompts * a.group,
                     num_generations=a.group, max_completion_length=a.new_tokens,
                     max_steps=a.steps, learning_rate=1e-5, beta=0.0, temperature=1.0,
                     use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
                     bf16=False, seed=0, shuffle_dataset=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_letters, args=cfg, train_dataset=ds,
                          processing_class=proc, callbacks=[Clock()])
    trainer.train()
    mem.__exit__()
    return {"side": "trl", "step_s": statistics.median(times), "peak_mb": mem.delta_mb}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--side", choices=["mmrl", "trl"], help="(internal) run one side")
    p.add_argument("--model", help="tiny model folder (built when omitted)")
    a = p.parse_args(argv)
    if a.side:
        print(json.dumps(run_mmrl(a) if a.side == "mmrl" else run_trl(a)))
        return 0
    if not a.model:
        from mmrl.video.tiny import build_tiny_qwen_vl
        a.model = build_tiny_qwen_vl(os.path.join(tempfile.mkdtemp(), "tiny"))
    res = {}
    for side in ("mmrl", "trl"):
        cmd = [sys.executable, __file__, "--side", side, "--model", a.model, "--prompts",
               str(a.prompts), "--group", str(a.group), "--new-tokens", str(a.new_tokens),
               "--steps", str(a.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        res[side] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(res[side]))
    print(json.dumps({"step_time_ratio": res["mmrl"]["step_s"] / res["trl"]["step_s"],
                      "peak_mem_ratio": res["mmrl"]["peak_mb"] / max(res["trl"]["peak_mb"], 1e-9),
                      "prompts": a.prompts, "group": a.group, "new_tokens": a.new_tokens}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
