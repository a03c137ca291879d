"""A tiny, randomly initialised SD3-architecture pipeline built offline from config (the demo).

``save_tiny_sd3(dir)`` writes it with ``save_pretrained``; the diffusion job then loads it by path
through the same ``from_pretrained`` code path as a real SD3.5 checkpoint. Sizes follow
../shared/TINY_MODELS.md: a one-layer SD3 transformer (≈41k parameters), a one-block VAE (latent
factor 1, so images are as large as the latents), two small CLIP text encoders, no T5, and a real
``CLIPTokenizer`` over a byte-level vocabulary without merges (every character is a token).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


def write_byte_clip_vocab(dirname: str) -> int:
    """Write a byte-level CLIP ``vocab.json`` + empty ``merges.txt`` to ``dirname`` -> vocab size.

    Every character is a token (no merges); ids are stable (the alphabet is sorted).
    """
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(dirname, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(dirname, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return len(vocab)


def build_tiny_sd3(size: int = 16, seed: int = 0):
    """A ``StableDiffusion3Pipeline`` with tiny random weights producing ``size × size`` images.

    Raises:
        ValueError: size < 2.
    """
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    if int(size) < 2:
        raise ValueError(f"size={size!r}; expected an int >= 2 (pixels per side)")
    with tempfile.TemporaryDirectory() as tok_dir:
        vocab = write_byte_clip_vocab(tok_dir)
        tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"),
                                  os.path.join(tok_dir, "merges.txt"), model_max_length=77)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=size, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
        pooled_projection_dim=64, out_channels=4)
    vae = AutoencoderKL(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(4,),
                        layers_per_block=1, latent_channels=4, norm_num_groups=1,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                        scaling_factor=1.5035)
    text = CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37,
                          num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                          max_position_embeddings=77, bos_token_id=vocab - 2,
                          eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    encoders = [CLIPTextModelWithProjection(text) for _ in range(2)]
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
        tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


def save_tiny_sd3(out_dir, size: int = 16, seed: int = 0, overwrite: bool = False) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it to ``out_dir`` (kept if it exists).

    Returns:
        the directory (holding ``model_index.json``), loadable by ``SD3Policy.from_pretrained``.
    """
    out = Path(out_dir)
    if (out / "model_index.json").exists() and not overwrite:
        return out
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_sd3(size, seed).save_pretrained(str(out))
    return out
