"""The Qwen2-VL reward-model backbone shared by HPSv3 and VideoReward.

Both papers fine-tune ``Qwen2VLForConditionalGeneration`` into a reward model
(``Qwen2VLRewardModelBT``: hpsv3 1.0.0 ``hpsv3/model/qwen2vl_trainer.py``, KwaiVGI/VideoAlign
``trainer.py``) with one forward, reproduced here on transformers 5:

1. chat text: one user turn ``[vision item, text]`` rendered by the processor's chat template with
   ``add_generation_prompt=True``; the single ``<|image_pad|>`` / ``<|video_pad|>`` repeated once
   per visual token (what the Qwen2-VL processor does); tokenized with right padding.
2. reward tokens (``<|Reward|>`` for HPSv3, three for VideoReward) added to the tokenizer as
   special tokens; the embedding and ``lm_head`` get ``len(tokenizer)`` rows (what
   ``resize_token_embeddings(len(tokenizer))`` leaves in the released checkpoints).
3. forward: token embeddings, the vision tower's merged output ``masked_scatter``-ed into the
   image / video pad positions, then the inner language model with **plain 1-D positions**
   ``arange(L)`` copied to the 3 mRoPE axes -- what transformers 4.45.2 (pinned by hpsv3) did
   when the reward model called it with ``position_ids=None``, and how the released checkpoints
   were trained. transformers 5's ``Qwen2VLModel`` would compute 3-D mRoPE positions
   (``get_rope_index``) instead, so this module calls ``model.language_model`` (the text
   decoder) directly with the plain positions.
4. last hidden state (after the final RMSNorm) at the reward-token rows, in sequence order; the
   head runs in float32 on it -> ``[B, n_tokens, out]``.

Heads: ``ranknet`` = Linear(H, 1024) -> ReLU -> Dropout(0.05) -> Linear(1024, 16) -> ReLU ->
Linear(16, out) (keys ``rm_head.0/3/5``), ``linear`` = Linear(H, out, bias=False) (hpsv3's
``rm_head_type="default"``, key ``rm_head.weight``).

Checkpoints use the released key layout (transformers 4.45: ``model.*`` = text decoder,
``visual.*`` = vision tower, ``lm_head.*``, ``rm_head.*``); :func:`from_released_keys` maps it to
transformers 5 module names (``model.language_model.*``, ``model.visual.*``), and keys already in
the transformers 5 layout load as they are. A top-level ``"model"`` key is unwrapped.

Preprocessing helpers (:func:`smart_resize`, :func:`resize_pil`, :func:`resize_tensor`,
:func:`to_patches`) are the Qwen2-VL image processor's (transformers 4.45.2
``Qwen2VLImageProcessor``; qwen-vl-utils ``smart_resize``) written in torch, so tensor inputs stay
differentiable and PIL inputs equal the package.

Differs from the issue: built on transformers' ``Qwen2VLForConditionalGeneration`` directly, not
on mmrl.video's adapters, because rewards sit below the video package; the same family is tested.

:func:`build_tiny_checkpoint` writes a random tiny model (hidden 32-64, 1-2 layers) in the released
layout (base folder in the ``Qwen/Qwen2-VL-7B-Instruct`` file layout + one reward state-dict file)
for tests, demos and benchmarks; transformers 4.45.2 (the hpsv3 package's stack) reads it too.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from mmrl.rewards.base import OPENAI_MEAN, OPENAI_STD, as_rgb, load_state_dict_file

IMAGE_FACTOR = 28
MAX_RATIO = 200
HEADS = ("ranknet", "linear")
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"


# --------------------------------------------------------------------------- preprocessing
def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR,
                 min_pixels: int = 4 * 28 * 28, max_pixels: int = 16384 * 28 * 28
                 ) -> Tuple[int, int]:
    """``(h', w')``: multiples of ``factor`` near ``(height, width)`` with ``h'·w'`` bounded.

    qwen-vl-utils' rule (copied into hpsv3 ``dataset/utils.py`` and VideoAlign
    ``vision_process.py``): round each side to a multiple of ``factor`` (Python ``round``, half to
    even; at least ``factor``); if the area exceeds ``max_pixels`` scale both sides down by
    ``β = √(h·w / max_pixels)`` and floor to the factor, elif it is below ``min_pixels`` scale up
    by ``β = √(min_pixels / (h·w))`` and ceil. The min bound is not re-checked after the max
    branch. 1024×1024 with min = max = 200704 -> 448×448; 768×1344 -> 336×588.

    Raises:
        ValueError: a non-positive side, or an aspect ratio above 200.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width}; expected positive height and width")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"image size {height}x{width} has aspect ratio "
                         f"{max(height, width) / min(height, width):.1f}; Qwen2-VL accepts at "
                         f"most {MAX_RATIO}: crop or pad the image first")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def resize_pil(image: Image.Image, min_pixels: int, max_pixels: int,
               factor: int = IMAGE_FACTOR) -> torch.Tensor:
    """RGB ``image`` -> ``[3, h', w']`` float32 in [0, 1]: :func:`smart_resize`, then PIL
    ``resize((w', h'), BICUBIC)`` on the uint8 image (qwen-vl-utils ``fetch_image``)."""
    image = as_rgb(image)
    h, w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.BICUBIC)
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3)
    # x * (1/255) in float64, then float32: the 4.45.2 image processor's rescale, bit for bit
    return (x.permute(2, 0, 1).double() * (1 / 255)).float()


