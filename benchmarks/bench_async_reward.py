"""Asynchronous rewards (``train.reward_chunks``): how much reward time hides behind sampling.

The diffusion demo's pieces on CPU: the tiny SD3 demo pipeline (16x16 images, 8 steps, the
flow_grpo SDE sampler) built by ``build_tiny(demo=True)``, a round of ``--prompts`` x
``--group-size`` samples, and a real scorer: ``pickscore`` on a small random CLIP saved to disk
(its size picked so that scoring a round takes about as long as sampling it), loaded

- ``inproc``: in the training process (``mmrl.rewards.compose``), the worker thread sharing the
  CPU with the sampler (both at ``--threads`` torch threads);
- ``remote``: served by ``mmrl reward serve`` in a subprocess (``OMP_NUM_THREADS=--threads``),
  scored through the ``remote`` scorer;
- ``offcpu``: a reward that waits 0.9 x as long as sampling the same images takes (measured
  first)
  without using this CPU: a model of a scorer served on another device or host, which shows
  the mechanism's own ceiling and overhead where the real scorers compete for a loaded CPU.

For each mode and chunk count K, interleaved and repeated, :func:`mmrl.train.async_reward.
collect_chunked` runs with ``overlap=False`` (sync: the K chunks sampled and scored in turn;
K=1 is the plain synchronous path) and ``overlap=True`` (async). Reported: the wall times
(best of ``--repeats``, medians beside), the reward time R_K (the reward calls' time in the
sync run), the fraction of it hidden, ``(sync_K - async_K) / R_K`` (the median over the
interleaved sync/async pairs; the best-of value beside), and the ratios async_K / sync_K and
async_K / sync_1. The last chunk's reward cannot overlap anything, so the hidden fraction is at
most 1 - 1/K (``hidden_bound``); ``hidden_ideal`` is perfect overlap's for the measured S and R.

Usage::

    python benchmarks/bench_async_reward.py [--chunks 1 2 4 8] [--repeats 5] [--threads 1]
        [--modes inproc remote] [--out docs/async_reward_bench.json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROMPTS = ["white: a white car", "black: a black bird", "red: a red house", "blue: a blue cup",
           "white: a white flower", "black: a black chair", "red: a red car", "blue: a blue bird"]


def build_scorer_dir(d: str, width: int, layers: int, image: int) -> str:
    """A random CLIP (``width`` wide, ``layers`` deep, ``image`` px input) saved as a PickScore
    checkpoint with its processor."""
    sys.path.insert(0, HERE)
    from bench_rewards import clip_tokenizer_files
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPTokenizer)
    os.makedirs(d, exist_ok=True)
    clip_tokenizer_files(d)
    tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                        model_max_length=77)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image},
                                                     crop_size={"height": image,
                                                                "width": image}),
                  tokenizer=tok).save_pretrained(d)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=width,
                                      intermediate_size=4 * width, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77,
                                      bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
                     vision_config=dict(image_size=image, patch_size=16, hidden_size=width,
                                        intermediate_size=4 * width, num_hidden_layers=layers,
                                        num_attention_heads=4), projection_dim=64)
    CLIPModel(cfg).save_pretrained(d)
    return d


def build_policy(tmp: str, num_steps: int):
    from mmrl.config.jobs import get_job  # noqa: F401 (registers the jobs' sections)
    from mmrl.config.schema import load_config
    from mmrl.diffusion.job import build_policy as job_policy
    from mmrl.diffusion.models import adapter_class
    model = adapter_class("sd3").build_tiny(os.path.join(tmp, "sd3"), size=16, seed=0,
                                            overwrite=False, demo=True)
    cfg = load_config(os.path.join(ROOT, "configs/demo/diffusion_tiny.yaml"),
                      [f"diffusion.model={model}", f"diffusion.num_steps={num_steps}",
                       f"train.output_dir={tmp}/out"])
    return job_policy(cfg.task, "cpu", cfg.algo.resolve())


class OffCpu:
    """Mean brightness after ``seconds_per_sample`` of waiting that uses no CPU (sleep)."""

    name = "offcpu"

    def __init__(self, seconds_per_sample: float):
        self.per = seconds_per_sample

    def __call__(self, samples, prompts, metadata):
        time.sleep(self.per * len(samples))
        return torch.stack(list(samples)).mean((1, 2, 3))


class Timed:
    """A reward callable that adds up the seconds its calls take."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0
        self.name = getattr(fn, "name", "reward")

    def __call__(self, samples, prompts, metadata):
        tic = time.perf_counter()
        try:
            return self.fn(samples, prompts, metadata)
        finally:
            self.seconds += time.perf_counter() - tic


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(scorer_dir: str, threads: int):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mmrl"), "reward",
                             "serve", f"pickscore:path={scorer_dir}", "--port", str(port),
                             "--no-token", "--quiet"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()[-2000:])
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the reward server did not start in 60 s")


