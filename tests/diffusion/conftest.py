"""Tiny SD3 and FLUX pipelines built offline from config and saved the way a user's checkpoint is.

SD3 transformer / VAE / text encoders follow ../shared/TINY_MODELS.md. The CLIP tokenizers are
real ``CLIPTokenizer`` objects over a byte-level vocabulary without merges (every character is a
token), which keeps the fixture fast; ``model_max_length=77`` as the pipelines require. FLUX's T5
tokenizer is a real ``T5TokenizerFast`` over a small Unigram vocabulary (characters and
"▁"+letter pieces) passed as ``vocab=``, so no sentencepiece file is needed.
"""
from __future__ import annotations

import os
import string

import pytest
import torch

from mmrl.diffusion.tiny import write_byte_clip_vocab


def build_tiny_sd3(tok_dir: str, seed: int = 0):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    vocab = write_byte_clip_vocab(tok_dir)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
        pooled_projection_dim=64, out_channels=4)
    vae = AutoencoderKL(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4,),
                        layers_per_block=1, latent_channels=4, norm_num_groups=1,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                        scaling_factor=1.5035)
    encoders = [_clip_text(vocab, CLIPTextModelWithProjection) for _ in range(2)]
    tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"),
                              os.path.join(tok_dir, "merges.txt"), model_max_length=77)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
        tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


def _clip_text(vocab: int, cls):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                              max_position_embeddings=77, bos_token_id=vocab - 2,
                              eos_token_id=vocab - 1, pad_token_id=vocab - 1))


def build_tiny_flux(tok_dir: str, seed: int = 0):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel)
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    vocab = write_byte_clip_vocab(tok_dir)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -4.0) for c in string.ascii_letters]
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    vae = AutoencoderKL(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(4,),
                        layers_per_block=1, latent_channels=4, norm_num_groups=1,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                        scaling_factor=0.3611)
    t5 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=32, d_ff=37, d_kv=8,
                                 num_layers=2, num_heads=4, relative_attention_num_buckets=8))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return FluxPipeline(
        scheduler=scheduler, vae=vae, transformer=transformer,
        text_encoder=_clip_text(vocab, CLIPTextModel),
        tokenizer=CLIPTokenizer(os.path.join(tok_dir, "vocab.json"),
                                os.path.join(tok_dir, "merges.txt"), model_max_length=77),
        text_encoder_2=t5, tokenizer_2=T5TokenizerFast(vocab=pieces, extra_ids=0,
                                                       model_max_length=512))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A directory written by ``FluxPipeline.save_pretrained`` (tiny, random, 16x16 images)."""
    tok_dir = str(tmp_path_factory.mktemp("byte_tok_flux"))
    out = str(tmp_path_factory.mktemp("tiny_flux"))
    build_tiny_flux(tok_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A directory written by ``StableDiffusion3Pipeline.save_pretrained`` (tiny, random)."""
    tok_dir = str(tmp_path_factory.mktemp("byte_tok"))
    out = str(tmp_path_factory.mktemp("tiny_sd3"))
    build_tiny_sd3(tok_dir).save_pretrained(out)
    return out
