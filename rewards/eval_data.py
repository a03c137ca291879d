"""Preference data for :mod:`mmrl.rewards.evaluate`: the file formats, their checks, and the
images and videos they point at.

Formats (``format=`` / ``--format``); paths are relative to the data file's folder (or
``image_root``), absolute paths pass through:

- ``pairs``: JSONL ``{"prompt", "image_a", "image_b", "label": "a"|"b"|"tie", "split"}``.
- ``ranked``: JSONL ``{"prompt", "images": [paths], "ranks": [ints, 1 = best]}``.
- ``hpdv3``: HPDv3's published test file (HF ``MizzenAI/HPDv3`` ``test.json``; read by hpsv3
  1.0.0 ``evaluate/evaluate.py``): one JSON list of either *pair* items ``{"prompt", "path1"
  (the human-preferred image), "path2", ...}`` or *ranking* items ``{"id", "prompt",
  "generations": [paths], "ranking": [ints, smaller = better]}``. Which one is read from the
  first item's keys; a file mixing them is refused. Other keys (``model1``, ``confidence`` ...)
  are ignored.
- ``videogen``: VideoGen-RewardBench (HF ``KwaiVGI/VideoGen-RewardBench``
  ``videogen-rewardbench.csv``, read by VideoAlign ``eval_videogen_rewardbench.py``) as that
  CSV, or JSONL records with the same fields: ``prompt``, ``path_A``, ``path_B`` (videos) and
  human labels in any of the columns :data:`DIMENSIONS`, each ``A``, ``B`` or ``same`` (an
  empty cell: no label for that dimension). Other columns (``A_model``, ``fps_A`` ...) are
  ignored.

Internally every format becomes one of three layouts (:attr:`PreferenceData.kind`): ``pairs``
(``image_a``, ``image_b``, ``label``), ``ranked`` (``images``, ``ranks``) or ``videogen``
(``image_a``, ``image_b``, ``labels: {dimension: 1 (A) | -1 (B) | 0 (same) | None}``).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

LABELS = ("a", "b", "tie")
FORMATS = ("pairs", "ranked", "hpdv3", "videogen")
#: VideoGen-RewardBench's label columns: visual quality, motion quality, text alignment, overall.
DIMENSIONS = ("VQ", "MQ", "TA", "Overall")
_VIDEOGEN_LABELS = {"a": 1, "b": -1, "same": 0}
#: Extensions read as videos by PyAV; ``.gif`` (and animated ``.webp``) are read with PIL.
VIDEO_EXTS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif")

FORMAT_HELP = {
    "pairs": '{"prompt": str, "image_a": path, "image_b": path, "label": "a"|"b"|"tie", '
             '"split": "validation"|"test" (optional)} per line',
    "ranked": '{"prompt": str, "images": [paths], "ranks": [ints, 1 = best]} per line',
    "hpdv3": 'one JSON list of pair items {"prompt": str, "path1": preferred image, "path2": '
             'other image} or of ranking items {"id", "prompt": str, "generations": [paths], '
             '"ranking": [ints, smaller = better]} (HPDv3 test.json)',
    "videogen": 'a CSV (VideoGen-RewardBench videogen-rewardbench.csv) or JSONL with "prompt", '
                '"path_A", "path_B" and labels "A"|"B"|"same" in one or more of '
                f'{", ".join(DIMENSIONS)}',
}


@dataclass
class PreferenceData:
    """A preference file read and checked: what :func:`mmrl.rewards.evaluate.evaluate` scores.

    Attributes:
        fmt: the file format (:data:`FORMATS`).
        kind: the record layout, ``pairs`` | ``ranked`` | ``videogen`` (module doc).
        mode: hpdv3: ``pair`` | ``ranking``; other formats: ``fmt``.
        records: the records in that layout.
        media: ``image`` | ``video``: what the paths point at.
        dims: videogen: the label columns present, in :data:`DIMENSIONS` order.
    """
    fmt: str
    kind: str
    mode: str
    records: List[Dict[str, Any]]
    media: str = "image"
    dims: Tuple[str, ...] = field(default_factory=tuple)


def read_data(path: str, fmt: str) -> PreferenceData:
    """Read and check ``path`` in ``fmt``; every bad record is named in one error.

    Raises:
        ValueError: unknown format; a record with a missing or invalid field (which record,
            which field, what was expected); no records.
        FileNotFoundError: no such file.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}; expected one of {FORMATS}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} not found; expected {FORMAT_HELP[fmt]}")
    if fmt in ("pairs", "ranked"):
        return PreferenceData(fmt, fmt, fmt, read_records(path, fmt))
    if fmt == "hpdv3":
        return _read_hpdv3(path)
    return _read_videogen(path)


