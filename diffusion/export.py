"""Export a trained flow adapter (SD3, FLUX, any family of :mod:`mmrl.diffusion.models`) as a
folder diffusers loads with its public API (``FlowAdapter.export`` calls this).

:func:`export_flow_policy` writes one of two layouts plus a small ``mmrl_export.json`` that records
what the folder holds and how to load it (``Pipeline`` = ``StableDiffusion3Pipeline`` or
``FluxPipeline``, as ``pipeline_class`` in the manifest says):

- LoRA -> the transformer's adapter as a diffusers LoRA file
  (``pytorch_lora_weights.safetensors``, written by ``Pipeline.save_lora_weights`` with the
  adapter's rank and alpha in its metadata), to load onto the base pipeline it was trained from
  (``base_model`` in the manifest)::

      pipe = Pipeline.from_pretrained(BASE_MODEL)
      pipe.load_lora_weights(path)

- full fine-tuning, no fine-tuning, or LoRA with ``merge_lora=True`` -> the whole pipeline
  (``model_index.json`` and one folder per component, ``save_pretrained``); a merged LoRA is
  folded into the transformer's weights (W + (α/r)·B·A), so no peft is needed to load it::

      pipe = Pipeline.from_pretrained(path)
      # a pipeline saved without some text encoders (SD3 without T5) records them as absent;
      # pass them as None: Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
      # mmrl.diffusion.models.base.load_pipeline("Pipeline", path) does that for you.

The merge never touches the live transformer: merged weights go into a new CPU state dict and a
new transformer built around it (one transformer's worth of host memory, no second copy on the
accelerator), so training goes on after an export exactly as before. The folder is written under
a temporary sibling name and renamed into place; an existing export at ``path`` is replaced.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from mmrl.train.export_io import (MANIFEST, check_target, merged_state_dict,  # noqa: F401
                             write_atomically)



def export_flow_policy(policy, path: str, *, merge_lora: bool = False,
                       state_dict: Optional[Dict[str, Any]] = None) -> str:
    """Write ``policy``'s pipeline (or its LoRA adapter) to the folder ``path`` -> ``path``.

    Args:
        policy: a :class:`~mmrl.diffusion.models.base.FlowAdapter` (uses ``.pipe``,
            ``.transformer``, ``.finetune``).
        path: the export folder. Created (with its parents); an earlier export there (a folder
            holding ``mmrl_export.json``) or an empty folder is replaced.
        merge_lora: LoRA only: write the whole pipeline with the adapter merged into the
            transformer instead of the adapter file.
        state_dict: full fine-tuning: the transformer's full weights to write instead of the
            live ones (an FSDP-sharded transformer: the runner passes the gathered weights).

    Returns:
        The absolute path of the export folder.

    Raises:
        ValueError: ``path`` is a file, or a non-empty folder that is not an mmrl export;
            ``merge_lora=True`` on a policy without LoRA; several adapters on the transformer;
            an adapter that cannot be merged (DoRA).
    """
    target = check_target(path)
    lora = policy.finetune == "lora"
    if merge_lora and not lora:
        raise ValueError(f"merge_lora=True but the policy has no LoRA adapter "
                         f"(finetune={policy.finetune!r}); export without merge_lora (the whole "
                         f"pipeline is written as it is)")
    pipe, cls = policy.pipe, type(policy.pipe).__name__
    adapter = lora and not merge_lora
    absent = sorted(k for k, v in pipe.components.items() if v is None)
    if adapter:
        load = f"pipe = {cls}.from_pretrained(BASE_MODEL)\npipe.load_lora_weights(PATH)"
    else:
        nones = "".join(f", {k}=None" for k in absent if k.startswith(("text_encoder",
                                                                       "tokenizer")))
        load = f"pipe = {cls}.from_pretrained(PATH{nones})"
    manifest = {"format": "mmrl_export", "version": 1, "kind": "flow_pipeline",
                "pipeline_class": cls,
                "layout": "diffusers_lora" if adapter else "diffusers_pipeline",
                "finetune": policy.finetune, "merged": bool(merge_lora),
                "base_model": _base_name(pipe),
                "dtype": str(policy.transformer.dtype).split(".")[-1], "load": load}

    def write(tmp: str) -> None:
        if adapter:
            _save_lora(pipe, policy.transformer, tmp)
        elif merge_lora or (state_dict is not None and not lora):
            if merge_lora:
                _adapter_name(policy.transformer)
                weights = merged_state_dict(policy.transformer)
            else:
                weights = state_dict
            fresh = _fresh_transformer(policy.transformer, weights)
            type(pipe)(**{**pipe.components, "transformer": fresh}).save_pretrained(tmp)
        else:
            pipe.save_pretrained(tmp)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)

    return write_atomically(target, write)


def _adapter_name(transformer) -> str:
    names = list(getattr(transformer, "peft_config", {}) or {})
    if len(names) != 1:
        raise ValueError(f"the transformer carries adapters {names}; expected exactly one "
                         f"(the policy's LoRA); delete the others with "
                         f"transformer.delete_adapters(name) before exporting")
    return names[0]


def _save_lora(pipe, transformer, folder: str) -> None:
    """The adapter via ``save_lora_weights``, its LoraConfig (rank, alpha, targets) as metadata.

    Without the metadata diffusers infers the rank from the shapes and takes alpha = rank, which
    is a different scale whenever alpha != rank (flow_grpo: r 32, alpha 64).
    """
    from peft import get_peft_model_state_dict

    name = _adapter_name(transformer)
    type(pipe).save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name=name),
        transformer_lora_adapter_metadata=transformer.peft_config[name].to_dict())


def _fresh_transformer(transformer, state):
    """A new transformer of the same class (FSDP2's wrapper class unwrapped) holding ``state``."""
    from accelerate import init_empty_weights

    cls = type(transformer)
    if cls.__name__.startswith("FSDP"):
        cls = next(c for c in cls.__mro__[1:] if c.__name__ == cls.__name__[len("FSDP"):])
    # parameters on the meta device (no init, no memory), replaced by the given tensors below
    with init_empty_weights(include_buffers=False):
        fresh = cls.from_config(transformer.config)
    fresh.load_state_dict(state, strict=True, assign=True)
    return fresh.eval()


def _base_name(pipe) -> Optional[str]:
    """The base pipeline's hub id or folder, when diffusers recorded one."""
    name = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None)
    return str(name) if name else None
