"""A synthetic video QA task generated on the fly: "Which way does the red square move?".

Each sample is a short mp4 (PyAV, H.264) of a red square sliding over a dark background in one of
four directions from a random start, and a Video-R1 record (``problem``, ``options``,
``solution``, ``problem_type="multiple choice"``, ``data_type="video"``, ``path``), so the demo
and the tests go through the same loader, prompt and reward code as real data.

Task kinds (``kind=``): ``"direction"`` (left/right/up/down: needs motion, i.e. the temporal
patches) and ``"color"`` (which colour is the moving square: needs only appearance; learns
fastest). Options are listed in a fixed order so the answer letter depends only on the video.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import numpy as np

from .synthetic import write_mp4

DIRECTIONS: Dict[str, Tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0),
                                          "down": (1, 0)}
COLORS: Dict[str, Tuple[int, int, int]] = {"red": (230, 30, 30), "green": (30, 200, 40),
                                           "blue": (40, 60, 230), "yellow": (230, 220, 30)}
KINDS = ("direction", "color")
LETTERS = "ABCD"


def moving_square(direction: str, color: str = "red", *, size: int = 56, frames: int = 8,
                  square: int = 14, rng: np.random.Generator = None) -> np.ndarray:
    """uint8 ``[frames, size, size, 3]``: a ``square``-pixel square moving one way at a constant
    speed that crosses about half the frame."""
    if direction not in DIRECTIONS or color not in COLORS:
        raise ValueError(f"direction={direction!r}, color={color!r}; expected one of "
                         f"{sorted(DIRECTIONS)} and one of {sorted(COLORS)}")
    rng = rng or np.random.default_rng(0)
    dy, dx = DIRECTIONS[direction]
    travel = (size - square) // 2
    step = travel / max(frames - 1, 1)
    lo, hi = 0, size - square
    # start so that the whole path stays inside the frame
    y0 = int(rng.integers(lo, hi + 1)) if dy == 0 else (lo if dy > 0 else hi)
    x0 = int(rng.integers(lo, hi + 1)) if dx == 0 else (lo if dx > 0 else hi)
    out = np.full((frames, size, size, 3), 20, np.uint8)
    for t in range(frames):
        y, x = int(round(y0 + dy * step * t)), int(round(x0 + dx * step * t))
        out[t, y:y + square, x:x + square] = COLORS[color]
    return out


def make_record(i: int, kind: str, rng: np.random.Generator, video_dir: str, *, size: int,
                frames: int, fps: float, square: int) -> Dict:
    direction = str(rng.choice(list(DIRECTIONS)))
    color = "red" if kind == "direction" else str(rng.choice(list(COLORS)))
    names = list(DIRECTIONS) if kind == "direction" else list(COLORS)
    answer = LETTERS[names.index(direction if kind == "direction" else color)]
    path = os.path.join(video_dir, f"{i:05d}.mp4")
    frames_ = moving_square(direction, color, size=size, frames=frames, square=square, rng=rng)
    tmp = f"{path}.{os.getpid()}.tmp.mp4"  # ranks of one job may write the same task at once:
    write_mp4(tmp, frames_, fps)           # a reader sees a whole file or none (os.replace)
    os.replace(tmp, path)
    problem = ("Which way does the red square move?" if kind == "direction"
               else "What colour is the moving square?")
    return {"problem_id": i, "problem": problem, "data_type": "video",
            "problem_type": "multiple choice",
            "options": [f"{LETTERS[k]}. {n}" for k, n in enumerate(names)],
            "solution": f"<answer>{answer}</answer>",
            "path": os.path.relpath(path, os.path.dirname(video_dir)),
            "data_source": f"mmrl-synthetic-{kind}"}


def write_synthetic_task(folder: str, num: int = 64, *, kind: str = "direction", seed: int = 0,
                         size: int = 56, frames: int = 8, fps: float = 4.0,
                         square: int = 0) -> str:
    """Write ``num`` videos under ``folder/videos`` and ``folder/train.jsonl`` -> the JSONL path.

    ``square`` is the square's side in pixels (0 = ``size // 2``: a large target, so that even a
    tiny random vision tower's features depend on it).

    An existing JSONL with the same ``num``/``kind``/``seed``/geometry is reused.

    Raises:
        ValueError: unknown ``kind``, ``num < 1``, or a frame smaller than twice the square.
    """
    if kind not in KINDS or num < 1 or size < 28:
        raise ValueError(f"kind={kind!r}, num={num}, size={size}; expected kind in {KINDS}, "
                         f"num >= 1 and size >= 28")
    jsonl = os.path.join(folder, "train.jsonl")
    square = square or size // 2
    stamp = {"num": num, "kind": kind, "seed": seed, "size": size, "frames": frames, "fps": fps,
             "square": square}
    stamp_path = os.path.join(folder, "task.json")
    if os.path.exists(jsonl) and os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                return jsonl
    video_dir = os.path.join(folder, "videos")
    os.makedirs(video_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    records: List[Dict] = [make_record(i, kind, rng, video_dir, size=size, frames=frames, fps=fps,
                                       square=square)
                           for i in range(num)]
    _write_atomic(jsonl, "".join(json.dumps(r) + "\n" for r in records))
    _write_atomic(stamp_path, json.dumps(stamp))
    return jsonl


def _write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``: ranks of one job
    writing the same task never let another read a truncated file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