def _raise(path: str, errors: List[str], what: str, fmt: str) -> None:
    if errors:
        more = f" (+{len(errors) - 10} more)" if len(errors) > 10 else ""
        raise ValueError(f"{path}: {len(errors)} bad {what}(s): " + "; ".join(errors[:10])
                         + more + f". Expected {FORMAT_HELP[fmt]}")


def read_records(path: str, fmt: str) -> List[Dict[str, Any]]:
    """Read and validate a JSONL file in ``fmt`` (``pairs`` or ``ranked``); all errors at once.

    Raises:
        ValueError: unknown format, or records with missing/invalid fields (lists every bad line).
    """
    if fmt not in ("pairs", "ranked"):
        raise ValueError(f"format {fmt!r}; expected one of ('pairs', 'ranked')")
    records, errors = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as err:
                errors.append(f"line {lineno}: not JSON ({err})")
                continue
            problem = _check_pair(rec) if fmt == "pairs" else _check_ranked(rec)
            if problem:
                errors.append(f"line {lineno}: {problem}")
            else:
                records.append(rec)
    _raise(path, errors, f"{fmt} record", fmt)
    if not records:
        raise ValueError(f"{path} holds no records; expected {FORMAT_HELP[fmt]}")
    return records


def _check_pair(rec) -> str:
    if not isinstance(rec, dict):
        return "not an object"
    missing = [k for k in ("prompt", "image_a", "image_b", "label") if k not in rec]
    if missing:
        return f"missing {missing}"
    if rec["label"] not in LABELS:
        return f"label {rec['label']!r} not in {LABELS}"
    if rec.get("split", "test") not in ("validation", "test"):
        return f"split {rec['split']!r} not in ('validation', 'test')"
    return ""


def _check_ranked(rec, images: str = "images", ranks: str = "ranks") -> str:
    if not isinstance(rec, dict):
        return "not an object"
    missing = [k for k in ("prompt", images, ranks) if k not in rec]
    if missing:
        return f"missing {missing}"
    ims, rk = rec[images], rec[ranks]
    if not isinstance(ims, list) or not isinstance(rk, list) or len(ims) != len(rk) or \
            len(ims) < 2:
        return (f"{images!r} and {ranks!r} must be lists of equal length >= 2; got "
                f"{_shape(ims)} and {_shape(rk)}")
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rk):
        return f"{ranks!r} must be numbers; got {rk!r}"
    if not all(isinstance(p, str) and p for p in ims):
        return f"{images!r} must be paths (strings); got {ims!r}"
    return ""


def _shape(x) -> str:
    return f"{len(x)} items" if isinstance(x, list) else f"a {type(x).__name__}"


# ----------------------------------------------------------------------------- hpdv3

_HPDV3_PAIR = ("prompt", "path1", "path2")
_HPDV3_RANKING = ("prompt", "generations", "ranking")


