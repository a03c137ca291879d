"""Reward-server throughput and latency: continuous batching, a batch window, and no batching.

Builds a small random-weight PickScore (a transformers ``CLIPModel`` + ``CLIPProcessor`` with the
real CLIP BPE, no download), serves it three times with ``mmrl reward serve`` in subprocesses
(same options: ``--batch-window-ms 0``, the default continuous batching; ``--batch-window-ms W``;
``--no-batching``), and for each client count N runs N concurrent clients (threads of this
process), each sending ``--requests`` requests of ``--images`` PNG images (the model's input
size) one after the other. Runs are interleaved (continuous, window, off, ...) and repeated; per
configuration the best throughput of the repeats is kept, with the request latency percentiles
of that run, and the ratio of the medians is reported too (on a loaded machine single runs
scatter by tens of percent). Clients post pre-encoded bodies, so the measurement is the
server's (PNG encoding on the client costs the same either way). The server's ``/health``
stats give the requests merged per model call.

Prints one line per N with images/s of each mode and its ratio to no batching (> 1: batching
wins), and writes the JSON report (``--out``, default ``docs/reward_server_bench.json``). Usage::

    python benchmarks/bench_reward_server.py [--sizes tiny,small] [--clients 1,4,16]
        [--requests 12] [--images 2] [--window-ms 5] [--repeats 5]
        [--threads 1] [--device cpu] [--out docs/reward_server_bench.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rewards import build_pickscore_dir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {  # (vision width, layers, heads, patch, image size), (text width, layers, heads), embed
    "tiny": dict(vision=(64, 2, 2, 16, 64), text=(64, 2, 2), embed=64),
    "small": dict(vision=(256, 4, 4, 32, 224), text=(256, 4, 4), embed=256),
}


def start_server(model_dir: str, window_ms: float, args, batching: bool = True) -> tuple:
    """``(process, url)`` of ``mmrl reward serve`` on a free loopback port."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "mmrl.cli", "reward", "serve", f"pickscore:path={model_dir}",
           "--port", "0", "--no-token", "--quiet", "--device", args.device,
           "--batch-size", str(args.batch_size), "--batch-window-ms", str(window_ms),
           *([] if batching else ["--no-batching"]),
           "--max-active", str(max(args.clients) + 1),
           "--max-connections", str(2 * max(args.clients) + 4)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    seen = ""
    for line in proc.stdout:  # "loading ..." lines, then the banner with the URL
        seen += line
        m = re.search(r"serving .* on (http://\S+) \(", line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain
            return proc, m.group(1)
    proc.kill()
    raise RuntimeError(f"the server did not start:\n{seen[-2000:]}")


def get(url: str, route: str) -> dict:
    with urllib.request.urlopen(url + route, timeout=60) as r:
        return json.loads(r.read())


def post(url: str, data: bytes) -> dict:
    req = urllib.request.Request(url + "/score", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def bodies(n_clients: int, image_size: int, args) -> list:
    """One pre-encoded JSON body per client (its own random images and prompts)."""
    from mmrl.rewards.wire import encode_images
    rng = np.random.default_rng(0)
    out = []
    for c in range(n_clients):
        ims = [Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3),
                                            dtype=np.uint8)) for _ in range(args.images)]
        prompts = [f"a photo of object {c}-{i}" for i in range(args.images)]
        out.append(json.dumps({"prompts": prompts, "images": encode_images(ims)}).encode())
    return out


