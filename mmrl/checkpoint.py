"""Atomic, verifiable checkpoints: a torn or half-written checkpoint is never picked up.

Layout under ``<output_dir>/checkpoints/``::

    step-00000040/          a complete checkpoint (the step count it resumes at)
        weights.safetensors   the policy's trainable weights (weights.pt without safetensors)
        optimizer.pt          optimizer + LR scheduler state (torch.load(weights_only=True))
        state.pt              step, every RNG (python, numpy, torch, CUDA, the loop's
                              generators), algorithm state (selectors, stat trackers), per rank
        MANIFEST.json         written last: size and sha256 of every file above

Saving writes into ``.tmp-step-…``, fsyncs every file, writes the manifest, fsyncs, renames the
folder into place and fsyncs the parent: a crash at any point leaves either the old set of
checkpoints or the new one. A write error (disk full) removes the temporary folder and keeps
the previous checkpoints. Loading verifies sizes and hashes and skips anything that does not
match, so ``resume=auto`` takes the newest *complete* checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

MANIFEST = "MANIFEST.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_tensors(tensors: Dict[str, torch.Tensor], folder: Path) -> str:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:  # safetensors is optional in the core
        torch.save(tensors, folder / "weights.pt")
        return "weights.pt"
    save_file(tensors, str(folder / "weights.safetensors"))
    return "weights.safetensors"


def _read_tensors(folder: Path) -> Dict[str, torch.Tensor]:
    if (folder / "weights.safetensors").exists():
        from safetensors.torch import load_file
        return load_file(str(folder / "weights.safetensors"))
    return torch.load(folder / "weights.pt", weights_only=True)


def rng_state(generators: Optional[Dict[str, torch.Generator]] = None) -> Dict[str, Any]:
    """Every RNG the run draws from, as plain tensors/ints (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "python_gauss": random.getstate()[2],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any],
                  generators: Optional[Dict[str, torch.Generator]] = None) -> None:
    py = state["python"]
    random.setstate((py[-1], tuple(py[:-1]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])


def save_checkpoint(root, step: int, weights: Dict[str, torch.Tensor],
                    optimizer_state: Dict[str, Any], state: Dict[str, Any],
                    keep_last: int = 3) -> Path:
    """Write checkpoint ``step`` atomically under ``root``; keep the newest ``keep_last``.

    Returns:
        the final folder.

    Raises:
        OSError: the write failed (e.g. disk full); the temporary folder is removed and every
            previous checkpoint is left as it was.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        files = [_write_tensors(weights, tmp)]
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(state, tmp / "state.pt")
        files += ["optimizer.pt", "state.pt"]
        for name in files:
            with (tmp / name).open("rb+") as f:
                os.fsync(f.fileno())
        manifest = {"step": step, "files": {n: {"size": (tmp / n).stat().st_size,
                                                "sha256": _sha256(tmp / n)} for n in files}}
        with (tmp / MANIFEST).open("w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(folder: Path) -> bool:
    """True when the manifest exists and every file matches its size and hash."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for name, meta in manifest["files"].items():
            p = folder / name
            if p.stat().st_size != meta["size"] or _sha256(p) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(root) -> List[Path]:
    """Checkpoint folders under ``root`` (complete or not), oldest first."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_checkpoint(root) -> Optional[Path]:
    """The newest complete checkpoint under ``root``; torn ones are skipped. None if none."""
    for folder in reversed(list_checkpoints(root)):
        if is_complete(folder):
            return folder
    return None


def load_checkpoint(folder) -> Dict[str, Any]:
    """``{"weights", "optimizer", "state"}`` of a complete checkpoint (safe loading only).

    Raises:
        ValueError: the folder is not a complete checkpoint.
    """
    folder = Path(folder)
    if not is_complete(folder):
        raise ValueError(f"{folder} is not a complete checkpoint (missing or mismatched "
                         f"{MANIFEST}); pick another with resume=auto or resume=<path>")
    return {"weights": _read_tensors(folder),
            "optimizer": torch.load(folder / "optimizer.pt", weights_only=True),
            "state": torch.load(folder / "state.pt", weights_only=True)}
