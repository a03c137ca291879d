"""Flow-matching generator families: one adapter per diffusers pipeline class.

A family is one module here (``sd3.py``, ``flux.py``) holding a :class:`~mmrl.diffusion.models.
base.FlowAdapter` subclass, plus one line in :data:`FAMILIES`. The job picks the adapter from the
checkpoint's pipeline class (``_class_name`` in its ``model_index.json``, or the class of a
loaded pipeline), so the job, the samplers and the loss never branch on a family.

This module is torch-free (the config section validates ``diffusion.pipeline`` with it); an
adapter module is imported when its class is asked for.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Dict, Optional, Tuple

from mmrl.registry import did_you_mean

FAMILIES: Dict[str, Tuple[str, str]] = {
    # family: (diffusers pipeline class, "module:adapter class")
    "sd3": ("StableDiffusion3Pipeline", "mmrl.diffusion.models.sd3:SD3Adapter"),
    "flux": ("FluxPipeline", "mmrl.diffusion.models.flux:FluxAdapter"),
    "wan": ("WanPipeline", "mmrl.diffusion.models.wan:WanAdapter"),
}
"""family name -> (the diffusers pipeline class it adapts, where its adapter lives)."""

VIDEO_FAMILIES = frozenset({"wan"})
"""Families whose adapter makes videos (``MEDIA == "video"``; a test keeps them equal), read
torch-free by the config preflight (``diffusion.frames`` > 0 exactly for these)."""


def supported() -> str:
    """``"sd3 (StableDiffusion3Pipeline), flux (FluxPipeline)"`` for error messages."""
    return ", ".join(f"{name} ({cls})" for name, (cls, _) in FAMILIES.items())


def family_of_class(pipeline_class: str) -> str:
    """The family adapting the diffusers pipeline class ``pipeline_class``.

    Raises:
        ValueError: no family adapts it (the message lists the supported ones).
    """
    for name, (cls, _) in FAMILIES.items():
        if cls == pipeline_class:
            return name
    raise ValueError(f"no flow adapter for the pipeline class {pipeline_class!r}; supported: "
                     f"{supported()}. Add one under diffusion/models/ (docs/"
                     f"adding_a_model_family.md) or convert the checkpoint to a supported class")


def adapter_class(family: str):
    """The adapter class of ``family`` (a name of :data:`FAMILIES`), imported now.

    Raises:
        ValueError: unknown family (the message lists the supported ones).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown flow family {family!r} (supported: {supported()})"
                         f"{did_you_mean(family, FAMILIES)}")
    module, name = FAMILIES[family][1].split(":")
    return getattr(importlib.import_module(module), name)


def adapter_for_pipeline(pipe):
    """The adapter class for a loaded diffusers pipeline (by its class name)."""
    return adapter_class(family_of_class(type(pipe).__name__))


def pipeline_class_of(model: str, download: bool = False) -> Optional[str]:
    """``_class_name`` of ``model``'s ``model_index.json``: a local folder, a hub id in the cache,
    or (``download``) fetched from the hub; None when it cannot be read."""
    path = os.path.join(os.path.expanduser(model), "model_index.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import hf_hub_download, try_to_load_from_cache
            cached = try_to_load_from_cache(model, "model_index.json")
            if not isinstance(cached, str) and download:
                cached = hf_hub_download(model, "model_index.json")
        except Exception:  # noqa: BLE001 - not a repo id, offline, no hub library: unknown
            return None
        if not isinstance(cached, str):
            return None
        path = cached
    try:
        with open(path) as f:
            name = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def resolve_family(pipeline: str, model: str, download: bool = False) -> str:
    """The family to use for ``diffusion.pipeline`` (``auto`` or a family name) and ``model``.

    ``auto`` reads the pipeline class from the model's ``model_index.json``; a family name is
    checked against it when it can be read (``download``: from the hub too).

    Raises:
        ValueError: unknown family, an unsupported pipeline class, a family that does not match
            the checkpoint's class, or ``auto`` for a model whose class cannot be read.
    """
    found = pipeline_class_of(model, download)
    if pipeline == "auto":
        if found is None:
            raise ValueError(f"diffusion.pipeline=auto but the pipeline class of {model!r} cannot "
                             f"be read (no model_index.json there, in the hub cache or on the "
                             f"hub); point diffusion.model at a saved pipeline (`huggingface-cli "
                             f"download ID --local-dir DIR` where the hub is reachable), or set "
                             f"diffusion.pipeline to one of: {supported()}")
        return family_of_class(found)
    if pipeline not in FAMILIES:
        raise ValueError(f"diffusion.pipeline={pipeline!r}; expected auto or one of: "
                         f"{supported()}{did_you_mean(pipeline, FAMILIES)}")
    if found is not None and found != FAMILIES[pipeline][0]:
        known = [n for n, (cls, _) in FAMILIES.items() if cls == found]
        fix = (f"set diffusion.pipeline=auto (or {known[0]})" if known else
               f"no adapter supports {found} (supported: {supported()})")
        raise ValueError(f"diffusion.pipeline={pipeline!r} adapts {FAMILIES[pipeline][0]} but "
                         f"{model!r} is a {found}; {fix}")
    return pipeline
