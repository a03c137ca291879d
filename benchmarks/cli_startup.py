"""Start-up time of the ``mmrl`` command and of ``import mmrl`` (issue 12: under 1 s).

Each command runs in a fresh interpreter (``subprocess``), ``--repeat`` times (default 5); the
median wall-clock seconds are printed, one line per command. Run from the repository root::

    .venv/bin/python benchmarks/cli_startup.py [--repeat 5]

Nothing here is a test: timings depend on the machine (the tests check instead that these
commands import no torch, the cause of a slow start).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "mmrl"  # the console script, as a user runs it
MMRL = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "mmrl.cli"]


def commands():
    """``[(label, argv)]``: the commands measured (a config that is not there is left out)."""
    out = [("mmrl --help", MMRL + ["--help"])]
    for cfg in ("configs/demo/toy.yaml", "configs/demo/video_tiny.yaml",
                "configs/demo/diffusion_tiny.yaml"):
        if (ROOT / cfg).is_file():
            out.append((f"mmrl config validate {cfg}", MMRL + ["config", "validate", cfg]))
    out.append(('python -c "import mmrl"', [sys.executable, "-c", "import mmrl"]))
    return out


def median_seconds(argv, repeat: int) -> float:
    """Median wall-clock seconds of ``repeat`` runs of ``argv`` (output discarded)."""
    times = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for _ in range(repeat):
        t0 = time.perf_counter()
        done = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - t0)
        if done.returncode not in (0, 2):  # 2: validate found problems on this machine
            raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command (median)")
    args = parser.parse_args(argv)
    for label, cmd in commands():
        print(f"{median_seconds(cmd, args.repeat):7.3f} s  {label}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
