"""Tiny, randomly initialised SD3- and FLUX-architecture pipelines built offline from config.

``save_tiny_sd3(dir)`` (the demo, ``mmrl diffusion tiny-pipeline``) and ``save_tiny_flux(dir)``
write them with ``save_pretrained``; the diffusion job then loads them by path through the same
``from_pretrained`` code path as a real SD3.5 / FLUX.1 checkpoint. The tests build theirs here too.
Sizes follow ../shared/TINY_MODELS.md: a one-layer SD3 transformer (≈41k parameters) or a
one-double- plus one-single-block FLUX transformer, a one-block VAE (latent factor 1, so images are
as large as the latents), small CLIP text encoders (two for SD3, one for FLUX), a small T5 for FLUX
only, and real tokenizers built in code: a ``CLIPTokenizer`` over a byte-level vocabulary without
merges (every character is a token) and, for FLUX, a ``T5TokenizerFast`` over a small Unigram
vocabulary (characters and "▁"+letter pieces) passed as ``vocab=``, so no sentencepiece file is
needed. diffusers and transformers are imported inside the functions.
"""
from __future__ import annotations

import json
import os
import string
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

    Args:
        size: image side in pixels (also the transformer's and VAE's ``sample_size``).
        seed: torch seed of the random initialization (same seed and size, same weights).

    Raises:
        ValueError: size < 2.
    """
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection

    _check_size(size)
    tokenizer, vocab = _byte_clip_tokenizer()
    # Construction order after the seed fixes the weights: transformer, VAE, both text encoders.
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=size, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
        pooled_projection_dim=64, out_channels=4)
    vae = _tiny_vae(size, shift_factor=0.0609, scaling_factor=1.5035)  # SD3.5's VAE constants
    encoders = [CLIPTextModelWithProjection(_clip_text_config(vocab)) for _ in range(2)]
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
        tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


def build_tiny_flux(size: int = 16, seed: int = 0, *, with_text_encoders: bool = True):
    """A ``FluxPipeline`` with tiny random weights producing ``size × size`` images.

    The transformer takes 16 packed channels (the VAE's 4 latent channels × 2×2 patches), so
    ``size`` must be even; it uses guidance embeddings (FLUX.1-dev style) and RoPE axes 4+4+8.

    Args:
        size: image side in pixels (the VAE's ``sample_size``).
        seed: torch seed of the random initialization (same seed and size, same weights).
        with_text_encoders: build the CLIP and T5 text encoders and tokenizers. Without them they
            are saved as absent and the caller gives the prompt embeddings directly (load with
            ``text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None``). The
            transformer and VAE weights are the same either way: the text encoders are
            initialised after them.

    Raises:
        ValueError: size < 2 or odd.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

    _check_size(size)
    if int(size) % 2:
        raise ValueError(f"size={size!r}; FLUX packs 2x2 latent patches, so the side must be "
                         f"even (e.g. {int(size) + 1})")
    if with_text_encoders:
        tokenizer, vocab = _byte_clip_tokenizer()
    # Construction order after the seed fixes the weights: transformer, VAE, T5, CLIP.
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    vae = _tiny_vae(size, shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's VAE constants
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    text = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if with_text_encoders:
        pieces = _t5_unigram_pieces()
        t5 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=32, d_ff=37, d_kv=8,
                                     num_layers=2, num_heads=4, relative_attention_num_buckets=8))
        text = dict(text_encoder=CLIPTextModel(_clip_text_config(vocab)), tokenizer=tokenizer,
                    text_encoder_2=t5, tokenizer_2=T5TokenizerFast(vocab=pieces, extra_ids=0,
                                                                   model_max_length=512))
    return FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer, **text)


def save_tiny_sd3(out_dir, size: int = 16, seed: int = 0, overwrite: bool = False) -> Path:
    """Build the tiny SD3 pipeline and ``save_pretrained`` it to ``out_dir`` (kept if it exists).

    Args:
        out_dir: target folder (created). A pipeline already there (``model_index.json``) is kept
            unless ``overwrite``, so a demo re-run does not rebuild it.
        size, seed: as :func:`build_tiny_sd3`.

    Returns:
        the directory (holding ``model_index.json``), loadable by ``SD3Policy.from_pretrained``.
    """
    return _save(out_dir, overwrite, lambda: build_tiny_sd3(size, seed))


def save_tiny_flux(out_dir, size: int = 16, seed: int = 0, *, with_text_encoders: bool = True,
                   overwrite: bool = False) -> Path:
    """Build the tiny FLUX pipeline and ``save_pretrained`` it to ``out_dir`` (kept if it exists).

    Args:
        out_dir: target folder (created). A pipeline already there (``model_index.json``) is kept
            unless ``overwrite``.
        size, seed, with_text_encoders: as :func:`build_tiny_flux`.

    Returns:
        the directory (holding ``model_index.json``), loadable by ``FluxPolicy.from_pretrained``.
    """
    return _save(out_dir, overwrite,
                 lambda: build_tiny_flux(size, seed, with_text_encoders=with_text_encoders))


def _save(out_dir, overwrite: bool, build) -> Path:
    out = Path(out_dir)
    if (out / "model_index.json").exists() and not overwrite:
        return out
    out.mkdir(parents=True, exist_ok=True)
    build().save_pretrained(str(out))
    return out


def _check_size(size) -> None:
    if int(size) < 2:
        raise ValueError(f"size={size!r}; expected an int >= 2 (pixels per side)")


def _byte_clip_tokenizer():
    """A ``CLIPTokenizer`` over the byte-level vocabulary -> (tokenizer, vocab size)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tok_dir:
        vocab = write_byte_clip_vocab(tok_dir)
        tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"),
                                  os.path.join(tok_dir, "merges.txt"), model_max_length=77)
    return tokenizer, vocab


def _clip_text_config(vocab: int):
    """The tiny CLIP text config; the specials are the vocabulary's last two entries."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37,
                          num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                          max_position_embeddings=77, bos_token_id=vocab - 2,
                          eos_token_id=vocab - 1, pad_token_id=vocab - 1)


def _tiny_vae(size: int, shift_factor: float, scaling_factor: float):
    """A one-block VAE with 4 latent channels (no down-sampling: latents are image-sized)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(4,),
                         layers_per_block=1, latent_channels=4, norm_num_groups=1,
                         use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=shift_factor, scaling_factor=scaling_factor)


def _t5_unigram_pieces():
    """The tiny T5 Unigram vocabulary: specials, "▁", characters, "▁"+letter -> [(piece, logp)]."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -4.0) for c in string.ascii_letters]
    return pieces
