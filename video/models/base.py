"""The VLM adapter interface: everything a vision-language model family does differently.

:class:`mmrl.video.policy.VLMPolicy` (the generic policy: KV-cached sampling, top-p, stop strings,
``allowed_answers``, TW weights, log-probs, ``concat_rollouts``, reference/LoRA, state dicts,
FSDP) never names a family; it calls one :class:`VLMAdapter`, picked from the registry in
:mod:`mmrl.video.models` by the checkpoint's ``config.model_type``. A family is a folder
``video/models/<family>/`` with a subclass of :class:`VLMAdapter` and one registry entry.

Names: ``model`` is what ``load`` returned (maybe peft-wrapped), ``base`` the unwrapped
``*ForConditionalGeneration`` (``model.get_base_model()`` or ``model``). Shapes: ``U`` unique
prompts, ``b`` rows (samples), ``P`` the (left-padded) prompt length, ``n`` one prompt's length,
``t`` response tokens, ``H`` hidden size, ``V`` vocabulary, ``D`` position dimensions
(``position_dims``: 3 for mRoPE, 1 for 1-D positions).

The surface (what the policy calls, in the order a rollout calls it)::

    name: str                            the family's folder name (the export's ``kind``)
    model_types: Tuple[str, ...]         config.model_type values handled (the registry's key)
    position_dims: int                   D
    check(model_type)                    NotImplementedError for a type not in model_types

    load(path, dtype, device) -> (model, processor)
        from_pretrained on a hub id or local folder; model on ``device`` in ``dtype``
        (a torch.dtype). No LoRA, no freezing: the policy's loader does those with:
    lora_target_regex(targets) -> str    peft ``target_modules`` regex: ``targets`` (e.g.
                                         ["q_proj", "v_proj"]) inside the language model only
    vision_modules(base) -> [nn.Module]  frozen by ``freeze_vision`` (tower + projector/merger)
    decoder_layers(base) -> [nn.Module]  the language model's blocks (FSDP2 units)
    language_model(base) -> nn.Module    called as ``lm(inputs_embeds=[b, L, H],
                                         attention_mask=[b, L], position_ids=lm_positions(pos),
                                         use_cache=bool, cache=DynamicCache|None, **lm_kwargs)``
                                         and returns ``.last_hidden_state [b, L, H]``
    embed_tokens(base) -> nn.Module      ids [..] -> [.., H]
    lm_head(base) -> nn.Linear           [.., H] -> [.., V]
    end_token_ids(tokenizer) -> [int]    tokens that end a completion (kept in its mask)
    turn_end_id(tokenizer) -> int        the end-of-turn token appended to a completion given
                                         as text (a preference pair's, :mod:`mmrl.video.pairs`)
    banned_token_ids(config) -> [int]    never sampled (vision placeholders: one in a completion
                                         would shift the visual features)

    encode(messages, processor, video_options) -> dict
        ONE prompt's processor tensors: ``input_ids [1, n]``, ``attention_mask [1, n]`` and the
        family's vision tensors. ``messages`` is a qwen-vl-utils style conversation
        (:func:`mmrl.video.data.build_messages`); ``video_options`` the job's video keywords
        (``mode``, ``fps``, ``max_frames``, slow-fast budgets); a family may ignore those it
        cannot use. Raises :class:`mmrl.video.io.VideoError` for unreadable media (the policy
        skips the prompt and counts it).
    positions(base, inputs) -> (pos [D, 1, n] long, next_pos int)
        the prompt's positions as the model was trained with them, and the first response
        position; response token ``k`` gets ``next_pos + k`` on every axis. Left padding gets 1.
    vision_payload(inputs) -> dict       the tensors kept ONCE per prompt for later forwards
                                         (pixel values, grids, ...; never copied per sample)
    prompt_embeds(base, ids [U, P], payloads[U]) -> (emb [U, P, H], vision_state)
        input embeddings of the unique prompts with the vision tower run once per prompt and
        its features placed at the placeholder tokens; ``vision_state`` is whatever
        ``lm_kwargs`` needs (None when nothing)
    lm_kwargs(vision_state, ids [U, P], inv [b], t) -> dict
        extra language-model kwargs for rows ``inv`` (indices into the U prompts) whose prompt
        is followed by ``t`` response tokens (e.g. Qwen3-VL DeepStack:
        ``visual_pos_masks [b, P + t]``, ``deepstack_visual_embeds``); {} by default. Passed
        with the prompt's forward only (the prefill step while sampling).
    lm_positions(pos [D, b, L]) -> position_ids as the language model takes them
        (default: ``pos`` for D > 1, ``pos[0]`` = [b, L] for D == 1)

    build_tiny(folder, model_type=None, **kw) -> folder
        save a tiny random model + processor (offline, seconds on CPU) with save_pretrained
    export(policy, path, merge_lora=False, state_dict=None) -> str
        the trained model in its library's format (default:
        :func:`mmrl.video.models.export.export_vlm`, a transformers folder, kind = ``name``)

The defaults below fit transformers' ``*ForConditionalGeneration`` VLMs with
``base.model.language_model``, ``base.lm_head`` and 1-D positions; a family overrides what
differs. Conformance: ``tests/video/models/conformance.py`` (``VLMAdapterConformance``), one
subclass per family.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["VLMAdapter", "chat_turn_end"]


class VLMAdapter:
    """One model family's specifics (see the module docstring for the surface and shapes)."""

    name: str = ""
    model_types: Tuple[str, ...] = ()
    position_dims: int = 1

    # ------------------------------------------------------------------ loading
    def check(self, model_type: str) -> None:
        """Raise for a ``model_type`` this adapter does not handle.

        Raises:
            UnsupportedModelError: ``model_type`` not in ``model_types``.
        """
        if model_type not in self.model_types:
            from mmrl.video.models import UnsupportedModelError
            raise UnsupportedModelError(
                f"model_type={model_type!r} is not handled by {type(self).__name__} (handled: "
                f"{', '.join(self.model_types)}); load a checkpoint of this family, or use "
                f"mmrl.video.models.adapter_for(model_type) to pick the family")

    def load(self, path: str, dtype: torch.dtype, device: str) -> tuple:
        """``(model, processor)`` from a hub id or local folder."""
        from transformers import AutoModelForImageTextToText, AutoProcessor
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
        return model, processor

    def lora_target_regex(self, targets: Sequence[str]) -> str:
        """peft ``target_modules``: the ``targets`` linear layers of the language model."""
        return rf".*language_model.*\.({'|'.join(targets)})"

    def vision_modules(self, base) -> List[nn.Module]:
        raise NotImplementedError(f"{type(self).__name__}.vision_modules")

    def decoder_layers(self, base) -> Sequence[nn.Module]:
        return list(self.language_model(base).layers)

    def language_model(self, base) -> nn.Module:
        return base.model.language_model

    def embed_tokens(self, base) -> nn.Module:
        return base.model.get_input_embeddings()

    def lm_head(self, base) -> nn.Module:
        return base.lm_head

    def end_token_ids(self, tokenizer) -> List[int]:
        """The tokenizer's EOS (sorted, unique, valid ids only)."""
        return _valid_ids([tokenizer.eos_token_id])

    def turn_end_id(self, tokenizer) -> int:
        """The token that ends an assistant turn, appended to a completion given as text (a
        preference pair's): the tokenizer's EOS (a chat model's end of turn).

        Raises:
            ValueError: a tokenizer without an EOS token.
        """
        eos = tokenizer.eos_token_id
        if not isinstance(eos, int) or eos < 0:
            raise ValueError(f"{type(self).__name__}.turn_end_id: the tokenizer has no EOS token "
                             f"(eos_token_id={eos!r}); set tokenizer.eos_token to the chat "
                             f"template's end-of-turn token, or override turn_end_id")
        return eos

    def banned_token_ids(self, config) -> List[int]:
        """The vision placeholder ids named in ``config`` (``image_token_id``,
        ``video_token_id``, and ``image_token_index``/``video_token_index`` spellings)."""
        names = ("image_token_id", "video_token_id", "image_token_index", "video_token_index")
        return _valid_ids([getattr(config, n, None) for n in names])

    # ------------------------------------------------------------------ prompts
    def encode(self, messages: Sequence[Mapping], processor,
               video_options: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__}.encode")

    def positions(self, base, inputs: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, int]:
        """1-D positions ``0..n-1`` -> ``([1, 1, n], n)``."""
        n = inputs["input_ids"].shape[1]
        return torch.arange(n).view(1, 1, n), n

    def vision_payload(self, inputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Every processor tensor but the ids and the mask."""
        return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}

    def prompt_embeds(self, base, ids: torch.Tensor, payloads: Sequence[Mapping[str, Any]]
                      ) -> Tuple[torch.Tensor, Any]:
        raise NotImplementedError(f"{type(self).__name__}.prompt_embeds")

    def lm_kwargs(self, vision_state: Any, ids: torch.Tensor, inv: torch.Tensor,
                  t: int) -> Dict[str, Any]:
        return {}

    def lm_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """``[D, b, L]`` -> the language model's ``position_ids``."""
        return pos if self.position_dims > 1 else pos[0]

    # ------------------------------------------------------------------ tiny model, export
    def build_tiny(self, folder: str, model_type: Optional[str] = None, **kw) -> str:
        raise NotImplementedError(f"{type(self).__name__}.build_tiny")

    def export(self, policy, path: str, merge_lora: bool = False,
               state_dict: Optional[Dict[str, Any]] = None) -> str:
        """The model in transformers' format (:func:`mmrl.video.models.export.export_vlm`)."""
        from mmrl.video.models.export import export_vlm
        return export_vlm(policy, path, kind=self.name, merge_lora=merge_lora,
                          state_dict=state_dict)


def chat_turn_end(tokenizer, token: str = "<|im_end|>") -> int:
    """``token``'s id when the vocabulary has it (ChatML's end of turn), else the EOS."""
    i = tokenizer.convert_tokens_to_ids(token)
    if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id:
        return i
    return VLMAdapter().turn_end_id(tokenizer)


def _valid_ids(ids) -> List[int]:
    return sorted({i for i in ids if isinstance(i, int) and i >= 0})
