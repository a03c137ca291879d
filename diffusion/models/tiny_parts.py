"""Parts of the tiny, randomly initialised pipelines the families build offline (tests, demo).

Sizes follow ../shared/TINY_MODELS.md: a one-block VAE (latent factor 1, so images are as large
as the latents), small CLIP text encoders and a real ``CLIPTokenizer`` built in code over a
byte-level vocabulary without merges (every character is a token). diffusers and transformers are
imported inside the functions.
"""
from __future__ import annotations

import json
import os
import tempfile


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


def check_size(size, multiple: int = 1, why: str = "") -> None:
    """Raise ``ValueError`` unless ``size`` (pixels per side) is >= 2 and a multiple of
    ``multiple`` (``why``: the family's reason, said in the message)."""
    if int(size) < 2:
        raise ValueError(f"size={size!r}; expected an int >= 2 (pixels per side)")
    if int(size) % multiple:
        need = "even" if multiple == 2 else f"a multiple of {multiple}"
        raise ValueError(f"size={size!r}; {why}, so the side must be {need} (e.g. "
                         f"{int(size) + multiple - int(size) % multiple})")


def byte_clip_tokenizer():
    """A ``CLIPTokenizer`` over the byte-level vocabulary -> (tokenizer, vocab size)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tok_dir:
        vocab = write_byte_clip_vocab(tok_dir)
        tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"),
                                  os.path.join(tok_dir, "merges.txt"), model_max_length=77)
    return tokenizer, vocab


def clip_text_config(vocab: int):
    """The tiny CLIP text config; the specials are the vocabulary's last two entries."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37,
                          num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                          max_position_embeddings=77, bos_token_id=vocab - 2,
                          eos_token_id=vocab - 1, pad_token_id=vocab - 1)


def tiny_vae(size: int, shift_factor: float, scaling_factor: float, channels: int = 4):
    """A one-block VAE with 4 latent channels (no down-sampling: latents are image-sized) and
    ``channels`` feature channels in its blocks."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=size, in_channels=3, out_channels=3,
                         block_out_channels=(channels,),
                         layers_per_block=1, latent_channels=4, norm_num_groups=1,
                         use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=shift_factor, scaling_factor=scaling_factor)


def byte_qwen_tokenizer(specials, **kwargs):
    """A ``Qwen2Tokenizer`` over the 256 ByteLevel characters (no merges: every byte is a token)
    with ``<|endoftext|>`` (padding), ``<|im_end|>`` (end) and ``specials`` as special tokens;
    ``kwargs`` go to the tokenizer (e.g. ``model_max_length``). The tiny Qwen-Image (Qwen2.5-VL)
    and Z-Image (Qwen3) text encoders read it."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    # alphabet() is a set: sorted, so token ids do not change with PYTHONHASHSEED
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(folder, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        return Qwen2Tokenizer(os.path.join(folder, "vocab.json"),
                              os.path.join(folder, "merges.txt"), unk_token=None, bos_token=None,
                              eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              additional_special_tokens=list(specials), **kwargs)

#: The linear VAE's latent -> RGB map (orthonormal rows of a 4x4 Hadamard matrix / 2): every
#: latent channel takes part, the all-ones latent direction is the one colour-blind direction.
LINEAR_VAE_RGB = ((0.5, -0.5, 0.5, -0.5), (0.5, 0.5, -0.5, -0.5), (0.5, -0.5, -0.5, 0.5))


def linear_vae(size: int, shift_factor: float, scaling_factor: float, gain: float = 1.0,
               const: float = 16.0):
    """A one-block VAE whose decoder is (almost exactly) a per-pixel linear map of the latent
    channels to RGB, ``rgb = 0.5 + 0.5·gain·M·(z − shift_factor)`` with M = :data:`LINEAR_VAE_RGB`
    and z the unscaled VAE latent: every colour is reachable, the mean colour of an image moves
    at the same rate in every colour direction (M has orthonormal rows), and a pixel saturates
    only at ``|M·latent| >= scaling_factor / gain`` (gain 1: about 1.5). The demo's VAE: a random
    tiny decoder ends in a one-group GroupNorm that removes its input's mean, so prompt colours
    other than light / dark barely move (benchmarks/flow_bench_common.py).

    The weights are set analytically (no fitting: exact, instant, no seed to depend on):
    16 decoder channels ``[z, −z, const, −const]`` (conv_in, centre tap, so no spatial mixing;
    latents are image-sized); every other weight is zero, so the resnets and the attention are
    identities (their residual branches output 0); the channel mean is 0 at every pixel, so the
    final GroupNorm only divides by ``sqrt((2·mean|z|² + 8 const²) / 16) ≈ const/√2`` (within
    1 % while the image's mean |z|² < 16, monotone beyond); conv_out undoes the SiLU with
    SiLU(u) − SiLU(−u) = u. The encoder stays random (the demo's GRPO never encodes images).
    """
    import torch

    vae = tiny_vae(size, shift_factor, scaling_factor, channels=16)
    dec, m = vae.decoder, torch.tensor(LINEAR_VAE_RGB)
    with torch.no_grad():
        for p in dec.parameters():
            p.zero_()
        for norm in [mod for mod in dec.modules() if isinstance(mod, torch.nn.GroupNorm)]:
            norm.weight.fill_(1.0)
        eye = torch.eye(4)
        dec.conv_in.weight[:, :, 1, 1] = torch.cat([eye, -eye, torch.zeros(8, 4)])
        dec.conv_in.bias[8:] = torch.tensor([const] * 4 + [-const] * 4)
        std = const / 2 ** 0.5  # the GroupNorm's std at z = 0 (half the channels are ±const)
        dec.conv_out.weight[:, :4, 1, 1] = gain * std * m
        dec.conv_out.weight[:, 4:8, 1, 1] = -gain * std * m
        dec.conv_out.bias[:] = -gain * (m @ torch.full((4,), float(shift_factor)))
    return vae
