"""Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models (≈200k parameters) and processors, built offline.

The demo and the tests load the result BY PATH, through :func:`mmrl.video.policy.load_vlm`,
the same code a user's checkpoint takes. Recipe: ../shared/TINY_MODELS.md — a byte-level
``Qwen2Tokenizer`` (the 256 ByteLevel characters, no merges, the Qwen specials) built in code, the
architecture's image/video processors at a few hundred pixels per frame, a two-layer text model
of width 64 and a two-block vision tower. Each builder writes to a private temporary folder and
renames it into place. transformers is imported inside the functions. :func:`build_tiny` picks
the builder by ``model_type`` (the adapter's ``build_tiny``).
"""
from __future__ import annotations

from mmrl.video.models.tiny_parts import byte_tokenizer, save_atomically

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]

ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def build_tiny_qwen_vl(folder: str, *, seed: int = 0, hidden_size: int = 64, layers: int = 2,
                       max_pixels: int = 28 * 28 * 16, vision_init_std: float = 0.5,
                       overwrite: bool = False) -> str:
    """Save a tiny Qwen2.5-VL processor + model to ``folder`` (``save_pretrained``) -> folder.

    Args:
        folder: target folder (created). An existing tiny model there is kept unless
            ``overwrite`` (so a demo re-run does not rebuild it).
        seed: torch seed of the random initialization (same seed, same weights).
        hidden_size: text width (a multiple of 16: 4 heads whose head_dim/2 splits 2+3+3 in
            mRoPE sections scaled accordingly).
        layers: text decoder layers.
        max_pixels: the processors' per-frame pixel cap (min is 28·28·4).
        vision_init_std: the vision tower's ``initializer_range``. With Qwen's 0.02, a random
            two-block tower maps every frame to nearly the same features (their spread across
            colours is ~1 % of their norm), so a tiny model cannot learn anything visual; 0.5
            gives features that differ with the content, as a pretrained tower's do.

    Raises:
        ValueError: a hidden size that is not a multiple of 16.
    """
    return _build("qwen2_5_vl", folder, seed=seed, hidden_size=hidden_size, layers=layers,
                  max_pixels=max_pixels, vision_init_std=vision_init_std, overwrite=overwrite)


def build_tiny_qwen2_vl(folder: str, *, seed: int = 0, hidden_size: int = 64, layers: int = 2,
                        max_pixels: int = 28 * 28 * 16, vision_init_std: float = 0.5,
                        overwrite: bool = False) -> str:
    """Save a tiny Qwen2-VL processor + model to ``folder`` -> folder.

    Same arguments as :func:`build_tiny_qwen_vl`. Qwen2-VL differs from 2.5 in its vision tower
    (no window attention, a LayerNorm merger) and its rope index (one temporal position per
    temporal grid, no ``second_per_grid_ts`` scaling).
    """
    return _build("qwen2_vl", folder, seed=seed, hidden_size=hidden_size, layers=layers,
                  max_pixels=max_pixels, vision_init_std=vision_init_std, overwrite=overwrite)


def build_tiny_qwen3_vl(folder: str, *, seed: int = 0, hidden_size: int = 64, layers: int = 2,
                        max_pixels: int = 32 * 32 * 16, vision_init_std: float = 0.5,
                        overwrite: bool = False) -> str:
    """Save a tiny Qwen3-VL processor + model to ``folder`` -> folder.

    Same arguments as :func:`build_tiny_qwen_vl` (``max_pixels`` counts 16-pixel patches: min
    is 32·32·4). Qwen3-VL has 16-pixel patches, interleaved mRoPE, DeepStack (the vision
    tower's first two blocks are added to the first two decoder layers' visual positions) and
    a video processor that writes a ``<t seconds>`` timestamp before every temporal grid.
    """
    return _build("qwen3_vl", folder, seed=seed, hidden_size=hidden_size, layers=layers,
                  max_pixels=max_pixels, vision_init_std=vision_init_std, overwrite=overwrite)


