"""Export a trained VLM policy as a Hugging Face folder that ``from_pretrained`` loads.

The default of :meth:`mmrl.video.models.base.VLMAdapter.export` (any transformers
``AutoModelForImageTextToText`` family). :func:`export_vlm` writes one of three layouts, always
with the processor and a small ``mmrl_export.json`` that records what the folder holds and how to
load it:

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
from typing import Any, Dict, Optional

from mmrl.train.export_io import (MANIFEST, check_target, merged_state_dict,  # noqa: F401
                             write_atomically)


_LOAD_FULL = ("from transformers import AutoModelForImageTextToText, AutoProcessor\n"
              "model = AutoModelForImageTextToText.from_pretrained(PATH)\n"
              "processor = AutoProcessor.from_pretrained(PATH)")
_LOAD_LORA = ("from peft import PeftModel\n"
              "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
              "base = AutoModelForImageTextToText.from_pretrained(BASE_MODEL)\n"
              "model = PeftModel.from_pretrained(base, PATH)\n"
              "processor = AutoProcessor.from_pretrained(PATH)")


def export_vlm(policy, path: str, *, kind: str, merge_lora: bool = False,
               state_dict: Optional[Dict[str, Any]] = None) -> str:
    """Write ``policy``'s model and processor to the folder ``path`` -> ``path`` (absolute).

    Args:
        policy: a :class:`~mmrl.video.policy.VLMPolicy` (uses ``.model``, ``.processor``,
            ``.is_peft``, ``.base``).
        kind: the family's name, recorded in ``mmrl_export.json`` (e.g. ``"qwen_vl"``).
        path: the export folder. Created (with its parents); an earlier export there (a folder
            holding ``mmrl_export.json``) or an empty folder is replaced.
        merge_lora: LoRA only: write a merged full model instead of the adapter.
        state_dict: full fine-tuning: the full weights to write instead of the live model's
            (an FSDP-sharded model: the runner passes the gathered final weights).

    Returns:
        The absolute path of the export folder.

    Raises:
        ValueError: ``path`` is a file, or a non-empty folder that is not an mmrl export;
            ``merge_lora=True`` on a policy without LoRA; an adapter that cannot be merged
            (DoRA, ``modules_to_save``).
    """
    target = check_target(path)
    if merge_lora and not policy.is_peft:
        raise ValueError("merge_lora=True but the policy has no LoRA adapter (finetune='full'); "
                         "export without merge_lora (the full model is written as it is)")
    finetune = "lora" if policy.is_peft else "full"
    manifest = {"format": "mmrl_export", "version": 1, "kind": kind,
                "layout": "peft_adapter" if policy.is_peft and not merge_lora else "full_model",
                "finetune": finetune, "merged": bool(merge_lora),
                "base_model": _base_name(policy), "dtype": str(policy.base.dtype).split(".")[-1],
                "load": _LOAD_LORA if policy.is_peft and not merge_lora else _LOAD_FULL}

    def write(tmp: str) -> None:
        if merge_lora:
            policy.base.save_pretrained(tmp, state_dict=merged_state_dict(policy.base))
        elif state_dict is not None and not policy.is_peft:
            policy.model.save_pretrained(tmp, state_dict=state_dict)
            _plain_architecture(tmp, policy.model)
        else:  # PeftModel.save_pretrained writes the adapter only, in peft's format
            policy.model.save_pretrained(tmp)
        policy.processor.save_pretrained(tmp)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)

    return write_atomically(target, write)


def _plain_architecture(folder: str, model) -> None:
    """config.json names the model's own class, not FSDP2's wrapper class (``FSDP<name>``)."""
    name = type(model).__name__
    if not name.startswith("FSDP"):
        return
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["architectures"] = [name[len("FSDP"):]]
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def _base_name(policy) -> Optional[str]:
    """The base checkpoint's hub id or folder, when transformers recorded one."""
    name = getattr(policy.base.config, "_name_or_path", None) or getattr(policy.base,
                                                                        "name_or_path", None)
    return str(name) if name else None