def _read_hpdv3(path: str) -> PreferenceData:
    """HPDv3 ``test.json``: pair items -> ``pairs`` records (label ``a``: path1 preferred),
    ranking items -> ``ranked`` records (``ranks`` = ``ranking``, ``id`` kept)."""
    try:
        with open(path) as f:
            items = json.load(f)
    except ValueError as err:
        raise ValueError(f"{path} is not one JSON document ({err}); --format hpdv3 reads "
                         f"HPDv3's test.json, {FORMAT_HELP['hpdv3']}; for JSONL use --format "
                         f"pairs or ranked") from None
    if not isinstance(items, list) or not items:
        got = "an empty list" if isinstance(items, list) else f"a {type(items).__name__}"
        raise ValueError(f"{path} holds {got}; expected {FORMAT_HELP['hpdv3']}")
    first = items[0] if isinstance(items[0], dict) else {}
    if "path1" in first or "path2" in first:
        mode = "pair"
    elif "generations" in first or "ranking" in first:
        mode = "ranking"
    else:
        raise ValueError(f"{path}[0] has keys {sorted(first)}; an HPDv3 item has 'path1' and "
                         f"'path2' (pair) or 'generations' and 'ranking' (ranking): "
                         f"{FORMAT_HELP['hpdv3']}")
    records, errors = [], []
    for i, it in enumerate(items):
        where = f"[{i}]" + (f" (id {it['id']!r})" if isinstance(it, dict) and "id" in it else "")
        problem = _check_hpdv3(it, mode)
        if problem:
            errors.append(f"item {where}: {problem}")
        elif mode == "pair":
            records.append({"prompt": it["prompt"], "image_a": it["path1"],
                            "image_b": it["path2"], "label": "a"})
        else:
            records.append({"prompt": it["prompt"], "images": list(it["generations"]),
                            "ranks": list(it["ranking"]), "id": it.get("id", i)})
    _raise(path, errors, f"HPDv3 {mode} item", "hpdv3")
    return PreferenceData("hpdv3", "pairs" if mode == "pair" else "ranked", mode, records)


def _check_hpdv3(it, mode: str) -> str:
    if not isinstance(it, dict):
        return f"a {type(it).__name__}, not an object"
    other = _HPDV3_RANKING if mode == "pair" else _HPDV3_PAIR
    keys = _HPDV3_PAIR if mode == "pair" else _HPDV3_RANKING
    if all(k in it for k in other[1:]) and not any(k in it for k in keys[1:]):
        return (f"a {'ranking' if mode == 'pair' else 'pair'} item in a file of {mode} items "
                f"(decided by item [0]); split the file by kind")
    missing = [k for k in keys if k not in it]
    if missing:
        return (f"missing {missing}; {mode} items need " + ", ".join(map(repr, keys)))
    if not isinstance(it["prompt"], str):
        return f"'prompt' is {it['prompt']!r}; expected the text prompt (a string)"
    if mode == "pair":
        bad = [k for k in ("path1", "path2") if not isinstance(it[k], str) or not it[k]]
        return (f"{bad[0]!r} is {it[bad[0]]!r}; expected an image path (path1 = the preferred "
                f"image)") if bad else ""
    return _check_ranked(it, "generations", "ranking")


# ----------------------------------------------------------------------------- videogen

