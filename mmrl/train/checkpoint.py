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
checkpoints or the new one. Re-saving a step that already has a checkpoint (the end-of-run save
after resuming a finished run) first renames the complete one to ``.old-step-…``, renames the new
one into place and only then deletes the old one; a crash between the two renames leaves the
complete ``.old-step-…``, which loading accepts and the next save renames back. Older
checkpoints are pruned only after the new one is in place. A write error (disk full: torch
raises ``RuntimeError``, safetensors ``SafetensorError``, the OS ``OSError``) removes the
temporary folder, keeps the previous checkpoints and raises :class:`CheckpointWriteError` (an
``OSError``). Loading verifies sizes and sha256 hashes and skips anything that does not match,
so ``resume=auto`` takes the newest *complete* checkpoint.
Each manifest records the ``run_id`` of the run that wrote it (see :mod:`mmrl.train.run_folder`).

Differs from transformers' ``Trainer``: it writes ``checkpoint-N`` in place (no manifest or
hashes), and ``get_last_checkpoint`` picks the newest folder by name without checking that it is
complete.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from mmrl.train.checkpoint_files import (MANIFEST, _sha256, is_complete,  # noqa: F401
                                         latest_checkpoint, list_checkpoints, manifest)

class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. disk full); the previous checkpoints are intact."""


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


def _write_errors() -> tuple:
    """The exceptions a full or failing disk raises from the writers (torch: RuntimeError)."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return (OSError, RuntimeError)
    return (OSError, RuntimeError, SafetensorError)


def _write_files(tmp: Path, step: int, weights, optimizer_state, state,
                 run_id: Optional[str]) -> None:
    """Every file of a checkpoint into ``tmp``, fsynced, the manifest last."""
    files = [_write_tensors(weights, tmp)]
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(state, tmp / "state.pt")
    files += ["optimizer.pt", "state.pt"]
    for name in files:
        with (tmp / name).open("rb+") as f:
            os.fsync(f.fileno())
    manifest = {"step": step, "run_id": run_id,
                "files": {n: {"size": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)}
                          for n in files}}
    with (tmp / MANIFEST).open("w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _aside(final: Path) -> Path:
    return final.parent / f".old-{final.name}"


def recover(root) -> None:
    """Clean up after a crash: finish an interrupted same-step replacement (keep ``step-N``
    when it is complete, else put the complete ``.old-step-N`` back in its place) and drop
    leftover ``.old-`` and ``.tmp-`` folders. Only the one process that saves calls it."""
    for tmp in Path(root).glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for aside in sorted(Path(root).glob(".old-step-*")):
        final = Path(root) / aside.name[len(".old-"):]
        if not (final.exists() and is_complete(final)) and is_complete(aside):
            shutil.rmtree(final, ignore_errors=True)
            os.replace(aside, final)
            _fsync_dir(Path(root))
        shutil.rmtree(aside, ignore_errors=True)


def save_checkpoint(root, step: int, weights: Dict[str, torch.Tensor],
                    optimizer_state: Dict[str, Any], state: Dict[str, Any],
                    keep_last: int = 3, run_id: Optional[str] = None) -> Path:
    """Write checkpoint ``step`` atomically under ``root``; keep the newest ``keep_last``.

    At every point of the save a complete checkpoint of the newest step saved so far exists
    (see the module docstring); ``run_id`` is recorded in the manifest.

    Returns:
        the final folder.

    Raises:
        CheckpointWriteError: a write failed (e.g. disk full); the temporary folder is removed
            and every previous checkpoint is left as it was.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    recover(root)
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    aside = _aside(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_files(tmp, step, weights, optimizer_state, state, run_id)
        if final.exists():  # a re-save of the same step: move the complete one aside first
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        if isinstance(err, _write_errors()) and not isinstance(err, CheckpointWriteError):
            raise CheckpointWriteError(
                f"could not write checkpoint step {step} under {root} "
                f"({type(err).__name__}: {err}); is the disk full?") from err
        raise
    shutil.rmtree(aside, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_atomic(obj: Any, path) -> None:
    """``torch.save(obj, path)`` through a temporary file renamed into place (never torn).

    Raises:
        CheckpointWriteError: the write failed; an existing ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        torch.save(obj, tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except _write_errors() as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"could not write {path} ({type(err).__name__}: {err}); "
                                   f"is the disk full?") from err


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


def parts_state(selector, augmenters, adv_state) -> Dict[str, Any]:
    """The run's stateful parts for a checkpoint's ``state``: the prompt selector, each round
    augmenter (by position; None for a stateless one) and the advantage estimator's run state
    (``PolicyLoss.adv_state``, e.g. RiskPO's tracked quantiles; None when stateless)."""
    return {"selector": selector.state_dict() if selector else None,
            "augmenters": [a.state_dict() if hasattr(a, "state_dict") else None
                           for a in augmenters],
            "advantage_state": adv_state.state_dict() if adv_state is not None else None}


def load_parts_state(state: Dict[str, Any], selector, augmenters, adv_state) -> None:
    """Hand :func:`parts_state`'s entries back (entries an older checkpoint lacks are kept)."""
    if selector is not None and state.get("selector") is not None:
        selector.load_state_dict(state["selector"])
    for aug, saved in zip(augmenters, state.get("augmenters") or []):
        if saved is not None and hasattr(aug, "load_state_dict"):
            aug.load_state_dict(saved)
    if adv_state is not None and state.get("advantage_state") is not None:
        adv_state.load_state_dict(state["advantage_state"])