def resize_tensor(x: torch.Tensor, min_pixels: int, max_pixels: int,
                  factor: int = IMAGE_FACTOR) -> torch.Tensor:
    """``[..., 3, H, W]`` in [0, 1] -> ``[..., 3, h', w']``: :func:`smart_resize`, then bicubic
    with antialiasing in float (torchvision's ``resize`` of a tensor, what hpsv3's
    ``fetch_image`` does to tensor inputs). Differentiable; no uint8 rounding or clamp, so it
    differs from the PIL path by rounding only."""
    h, w = smart_resize(x.shape[-2], x.shape[-1], factor, min_pixels, max_pixels)
    if (h, w) == tuple(x.shape[-2:]):
        return x
    lead = x.shape[:-3]
    y = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=(h, w), mode="bicubic",
                      align_corners=False, antialias=True)
    return y.reshape(*lead, *y.shape[-3:])


def to_patches(frames: torch.Tensor, mean: Sequence[float] = OPENAI_MEAN,
               std: Sequence[float] = OPENAI_STD, patch_size: int = 14, merge_size: int = 2,
               temporal_patch_size: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[T, 3, H, W]`` in [0, 1] (one image: T = 1) -> ``(rows [N, 3·tp·p·p], grid_thw [3])``.

    The Qwen2-VL image processor after its resize: ``(x - mean) / std``, one frame tiled to
    ``temporal_patch_size`` frames, then patches of ``tp × p × p`` grouped so that each
    ``merge × merge`` block of patches is contiguous (the order the vision merger expects).
    N = (T/tp)·(H/p)·(W/p); the sequence gets N / merge² visual tokens. Differentiable.

    Raises:
        ValueError: H or W not a multiple of ``patch_size · merge_size``, or T > 1 not a multiple
            of ``temporal_patch_size``.
    """
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames have shape {tuple(frames.shape)}; expected [T, 3, H, W]")
    t, c, h, w = frames.shape
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"frames are {h}x{w}; expected sides that are multiples of {unit} "
                         f"(resize with smart_resize first)")
    m = torch.tensor(mean, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    x = (frames - m) / s
    if t == 1:
        x = x.expand(temporal_patch_size, -1, -1, -1)
        t = temporal_patch_size
    if t % temporal_patch_size:
        raise ValueError(f"{t} frames; expected 1 or a multiple of temporal_patch_size="
                         f"{temporal_patch_size} (repeat the last frame to pad)")
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    # [gt, tp, C, gh/m, m, p, gw/m, m, p] -> [gt, gh/m, gw/m, m, m, C, tp, p, p]
    x = x.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                  gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    return rows, torch.tensor([gt, gh, gw], dtype=torch.long)


def encode(processor, texts: Sequence[str], rows: Sequence[torch.Tensor],
           grids: Sequence[torch.Tensor], media: str = "image") -> Dict[str, torch.Tensor]:
    """Model inputs for B (text, visual) pairs, right padded.

    Args:
        processor: the base's processor (chat template + tokenizer with the reward tokens).
        texts: B user texts (the reward template already filled in).
        rows, grids: B outputs of :func:`to_patches`.
        media: ``"image"`` or ``"video"`` (which vision item and pad token).

    Returns:
        ``input_ids`` / ``attention_mask`` ``[B, L]`` and ``pixel_values`` + ``image_grid_thw``
        ``[B, 3]`` (or ``pixel_values_videos`` + ``video_grid_thw``).

    Raises:
        ValueError: a chat template that does not emit exactly one pad token per turn.
    """
    if media not in ("image", "video"):
        raise ValueError(f"media={media!r}; expected 'image' or 'video'")
    pad = IMAGE_PAD if media == "image" else VIDEO_PAD
    merge = processor.image_processor.merge_size ** 2
    chats = []
    for text, grid in zip(texts, grids):
        msg = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": text}]}]
        chat = processor.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
        if chat.count(pad) != 1:
            raise ValueError(f"the chat template emitted {chat.count(pad)} {pad} tokens for one "
                             f"{media}; expected 1 (a Qwen2-VL processor's template)")
        chats.append(chat.replace(pad, pad * (int(grid.prod()) // merge)))
    tok = processor.tokenizer
    tok.padding_side = "right"
    batch = tok(chats, padding=True, return_tensors="pt")
    key, gkey = ("pixel_values", "image_grid_thw") if media == "image" else \
        ("pixel_values_videos", "video_grid_thw")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            key: torch.cat(list(rows)), gkey: torch.stack(list(grids))}


# --------------------------------------------------------------------------- the model
def build_head(kind: str, hidden: int, out_dim: int) -> nn.Module:
    """The reward head (see the module docstring), float32.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind == "ranknet":
        head = nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05),
                             nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, out_dim))
    elif kind == "linear":
        head = nn.Linear(hidden, out_dim, bias=False)
    else:
        raise ValueError(f"head={kind!r}; expected one of {HEADS} (hpsv3 'ranknet'; "
                         f"VideoReward's rm_head_type='default' is 'linear')")
    return head.float()


