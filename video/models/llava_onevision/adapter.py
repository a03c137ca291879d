"""The LLaVA-OneVision family (transformers ``llava_onevision``): a SigLIP vision tower, a
two-layer MLP projector, a learned newline embedding and a Qwen2 language model with 1-D
positions.

What differs from the interface's defaults:

- vision: ``get_video_features`` runs the tower on every frame, projects, pools each frame 2×2
  (bilinear) and appends the newline once per video -> ``[videos, T·q + 1, H]``; images take
  the anyres path (``get_image_features`` -> one ``[tokens, H]`` per image). Both are written
  at the ``<video>`` / ``<image>`` placeholder ids in order, as the model's own forward does.
- frozen vision (``freeze_vision``): the tower, the projector and ``image_newline`` (a bare
  parameter of the inner model, held by a small module so it freezes with the rest).
- end tokens: the tokenizer's EOS, ``<|im_end|>`` and ``<|endoftext|>`` (Qwen2's chat ends);
  a completion given as text (a preference pair's) ends with ``<|im_end|>``.
- positions: 1-D ``0..n-1`` (the default): the model's forward takes ``arange`` positions.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from mmrl.video.models.base import VLMAdapter, chat_turn_end

from .inputs import encode_conversation

__all__ = ["LlavaOneVisionAdapter"]


class _Newline(nn.Module):
    """Holds the inner model's ``image_newline`` parameter (shared, not copied)."""

    def __init__(self, param: nn.Parameter):
        super().__init__()
        self.image_newline = param


class LlavaOneVisionAdapter(VLMAdapter):
    """LLaVA-OneVision behind :class:`~mmrl.video.models.base.VLMAdapter`."""

    name = "llava_onevision"
    model_types = ("llava_onevision",)
    position_dims = 1

    def vision_modules(self, base) -> List[nn.Module]:
        """The SigLIP tower, the projector and ``image_newline`` (frozen by ``freeze_vision``)."""
        inner = base.model
        return [inner.vision_tower, inner.multi_modal_projector, _Newline(inner.image_newline)]

    def end_token_ids(self, tokenizer) -> List[int]:
        """EOS, ``<|im_end|>`` and ``<|endoftext|>`` where the vocabulary has them."""
        ids = [tokenizer.eos_token_id]
        for token in ("<|im_end|>", "<|endoftext|>"):
            i = tokenizer.convert_tokens_to_ids(token)
            if i is not None and i != tokenizer.unk_token_id:
                ids.append(i)
        return sorted({i for i in ids if isinstance(i, int) and i >= 0})

    def turn_end_id(self, tokenizer) -> int:
        """``<|im_end|>`` (its Qwen2 chat template's end of turn), else the EOS."""
        return chat_turn_end(tokenizer)

    def encode(self, messages: Sequence[Mapping], processor,
               video_options: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """See :func:`~mmrl.video.models.llava_onevision.inputs.encode_conversation`."""
        return encode_conversation(messages, processor, video_options)

    def prompt_embeds(self, base, ids: torch.Tensor, payloads: Sequence[Mapping[str, Any]]
                      ) -> Tuple[torch.Tensor, Any]:
        """``[U, P, H]`` embeddings of the prompts ``ids`` with their image and video features
        at the placeholders (the tower runs once per prompt); no vision state."""
        inner = base.model
        cfg = base.config
        emb = inner.get_input_embeddings()(ids)
        feats = (("pixel_values", cfg.image_token_id, self._image_features),
                 ("pixel_values_videos", cfg.video_token_id, self._video_features))
        for key, token_id, fn in feats:
            parts = [p for p in payloads if key in p]
            if not parts:
                continue
            x = fn(inner, parts, emb.device)  # [slots, H], prompt by prompt
            slots = (ids == token_id).unsqueeze(-1).expand_as(emb)
            if int(slots[..., 0].sum()) != x.shape[0]:
                raise ValueError(f"{int(slots[..., 0].sum())} placeholder tokens (id {token_id}) "
                                 f"for {x.shape[0]} {key} features; the prompts were encoded by "
                                 f"another processor than this model's")
            emb = emb.masked_scatter(slots, x.to(emb.dtype))
        return emb, None

    @staticmethod
    def _video_features(inner, parts: Sequence[Mapping[str, Any]], device) -> torch.Tensor:
        """``[sum of T·q + 1, H]``: videos of equal shape share one tower call; order kept."""
        dtype = inner.vision_tower.dtype
        pix = [p["pixel_values_videos"] for p in parts]  # each [v, T, 3, S, S]
        out: List[Optional[torch.Tensor]] = [None] * len(pix)
        for shape in dict.fromkeys(tuple(x.shape[1:]) for x in pix):
            members = [i for i, x in enumerate(pix) if tuple(x.shape[1:]) == shape]
            batch = torch.cat([pix[i] for i in members]).to(device, dtype)
            f = inner.get_video_features(batch, return_dict=True).pooler_output  # [v', L, H]
            counts = [pix[i].shape[0] for i in members]
            for i, chunk in zip(members, f.split(counts)):
                out[i] = chunk.flatten(0, 1)
        return torch.cat(out)

    @staticmethod
    def _image_features(inner, parts: Sequence[Mapping[str, Any]], device) -> torch.Tensor:
        """``[image tokens, H]``, one tower call per prompt (anyres tiles differ per image)."""
        dtype = inner.vision_tower.dtype
        out = []
        for p in parts:
            f = inner.get_image_features(p["pixel_values"].to(device, dtype),
                                         p["image_sizes"].to(device),
                                         batch_num_images=p.get("batch_num_images"),
                                         return_dict=True).pooler_output
            out.extend(f)
        return torch.cat(out)

    def build_tiny(self, folder: str, model_type: Optional[str] = None, **kw) -> str:
        """A tiny LLaVA-OneVision in ``folder`` -> folder (keywords: see
        :func:`~mmrl.video.models.llava_onevision.tiny.build_tiny_llava_onevision`)."""
        from .tiny import build_tiny_llava_onevision
        self.check(model_type or self.model_types[0])
        return build_tiny_llava_onevision(folder, **kw)