def run_clients(url: str, payloads: list, n_requests: int) -> dict:
    """N clients at once, each posting its body ``n_requests`` times in a row."""
    lat = [[] for _ in payloads]
    gate = threading.Barrier(len(payloads) + 1)

    def client(i):
        gate.wait()
        for _ in range(n_requests):
            t = time.perf_counter()
            post(url, payloads[i])
            lat[i].append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    before = get(url, "/health")["stats"]
    gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = get(url, "/health")["stats"]
    all_lat = sorted(x for per in lat for x in per)
    calls = after["model_calls"] - before["model_calls"]
    reqs = after["requests"] - before["requests"]
    return {"wall_s": wall, "requests": reqs, "model_calls": calls,
            "requests_per_call": reqs / max(calls, 1),
            "latency_ms_p50": 1000 * statistics.median(all_lat),
            "latency_ms_p95": 1000 * all_lat[min(len(all_lat) - 1, int(0.95 * len(all_lat)))]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--sizes", default="tiny,small", help=f"model sizes, comma-separated, of "
                    f"{', '.join(SIZES)}")
    ap.add_argument("--clients", default="1,4,16", help="client counts, comma-separated")
    ap.add_argument("--requests", type=int, default=12, help="requests per client per run")
    ap.add_argument("--images", type=int, default=2, help="images per request")
    ap.add_argument("--window-ms", type=float, default=5.0, help="batch window when on")
    ap.add_argument("--batch-size", type=int, default=64, help="the scorer's forward batch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the servers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "reward_server_bench.json"))
    args = ap.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    sizes = args.sizes.split(",")
    bad = [z for z in sizes if z not in SIZES]
    if bad:
        ap.error(f"unknown sizes {bad}; choose from {list(SIZES)}")
    report = {"runs": []}
    for size in sizes:
        print(f"{size}: {SIZES[size]}", flush=True)
        with tempfile.TemporaryDirectory() as d:
            build_pickscore_dir(d, SIZES[size], crop_to_model=True)
            servers = {"continuous": start_server(d, 0, args),
                       "window": start_server(d, args.window_ms, args),
                       "off": start_server(d, 0, args, batching=False)}
            try:
                rows = measure(servers, SIZES[size]["vision"][4], args)
            finally:
                for proc, _ in servers.values():
                    proc.terminate()
                    proc.wait(30)
        report["runs"].append({"size": size, "model": SIZES[size], "rows": rows})
    report["setup"] = dict(vars(args), torch=torch.__version__, python=platform.python_version(),
                           machine=platform.machine(), cpus=os.cpu_count(),
                           load_average=os.getloadavg())
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return 0


def measure(servers: dict, image_size: int, args) -> list:
    payloads = bodies(max(args.clients), image_size, args)
    for _, url in servers.values():  # warm-up: first calls build caches
        run_clients(url, payloads[:4], 3)
    rows = []
    for n in args.clients:
        runs = {m: [] for m in servers}
        for _ in range(args.repeats):
            for mode in servers:
                runs[mode].append(run_clients(servers[mode][1], payloads[:n], args.requests))
        best = {m: min(r, key=lambda x: x["wall_s"]) for m, r in runs.items()}
        images = n * args.requests * args.images
        row = {"clients": n}
        for m, b in best.items():
            row[m] = dict(b, images_per_s=images / b["wall_s"],
                          all_images_per_s=[images / r["wall_s"] for r in runs[m]])
        line = [f"N={n:3d}: off {row['off']['images_per_s']:7.1f} img/s "
                f"(p50 {row['off']['latency_ms_p50']:.1f} ms)"]
        for m in ("continuous", "window"):
            row[f"{m}_throughput_ratio"] = row[m]["images_per_s"] / row["off"]["images_per_s"]
            row[f"{m}_median_throughput_ratio"] = (
                statistics.median(row[m]["all_images_per_s"])
                / statistics.median(row["off"]["all_images_per_s"]))
            row[f"{m}_p50_latency_ratio"] = (row[m]["latency_ms_p50"]
                                             / row["off"]["latency_ms_p50"])
            line.append(f"{m} {row[m]['images_per_s']:7.1f} img/s "
                        f"({row[m]['requests_per_call']:.2f} req/call, "
                        f"x{row[f'{m}_throughput_ratio']:.2f}, median x{row[f'{m}_median_throughput_ratio']:.2f}, p50 latency "
                        f"x{row[f'{m}_p50_latency_ratio']:.2f})")
        rows.append(row)
        print(" | ".join(line), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
