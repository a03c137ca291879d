"""What the HF-format exporters of both trainers share (``mmrl.video.export``,
``mmrl.diffusion.export``): folding LoRA adapters into the weights without touching the live
model, and writing an export folder atomically. torch and the standard library only.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Dict

import torch

__all__ = ["MANIFEST", "merged_state_dict", "check_target", "write_atomically"]

#: The file that marks a folder as an mmrl export (layout, loading code).
MANIFEST = "mmrl_export.json"


def merged_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """``model``'s state dict with every active LoRA folded in: W + ΔW, adapter keys dropped.

    Works on a module carrying peft tuner layers (a ``PeftModel``'s base model, or a diffusers
    model after ``add_adapter``); keys are those of the un-adapted model (``...q_proj.weight``,
    not ``...q_proj.base_layer.weight``). Tensors are detached CPU copies in the weight's dtype;
    the sum is done in fp32 so a bf16 model rounds once. ``model`` is not modified.

    Raises:
        ValueError: an adapter the simple sum cannot express (DoRA, ``modules_to_save``).
    """
    tuners = {name: module for name, module in model.named_modules()
              if hasattr(module, "get_base_layer") and hasattr(module, "get_delta_weight")}
    out: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".modules_to_save." in key or ".original_module." in key:
            raise ValueError(f"cannot merge {key!r}: adapters with modules_to_save are not "
                             f"supported; export without merge_lora and load with peft")
        owner = next((n for n in _prefixes(key) if n in tuners), None)
        if owner is None:
            out[key] = value.detach().cpu().clone()
            continue
        rest = key[len(owner) + 1:]
        if not rest.startswith("base_layer."):
            continue  # lora_A / lora_B: folded into the weight below
        new_key = f"{owner}.{rest[len('base_layer.'):]}"
        out[new_key] = value.detach().cpu().clone()
        if rest == "base_layer.weight":
            out[new_key] = _fold(tuners[owner], value, owner)
    return out


def _prefixes(key: str):
    """Module names that may own ``key``, longest first (``a.b.c.weight`` -> a.b.c, a.b, a)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:i])


def _fold(layer, weight: torch.Tensor, name: str) -> torch.Tensor:
    """W + Σ ΔW over the layer's active, not yet merged adapters (fp32 sum, W's dtype)."""
    total = weight.detach().float().cpu().clone()
    if getattr(layer, "disable_adapters", False):
        return total.to(weight.dtype)
    for adapter in layer.active_adapters:
        if adapter in getattr(layer, "merged_adapters", ()):
            continue  # already inside W
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise ValueError(f"cannot merge the DoRA adapter {adapter!r} of {name!r} as W + BA; "
                             f"export without merge_lora and load with peft")
        total += layer.get_delta_weight(adapter).detach().float().cpu()
    return total.to(weight.dtype)


def check_target(path: str) -> str:
    """The absolute export folder, refusing paths an export must not replace."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"path={path!r}; expected a folder path (str) for the export")
    target = os.path.abspath(os.fspath(path))
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"path {target!r} is an existing file; expected a folder (new, empty, "
                         f"or an earlier export); choose another path or remove the file")
    if os.path.isdir(target) and os.listdir(target) and \
            not os.path.isfile(os.path.join(target, MANIFEST)):
        raise ValueError(f"path {target!r} is a non-empty folder without {MANIFEST}, so it is "
                         f"not an earlier export and will not be replaced; choose a new or empty "
                         f"folder")
    return target


def write_atomically(target: str, write) -> str:
    """Run ``write(tmp)`` on a temporary sibling folder, then rename it to ``target``.

    An existing ``target`` is first renamed aside and deleted only after the new folder is in
    place; on any error the temporary folder is removed and ``target`` is left as it was.
    """
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; an export is an ordinary folder
    old = None
    try:
        write(tmp)
        if os.path.isdir(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:
        if old is not None and not os.path.exists(target):
            os.rename(old, target)  # put the earlier export back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