def one(policy, reward, prompts, group: int, chunks: int, overlap: bool, seed: int):
    from mmrl.train.async_reward import collect_chunked
    reward.seconds = 0.0
    policy.iteration = 1  # no periodic evaluation in the way
    gen = torch.Generator().manual_seed(seed)
    tic = time.perf_counter()
    _, rewards, error, _ = collect_chunked(policy, reward, prompts, [{}] * len(prompts),
                                           [group] * len(prompts), gen,
                                           list(range(len(prompts))), chunks, overlap=overlap)
    wall = time.perf_counter() - tic
    if error or not bool(rewards.valid.all()):
        raise RuntimeError(f"the reward failed: {error}")
    return wall, reward.seconds, rewards.values


def ideal_hidden(S: float, R: float, K: int) -> float:
    """The hidden fraction of perfect overlap of K equal chunks: async = max(S + R/K, S/K + R)
    (the last chunk's reward, or the first chunk's sampling, cannot overlap)."""
    return (S + R - max(S + R / K, S / K + R)) / R if R > 0 else 0.0


def measure(policy, reward, args) -> dict:
    prompts = (PROMPTS * ((args.prompts + len(PROMPTS) - 1) // len(PROMPTS)))[:args.prompts]
    one(policy, reward, prompts, args.group_size, max(args.chunks), True, 0)  # warm up
    runs = {(k, ov): [] for k in args.chunks for ov in (False, True)}
    for rep in range(args.repeats):
        for k in args.chunks:
            for ov in ((False, True) if rep % 2 == 0 else (True, False)):
                wall, rsec, values = one(policy, reward, prompts, args.group_size, k, ov, rep)
                runs[(k, ov)].append((wall, rsec, values))
    best, med = min, statistics.median
    sync1 = best([w for w, _, _ in runs[(min(args.chunks), False)]])
    rows = []
    for k in args.chunks:
        sync, asy = runs[(k, False)], runs[(k, True)]
        same = all(torch.equal(a[2], b[2]) for a, b in zip(sync, asy))
        s_wall, a_wall = best([w for w, _, _ in sync]), best([w for w, _, _ in asy])
        r_sec = best([r for _, r, _ in sync])
        rows.append({"chunks": k, "sync_s": round(s_wall, 4), "async_s": round(a_wall, 4),
                     "reward_s": round(r_sec, 4), "sampling_s": round(s_wall - r_sec, 4),
                     # per interleaved pair (sync_r - async_r) / R_r, the median over pairs
                     "hidden_fraction": round(med([(a[0] - b[0]) / a[1] for a, b
                                                   in zip(sync, asy)]), 3) if k > 1 else 0.0,
                     "hidden_fraction_best_of": round((s_wall - a_wall) / r_sec, 3)
                     if k > 1 else 0.0,
                     "hidden_bound": round(1 - 1 / k, 3),
                     "hidden_ideal": round(ideal_hidden(s_wall - r_sec, r_sec, k), 3),
                     "async_over_sync_k": round(a_wall / s_wall, 3),
                     "async_over_sync_1": round(a_wall / sync1, 3),
                     "sync_s_median": round(med([w for w, _, _ in sync]), 4),
                     "async_s_median": round(med([w for w, _, _ in asy]), 4),
                     "rewards_equal_sync_async": same,
                     "runs_s": {"sync": [round(w, 4) for w, _, _ in sync],
                                "async": [round(w, 4) for w, _, _ in asy],
                                "reward": [round(r, 4) for _, r, _ in sync]}})
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--num-steps", type=int, default=8)
    p.add_argument("--clip-width", type=int, default=192)
    p.add_argument("--clip-layers", type=int, default=12)
    p.add_argument("--clip-image", type=int, default=112)
    p.add_argument("--modes", nargs="+", default=["inproc", "remote", "offcpu"],
                   choices=["inproc", "remote", "offcpu"])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from mmrl.diffusion.evaluate import ImageReward
    from mmrl.rewards import compose
    result = {"setup": {k: v for k, v in vars(args).items() if k != "out"},
              "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                          "load_average_at_start": os.getloadavg()}}
    with tempfile.TemporaryDirectory() as tmp:
        policy = build_policy(tmp, args.num_steps)
        scorer_dir = build_scorer_dir(os.path.join(tmp, "pick"), args.clip_width,
                                      args.clip_layers, args.clip_image)
        for mode in args.modes:
            print(f"== {mode}", flush=True)
            proc = None
            if mode == "offcpu":
                B, free = args.prompts * args.group_size, Timed(OffCpu(0.0))
                walls = [one(policy, free, PROMPTS[:1] * args.prompts, args.group_size, 1,
                             False, 0)[0] for _ in range(3)]  # sampling alone, best of 3
                result["offcpu_seconds_per_sample"] = 0.9 * min(walls) / B  # R <= S
                reward = Timed(OffCpu(result["offcpu_seconds_per_sample"]))
                result[mode] = measure(policy, reward, args)
                continue
            if mode == "inproc":
                spec = f"pickscore:path={scorer_dir}"
            else:
                proc, url = start_server(scorer_dir, args.threads)
                spec = f"remote:url={url}"
            try:
                reward = Timed(ImageReward(compose(spec, device="cpu")))
                result[mode] = measure(policy, reward, args)
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=30)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
