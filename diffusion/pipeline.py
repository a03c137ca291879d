"""A diffusers SD3 / SD3.5 pipeline as a policy for the samplers: ``velocity_fn``, decode, LoRA.

:class:`SD3Policy` wraps a ``StableDiffusion3Pipeline``:

- ``policy.encode(prompts)`` computes the text embeddings once per distinct prompt (cached) and
  returns the cond rows the samplers index (``{"emb", "pooled"}`` plus ``"neg_emb"``,
  ``"neg_pooled"`` when classifier-free guidance is on);
- ``policy(x, sigma, cond)`` is the velocity function, with CFG v = v_u + w(v_c − v_u) when
  ``guidance_scale > 1`` (the model then runs on 2 rows per sample: twice the sampler's ``nfe``);
- ``policy.reference(x, sigma, cond)`` is the reference policy = the base weights, under
  ``no_grad``: the LoRA adapter disabled, or a frozen copy for full fine-tuning;
- ``policy.decode(latents)`` gives images ``[B, 3, H, W]`` in [0, 1];
- ``policy.latent_shape(height, width)`` checks the resolution before any work.

LoRA follows flow_grpo: peft, r = 32, α = 64, Gaussian init, on the joint attention's projections.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from typing import Dict, Optional, Sequence, Tuple

import torch

from mmrl.diffusion.schedule import cfg_combine

Tensor = torch.Tensor

#: flow_grpo's LoRA targets for the SD3 transformer (image and text streams of joint attention).
SD3_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
FINETUNE_MODES = ("lora", "full", "none")


def load_sd3_pipeline(name_or_path: str, *, dtype: torch.dtype = torch.float32,
                      device="cpu", **kwargs):
    """``StableDiffusion3Pipeline.from_pretrained`` with an error that says what to do offline.

    Args:
        name_or_path: a hub id (``stabilityai/stable-diffusion-3.5-medium``) or a local directory
            holding ``model_index.json`` (what ``save_pretrained`` writes).
        dtype: weights dtype (bf16 on GPU; fp32 on CPU).
        device: where to move the pipeline.
        **kwargs: passed to ``from_pretrained`` (e.g. ``text_encoder_3=None``).

    Raises:
        FileNotFoundError: the weights are neither a local directory nor reachable / cached.
    """
    from diffusers import StableDiffusion3Pipeline

    kwargs = {**_absent_components(name_or_path), **kwargs}
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(name_or_path, dtype=dtype,
                                                        **kwargs)
    except OSError as err:
        if os.path.isdir(name_or_path):
            where = (f"the local directory {name_or_path!r} has no complete diffusers pipeline "
                     f"(model_index.json and one folder per component)")
            fix = "point to the directory that pipeline.save_pretrained() wrote"
        else:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            where = (f"{name_or_path!r} is not a local directory and its weights are not in the "
                     f"hub cache{' (HF_HUB_OFFLINE=1: the hub is not contacted)' if offline else ''}")
            fix = (f"run `huggingface-cli download {name_or_path} --local-dir DIR` where the hub is "
                   f"reachable and pass DIR (or unset HF_HUB_OFFLINE)")
        raise FileNotFoundError(
            f"could not load an SD3 pipeline: {where}. Expected a hub id available on this machine "
            f"or a local pipeline directory. To fix: {fix} (original error: "
            f"{type(err).__name__}: {str(err)[:300]})") from err
    return pipe.to(device)


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


class SD3Policy:
    """An SD3 pipeline as velocity function, reference policy and decoder (see module docstring).

    Args:
        pipe: a ``StableDiffusion3Pipeline`` (``text_encoder_3`` may be None).
        guidance_scale: CFG weight w (SD3.5-M: 4.5); ≤ 1 disables CFG (one model row per sample).
        finetune: ``lora`` (adds a peft adapter, base frozen), ``full`` (all transformer weights
            train; the reference is a frozen copy) or ``none`` (sampling / evaluation only).
        lora_rank, lora_alpha, lora_targets: the LoRA adapter (flow_grpo: 32, 64, attention).
        max_sequence_length: T5 tokens (SD3 default 256); CLIP always takes 77.
        negative_prompt: the unconditional prompt for CFG ("" as flow_grpo).

    Raises:
        ValueError: unknown ``finetune`` mode, lora_rank < 1.
    """

    def __init__(self, pipe, *, guidance_scale: float = 4.5, finetune: str = "lora",
                 lora_rank: int = 32, lora_alpha: float = 64.0,
                 lora_targets: Sequence[str] = SD3_LORA_TARGETS, max_sequence_length: int = 256,
                 negative_prompt: str = ""):
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune={finetune!r}; expected one of {FINETUNE_MODES}")
        self.pipe, self.transformer = pipe, pipe.transformer
        self.guidance_scale, self.finetune = float(guidance_scale), finetune
        self.max_sequence_length, self.negative_prompt = max_sequence_length, negative_prompt
        self._cache: Dict[str, Tuple[Tensor, Tensor]] = {}
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            if module is not None:
                module.requires_grad_(False)
        self.ref_transformer = None
        if finetune == "lora":
            self._add_lora(lora_rank, lora_alpha, lora_targets)
        elif finetune == "full":
            self.transformer.requires_grad_(True)
            self.ref_transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        else:
            self.transformer.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype = torch.float32,
                        device="cpu", pipeline_kwargs: Optional[dict] = None, **kwargs):
        """Load with :func:`load_sd3_pipeline`, then wrap; ``kwargs`` go to :class:`SD3Policy`."""
        return cls(load_sd3_pipeline(name_or_path, dtype=dtype, device=device,
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
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def trainable_parameters(self):
        """The parameters the optimizer should update (LoRA weights, or the whole transformer)."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

    # -- text ------------------------------------------------------------------------------------
    def _warn_truncation(self, prompts: Sequence[str]) -> None:
        tok = self.pipe.tokenizer
        limit = tok.model_max_length
        lengths = [len(ids) for ids in tok(list(prompts), truncation=False)["input_ids"]]
        over = sum(n > limit for n in lengths)
        if over:
            warnings.warn(f"{over} of {len(prompts)} prompts are longer than CLIP's {limit} tokens "
                          f"(longest {max(lengths)}) and were truncated; shorten them to keep "
                          f"their ends", stacklevel=3)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Dict[str, Tensor]:
        """Cond rows for ``prompts`` (one row each), encoding each distinct text only once.

        Returns:
            ``{"emb": [P, S, D], "pooled": [P, Dp]}`` plus ``"neg_emb"``, ``"neg_pooled"`` when
            CFG is on; pass it (or its rows) as the samplers' ``cond``.

        Raises:
            ValueError: no prompts, or a prompt that is not a string.
        """
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts={prompts!r}; expected a non-empty list of strings")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must be strings; got {type(bad[0]).__name__} {bad[0]!r}")
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            self._warn_truncation(missing)
            emb, _, pooled, _ = self.pipe.encode_prompt(
                prompt=missing, prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
            for k, p in enumerate(missing):
                self._cache[p] = (emb[k], pooled[k])
        if self.cfg and self.negative_prompt not in self._cache:
            emb, _, pooled, _ = self.pipe.encode_prompt(
                prompt=[self.negative_prompt], prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
            self._cache[self.negative_prompt] = (emb[0], pooled[0])
        cond = {"emb": torch.stack([self._cache[p][0] for p in prompts]),
                "pooled": torch.stack([self._cache[p][1] for p in prompts])}
        if self.cfg:
            neg_emb, neg_pooled = self._cache[self.negative_prompt]
            cond["neg_emb"] = neg_emb.expand_as(cond["emb"])
            cond["neg_pooled"] = neg_pooled.expand_as(cond["pooled"])
        return cond

    # -- velocity --------------------------------------------------------------------------------
    def _forward(self, model, x: Tensor, sigma: Tensor, cond: Dict[str, Tensor]) -> Tensor:
        if not isinstance(cond, dict) or "emb" not in cond:
            raise TypeError("cond must be the dict returned by SD3Policy.encode (or its rows)")
        dtype = model.dtype
        h, emb, pooled = x.to(dtype), cond["emb"], cond["pooled"]
        t = sigma.to(x.device) * 1000  # SD3 is conditioned on t = 1000·σ
        if self.cfg:  # one forward on [uncond; cond] rows: [R] -> [2R]
            h, t = torch.cat([h, h]), torch.cat([t, t])
            emb, pooled = torch.cat([cond["neg_emb"], emb]), torch.cat([cond["neg_pooled"], pooled])
        v = model(hidden_states=h, timestep=t.to(dtype), encoder_hidden_states=emb.to(dtype),
                  pooled_projections=pooled.to(dtype), return_dict=False)[0]
        if self.cfg:
            v_uncond, v_cond = v.chunk(2)
            v = cfg_combine(v_uncond.float(), v_cond.float(), self.guidance_scale)
        return v.float()

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

    # -- latents and images ----------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> Tuple[int, int, int]:
        """``(C, height/f, width/f)`` for images of ``height × width``.

        Raises:
            ValueError: a side not divisible by f·patch (the VAE factor times the patch size).
        """
        factor = self.pipe.vae_scale_factor * self.transformer.config.patch_size
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(f"resolution {height}x{width} is not a positive multiple of {factor} "
                             f"(VAE factor {self.pipe.vae_scale_factor} x patch size "
                             f"{self.transformer.config.patch_size}); use "
                             f"{max(factor, height - height % factor)}x"
                             f"{max(factor, width - width % factor)}")
        f = self.pipe.vae_scale_factor
        return (self.transformer.config.in_channels, height // f, width // f)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` float32 in [0, 1] from final latents ``[B, C, h, w]``."""
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