class Qwen2VLRewardModel(nn.Module):
    """``forward(...) -> [B, n_tokens, out]`` float32: the head at each reward token.

    Args:
        base: a transformers ``Qwen2VLForConditionalGeneration``.
        head: ``"ranknet"`` or ``"linear"``.
        out_dim: head outputs per reward token (HPSv3 2 = (μ, log σ); VideoReward 1).
        token_ids: the reward tokens' ids; every sequence must hold exactly
            ``n_tokens = len(token_ids)`` of them (any of the ids counts).
    """

    def __init__(self, base: nn.Module, head: str = "ranknet", out_dim: int = 2,
                 token_ids: Sequence[int] = ()):
        super().__init__()
        if not token_ids:
            raise ValueError("token_ids is empty; pass the reward tokens' ids (tokenizer."
                             "convert_tokens_to_ids(['<|Reward|>']) for HPSv3)")
        self.base = base
        self.rm_head = build_head(head, base.config.text_config.hidden_size, out_dim)
        self.head, self.out_dim = head, int(out_dim)
        self.register_buffer("token_ids", torch.tensor(list(token_ids), dtype=torch.long),
                             persistent=False)

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.numel())

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None,
                pixel_values_videos: Optional[torch.Tensor] = None,
                video_grid_thw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Args: ``input_ids`` / ``attention_mask`` ``[B, L]`` (right padded), pixel rows and
        ``[n, 3]`` grids from :func:`encode`. Returns ``[B, n_tokens, out]`` float32.

        Raises:
            ValueError: a sequence without exactly ``n_tokens`` reward tokens.
        """
        B, L = input_ids.shape
        is_reward = torch.isin(input_ids, self.token_ids)  # [B, L]
        counts = is_reward.sum(1)
        if bool((counts != self.n_tokens).any()):
            bad = [(i, int(c)) for i, c in enumerate(counts.tolist()) if c != self.n_tokens]
            raise ValueError(f"sequences (index, reward tokens) {bad[:5]} do not hold exactly "
                             f"{self.n_tokens} reward tokens (ids {self.token_ids.tolist()}); "
                             f"the text must contain the template's reward token(s) once each "
                             f"and must not be truncated")
        model = self.base.model
        embeds = model.language_model.embed_tokens(input_ids)  # [B, L, H]
        for pix, grid, token in ((pixel_values, image_grid_thw, self.base.config.image_token_id),
                                 (pixel_values_videos, video_grid_thw,
                                  self.base.config.video_token_id)):
            if pix is None:
                continue
            vis = model.visual(pix.to(model.visual.dtype), grid_thw=grid).pooler_output
            mask = (input_ids == token).unsqueeze(-1).expand_as(embeds)
            if mask.sum() != vis.numel():
                raise ValueError(f"{int((input_ids == token).sum())} visual pad tokens but the "
                                 f"vision tower returned {vis.shape[0]} embeddings; build the "
                                 f"inputs with mmrl.rewards.qwen2vl_rm.encode")
            embeds = embeds.masked_scatter(mask, vis.to(embeds.dtype))
        # plain 1-D positions on all 3 mRoPE axes (transformers 4.45.2 with position_ids=None)
        positions = torch.arange(L, device=embeds.device).view(1, 1, L).expand(3, B, L)
        hidden = model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                      position_ids=positions, use_cache=False).last_hidden_state
        pooled = hidden[is_reward]  # [B * n_tokens, H], sequence order within each row
        # the head runs in float32 on the (bf16) hidden state, as hpsv3's autocast(float32)
        return self.rm_head(pooled.float()).view(B, self.n_tokens, -1)


# --------------------------------------------------------------------------- loading
def _is_legacy(key: str) -> bool:
    return not key.startswith(("model.language_model.", "model.visual."))


def from_released_keys(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Released (transformers 4.45) keys -> this module's: ``model.X`` ->
    ``base.model.language_model.X``, ``visual.X`` -> ``base.model.visual.X``, ``lm_head.X`` ->
    ``base.lm_head.X``, ``rm_head.X`` kept; transformers 5 keys (``model.language_model.X``,
    ``model.visual.X``) get the ``base.`` prefix only."""
    out = {}
    for k, v in sd.items():
        if k.startswith("rm_head."):
            out[k] = v
        elif k.startswith("visual."):
            out["base.model." + k] = v
        elif k.startswith("model.") and _is_legacy(k):
            out["base.model.language_model." + k[len("model."):]] = v
        else:
            out["base." + k] = v
    return out