def build_tiny(folder: str, model_type: str = "qwen2_5_vl", **kw) -> str:
    """The tiny model of ``model_type`` (qwen2_vl, qwen2_5_vl or qwen3_vl) in ``folder``.

    Raises:
        ValueError: another ``model_type``.
    """
    builders = {"qwen2_vl": build_tiny_qwen2_vl, "qwen2_5_vl": build_tiny_qwen_vl,
                "qwen3_vl": build_tiny_qwen3_vl}
    if model_type not in builders:
        raise ValueError(f"model_type={model_type!r}; expected one of {ARCHS}")
    return builders[model_type](folder, **kw)


def _build(arch: str, folder: str, *, seed: int, hidden_size: int, layers: int, max_pixels: int,
           vision_init_std: float, overwrite: bool) -> str:
    import torch

    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}; expected one of {ARCHS}")
    if hidden_size % 16:
        raise ValueError(f"hidden_size={hidden_size}; expected a multiple of 16 (4 heads, "
                         f"mRoPE sections in the ratio 2:3:3)")
    def write(tmp: str) -> None:
        tok = byte_tokenizer(tmp, SPECIALS)
        _processor(arch, tok, max_pixels).save_pretrained(tmp)
        torch.manual_seed(seed)
        _model(arch, tok, hidden_size, layers, vision_init_std).save_pretrained(tmp)
    return save_atomically(folder, write, overwrite)


def _processor(arch: str, tok, max_pixels: int):
    from transformers import (Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor)
    if arch == "qwen3_vl":
        factor = 32  # 16-pixel patches, 2x2 merge
        image = Qwen2VLImageProcessor(min_pixels=factor * factor * 4, max_pixels=max_pixels,
                                      patch_size=16, merge_size=2, temporal_patch_size=2)
        # the Qwen3 video processor bounds t·h·w (all frames), not one frame
        video = Qwen3VLVideoProcessor(size={"shortest_edge": factor * factor * 4,
                                            "longest_edge": max_pixels * 16},
                                      patch_size=16, merge_size=2, temporal_patch_size=2)
        return Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                                chat_template=CHAT_TEMPLATE)
    pix = dict(min_pixels=28 * 28 * 4, max_pixels=max_pixels, patch_size=14, merge_size=2,
               temporal_patch_size=2)
    cls = Qwen2VLProcessor if arch == "qwen2_vl" else Qwen2_5_VLProcessor
    return cls(image_processor=Qwen2VLImageProcessor(**pix), tokenizer=tok,
               video_processor=Qwen2VLVideoProcessor(**pix), chat_template=CHAT_TEMPLATE)


def _model(arch: str, tok, hidden_size: int, layers: int, vision_init_std: float):
    """The randomly initialized model (seed the torch RNG first)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration)
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    half = hidden_size // 4 // 2  # head_dim / 2, split over (t, h, w) as 2:3:3
    section = [half * 2 // 8, half * 3 // 8, half - half * 2 // 8 - half * 3 // 8]
    text = dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                 "mrope_section": section},
                bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.pad_token_id)
    vision = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, initializer_range=vision_init_std)
    if arch == "qwen2_5_vl":
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            vision, hidden_size=32, intermediate_size=64, out_hidden_size=hidden_size,
            window_size=56, fullatt_block_indexes=[1]), **ids)
        return Qwen2_5_VLForConditionalGeneration(cfg)
    if arch == "qwen2_vl":
        cfg = Qwen2VLConfig(text_config=text, vision_config=dict(
            vision, embed_dim=32, mlp_ratio=2, hidden_size=hidden_size), **ids)
        return Qwen2VLForConditionalGeneration(cfg)
    # Qwen3-VL: explicit head_dim, interleaved mRoPE (T gets the frequencies H and W leave)
    text["head_dim"] = hidden_size // 4
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4,
                               "mrope_section": [half // 2, half // 4, half // 4],
                               "mrope_interleaved": True}
    cfg = Qwen3VLConfig(text_config=text, vision_config=dict(
        vision, patch_size=16, hidden_size=32, intermediate_size=64, out_hidden_size=hidden_size,
        num_position_embeddings=64, deepstack_visual_indexes=[0, 1]), **ids)
    return Qwen3VLForConditionalGeneration(cfg)
