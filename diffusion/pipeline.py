"""Diffusers SD3 / SD3.5 and FLUX pipelines as policies for the samplers.

A policy wraps a pipeline and is itself the samplers' ``velocity_fn``:

- ``policy.encode(prompts)`` computes the text embeddings once per distinct prompt (cached) and
  returns the cond rows the samplers index (a dict of ``[P, ...]`` tensors);
- ``policy(x, sigma, cond)`` is the velocity in fp32 (gradients flow when enabled);
- ``policy.reference(x, sigma, cond)`` is the reference policy = the base weights, under
  ``no_grad``: the LoRA adapter disabled, or a frozen copy for full fine-tuning;
- ``policy.decode(latents)`` gives images ``[B, 3, H, W]`` in [0, 1];
- ``policy.latent_shape(...)`` checks the resolution before any work.

:class:`SD3Policy` adds classifier-free guidance v = v_u + w(v_c − v_u) (one forward on
``[uncond; cond]`` rows). :class:`FluxPolicy` works on FLUX's packed latents ``[B, L, 4C]`` with
the embedded (distilled) guidance FLUX.1-dev uses, and gives the resolution-shifted schedule.
LoRA follows flow_grpo / DanceGRPO: peft, r = 32, α = 64, Gaussian init, attention projections.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mmrl.diffusion.schedule import cfg_combine

Tensor = torch.Tensor

#: flow_grpo's LoRA targets for the SD3 transformer (image and text streams of joint attention).
SD3_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
#: FLUX: the same projections in the double-stream blocks; single-stream blocks have to_q/k/v.
FLUX_LORA_TARGETS = SD3_LORA_TARGETS
FINETUNE_MODES = ("lora", "full", "none")


def _absent_components(name_or_path: str) -> dict:
    """``{component: None}`` for the components a saved pipeline stored as absent.

    A pipeline saved with ``text_encoder_3=None`` (no T5) records ``[null, null]`` in
    ``model_index.json``; ``from_pretrained`` then needs them passed as None explicitly.
    """
    index = os.path.join(name_or_path, "model_index.json")
    if not os.path.isfile(index):
        return {}
    with open(index) as f:
        entries = json.load(f)
    return {k: None for k, v in entries.items()
            if not k.startswith("_") and isinstance(v, list) and v[0] is None}


def load_pipeline(pipeline_class: str, name_or_path: str, *, dtype: torch.dtype = torch.float32,
                  device="cpu", **kwargs):
    """``diffusers.<pipeline_class>.from_pretrained`` with an error that says what to do offline.

    Args:
        pipeline_class: ``StableDiffusion3Pipeline`` or ``FluxPipeline``.
        name_or_path: a hub id (``stabilityai/stable-diffusion-3.5-medium``) or a local directory
            holding ``model_index.json`` (what ``save_pretrained`` writes).
        dtype: weights dtype (bf16 on GPU; fp32 on CPU). device: where to move the pipeline.
        **kwargs: passed to ``from_pretrained``.

    Raises:
        FileNotFoundError: the weights are neither a local directory nor reachable / cached.
    """
    import diffusers

    kwargs = {**_absent_components(name_or_path), **kwargs}
    try:
        pipe = getattr(diffusers, pipeline_class).from_pretrained(name_or_path, dtype=dtype,
                                                                  **kwargs)
    except OSError as err:
        if os.path.isdir(name_or_path):
            where = (f"the local directory {name_or_path!r} has no complete diffusers pipeline "
                     f"(model_index.json and one folder per component)")
            fix = "point to the directory that pipeline.save_pretrained() wrote"
        else:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            note = " (HF_HUB_OFFLINE=1: the hub is not contacted)" if offline else ""
            where = (f"{name_or_path!r} is not a local directory and its weights are not in the "
                     f"hub cache{note}")
            fix = (f"run `huggingface-cli download {name_or_path} --local-dir DIR` where the hub "
                   f"is reachable and pass DIR (or unset HF_HUB_OFFLINE)")
        raise FileNotFoundError(
            f"could not load a {pipeline_class}: {where}. Expected a hub id available on this "
            f"machine or a local pipeline directory. To fix: {fix} (original error: "
            f"{type(err).__name__}: {str(err)[:300]})") from err
    return pipe.to(device)


def load_sd3_pipeline(name_or_path: str, **kwargs):
    """:func:`load_pipeline` for ``StableDiffusion3Pipeline``."""
    return load_pipeline("StableDiffusion3Pipeline", name_or_path, **kwargs)


class _FlowPolicy:
    """What SD3 and FLUX share: fine-tuning mode, LoRA, reference policy, prompt cache."""

    PIPELINE_CLASS = ""
    LORA_TARGETS: Tuple[str, ...] = ()

    def __init__(self, pipe, *, finetune: str, lora_rank: int, lora_alpha: float,
                 lora_targets: Optional[Sequence[str]], max_sequence_length: int):
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune={finetune!r}; expected one of {FINETUNE_MODES}")
        self.pipe, self.transformer, self.finetune = pipe, pipe.transformer, finetune
        self.max_sequence_length = max_sequence_length
        self._cache: Dict[str, Tuple[Tensor, ...]] = {}
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False)
        self.ref_transformer = None
        if finetune == "lora":
            self._add_lora(lora_rank, lora_alpha, lora_targets or self.LORA_TARGETS)
        elif finetune == "full":
            self.transformer.requires_grad_(True)
            self.ref_transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        else:
            self.transformer.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype = torch.float32,
                        device="cpu", pipeline_kwargs: Optional[dict] = None, **kwargs):
        """Load with :func:`load_pipeline`, then wrap; ``kwargs`` go to the policy."""
        return cls(load_pipeline(cls.PIPELINE_CLASS, name_or_path, dtype=dtype, device=device,
                                 **(pipeline_kwargs or {})), **kwargs)

    def _add_lora(self, rank: int, alpha: float, targets: Sequence[str]) -> None:
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"lora_rank={rank}; expected an int >= 1 (flow_grpo uses 32)")
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha,
                                                init_lora_weights="gaussian",
                                                target_modules=list(targets)))

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def export_pretrained(self, path: str, merge_lora: bool = False, state_dict=None) -> str:
        """The policy in diffusers format (see :func:`mmrl.diffusion.export.export_flow_policy`)."""
        from mmrl.diffusion.export import export_flow_policy
        return export_flow_policy(self, path, merge_lora=merge_lora, state_dict=state_dict)

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        """The parameters the optimizer should update (LoRA weights, or the whole transformer)."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def __call__(self, x: Tensor, sigma: Tensor, cond: Dict[str, Tensor]) -> Tensor:
        """The policy's velocity v(x, σ, cond) in fp32 (gradients flow when enabled)."""
        return self._forward(self.transformer, x, sigma, cond)

    @torch.no_grad()
    def reference(self, x: Tensor, sigma: Tensor, cond: Dict[str, Tensor]) -> Tensor:
        """The reference policy's velocity (base weights), without gradients."""
        if self.ref_transformer is not None:
            return self._forward(self.ref_transformer, x, sigma, cond)
        with self._adapters_disabled():
            return self._forward(self.transformer, x, sigma, cond)

    @contextlib.contextmanager
    def _adapters_disabled(self):
        if self.finetune != "lora":
            yield
            return
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def _warn_truncation(self, prompts: Sequence[str]) -> None:
        tok = self.pipe.tokenizer
        limit = tok.model_max_length
        lengths = [len(ids) for ids in tok(list(prompts), truncation=False)["input_ids"]]
        over = sum(n > limit for n in lengths)
        if over:
            warnings.warn(f"{over} of {len(prompts)} prompts are longer than CLIP's {limit} tokens "
                          f"(longest {max(lengths)}) and were truncated; shorten them to keep "
                          f"their ends", stacklevel=4)

    @torch.no_grad()
    def _lookup(self, prompts: Sequence[str]) -> List[Tuple[Tensor, ...]]:
        """Per-prompt embedding tuples, encoding each text not seen before exactly once."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts={prompts!r}; expected a non-empty list of strings")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must be strings; got {type(bad[0]).__name__} {bad[0]!r}")
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            self._warn_truncation(missing)
            self._cache.update(zip(missing, self._encode_batch(missing)))
        return [self._cache[p] for p in prompts]

    def _encode_batch(self, prompts: List[str]) -> List[Tuple[Tensor, ...]]:
        raise NotImplementedError

    def _forward(self, model, x, sigma, cond) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _check_cond(cond, keys) -> None:
        if not isinstance(cond, dict) or any(k not in cond for k in keys):
            raise TypeError(f"cond must be the dict returned by encode() (or its rows) with keys "
                            f"{list(keys)}; got {type(cond).__name__}")

    def _vae_decode(self, z: Tensor) -> Tensor:
        vae = self.pipe.vae
        z = z.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)


class SD3Policy(_FlowPolicy):
    """An SD3 / SD3.5 pipeline as velocity function, reference policy and decoder.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` (``text_encoder_3`` may be None).
        guidance_scale: CFG weight w (SD3.5-M: 4.5); ≤ 1 disables CFG (one model row per sample).
        finetune: ``lora`` (adds a peft adapter, base frozen), ``full`` (all transformer weights
            train; the reference is a frozen copy) or ``none`` (sampling / evaluation only).
        lora_rank, lora_alpha, lora_targets: the adapter (flow_grpo: 32, 64, ``SD3_LORA_TARGETS``).
        max_sequence_length: T5 tokens (SD3 default 256); CLIP always takes 77.
        negative_prompt: the unconditional prompt for CFG ("" as flow_grpo).

    Raises:
        ValueError: unknown ``finetune`` mode, lora_rank < 1.
    """

    PIPELINE_CLASS = "StableDiffusion3Pipeline"
    LORA_TARGETS = SD3_LORA_TARGETS

    def __init__(self, pipe, *, guidance_scale: float = 4.5, finetune: str = "lora",
                 lora_rank: int = 32, lora_alpha: float = 64.0,
                 lora_targets: Optional[Sequence[str]] = None, max_sequence_length: int = 256,
                 negative_prompt: str = ""):
        super().__init__(pipe, finetune=finetune, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_targets=lora_targets, max_sequence_length=max_sequence_length)
        self.guidance_scale, self.negative_prompt = float(guidance_scale), negative_prompt

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def _encode_batch(self, prompts):
        emb, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return list(zip(emb, pooled))

    def encode(self, prompts: Sequence[str]) -> Dict[str, Tensor]:
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

    def _forward(self, model, x: Tensor, sigma: Tensor, cond: Dict[str, Tensor]) -> Tensor:
        self._check_cond(cond, ("emb", "pooled") + (("neg_emb", "neg_pooled") if self.cfg else ()))
        dtype = model.dtype
        h, emb, pooled = x.to(dtype), cond["emb"], cond["pooled"]
        t = sigma.to(x.device) * 1000  # SD3 is conditioned on t = 1000·σ, as the pipeline passes
        if self.cfg:  # one forward on [uncond; cond] rows: [R] -> [2R]
            h, t = torch.cat([h, h]), torch.cat([t, t])
            emb, pooled = torch.cat([cond["neg_emb"], emb]), torch.cat([cond["neg_pooled"], pooled])
        v = model(hidden_states=h, timestep=t.to(dtype), encoder_hidden_states=emb.to(dtype),
                  pooled_projections=pooled.to(dtype), return_dict=False)[0]
        if self.cfg:
            v_uncond, v_cond = v.chunk(2)
            v = cfg_combine(v_uncond.float(), v_cond.float(), self.guidance_scale)
        return v.float()

    def latent_shape(self, height: int, width: int) -> Tuple[int, int, int]:
        """``(C, height/f, width/f)`` for images of ``height × width``.

        Raises:
            ValueError: a side not divisible by f·patch (the VAE factor times the patch size).
        """
        f = self.pipe.vae_scale_factor
        _check_resolution(height, width, f * self.transformer.config.patch_size,
                          f"VAE factor {f} x patch size {self.transformer.config.patch_size}")
        return (self.transformer.config.in_channels, height // f, width // f)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` float32 in [0, 1] from final latents ``[B, C, h, w]``."""
        return self._vae_decode(latents)


def _check_resolution(height: int, width: int, factor: int, why: str) -> None:
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise ValueError(f"resolution {height}x{width} is not a positive multiple of {factor} "
                         f"({why}); use {max(factor, height - height % factor)}x"
                         f"{max(factor, width - width % factor)}")


class FluxPolicy(_FlowPolicy):
    """A FLUX.1 pipeline at a fixed resolution as velocity function, reference and decoder.

    Latents are FLUX's packed tokens ``[B, L, 4C]`` (2×2 latent patches), which the samplers treat
    like any other rank. FLUX.1-dev is guidance-distilled: ``guidance_scale`` is fed to the
    transformer's guidance embedding (DanceGRPO: 3.5), not used for CFG.

    Args:
        pipe: a ``FluxPipeline``.
        height, width: the image resolution (multiples of 2·VAE factor = 16).
        guidance_scale: the embedded guidance (ignored by models without guidance embeddings).
        finetune, lora_rank, lora_alpha, lora_targets: as :class:`SD3Policy`.
        max_sequence_length: T5 tokens (FLUX default 512).

    Raises:
        ValueError: bad resolution, unknown ``finetune`` mode, lora_rank < 1.
    """

    PIPELINE_CLASS = "FluxPipeline"
    LORA_TARGETS = FLUX_LORA_TARGETS

    def __init__(self, pipe, *, height: int = 512, width: int = 512, guidance_scale: float = 3.5,
                 finetune: str = "lora", lora_rank: int = 32, lora_alpha: float = 64.0,
                 lora_targets: Optional[Sequence[str]] = None, max_sequence_length: int = 512):
        _check_resolution(height, width, 2 * pipe.vae_scale_factor,
                          f"2 x VAE factor {pipe.vae_scale_factor}: FLUX packs 2x2 latent patches")
        super().__init__(pipe, finetune=finetune, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_targets=lora_targets, max_sequence_length=max_sequence_length)
        self.height, self.width, self.guidance_scale = height, width, float(guidance_scale)
        f = pipe.vae_scale_factor
        self._grid = (height // (2 * f), width // (2 * f))  # packed token grid
        self._img_ids = pipe._prepare_latent_image_ids(1, *self._grid, self.device, torch.float32)

    def latent_shape(self) -> Tuple[int, int]:
        """``(L, 4C)``: the packed latent of one image at this policy's resolution."""
        return (self._grid[0] * self._grid[1], self.transformer.config.in_channels)

    def sigmas(self, num_steps: int) -> Tensor:
        """The FLUX schedule ``[T+1]``: linspace(1, 1/T, T) with the resolution-dependent shift μ,
        computed by the pipeline's own scheduler (what ``FluxPipeline.__call__`` uses)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        mu = calculate_shift(self.latent_shape()[0], cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                             cfg.get("max_shift", 1.15))
        sched = copy.deepcopy(self.pipe.scheduler)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return sched.sigmas.float().cpu()

    def _encode_batch(self, prompts):
        emb, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                 max_sequence_length=self.max_sequence_length)
        return list(zip(emb, pooled))

    def encode(self, prompts: Sequence[str]) -> Dict[str, Tensor]:
        """Cond rows ``{"emb": [P, S, D] (T5), "pooled": [P, Dp] (CLIP)}``, each text once."""
        rows = self._lookup(prompts)
        return {"emb": torch.stack([r[0] for r in rows]),
                "pooled": torch.stack([r[1] for r in rows])}

    def _forward(self, model, x: Tensor, sigma: Tensor, cond: Dict[str, Tensor]) -> Tensor:
        self._check_cond(cond, ("emb", "pooled"))
        dtype, rows = model.dtype, x.shape[0]
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((rows,), self.guidance_scale, device=x.device)
        # The pipeline passes (1000·σ)/1000; the same float ops keep its results bit-comparable.
        t = (sigma.to(x.device) * 1000).to(dtype) / 1000
        txt_ids = torch.zeros(cond["emb"].shape[1], 3, device=x.device, dtype=dtype)
        v = model(hidden_states=x.to(dtype), timestep=t, guidance=guidance,
                  pooled_projections=cond["pooled"].to(dtype),
                  encoder_hidden_states=cond["emb"].to(dtype), txt_ids=txt_ids,
                  img_ids=self._img_ids.to(x.device, dtype), return_dict=False)[0]
        return v.float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` float32 in [0, 1] from packed final latents ``[B, L, 4C]``."""
        z = self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)
        return self._vae_decode(z)