def to_released_keys(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`from_released_keys` (this module's keys -> the released layout)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("base.model.language_model."):
            out["model." + k[len("base.model.language_model."):]] = v
        elif k.startswith("base.model.visual."):
            out[k[len("base.model."):]] = v
        elif k.startswith("base."):
            out[k[len("base."):]] = v
        else:
            out[k] = v
    return out


def read_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``); a top-level
    ``"model"`` key is unwrapped (hpsv3 ``inference.py``, its ``final_model.pth``)."""
    sd = load_state_dict_file(path)
    if "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    return sd


@contextlib.contextmanager
def _meta_parameters():
    """Parameters created inside are placed on the meta device (no memory, no init cost: a 7B
    model's random init would take minutes); buffers (rotary ``inv_freq``) stay real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_processor(base: str, special_tokens: Sequence[str]):
    """``AutoProcessor.from_pretrained(base)`` with right padding and ``special_tokens`` added
    as additional special tokens -> ``(processor, token_ids)``."""
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(base, padding_side="right")
    tok = processor.tokenizer
    tok.padding_side = "right"
    tok.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    ids = tok.convert_tokens_to_ids(list(special_tokens))
    return processor, ids


def load_reward_model(path: str, base: str, *, special_tokens: Sequence[str], head: str,
                      out_dim: int, dtype: torch.dtype = torch.float32,
                      device: Union[str, torch.device] = "cpu", attn_implementation: str = "sdpa",
                      name: str = "qwen2vl_rm"):
    """A :class:`Qwen2VLRewardModel` from a reward state-dict file and its base -> ``(model,
    processor)``, in eval mode with gradients off.

    The architecture comes from ``base``'s ``config.json`` (its weights are not read: the
    reward file holds the whole model), the vocabulary is ``len(tokenizer)`` after adding the
    reward tokens, the state dict is loaded strictly (released or transformers 5 keys), the
    model is cast to ``dtype`` and the head kept in float32.

    Raises:
        ValueError: missing / unexpected / mis-shaped keys (with examples and what to check).
    """
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration
    processor, ids = load_processor(base, special_tokens)
    config = AutoConfig.from_pretrained(base)
    config.text_config.vocab_size = len(processor.tokenizer)
    sd = from_released_keys(read_checkpoint(path))
    with _meta_parameters():
        model = Qwen2VLRewardModel(
            Qwen2VLForConditionalGeneration._from_config(
                config, attn_implementation=attn_implementation),
            head=head, out_dim=out_dim, token_ids=ids)
    expected = {k: p.shape for k, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k])}"
              for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != tuple(expected[k])]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{name}: {path} does not fit a Qwen2-VL reward model (base {base!r}, head {head!r}, "
            f"out_dim {out_dim}, vocab {len(processor.tokenizer)} with {list(special_tokens)}): "
            f"{len(missing)} missing keys (e.g. {[_released(k) for k in missing[:3]]}), "
            f"{len(unexpected)} unexpected (e.g. {[_released(k) for k in unexpected[:3]]}), "
            f"{len(shapes)} of another shape (e.g. {shapes[:2]}); pass the reward checkpoint "
            f"that was trained on this base (the whole model: model.*, visual.*, lm_head.*, "
            f"rm_head.*)")
    model.load_state_dict(sd, strict=True, assign=True)
    model.to(dtype)
    model.rm_head.float()  # the head stays float32 (hpsv3 casts it back after the bf16 cast)
    return model.to(device).eval().requires_grad_(False), processor


