"""Reference packages installed by `make install` into .peers/ (see peers.txt), for tests only.

``import_peer("hpsv2.img_score")`` imports a module from there. .peers/ goes to the end of
sys.path, so a package of the pinned stack is never shadowed by a peer's copy.
"""
import importlib
import sys
from pathlib import Path

PEERS = Path(__file__).resolve().parents[1] / ".peers"


def import_peer(module: str):
    """The module ``module`` from .peers/; a clear error when `make install` has not filled it."""
    if not PEERS.is_dir():
        raise RuntimeError(f"{PEERS} is missing: run `make install` (it installs peers.txt there)")
    if str(PEERS) not in sys.path:
        sys.path.append(str(PEERS))
    return importlib.import_module(module)
