"""Export a trained Qwen2.5-VL policy as a Hugging Face folder that ``from_pretrained`` loads.

:func:`export_qwen_vl` writes one of three layouts, always with the processor and a small
``mmrl_export.json`` that records what the folder holds and how to load it:

- full fine-tuning -> the whole model (``config.json`` + safetensors)::

      from transformers import AutoModelForImageTextToText, AutoProcessor
      model = AutoModelForImageTextToText.from_pretrained(path)
      processor = AutoProcessor.from_pretrained(path)

- LoRA -> the peft adapter only (``adapter_model.safetensors`` + ``adapter_config.json``), to put
  on the base model it was trained from (``base_model`` in ``mmrl_export.json``)::

      from peft import PeftModel
      from transformers import AutoModelForImageTextToText, AutoProcessor
      base = AutoModelForImageTextToText.from_pretrained(BASE_MODEL)
      model = PeftModel.from_pretrained(base, path)
      processor = AutoProcessor.from_pretrained(path)

- LoRA with ``merge_lora=True`` -> a plain full model with W + (α/r)·B·A folded into each adapted
  weight; load it as the full fine-tuning case (no peft needed).

The merge never touches the live model: merged weights are computed into a new CPU state dict
(one model's worth of host memory, no second copy on the accelerator), so training goes on after
an export exactly as before. The folder is written under a temporary sibling name and renamed into
place, so a reader never sees a half-written export; an existing export at ``path`` is replaced.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, Optional

import torch

MANIFEST = "mmrl_export.json"

_LOAD_FULL = ("from transformers import AutoModelForImageTextToText, AutoProcessor\n"
              "model = AutoModelForImageTextToText.from_pretrained(PATH)\n"
              "processor = AutoProcessor.from_pretrained(PATH)")
_LOAD_LORA = ("from peft import PeftModel\n"
              "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
              "base = AutoModelForImageTextToText.from_pretrained(BASE_MODEL)\n"
              "model = PeftModel.from_pretrained(base, PATH)\n"
              "processor = AutoProcessor.from_pretrained(PATH)")


def export_qwen_vl(policy, path: str, *, merge_lora: bool = False) -> str:
    """Write ``policy``'s model and processor to the folder ``path`` -> ``path`` (absolute).

    Args:
        policy: a :class:`~mmrl.video.policy.QwenVLPolicy` (uses ``.model``, ``.processor``,
            ``.is_peft``, ``.base``).
        path: the export folder. Created (with its parents); an earlier export there (a folder
            holding ``mmrl_export.json``) or an empty folder is replaced.
        merge_lora: LoRA only: write a merged full model instead of the adapter.

    Returns:
        The absolute path of the export folder.

    Raises:
        ValueError: ``path`` is a file, or a non-empty folder that is not an mmrl export;
            ``merge_lora=True`` on a policy without LoRA; an adapter that cannot be merged
            (DoRA, ``modules_to_save``).
    """
    target = _check_target(path)
    if merge_lora and not policy.is_peft:
        raise ValueError("merge_lora=True but the policy has no LoRA adapter (finetune='full'); "
                         "export without merge_lora (the full model is written as it is)")
    finetune = "lora" if policy.is_peft else "full"
    manifest = {"format": "mmrl_export", "version": 1, "kind": "qwen_vl",
                "layout": "peft_adapter" if policy.is_peft and not merge_lora else "full_model",
                "finetune": finetune, "merged": bool(merge_lora),
                "base_model": _base_name(policy), "dtype": str(policy.base.dtype).split(".")[-1],
                "load": _LOAD_LORA if policy.is_peft and not merge_lora else _LOAD_FULL}

    def write(tmp: str) -> None:
        if merge_lora:
            policy.base.save_pretrained(tmp, state_dict=merged_state_dict(policy.base))
        else:  # PeftModel.save_pretrained writes the adapter only, in peft's format
            policy.model.save_pretrained(tmp)
        policy.processor.save_pretrained(tmp)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)

    return _write_atomically(target, write)


def _base_name(policy) -> Optional[str]:
    """The base checkpoint's hub id or folder, when transformers recorded one."""
    name = getattr(policy.base.config, "_name_or_path", None) or getattr(policy.base,
                                                                        "name_or_path", None)
    return str(name) if name else None


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


def _check_target(path: str) -> str:
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


def _write_atomically(target: str, write) -> str:
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
