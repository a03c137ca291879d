"""Converters from public preference sets to mmrl's JSONL formats (see :mod:`.evaluate`).

- ``hpdv2``: HPDv2 ``test.json`` (a JSON list of ``{"prompt", "image_path": [files],
  "rank": [ints]}``; images in ``test/``) -> ``ranked``.
- ``imagerewarddb``: ImageReward's ``test.json`` (``{"prompt", "generations": [files],
  "ranking": [ints]}``) -> ``ranked``.
- ``pickapic``: Pick-a-Pic v2 parquet shards (columns ``caption``, ``jpg_0``, ``jpg_1``,
  ``label_0``, ``label_1``; ``label_0 = label_1 = 0.5`` is a tie) -> ``pairs``, writing the image
  bytes to ``images/``; rows of the ``validation_unique`` shards get ``split = validation``.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import List, Optional

CONVERTERS = ("hpdv2", "imagerewarddb", "pickapic")

_RANKED_KEYS = {"hpdv2": ("image_path", "rank"), "imagerewarddb": ("generations", "ranking")}


def convert_ranked(source: str, out: str, dataset: str, image_dir: Optional[str] = None) -> int:
    """Convert an HPDv2 / ImageRewardDB ``test.json`` to ranked JSONL; returns records written.

    Args:
        source: the dataset's ``test.json``.
        out: the JSONL to write.
        image_dir: the folder holding the images (default: ``test/`` next to ``source`` for
            HPDv2, the folder of ``source`` for ImageRewardDB); written relative to ``out``.
    """
    images_key, ranks_key = _RANKED_KEYS[dataset]
    with open(source) as f:
        items = json.load(f)
    if not isinstance(items, list):
        raise ValueError(f"{source} holds a {type(items).__name__}; expected the JSON list of "
                         f"{dataset}'s test.json")
    src_dir = os.path.dirname(os.path.abspath(source))
    if image_dir is None:
        image_dir = os.path.join(src_dir, "test") if dataset == "hpdv2" else src_dir
    rel = os.path.relpath(os.path.abspath(image_dir), os.path.dirname(os.path.abspath(out)))
    n = 0
    with open(out, "w") as f:
        for i, it in enumerate(items):
            if images_key not in it or ranks_key not in it or "prompt" not in it:
                raise ValueError(f"{source} item {i} has keys {sorted(it)}; expected 'prompt', "
                                 f"{images_key!r}, {ranks_key!r} ({dataset} test.json)")
            f.write(json.dumps({"prompt": it["prompt"],
                                "images": [os.path.join(rel, p) for p in it[images_key]],
                                "ranks": list(it[ranks_key])}) + "\n")
            n += 1
    return n


def _pick_label(l0: float, l1: float) -> str:
    if l0 == l1:
        return "tie"
    return "a" if l0 > l1 else "b"


def convert_pickapic(source: str, out: str, limit: Optional[int] = None) -> int:
    """Convert Pick-a-Pic parquet shard(s) (a file, a folder or a glob) to pairs JSONL."""
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise ImportError("converting Pick-a-Pic reads parquet files: pip install pyarrow") \
            from None
    files = sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True)
                   if os.path.isdir(source) else glob.glob(source))
    if not files:
        raise ValueError(f"no parquet files at {source!r}; pass the downloaded Pick-a-Pic "
                         f"(yuvalkirstain/pickapic_v2) test/validation shards")
    img_dir = os.path.join(os.path.dirname(os.path.abspath(out)), "images")
    os.makedirs(img_dir, exist_ok=True)
    n = 0
    with open(out, "w") as f:
        for path in files:
            split = "validation" if "validation" in os.path.basename(path) else "test"
            table = pq.read_table(path, columns=["caption", "jpg_0", "jpg_1", "label_0",
                                                 "label_1"])
            for row in table.to_pylist():
                if limit is not None and n >= limit:
                    return n
                names = [_save_image(img_dir, row[k]) for k in ("jpg_0", "jpg_1")]
                f.write(json.dumps({"prompt": row["caption"], "image_a": f"images/{names[0]}",
                                    "image_b": f"images/{names[1]}",
                                    "label": _pick_label(row["label_0"], row["label_1"]),
                                    "split": split}) + "\n")
                n += 1
    return n


def _save_image(folder: str, data: bytes) -> str:
    name = hashlib.sha1(data).hexdigest()[:16] + ".jpg"  # content-addressed: duplicates share
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(data)
    return name


def convert(dataset: str, source: str, out: str, image_dir: Optional[str] = None,
            limit: Optional[int] = None) -> int:
    """Dispatch to the converter for ``dataset`` (one of :data:`CONVERTERS`)."""
    if dataset in _RANKED_KEYS:
        return convert_ranked(source, out, dataset, image_dir)
    if dataset == "pickapic":
        return convert_pickapic(source, out, limit)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {CONVERTERS}")


__all__: List[str] = ["CONVERTERS", "convert", "convert_ranked", "convert_pickapic"]
