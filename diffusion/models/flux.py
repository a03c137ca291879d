"""FLUX.1 (``FluxPipeline``) behind the flow adapter interface.

Latents are FLUX's packed tokens ``[B, L, 4C]`` (2×2 latent patches, what the pipeline's
``_pack_latents`` makes), which the samplers treat like any other rank. FLUX.1-dev is
guidance-distilled: ``guidance_scale`` is fed to the transformer's guidance embedding (DanceGRPO:
3.5), not used for CFG. The schedule's shift μ depends on the resolution (the pipeline's
``calculate_shift``), so an adapter is built for one resolution.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from mmrl.diffusion.models.base import FlowAdapter, refuse_shift
from mmrl.diffusion.models.tiny_parts import (byte_clip_tokenizer, check_size, clip_text_config,
                                              tiny_vae)

Tensor = torch.Tensor

#: The attention projections of the double-stream blocks (image and text streams, as SD3's);
#: the single-stream blocks have to_q/k/v.
FLUX_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                     "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")


class FluxAdapter(FlowAdapter):
    """A FLUX.1 pipeline at a fixed resolution as velocity function, reference and decoder.

    Args (beyond :class:`~mmrl.diffusion.models.base.FlowAdapter`'s):
        height, width: the image resolution (multiples of 2·VAE factor = 16).
        guidance_scale: the embedded guidance (ignored by models without guidance embeddings).
        max_sequence_length: T5 tokens (FLUX default 512).
        shift: must be None: FLUX's shift follows the resolution.
    """

    PIPELINE_CLASS = "FluxPipeline"
    LORA_TARGETS = FLUX_LORA_TARGETS
    LONG_TOKENIZER = "tokenizer_2"  # T5; CLIP always takes 77 (truncation warned)
    FSDP_BLOCKS = ("transformer_blocks", "single_transformer_blocks")

    def __init__(self, pipe, *, guidance_scale: float = 3.5, max_sequence_length: int = 512,
                 shift: Optional[float] = None, **kwargs):
        refuse_shift("FLUX", shift)
        super().__init__(pipe, guidance_scale=guidance_scale,
                         max_sequence_length=max_sequence_length, **kwargs)
        f = pipe.vae_scale_factor
        self._grid = (self.height // (2 * f), self.width // (2 * f))  # packed token grid
        self._img_ids = pipe._prepare_latent_image_ids(1, *self._grid, self.device, torch.float32)

    def latent_shape(self, height: Optional[int] = None, width: Optional[int] = None,
                     frames: Optional[int] = None) -> Tuple[int, int]:
        """``(L, 4C)``: the packed latent of one image (``height``/``width`` None: the adapter's
        resolution).

        Raises:
            ValueError: a side not divisible by 2·VAE factor, a resolution other than the
                adapter's (its positions and schedule depend on it), or frames given.
        """
        return self._packed_latent_shape(height, width, frames, "FLUX")

    def sigmas(self, num_steps: int) -> Tensor:
        """The FLUX schedule ``[T+1]``: linspace(1, 1/T, T) with the resolution-dependent shift μ,
        computed by the pipeline's own scheduler (what ``FluxPipeline.__call__`` uses)."""
        return self._resolution_shifted_sigmas(num_steps)

    def _encode_batch(self, prompts):
        emb, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                 max_sequence_length=self.max_sequence_length)
        return list(zip(emb, pooled))

    def encode_prompt(self, prompts: Sequence[str]) -> Dict[str, Tensor]:
        """Cond rows ``{"emb": [P, S, D] (T5), "pooled": [P, Dp] (CLIP)}``, each text once."""
        rows = self._lookup(prompts)
        return {"emb": torch.stack([r[0] for r in rows]),
                "pooled": torch.stack([r[1] for r in rows])}

    def transformer_velocity(self, model, latents: Tensor, sigma: Tensor,
                             cond: Dict[str, Tensor]) -> Tensor:
        """The FLUX transformer's velocity in fp32 on packed latents, embedded guidance."""
        self._check_cond(cond, ("emb", "pooled"))
        dtype, rows = model.dtype, latents.shape[0]
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((rows,), self.guidance_scale, device=latents.device)
        # The pipeline passes (1000·σ)/1000; the same float ops keep its results bit-comparable.
        t = (sigma.to(latents.device) * 1000).to(dtype) / 1000
        txt_ids = torch.zeros(cond["emb"].shape[1], 3, device=latents.device, dtype=dtype)
        v = model(hidden_states=latents.to(dtype), timestep=t, guidance=guidance,
                  pooled_projections=cond["pooled"].to(dtype),
                  encoder_hidden_states=cond["emb"].to(dtype), txt_ids=txt_ids,
                  img_ids=self._img_ids.to(latents.device, dtype), return_dict=False)[0]
        return v.float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` float32 in [0, 1] from packed final latents ``[B, L, 4C]``."""
        z = self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)
        return self._vae_decode(z)

    def encode_images(self, images: Tensor) -> Tensor:
        """Packed latents ``[B, L, 4C]`` of images ``[B, 3, H, W]`` in [0, 1] (the VAE
        posterior mean, shifted and scaled, packed as the pipeline's ``_pack_latents``)."""
        z = self._vae_encode(images)  # [B, C, h, w]
        return self.pipe._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])

    @staticmethod
    def build_tiny_pipeline(size: int = 16, seed: int = 0):
        """:func:`build_tiny_flux` with its text encoders."""
        return build_tiny_flux(size, seed)


def build_tiny_flux(size: int = 16, seed: int = 0, *, with_text_encoders: bool = True):
    """A ``FluxPipeline`` with tiny random weights producing ``size × size`` images.

    A one-double- plus one-single-block transformer taking 16 packed channels (the VAE's 4 latent
    channels × 2×2 patches, so ``size`` must be even), with guidance embeddings (FLUX.1-dev
    style) and RoPE axes 4+4+8; a one-block VAE; one small CLIP and a small T5 with a
    ``T5TokenizerFast`` over a small Unigram vocabulary passed as ``vocab=`` (no sentencepiece
    file).

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

    check_size(size, 2, "FLUX packs 2x2 latent patches")
    if with_text_encoders:
        tokenizer, vocab = byte_clip_tokenizer()
    # Construction order after the seed fixes the weights: transformer, VAE, T5, CLIP.
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    vae = tiny_vae(size, shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's VAE constants
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    text = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if with_text_encoders:
        pieces = _t5_unigram_pieces()
        t5 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=32, d_ff=37, d_kv=8,
                                     num_layers=2, num_heads=4, relative_attention_num_buckets=8))
        text = dict(text_encoder=CLIPTextModel(clip_text_config(vocab)), tokenizer=tokenizer,
                    text_encoder_2=t5, tokenizer_2=T5TokenizerFast(vocab=pieces, extra_ids=0,
                                                                   model_max_length=512))
    return FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer, **text)


def save_tiny_flux(out_dir, size: int = 16, seed: int = 0, *, with_text_encoders: bool = True,
                   overwrite: bool = False) -> Path:
    """Build the tiny FLUX pipeline and ``save_pretrained`` it to ``out_dir`` (kept if it exists).

    Args:
        out_dir: target folder (created). A pipeline already there (``model_index.json``) is kept
            unless ``overwrite``.
        size, seed, with_text_encoders: as :func:`build_tiny_flux`.

    Returns:
        the directory (holding ``model_index.json``), loadable by ``FluxAdapter.from_pretrained``.
    """
    out = Path(out_dir)
    if (out / "model_index.json").exists() and not overwrite:
        return out
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_flux(size, seed, with_text_encoders=with_text_encoders).save_pretrained(str(out))
    return out


def _t5_unigram_pieces():
    """The tiny T5 Unigram vocabulary: specials, "▁", characters, "▁"+letter -> [(piece, logp)]."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -4.0) for c in string.ascii_letters]
    return pieces


FluxPolicy = FluxAdapter
"""The adapter's name before the adapter interface (``mmrl.diffusion.pipeline.FluxPolicy``)."""
