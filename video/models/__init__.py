"""The VLM family registry: which :class:`~mmrl.video.models.base.VLMAdapter` handles a
checkpoint, picked by its ``config.model_type``.

Adding a family is a folder ``video/models/<family>/`` and ONE entry in :data:`FAMILIES`
(see docs/adding_a_model_family.md). This module is torch-free (the job's config checks read
the tiny-model names); adapters are imported when first asked for.

- :func:`adapter_for` ``(model_type) -> VLMAdapter`` (raises with the supported list).
- :func:`adapter_for_path` ``(path) -> VLMAdapter`` from a checkpoint's config.json.
- :data:`TINY_MODELS` ``{job model name: (model_type, folder under output_dir)}``;
  :func:`build_default_tiny` builds one with its family's ``build_tiny``.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from mmrl.config.core import UserError

__all__ = ["FAMILIES", "Family", "TINY_MODELS", "adapter_for", "adapter_for_path",
           "build_default_tiny", "default_tiny_dir", "family_for", "supported_model_types"]


@dataclass(frozen=True)
class Family:
    """One registry entry.

    Attributes:
        name: the folder under ``video/models/`` (and the export manifest's ``kind``).
        adapter: ``"module:Class"`` of its :class:`~mmrl.video.models.base.VLMAdapter`.
        model_types: the ``config.model_type`` values it handles.
        tiny: the video job's ``model:`` names that build a tiny model of this family ->
            ``(model_type, folder under output_dir)``.
    """

    name: str
    adapter: str
    model_types: Tuple[str, ...]
    tiny: Dict[str, Tuple[str, str]] = field(default_factory=dict)


FAMILIES: List[Family] = [
    Family("qwen_vl", "mmrl.video.models.qwen_vl.adapter:QwenVLAdapter",
           ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
           {"tiny": ("qwen2_5_vl", "tiny_qwen_vl"), "tiny_qwen2": ("qwen2_vl", "tiny_qwen2_vl"),
            "tiny_qwen3": ("qwen3_vl", "tiny_qwen3_vl")}),
    Family("llava_onevision", "mmrl.video.models.llava_onevision.adapter:LlavaOneVisionAdapter",
           ("llava_onevision",), {"tiny_llava_ov": ("llava_onevision", "tiny_llava_ov")}),
]

TINY_MODELS: Dict[str, Tuple[str, str]] = {k: v for f in FAMILIES for k, v in f.tiny.items()}


class UnsupportedModelError(UserError, NotImplementedError):
    """A checkpoint of a ``model_type`` no registered family handles: a user's choice of model
    (the CLI prints the message, with the supported types, and exits 2), and still a
    ``NotImplementedError`` for code that catches that."""


def supported_model_types() -> List[str]:
    """Every registered ``model_type``, in registry order."""
    return [t for f in FAMILIES for t in f.model_types]


def family_for(model_type: str) -> Family:
    """The registry entry handling ``model_type``.

    Raises:
        UnsupportedModelError: no family handles it (the message lists the supported ones).
    """
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise UnsupportedModelError(
        f"model_type={model_type!r} is not supported by the video policy (supported: "
        f"{', '.join(supported_model_types())}); load a checkpoint of one of these, or add a "
        f"family (docs/adding_a_model_family.md)")


_ADAPTERS: Dict[str, object] = {}


def adapter_for(model_type: str):
    """The :class:`~mmrl.video.models.base.VLMAdapter` instance for ``model_type`` (one per
    family, created on first use).

    Raises:
        UnsupportedModelError: an unregistered ``model_type`` (see :func:`family_for`).
    """
    fam = family_for(model_type)
    if fam.name not in _ADAPTERS:
        module, cls = fam.adapter.split(":")
        _ADAPTERS[fam.name] = getattr(importlib.import_module(module), cls)()
    return _ADAPTERS[fam.name]


def adapter_for_path(path: str):
    """The adapter for the checkpoint at ``path`` (a hub id or folder), from its config only
    (no weights are read)."""
    from transformers import AutoConfig
    return adapter_for(AutoConfig.from_pretrained(path).model_type)


def default_tiny_dir(output_dir: Optional[str] = None, name: str = "tiny") -> str:
    """Where the job keeps the tiny model ``name``: ``<output_dir>/<its folder>`` (e.g.
    ``tiny_qwen_vl`` for ``tiny``, a Qwen2.5-VL).

    Raises:
        ValueError: ``name`` is not one of :data:`TINY_MODELS`.
    """
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r} (known: {', '.join(TINY_MODELS)}); pass "
                         "one of these names, or a checkpoint folder as video.model")
    return os.path.join(output_dir or ".", TINY_MODELS[name][1])


def build_default_tiny(name: str, output_dir: Optional[str] = None) -> str:
    """Build (or keep) the tiny model ``name`` in :func:`default_tiny_dir` -> its folder, with
    its family's ``build_tiny``.

    Raises:
        ValueError: ``name`` is not one of :data:`TINY_MODELS`.
    """
    folder = default_tiny_dir(output_dir, name)  # checks the name
    model_type = TINY_MODELS[name][0]
    return adapter_for(model_type).build_tiny(folder, model_type=model_type)
