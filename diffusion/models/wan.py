"""Wan 2.1 / 2.2 text-to-video (``WanPipeline``) behind the flow adapter interface.

Latents ``[B, C, F', H/s, W/s]`` with ``F' = (F - 1) / t + 1`` (the VAE compresses time by
``t = 4`` and space by ``s``: 8 for Wan 2.1, 16 for the Wan 2.2 TI2V-5B VAE), exactly as
``WanPipeline.prepare_latents`` lays them out. Wan is conditioned on UMT5 embeddings padded with
zeros to ``max_sequence_length`` (``WanPipeline._get_t5_prompt_embeds``), on the timestep
``t = 1000·σ`` of its scheduler (an integer ``floor(1000·σ)`` with the UniPC scheduler the hub
checkpoints ship), and uses classifier-free guidance ``v_u + w (v_c − v_u)`` with the negative
prompt ``""`` (the pipeline's default). ``decode`` returns ``[B, F, 3, H, W]`` in [0, 1].

Wan 2.2: the **TI2V-5B** layout is supported (one transformer, the 48-channel VAE with 16x
spatial compression, per-token timesteps ``expand_timesteps``). Picked over A14B's two experts
(``transformer`` above ``boundary_ratio·1000``, ``transformer_2`` below) because every piece the
job relies on — one trained module for LoRA / full fine-tuning, the reference copy, FSDP units,
the export, the prompt cache — stays one transformer, and because 5B trains on one GPU while
A14B needs two 14B experts resident. An A14B pipeline (``transformer_2`` set) is refused with
the reason and the fix.

LoRA targets: flow_grpo's ``scripts/train_wan2_1.py`` (yifan123/flow_grpo @ 74db691) lists
``to_q, to_k, to_v, to_out.0`` and SD3's ``add_*`` / ``to_add_out``; Wan's T2V blocks have only
the first four (in both ``attn1`` self- and ``attn2`` cross-attention), which are these targets.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from mmrl.diffusion.models.base import FlowAdapter, check_resolution
from mmrl.diffusion.models.tiny_parts import check_size
from mmrl.diffusion.schedule import cfg_combine

Tensor = torch.Tensor

#: The attention projections of Wan's blocks (self- and cross-attention), as flow_grpo's
#: train_wan2_1.py targets them.
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")



class WanAdapter(FlowAdapter):
    """A Wan 2.1 (or Wan 2.2 TI2V-5B) pipeline as velocity function, reference and decoder.

    Args (beyond :class:`~mmrl.diffusion.models.base.FlowAdapter`'s):
        frames: pixel frames per video, ``4k + 1`` (Wan's VAE compresses time by 4).
        guidance_scale: CFG weight w (Wan2.1-T2V-1.3B: 5.0; flow_grpo 4.5); <= 1 disables CFG.
        max_sequence_length: UMT5 tokens (the pipeline's 512).
        shift: the flow shift (None: the scheduler config's ``flow_shift`` / ``shift``; 3.0 for
            Wan2.1-T2V-1.3B at 480p).
        negative_prompt: the unconditional prompt for CFG ("" as the pipeline and flow_grpo).
        cfg_uncond_grad: as :class:`~mmrl.diffusion.models.sd3.SD3Adapter`'s (False: the
            unconditional rows run without gradient, as flow_grpo detaches them).

    Raises:
        ValueError: a Wan 2.2 A14B pipeline (two experts), a scheduler without a flow-matching
            σ grid, frames that are not ``4k + 1``, a resolution the VAE and patches cannot make.
    """

    PIPELINE_CLASS = "WanPipeline"
    CFG_OFF = 1.0
    LORA_TARGETS = WAN_LORA_TARGETS
    FSDP_BLOCKS = ("blocks",)
    MEDIA = "video"
    LONG_TOKENIZER = "tokenizer"  # UMT5

    def __init__(self, pipe, *, guidance_scale: float = 5.0, max_sequence_length: int = 512,
                 negative_prompt: str = "", cfg_uncond_grad: bool = True, **kwargs):
        if getattr(pipe, "transformer_2", None) is not None or \
                pipe.config.get("boundary_ratio") is not None:
            raise ValueError(
                f"this WanPipeline has two experts (transformer_2, boundary_ratio="
                f"{pipe.config.get('boundary_ratio')}: Wan 2.2 A14B); mmrl supports Wan 2.1 and "
                f"the single-transformer Wan 2.2 TI2V-5B. Use Wan-AI/Wan2.2-TI2V-5B-Diffusers or "
                f"a Wan 2.1 checkpoint")
        self._schedule_kind(pipe.scheduler)  # a scheduler without flow σ fails before work
        super().__init__(pipe, guidance_scale=guidance_scale,
                         max_sequence_length=max_sequence_length, **kwargs)
        self.negative_prompt = negative_prompt
        self.cfg_uncond_grad = cfg_uncond_grad
        probe = self._scheduler()
        probe.set_timesteps(2)
        # UniPC (the hub checkpoints' scheduler) hands the transformer int64 timesteps
        self._integer_t = not probe.timesteps.is_floating_point()

    # ------------------------------------------------------------------ shapes
    def latent_shape(self, height: Optional[int] = None, width: Optional[int] = None,
                     frames: Optional[int] = None) -> Tuple[int, int, int, int]:
        """``(C, (F - 1) / t + 1, H / s, W / s)`` for one video of ``frames`` at ``height × width``
        (None: the adapter's), as ``WanPipeline.prepare_latents``.

        Raises:
            ValueError: no frames, ``F - 1`` not a multiple of the VAE's temporal factor t (the
                nearest valid counts in the message), a side not a multiple of s · patch,
                or latent frames not a multiple of the transformer's temporal patch.
        """
        height = self.height if height is None else height
        width = self.width if width is None else width
        frames = self.frames if frames is None else frames
        t, s = self.pipe.vae_scale_factor_temporal, self.pipe.vae_scale_factor_spatial
        check_frames(frames, t)
        patch = self.transformer.config.patch_size
        check_resolution(height, width, s * patch[1],
                         f"VAE spatial factor {s} x patch size {patch[1]}")
        latent_frames = (frames - 1) // t + 1
        if latent_frames % patch[0]:  # a transformer patching time (the tiny demo's: 3)
            raise ValueError(f"frames={frames} makes {latent_frames} latent frames, not a "
                             f"multiple of the transformer's temporal patch {patch[0]}; use "
                             f"frames = {t} * ({patch[0]}k) - {t - 1}, e.g. "
                             f"{t * patch[0] - t + 1}")
        return (self.transformer.config.in_channels, latent_frames, height // s, width // s)

    # ------------------------------------------------------------------ schedule
    @staticmethod
    def _schedule_kind(scheduler) -> str:
        """``shift`` (FlowMatchEulerDiscreteScheduler) or ``flow_shift`` (UniPC with flow σ)."""
        config = scheduler.config
        if "flow_shift" in config:
            if not config.get("use_flow_sigmas"):
                raise ValueError(f"{type(scheduler).__name__} without use_flow_sigmas=True has no "
                                 f"flow-matching σ grid; load Wan's own scheduler config (or a "
                                 f"FlowMatchEulerDiscreteScheduler)")
            return "flow_shift"
        if "shift" in config:
            return "shift"
        raise ValueError(f"{type(scheduler).__name__} is not a flow-matching scheduler; expected "
                         f"FlowMatchEulerDiscreteScheduler or UniPCMultistepScheduler("
                         f"use_flow_sigmas=True) as the Wan checkpoints ship")

    def _scheduler(self):
        """A copy of the pipeline's scheduler with the adapter's shift (when given)."""
        sched = self.pipe.scheduler
        if self.shift is None:
            return copy.deepcopy(sched)
        key = self._schedule_kind(sched)
        return type(sched).from_config({**sched.config, key: float(self.shift)})

    def sigmas(self, num_steps: int) -> Tensor:
        """``[T+1]`` fp32: the σ grid ``WanPipeline.__call__`` steps through, from its own
        scheduler's ``set_timesteps(num_steps)`` with the flow shift (UniPC: ``linspace(1,
        1/1000, T+1)[:-1]`` shifted, σ_0 = 1 − 1e-6; FlowMatchEuler: its shifted linspace)."""
        sched = self._scheduler()
        sched.set_timesteps(num_steps)
        return sched.sigmas.float().cpu()

    def training_sigmas(self) -> Tensor:
        """``[N]`` fp32: the shifted flow-matching training grid (``N = num_train_timesteps``)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = self._scheduler()
        shift = sched.config[self._schedule_kind(sched)]
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=sched.config.num_train_timesteps, shift=shift).sigmas.float()

    def _timestep(self, sigma: Tensor, latents: Tensor) -> Tensor:
        """The ``timestep`` argument as ``WanPipeline.__call__`` passes it: ``[R]`` (``[R, n]``
        per token with ``expand_timesteps``, Wan 2.2 TI2V)."""
        t = sigma * self.pipe.scheduler.config.num_train_timesteps
        if self._integer_t:  # UniPC: int64 of the float σ·1000 (truncation)
            t = t.double().long()
        if self.pipe.config.get("expand_timesteps"):
            # the pipeline's mask[0][0][:, ::2, ::2]: one timestep per 2x2 latent patch
            frames, h, w = latents.shape[2:]
            tokens = frames * ((h + 1) // 2) * ((w + 1) // 2)
            t = t[:, None].expand(-1, tokens)
        return t

    # ------------------------------------------------------------------ text
    def _encode_batch(self, prompts):
        emb = self.pipe._get_t5_prompt_embeds(prompt=prompts, device=self.device,
                                              max_sequence_length=self.max_sequence_length)
        return [(row,) for row in emb]

    def _warn_truncation(self, prompts) -> None:
        """No CLIP here: UMT5 lengths are checked by :meth:`check_prompts`."""

    def encode_prompt(self, prompts: Sequence[str]) -> Dict[str, Tensor]:
        """Cond rows ``{"emb": [P, S, D]}`` (UMT5, zero-padded to ``max_sequence_length``) plus
        ``"neg_emb"`` (the negative prompt's) when CFG is on; each distinct text once.

        Raises:
            ValueError: no prompts, or a prompt that is not a string.
        """
        cond = {"emb": torch.stack([r[0] for r in self._lookup(prompts)])}
        if self.cfg:
            cond["neg_emb"] = self._lookup([self.negative_prompt])[0][0].expand_as(cond["emb"])
        return cond

    # ------------------------------------------------------------------ the model
    def transformer_velocity(self, model, latents: Tensor, sigma: Tensor,
                             cond: Dict[str, Tensor]) -> Tensor:
        """Wan's velocity in fp32, CFG-combined ``v_u + w (v_c − v_u)`` when guidance_scale > 1
        (one forward on ``[uncond; cond]`` rows; the pipeline runs two)."""
        self._check_cond(cond, ("emb",) + (("neg_emb",) if self.cfg else ()))
        dtype = model.dtype
        h, t = latents.to(dtype), self._timestep(sigma.to(latents.device), latents)

        def run(h, t, emb):
            return model(hidden_states=h, timestep=t, encoder_hidden_states=emb.to(dtype),
                         return_dict=False)[0]
        if not self.cfg:
            return run(h, t, cond["emb"]).float()
        if not self.cfg_uncond_grad and torch.is_grad_enabled():  # flow_grpo's detach
            with torch.no_grad():
                v_uncond = run(h, t, cond["neg_emb"])
            v_cond = run(h, t, cond["emb"])
        else:  # [R] -> [2R] rows
            v_uncond, v_cond = run(torch.cat([h, h]), torch.cat([t, t]),
                                   torch.cat([cond["neg_emb"], cond["emb"]])).chunk(2)
        return cfg_combine(v_uncond.float(), v_cond.float(), self.guidance_scale).float()

    # ------------------------------------------------------------------ the VAE
    def _latent_stats(self, like: Tensor) -> Tuple[Tensor, Tensor]:
        """The VAE's per-channel ``latents_mean`` and ``1 / latents_std`` as ``[1, C, 1, 1, 1]``."""
        config = self.pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(like)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(like)
        return mean, inv_std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` float32 in [0, 1] from final latents ``[B, C, F', h, w]``
        (un-normalised as the pipeline: ``z / (1 / std) + mean``)."""
        vae = self.pipe.vae
        z = latents.to(vae.dtype)
        mean, inv_std = self._latent_stats(z)
        video = vae.decode(z / inv_std + mean, return_dict=False)[0]  # [B, 3, F, H, W]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Latents ``[B, C, F', h, w]`` fp32 of videos ``[B, F, 3, H, W]`` in [0, 1] (the VAE
        posterior mean, normalised by ``latents_mean`` / ``latents_std``: what :meth:`decode`
        undoes).

        Raises:
            ValueError: images ``[B, 3, H, W]`` (e.g. Diffusion-DPO pairs of images): Wan makes
                videos.
        """
        if images.dim() != 5:
            raise ValueError(f"Wan encodes videos [B, F, 3, H, W]; got a tensor of shape "
                             f"{tuple(images.shape)} (images?). Preference pairs and other "
                             f"inputs of a Wan job must be videos of diffusion.frames frames")
        vae = self.pipe.vae
        x = images.to(self.device, vae.dtype).permute(0, 2, 1, 3, 4) * 2 - 1  # [B, 3, F, H, W]
        z = vae.encode(x, return_dict=False)[0].mode()
        mean, inv_std = self._latent_stats(z)
        return ((z - mean) * inv_std).float()

    @staticmethod
    def build_tiny_pipeline(size: int = 16, seed: int = 0, demo: bool = False):
        """:func:`build_tiny_wan` (Wan 2.1 layout). ``demo``: the text-to-video demo's pipeline
        (9 frames): the smooth VAE, one transformer token per video (patch 3 x s x s with
        ``s = size / 8``) and a 10x text gain, see :func:`build_tiny_wan`."""
        if demo:
            return build_tiny_wan(size, seed, vae="smooth", patch=(3, size // 8, size // 8),
                                  text_gain=10.0)
        return build_tiny_wan(size, seed)


def check_frames(frames, factor: int = 4) -> None:
    """Raise ``ValueError`` unless ``frames`` is ``factor·k + 1`` (k >= 0), naming the nearest
    valid counts."""
    if frames is None or isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames={frames!r}; Wan makes videos of {factor}k + 1 frames: set "
                         f"diffusion.frames (e.g. 33 as flow_grpo, 81 as Wan2.1 at 16 fps)")
    if (frames - 1) % factor:
        low = frames - (frames - 1) % factor
        raise ValueError(f"frames={frames} is not {factor}k + 1 (Wan's VAE compresses time by "
                         f"{factor}: latent frames (F - 1) / {factor} + 1); use {low} or "
                         f"{low + factor}")


def build_tiny_wan(size: int = 16, seed: int = 0, *, ti2v: bool = False, vae: str = "random",
                   patch=(1, 2, 2), text_gain: float = 1.0):
    """A ``WanPipeline`` with tiny random weights making ``size × size`` videos.

    Wan 2.1 layout: a one-block transformer (≈7k parameters, patch 1x2x2, 4 latent channels), a
    4-level ``AutoencoderKLWan`` (8x spatial, 4x temporal compression, 4 channels, ≈17k
    parameters), a one-layer UMT5 with a ``T5TokenizerFast`` built in code (FLUX's tiny Unigram
    vocabulary), ``FlowMatchEulerDiscreteScheduler(shift=3)``. ``ti2v``: the Wan 2.2 TI2V-5B
    layout instead (the residual VAE with 2x2 pixel patches: 16x spatial compression;
    ``expand_timesteps=True``); ``size`` must then be a multiple of 32. ``vae``: "random"
    (the conformance tests' VAE) or "smooth": the same VAE with its decoder set by
    :func:`~mmrl.diffusion.models.tiny_video_vae.smooth_wan_decoder` to a smooth upsampling of
    latent channel 0 to grey (a latent blob decodes to a pixel blob at its place: what the
    text-to-video demo's motion reward needs; Wan 2.1 layout only). ``patch``: the
    transformer's (t, h, w) patch. The tiny transformer's only positions are RoPE's, relative
    ones: with several tokens it can hardly put mass at an absolute place (left at the first
    frame, right at the last), so the demo uses one token for its whole 9-frame latent
    ``(3, size / 8, size / 8)``: its output projection then writes an absolute pattern.
    ``text_gain``: scales the cross-attention's output projection (the demo: 10; at 1 "moving
    left" vs "right" moves the velocity ~1%, too little for GRPO to learn from in minutes).

    Raises:
        ValueError: size < 2; ``vae`` not one of random | smooth; smooth with ``ti2v``.
    """
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline,
                           WanTransformer3DModel)
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    from mmrl.diffusion.models.flux import _t5_unigram_pieces
    from mmrl.diffusion.models.tiny_video_vae import VAES, smooth_wan_decoder

    check_size(size)
    if vae not in VAES or (ti2v and vae != "random"):
        raise ValueError(f"build_tiny_wan: vae={vae!r} (ti2v={ti2v}); expected one of "
                         f"{', '.join(VAES)} (smooth only for the Wan 2.1 layout, ti2v=False)")
    # Construction order after the seed fixes the weights: transformer, VAE, UMT5.
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=patch, num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
    stats = dict(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0])
    if ti2v:  # Wan 2.2's VAE: 2x2 pixel patches (12 channels in), residual blocks, 16x
        autoencoder = AutoencoderKLWan(
            base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
            out_channels=12, patch_size=2, scale_factor_spatial=16, **stats)
    else:
        autoencoder = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1],
                                       num_res_blocks=1, temperal_downsample=[False, True, True],
                                       **stats)
    if vae == "smooth":
        smooth_wan_decoder(autoencoder)
    _scale_text(transformer, text_gain)
    pieces = _t5_unigram_pieces()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(pieces), d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8)).eval()  # no dropout: as from_pretrained loads it
    return WanPipeline(tokenizer=T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512),
                       text_encoder=text_encoder, vae=autoencoder, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), expand_timesteps=ti2v)


def _scale_text(transformer, gain: float) -> None:
    """Multiply every block's cross-attention output projection (weight, not bias) by ``gain``."""
    with torch.no_grad():
        for block in transformer.blocks:
            block.attn2.to_out[0].weight.mul_(gain)


def save_tiny_wan(out_dir, size: int = 16, seed: int = 0, overwrite: bool = False,
                  demo: bool = False) -> Path:
    """Build the tiny Wan 2.1 pipeline (``demo``: the video demo's) and ``save_pretrained`` it
    to ``out_dir`` (kept if it exists unless ``overwrite``) -> the directory."""
    return WanAdapter.build_tiny(out_dir, size=size, seed=seed, overwrite=overwrite, demo=demo)
