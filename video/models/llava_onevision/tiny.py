"""A tiny LLaVA-OneVision (≈150k parameters) and its processor, built offline.

Recipe (see ../shared/TINY_MODELS.md for the Qwen one it follows): a byte-level
``Qwen2Tokenizer`` (the 256 ByteLevel characters, no merges) with the LLaVA-OneVision specials
``<image>`` / ``<video>`` and Qwen2's chat tokens; ``LlavaOnevisionImageProcessor`` /
``LlavaOnevisionVideoProcessor`` at ``image_size``² pixels (anyres pinpoints of 1×1 to 2×2
tiles); a two-layer SigLIP tower (14-pixel patches) and a two-layer Qwen2 text model of width
64. With ``image_size=56`` a frame is 4×4 patches, pooled to 2×2 = 4 tokens, and a video of
T frames is ``4·T + 1`` tokens (the newline). The folder is written under a private name and
renamed into place (several ranks may build it at once). transformers is imported inside.
"""
from __future__ import annotations

from mmrl.video.models.tiny_parts import byte_tokenizer, save_atomically

# The release's layout: per message the images, then the videos, then each text after a newline;
# list contents only (a string content renders nothing: inputs.py turns it into a text item).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% for c in m['content'] if c['type'] == 'image' %}<image>{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'video' %}<video>{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ '\\n' ~ c['text'] }}{% endfor %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

SPECIALS = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]
PATCH = 14


def build_tiny_llava_onevision(folder: str, *, seed: int = 0, hidden_size: int = 64,
                               layers: int = 2, image_size: int = 56,
                               overwrite: bool = False) -> str:
    """Save a tiny LLaVA-OneVision processor + model to ``folder`` (``save_pretrained``) ->
    folder.

    Args:
        folder: target folder (created). An existing model there is kept unless ``overwrite``.
        seed: torch seed of the random initialization (same seed, same weights).
        hidden_size: text width (a multiple of 4: 4 query heads, 2 key/value heads).
        layers: text decoder layers.
        image_size: the vision tower's square input (a multiple of 14); frames and image tiles
            are resized to it.

    Raises:
        ValueError: a ``hidden_size`` or ``image_size`` of the wrong multiple.
    """
    import torch
    if hidden_size % 4 or hidden_size <= 0:
        raise ValueError(f"hidden_size={hidden_size}; expected a positive multiple of 4 "
                         f"(4 attention heads)")
    if image_size % PATCH or image_size <= 0:
        raise ValueError(f"image_size={image_size}; expected a positive multiple of the "
                         f"{PATCH}-pixel patch")
    def write(tmp: str) -> None:
        tok = byte_tokenizer(tmp, SPECIALS)
        _processor(tok, image_size).save_pretrained(tmp)
        torch.manual_seed(seed)
        _model(tok, hidden_size, layers, image_size).save_pretrained(tmp)
    return save_atomically(folder, write, overwrite)


def _pinpoints(image_size: int):
    """Anyres grids of 1×1 to 2×2 tiles (the release has 1×1 to 6×6 of 384 pixels)."""
    return [[image_size * a, image_size * b] for a in (1, 2) for b in (1, 2)]


def _processor(tok, image_size: int):
    from transformers import (LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor)
    size = {"height": image_size, "width": image_size}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size,
                                                     image_grid_pinpoints=_pinpoints(image_size)),
        tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(image_size // PATCH) ** 2, vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE)


def _model(tok, hidden_size: int, layers: int, image_size: int):
    """The randomly initialized model (seed the torch RNG first)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    end = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=PATCH, vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=None, eos_token_id=end,
                         pad_token_id=tok.pad_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=_pinpoints(image_size), vision_feature_layer=-1,
        vision_feature_select_strategy="full")
    return LlavaOnevisionForConditionalGeneration(cfg)