def _videogen_label(value) -> Optional[int]:
    """``"A"`` -> 1, ``"B"`` -> -1, ``"same"`` -> 0 (any case), empty/None/NaN -> None."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip().lower()
    if text in ("", "nan"):
        return None
    if text not in _VIDEOGEN_LABELS:
        raise ValueError(f"{value!r}")
    return _VIDEOGEN_LABELS[text]


def _videogen_rows(path: str):
    """``(where, row dict)`` from the CSV or JSONL file."""
    with open(path, newline="") as f:
        head = f.read(1)
        f.seek(0)
        if head == "{":  # JSONL
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"line {lineno}", json.loads(line)
                    except ValueError as err:
                        yield f"line {lineno}", f"not JSON ({err})"
            return
        reader = csv.DictReader(f)
        for row in reader:
            yield f"line {reader.line_num}", row


def _read_videogen(path: str) -> PreferenceData:
    records, errors, dims_seen = [], [], set()
    for where, row in _videogen_rows(path):
        if isinstance(row, str) or not isinstance(row, dict):
            errors.append(f"{where}: {row if isinstance(row, str) else 'not an object'}")
            continue
        missing = [k for k in ("prompt", "path_A", "path_B") if not row.get(k)]
        dims = [d for d in DIMENSIONS if d in row]
        if missing or not dims:
            what = f"missing or empty {missing}" if missing else "no label column"
            errors.append(f"{where}: {what}; a pair needs prompt, path_A, path_B and labels in "
                          f"{'/'.join(DIMENSIONS)}")
            continue
        labels, bad = {}, []
        for d in dims:
            try:
                labels[d] = _videogen_label(row[d])
            except ValueError as err:
                bad.append(f"{d}={err}")
        if bad:
            errors.append(f"{where}: label {', '.join(bad)}; expected 'A', 'B', 'same' or empty")
            continue
        dims_seen.update(dims)
        records.append({"prompt": str(row["prompt"]), "image_a": str(row["path_A"]),
                        "image_b": str(row["path_B"]), "labels": labels})
    _raise(path, errors, "videogen row", "videogen")
    if not records:
        raise ValueError(f"{path} holds no pairs; expected {FORMAT_HELP['videogen']}")
    dims = tuple(d for d in DIMENSIONS if d in dims_seen)
    return PreferenceData("videogen", "videogen", "videogen", records, "video", dims)


# ----------------------------------------------------------------------------- media

def resolve(rel: str, root: str) -> str:
    """``rel`` under ``root`` (absolute paths unchanged); FileNotFoundError naming both."""
    path = rel if os.path.isabs(rel) else os.path.join(root, rel)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{rel!r} not found at {path}; paths are relative to the data "
                                f"file's folder, or to --image-root (Python: image_root=)")
    return path


def load_image(path: str):
    """A PIL image, fully read (the file is closed)."""
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        return im


def load_video(path: str):
    """``(frames, fps)``: every frame as float ``[F, 3, H, W]`` in [0, 1] and the frame rate
    (None when the file has none). GIF / WebP through PIL (fps = 1000 / mean frame duration in
    ms), other files through PyAV (FFmpeg; fps = the stream's average rate).

    Raises:
        ImportError: a non-GIF video without PyAV (``pip install av``).
        ValueError: a file with no decodable frame.
    """
    import numpy as np
    import torch
    if path.lower().endswith((".gif", ".webp")):
        from PIL import Image, ImageSequence
        with Image.open(path) as im:
            frames, durations = [], []
            for fr in ImageSequence.Iterator(im):
                frames.append(np.asarray(fr.convert("RGB")))
                durations.append(fr.info.get("duration", 0))
        mean_ms = float(np.mean(durations)) if durations else 0.0
        fps = 1000.0 / mean_ms if mean_ms > 0 else None
    else:
        try:
            import av
        except ModuleNotFoundError:
            raise ImportError(f"reading {os.path.basename(path)} needs PyAV: pip install av "
                              f"(GIFs are read with PIL)") from None
        with av.open(path) as box:
            stream = box.streams.video[0]
            frames = [fr.to_ndarray(format="rgb24") for fr in box.decode(stream)]
            rate = stream.average_rate
        fps = float(rate) if rate else None
    if not frames:
        raise ValueError(f"{path}: no video frames decoded; re-encode the file (e.g. ffmpeg -i "
                         f"IN -c:v libx264 OUT.mp4)")
    x = torch.from_numpy(np.stack(frames))  # [F, H, W, 3] uint8
    return x.permute(0, 3, 1, 2).float().div_(255.0), fps  # [F, 3, H, W] in [0, 1]
