"""SD3 / SD3.5 (``StableDiffusion3Pipeline``) behind the flow adapter interface.

Latents ``[B, C, H/f, W/f]``; the schedule is diffusers' shifted flow schedule (shift 3.0 for
SD3 / SD3.5 in their scheduler config); classifier-free guidance v = v_u + w(v_c − v_u) with one
transformer forward on ``[uncond; cond]`` rows; the transformer is conditioned on t = 1000·σ.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from mmrl.diffusion.models.base import FlowAdapter, check_resolution
from mmrl.diffusion.models.tiny_parts import (byte_clip_tokenizer, check_size, clip_text_config,
                                              linear_vae, tiny_vae)
from mmrl.diffusion.schedule import cfg_combine, flow_sigmas

Tensor = torch.Tensor

#: flow_grpo's LoRA targets for the SD3 transformer (image and text streams of joint attention).
SD3_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")


class SD3Adapter(FlowAdapter):
    """An SD3 / SD3.5 pipeline as velocity function, reference policy and decoder.

    Args (beyond :class:`~mmrl.diffusion.models.base.FlowAdapter`'s):
        guidance_scale: CFG weight w (SD3.5-M: 4.5); <= 1 disables CFG (one model row per
            sample).
        shift: the schedule shift (None: the scheduler config's, 3.0 for SD3 / SD3.5).
        negative_prompt: the unconditional prompt for CFG ("" as flow_grpo).
        cfg_uncond_grad: with CFG, whether the training forward back-propagates through the
            unconditional prediction too (True: the exact gradient of the guided velocity).
            False: the unconditional rows run without gradient (a separate no-grad forward),
            as flow_grpo's ``train_sd3.py`` detaches ``noise_pred_uncond``; the backward pass
            then covers the conditional rows only.
    """

    PIPELINE_CLASS = "StableDiffusion3Pipeline"
    CFG_OFF = 1.0
    LORA_TARGETS = SD3_LORA_TARGETS
    LONG_TOKENIZER = "tokenizer_3"  # T5; CLIP always takes 77 (truncation warned)

    def __init__(self, pipe, *, guidance_scale: float = 4.5, max_sequence_length: int = 256,
                 negative_prompt: str = "", cfg_uncond_grad: bool = True, **kwargs):
        super().__init__(pipe, guidance_scale=guidance_scale,
                         max_sequence_length=max_sequence_length, **kwargs)
        self.negative_prompt = negative_prompt
        self.cfg_uncond_grad = cfg_uncond_grad

    def latent_shape(self, height: Optional[int] = None, width: Optional[int] = None,
                     frames: Optional[int] = None) -> Tuple[int, int, int]:
        """``(C, height/f, width/f)`` for images of ``height × width`` (None: the adapter's).

        Raises:
            ValueError: a side not divisible by f·patch (the VAE factor times the patch size),
                or frames given.
        """
        self._check_frames(frames, "SD3")
        height = self.height if height is None else height
        width = self.width if width is None else width
        f, patch = self.pipe.vae_scale_factor, self.transformer.config.patch_size
        check_resolution(height, width, f * patch, f"VAE factor {f} x patch size {patch}")
        return (self.transformer.config.in_channels, height // f, width // f)

    def sigmas(self, num_steps: int) -> Tensor:
        """diffusers' ``FlowMatchEulerDiscreteScheduler(shift).set_timesteps(num_steps)`` sigmas
        ``[T+1]`` (:func:`~mmrl.diffusion.schedule.flow_sigmas`)."""
        shift = self.shift if self.shift is not None else self.pipe.scheduler.config.shift
        return flow_sigmas(num_steps, float(shift))

    def _encode_batch(self, prompts):
        emb, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return list(zip(emb, pooled))

    def encode_prompt(self, prompts: Sequence[str]) -> Dict[str, Tensor]:
        """Cond rows for ``prompts`` (one row each), encoding each distinct text only once.

        Returns:
            ``{"emb": [P, S, D], "pooled": [P, Dp]}`` plus ``"neg_emb"``, ``"neg_pooled"`` when
            CFG is on; pass it (or its rows) as the samplers' ``cond``.

        Raises:
            ValueError: no prompts, or a prompt that is not a string.
        """
        rows = self._lookup(prompts)
        cond = {"emb": torch.stack([r[0] for r in rows]),
                "pooled": torch.stack([r[1] for r in rows])}
        if self.cfg:
            neg_emb, neg_pooled = self._lookup([self.negative_prompt])[0]
            cond["neg_emb"] = neg_emb.expand_as(cond["emb"])
            cond["neg_pooled"] = neg_pooled.expand_as(cond["pooled"])
        return cond

    def transformer_velocity(self, model, latents: Tensor, sigma: Tensor,
                             cond: Dict[str, Tensor]) -> Tensor:
        """The SD3 transformer's velocity in fp32, CFG-combined when guidance_scale > 1."""
        self._check_cond(cond, ("emb", "pooled") + (("neg_emb", "neg_pooled") if self.cfg else ()))
        dtype = model.dtype
        h, emb, pooled = latents.to(dtype), cond["emb"], cond["pooled"]
        t = sigma.to(latents.device) * 1000  # SD3 is conditioned on t = 1000·σ, as the pipeline
        def run(h, t, emb, pooled):
            return model(hidden_states=h, timestep=t.to(dtype), encoder_hidden_states=emb.to(dtype),
                         pooled_projections=pooled.to(dtype), return_dict=False)[0]
        if not self.cfg:
            return run(h, t, emb, pooled).float()
        if not self.cfg_uncond_grad and torch.is_grad_enabled():  # flow_grpo's detach
            with torch.no_grad():
                v_uncond = run(h, t, cond["neg_emb"], cond["neg_pooled"])
            v_cond = run(h, t, emb, pooled)
        else:  # one forward on [uncond; cond] rows: [R] -> [2R]
            v_uncond, v_cond = run(torch.cat([h, h]), torch.cat([t, t]),
                                   torch.cat([cond["neg_emb"], emb]),
                                   torch.cat([cond["neg_pooled"], pooled])).chunk(2)
        return cfg_combine(v_uncond.float(), v_cond.float(), self.guidance_scale).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` float32 in [0, 1] from final latents ``[B, C, h, w]``."""
        return self._vae_decode(latents)

    @staticmethod
    def build_tiny_pipeline(size: int = 16, seed: int = 0, demo: bool = False):
        """:func:`build_tiny_sd3`; ``demo``: with the prompt-following demo's linear VAE."""
        return build_tiny_sd3(size, seed, vae="linear" if demo else "random")


#: ``vae=`` choices of :func:`build_tiny_sd3`.
TINY_VAES = ("random", "linear")


def build_tiny_sd3(size: int = 16, seed: int = 0, vae: str = "random"):
    """A ``StableDiffusion3Pipeline`` with tiny random weights producing ``size × size`` images:
    a one-layer transformer (≈41k parameters), a one-block VAE, two small CLIP text encoders, no
    T5 (``text_encoder_3=None``).

    Args:
        size: image side in pixels (also the transformer's and VAE's ``sample_size``).
        seed: torch seed of the random initialization (same seed and size, same weights).
        vae: "random" (the tests' tiny VAE) or "linear" (the demo's: a decoder set analytically
            to a per-pixel linear latent -> RGB map, :func:`~.tiny_parts.linear_vae`, so every
            colour is reachable; transformer and text encoders are the same as with "random").

    Raises:
        ValueError: size < 2, or an unknown ``vae``.
    """
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection

    check_size(size)
    if vae not in TINY_VAES:
        raise ValueError(f"vae={vae!r}; expected one of {TINY_VAES} ('linear' for the demo)")
    tokenizer, vocab = byte_clip_tokenizer()
    # Construction order after the seed fixes the weights: transformer, VAE, both text encoders.
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=size, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
        pooled_projection_dim=64, out_channels=4)
    consts = dict(shift_factor=0.0609, scaling_factor=1.5035)  # SD3.5's VAE constants
    vae_model = tiny_vae(size, **consts)
    encoders = [CLIPTextModelWithProjection(clip_text_config(vocab)) for _ in range(2)]
    if vae == "linear":
        vae_model = linear_vae(size, **consts)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae_model,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
        tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


def save_tiny_sd3(out_dir, size: int = 16, seed: int = 0, overwrite: bool = False,
                  vae: str = "random") -> Path:
    """Build the tiny SD3 pipeline and ``save_pretrained`` it to ``out_dir`` (kept if it exists).

    Args:
        out_dir: target folder (created). A pipeline already there (``model_index.json``) is kept
            unless ``overwrite``, so a demo re-run does not rebuild it.
        size, seed, vae: as :func:`build_tiny_sd3`.

    Returns:
        the directory (holding ``model_index.json``), loadable by ``SD3Adapter.from_pretrained``.
    """
    if vae == "random":
        return SD3Adapter.build_tiny(out_dir, size=size, seed=seed, overwrite=overwrite)
    out = Path(out_dir)
    if not (out / "model_index.json").exists() or overwrite:
        out.mkdir(parents=True, exist_ok=True)
        build_tiny_sd3(size, seed, vae=vae).save_pretrained(str(out))
    return out


def load_sd3_pipeline(name_or_path: str, **kwargs):
    """:func:`~mmrl.diffusion.models.base.load_pipeline` for ``StableDiffusion3Pipeline``."""
    from mmrl.diffusion.models.base import load_pipeline
    return load_pipeline(SD3Adapter.PIPELINE_CLASS, name_or_path, **kwargs)


SD3Policy = SD3Adapter
"""The adapter's name before the adapter interface (``mmrl.diffusion.pipeline.SD3Policy``)."""