def _released(key: str) -> str:
    return next(iter(to_released_keys({key: None})))


# --------------------------------------------------------------------------- tiny checkpoints
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""A Qwen2-VL-Instruct-style chat template (default system turn, vision items inline)."""

SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            IMAGE_PAD, VIDEO_PAD)


def build_tiny_checkpoint(folder: str, *, special_tokens: Sequence[str] = ("<|Reward|>",),
                          head: str = "ranknet", out_dim: int = 2, hidden_size: int = 64,
                          layers: int = 2, vision_depth: int = 1, seed: int = 0,
                          filename: str = "reward.safetensors") -> Dict[str, str]:
    """A random tiny Qwen2-VL reward model in the released layout -> ``{"base", "path"}``.

    ``folder`` receives the base in the ``Qwen/Qwen2-VL-7B-Instruct`` file layout (a flat
    ``config.json``, ``preprocessor_config.json``, ``chat_template.json``, a byte-level tokenizer,
    ``model.safetensors`` with transformers 4.45 keys) and ``folder/filename``: the whole reward
    model after adding ``special_tokens`` and resizing the vocabulary, in the released key layout
    (``rm_head.*`` included), as hpsv3 / VideoAlign save it. Loaders: :func:`load_reward_model`
    and, on transformers 4.45.2, hpsv3's own ``HPSv3RewardInferencer``.

    Args:
        hidden_size: text width, a multiple of 16 (4 heads; mRoPE sections 2:3:3 of head_dim/2).
        layers, vision_depth: decoder layers and vision blocks.
        seed: torch seed of the random weights (same seed, same checkpoint).
    """
    from safetensors.torch import save_file
    from tokenizers import pre_tokenizers
    from transformers import AutoConfig, Qwen2Tokenizer, Qwen2VLForConditionalGeneration

    if hidden_size % 16:
        raise ValueError(f"hidden_size={hidden_size}; expected a multiple of 16")
    os.makedirs(folder, exist_ok=True)
    # tokenizer: the 256 ByteLevel characters (sorted: alphabet() is a set), no merges, specials
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    _write_json(os.path.join(folder, "vocab.json"), vocab)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tok = Qwen2Tokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", additional_special_tokens=list(SPECIALS))
    tok.save_pretrained(folder)
    _legacy_tokenizer_config(folder, tok)
    _write_json(os.path.join(folder, "chat_template.json"), {"chat_template": CHAT_TEMPLATE})
    _write_json(os.path.join(folder, "preprocessor_config.json"), {
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD),
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"})
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    half = hidden_size // 4 // 2  # head_dim / 2 split over (t, h, w) as 2:3:3
    section = [half * 2 // 8, half * 3 // 8, half - half * 2 // 8 - half * 3 // 8]
    config = {  # the flat layout of Qwen2-VL-7B-Instruct's config.json (transformers 4.45)
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "vocab_size": len(tok), "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "initializer_range": 0.3,  # Qwen's 0.02 leaves a random decoder nearly input-blind
        "rope_scaling": {"type": "mrope", "mrope_section": section},
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 4096,
        "max_window_layers": layers, "attention_dropout": 0.0, "bos_token_id": None,
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"), "torch_dtype": "float32",
        "vision_config": {"depth": vision_depth, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2,
                          "in_chans": 3, "hidden_size": hidden_size, "patch_size": 14,
                          "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2, "initializer_range": 0.5},
        **ids}
    _write_json(os.path.join(folder, "config.json"), config)
    torch.manual_seed(seed)
    base = Qwen2VLForConditionalGeneration(AutoConfig.from_pretrained(folder)).float()
    base_sd = to_released_keys({"base." + k: v for k, v in base.state_dict().items()})
    # metadata format=pt: transformers 4.45's from_pretrained refuses safetensors without it
    save_file({k: v.contiguous() for k, v in base_sd.items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    # the reward model: reward tokens added, vocabulary resized, head on top (hpsv3 train.py)
    tok.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    base.resize_token_embeddings(len(tok), mean_resizing=False)
    model = Qwen2VLRewardModel(base, head=head, out_dim=out_dim,
                               token_ids=tok.convert_tokens_to_ids(list(special_tokens)))
    with torch.no_grad():  # outputs of order 1 that differ visibly between inputs
        for layer in model.rm_head.modules():
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0.0, 1.0 / math.sqrt(layer.in_features))
                if layer.bias is not None:
                    layer.bias.normal_(0.0, 0.1)
    sd = to_released_keys(model.state_dict())
    path = os.path.join(folder, filename)
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata={"format": "pt"})
    return {"base": folder, "path": path}


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _legacy_tokenizer_config(folder: str, tok) -> None:
    """Rewrite tokenizer_config.json in the pre-transformers-5 form Qwen2-VL ships (a tokenizer
    class and ``additional_special_tokens``), so that transformers 4.45.2 reads it too."""
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["additional_special_tokens"] = list(SPECIALS)
    cfg.pop("extra_special_tokens", None)
    _write_json(path, cfg)
