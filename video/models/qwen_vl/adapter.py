"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL behind :class:`~mmrl.video.models.base.VLMAdapter`.

- Inputs: video through :func:`.inputs.build_qwen_video_inputs` (slow-fast or uniform), images
  and text through the processor.
- Positions: mRoPE ``[3, 1, n]`` per architecture (:func:`.positions.mrope_position_ids`); the
  release's rule, not transformers 5.24's ``get_rope_index`` (wrong for text after a video of more
  than one temporal grid); response token ``k`` gets ``max(prompt positions) + 1 + k``.
- Vision: ``get_video_features`` / ``get_image_features`` of the inner model, once per unique
  prompt; their pooled output replaces the ``<|video_pad|>`` / ``<|image_pad|>`` embeddings.
- Qwen3-VL DeepStack: the tower's intermediate features (one ``[U, P, H]`` tensor per injected
  decoder layer, zeros off the visual slots) go to the language model as ``visual_pos_masks``
  ``[b, P + t]`` (response positions are never visual) and ``deepstack_visual_embeds`` (the
  features at those slots, row-major), expanded to the rows by indexing.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from mmrl.video.io import VideoError
from mmrl.video.models.base import VLMAdapter, chat_turn_end

from .positions import MROPE_MODEL_TYPES, mrope_position_ids

VISION_KEYS = ("pixel_values_videos", "video_grid_thw", "pixel_values", "image_grid_thw")


class DeepStack(NamedTuple):
    """Qwen3-VL's vision state: one ``[U, P, H]`` tensor per injected decoder layer (the
    tower's features at the visual slots, zeros elsewhere) and the placeholder ids marking
    the visual slots."""

    features: List[torch.Tensor]
    token_ids: Tuple[int, int]


class QwenVLAdapter(VLMAdapter):
    """The Qwen-VL family (``model_type`` qwen2_vl, qwen2_5_vl, qwen3_vl)."""

    name = "qwen_vl"
    model_types = MROPE_MODEL_TYPES
    position_dims = 3

    def vision_modules(self, base) -> list:
        return [base.model.visual]  # the tower and its merger

    def end_token_ids(self, tokenizer) -> List[int]:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        return sorted({i for i in ids + [tokenizer.eos_token_id]
                       if isinstance(i, int) and i >= 0})

    def turn_end_id(self, tokenizer) -> int:
        """``<|im_end|>`` (the chat template's end of turn; a base model's EOS is
        ``<|endoftext|>``)."""
        return chat_turn_end(tokenizer)

    def banned_token_ids(self, config) -> List[int]:
        return [i for i in (config.image_token_id, config.video_token_id,
                            config.vision_start_token_id, config.vision_end_token_id)
                if i is not None]

    # ------------------------------------------------------------------ prompts
    def encode(self, messages, processor, video_options) -> Dict[str, torch.Tensor]:
        from .inputs import build_qwen_video_inputs
        kinds = {item.get("type") for m in messages if isinstance(m.get("content"), list)
                 for item in m["content"] if isinstance(item, dict)}
        if "video" in kinds:
            batch = build_qwen_video_inputs([messages], processor, on_error="raise",
                                            **video_options)
            return dict(batch.inputs)
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = None
        if "image" in kinds:
            images = [_first_image(messages)]
        return dict(processor(text=[text], images=images, return_tensors="pt"))

    def positions(self, base, inputs) -> Tuple[torch.Tensor, int]:
        pos, _ = mrope_position_ids(base.model, {k: v for k, v in inputs.items()
                                                 if k != "attention_mask"})
        return pos, int(pos.max()) + 1

    def vision_payload(self, inputs) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in inputs.items() if k in VISION_KEYS}

    def prompt_embeds(self, base, ids: torch.Tensor, payloads: Sequence[Mapping[str, Any]]
                      ) -> Tuple[torch.Tensor, Optional[DeepStack]]:
        """``([U, P, H] embeddings, DeepStack or None)`` (None: Qwen2/2.5-VL, or no vision)."""
        inner, cfg = base.model, base.config
        emb = inner.get_input_embeddings()(ids)
        deep = None
        for key, grid_key, token_id, fn in (
                ("pixel_values_videos", "video_grid_thw", cfg.video_token_id,
                 inner.get_video_features),
                ("pixel_values", "image_grid_thw", cfg.image_token_id,
                 inner.get_image_features)):
            parts = [p for p in payloads if key in p]
            if not parts:
                continue
            pix = torch.cat([p[key] for p in parts]).to(emb.device)
            grid = torch.cat([p[grid_key] for p in parts]).to(emb.device)
            out = fn(pix, grid, return_dict=True)
            slots = (ids == token_id).unsqueeze(-1).expand_as(emb)
            emb = emb.masked_scatter(slots, torch.cat(out.pooler_output).to(emb.dtype))
            stack = getattr(out, "deepstack_features", None)
            if stack:
                deep = deep or [torch.zeros_like(emb) for _ in stack]
                deep = [d.masked_scatter(slots, torch.cat(f).to(emb.dtype))
                        for d, f in zip(deep, stack)]
        if deep is None:
            return emb, None
        return emb, DeepStack(deep, (cfg.image_token_id, cfg.video_token_id))

    def lm_kwargs(self, vision_state: Optional[DeepStack], ids: torch.Tensor, inv: torch.Tensor,
                  t: int) -> Dict[str, Any]:
        """DeepStack kwargs for rows ``inv``; ``{}`` without DeepStack."""
        if vision_state is None:
            return {}
        marks = torch.tensor(vision_state.token_ids, device=ids.device)
        vis = torch.isin(ids, marks)[inv]  # [U, P] -> [b, P]
        r, c = vis.nonzero(as_tuple=True)
        return {"visual_pos_masks": F.pad(vis, (0, t), value=False),
                "deepstack_visual_embeds": [d[inv[r], c] for d in vision_state.features]}

    # ------------------------------------------------------------------ tiny, export
    def build_tiny(self, folder: str, model_type: Optional[str] = None, **kw) -> str:
        from .tiny import build_tiny
        return build_tiny(folder, model_type or "qwen2_5_vl", **kw)


def _first_image(messages):
    """The conversation's first image, as an RGB PIL image.

    Raises:
        VideoError: a path that cannot be opened as an image.
    """
    from PIL import Image
    src = next(item["image"] for m in messages if isinstance(m.get("content"), list)
               for item in m["content"] if isinstance(item, dict) and item.get("type") == "image")
    try:
        return src if isinstance(src, Image.Image) else Image.open(src).convert("RGB")
    except (OSError, ValueError) as err:
        raise VideoError(str(src), "unreadable_image", str(err)) from None
