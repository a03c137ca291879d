"""The hpsv2 1.2.0 package from .peers/ (tests/peers.py), made importable for the tests.

Two gaps in the package as installed with --no-deps are bridged here, neither touching a value
the tests compare:

- ``clint`` (``hpsv2/utils.py``, ``img_score.py``, ``evaluation.py``: download progress bars) and,
  for ``hpsv2.evaluation``, the training-only imports of ``hpsv2/src/training`` (``einops``,
  ``braceexpand``, ``webdataset``, ``pandas``) are stubbed in ``sys.modules`` while importing;
  the code the tests run (``ImageRewardDataset`` on pyarrow, ``collate_rank``, ``calc_ImageReward``,
  ``evaluate_IR``) uses none of them.
- The 1.2.0 wheel lacks ``hpsv2/src/open_clip/bpe_simple_vocab_16e6.txt.gz``, which its tokenizer
  reads at import; the read is pointed at open_clip's copy of the same CLIP BPE merges file.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import sys
import types

from tests.peers import import_peer

_STUBS = ("clint", "clint.textui", "einops", "braceexpand", "webdataset", "webdataset.filters",
          "webdataset.tariterators", "pandas")


class _Stub(types.ModuleType):
    """A module whose every attribute is an empty class (imported or subclassed, never used)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


@contextlib.contextmanager
def _bridged():
    import open_clip
    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    real_open = gzip.open

    def open_bpe(path, *args, **kwargs):
        if str(path).endswith("bpe_simple_vocab_16e6.txt.gz") and not os.path.exists(path):
            path = bpe
        return real_open(path, *args, **kwargs)

    added = [m for m in _STUBS if m not in sys.modules]
    for m in added:
        sys.modules[m] = _Stub(m)
    gzip.open = open_bpe
    try:
        yield
    finally:
        gzip.open = real_open
        for m in added:
            del sys.modules[m]


def hpsv2_module(name: str):
    """``hpsv2.<name>`` (e.g. ``"src.open_clip"``, ``"evaluation"``) from .peers/."""
    with _bridged():
        return import_peer(f"hpsv2.{name}")


def register_arch(arch: str, config: dict, dirname: str):
    """Register the open_clip model config ``config`` as ``arch`` in hpsv2's own open_clip copy."""
    import json
    oc = hpsv2_module("src.open_clip")
    if arch not in oc.list_models():
        path = os.path.join(dirname, f"{arch}.json")
        with open(path, "w") as f:
            json.dump(config, f)
        oc.add_model_config(path)
    return oc
