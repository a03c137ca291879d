"""The checkpoint folder layout, read without torch: the manifest, which ``step-N`` folders
exist, which are complete, the newest complete one. :mod:`mmrl.train.checkpoint` writes and loads
checkpoints (and re-exports these names); ``mmrl config validate`` reads a run folder through
this module only, so it never loads torch."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(folder) -> Dict[str, Any]:
    """The checkpoint's parsed manifest ({} when missing or unreadable)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def is_complete(folder: Path) -> bool:
    """True when the manifest exists and every file matches its size and sha256 hash."""
    try:
        meta_all = json.loads((folder / MANIFEST).read_text())["files"]
        for name, meta in meta_all.items():
            p = folder / name
            if p.stat().st_size != meta["size"] or _sha256(p) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def list_checkpoints(root) -> List[Path]:
    """Checkpoint folders ``step-N`` under ``root`` (complete or not), oldest first."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_checkpoint(root, run_id: Optional[str] = None) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (``step-N``, or the ``.old-step-N`` a crash
    during a same-step re-save left); torn ones are skipped, and with ``run_id`` those whose
    manifest names another run. None if none."""
    root = Path(root)
    if not root.exists():
        return None
    names = {p.name.replace(".old-", "", 1) for p in root.iterdir() if p.is_dir() and
             p.name.startswith(("step-", ".old-step-"))}
    for name in sorted(names, reverse=True):
        for folder in (root / name, root / f".old-{name}"):
            if folder.exists() and is_complete(folder) and (
                    run_id is None or manifest(folder).get("run_id") in (None, run_id)):
                return folder
    return None
