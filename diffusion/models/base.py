"""The flow adapter interface: what the samplers, the policy and the job need from a
flow-matching generator family, and the diffusers plumbing every family shares.

An adapter wraps a diffusers pipeline at a fixed resolution and is itself the samplers'
``velocity_fn``. A family subclasses :class:`FlowAdapter` and implements (``sd3.py`` and
``flux.py`` are the examples):

- ``encode_prompt(prompts) -> cond``: the cond rows the samplers index (a dict of ``[P, ...]``
  tensors), each distinct text encoded once (:meth:`FlowAdapter._lookup` caches);
- ``latent_shape(height, width, frames=None)``: the shape of one sample's latent (checks the
  resolution); image families take ``frames=None``;
- ``sigmas(num_steps) -> [T+1]``: the family's noise schedule;
- ``transformer_velocity(model, latents, sigma, cond)``: the velocity of ``model`` (the policy's
  transformer or the reference) in fp32, with the family's guidance (CFG or embedded);
- ``decode(latents) -> [B, 3, H, W]`` in [0, 1]; ``encode_images`` (its inverse through the VAE)
  and ``unguided()`` (the unguided prediction) where the shared defaults do not fit;
- ``build_tiny_pipeline(size, seed)``: a tiny random pipeline built offline (tests, demo).

Shared here: fine-tuning mode and LoRA (peft), the reference velocity (adapter disabled, or a
frozen copy), the prompt cache, trainable parameters and state, FSDP units, the diffusers-format
export, and loading (:func:`load_pipeline`).
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor
FINETUNE_MODES = ("lora", "full", "none")


def load_pipeline(pipeline_class: str, name_or_path: str, *, dtype: torch.dtype = torch.float32,
                  device="cpu", **kwargs):
    """``diffusers.<pipeline_class>.from_pretrained`` with an error that says what to do offline.

    Args:
        pipeline_class: e.g. ``StableDiffusion3Pipeline`` or ``FluxPipeline``.
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
            f"{type(err).__name__}: {str(err)[:300]}). Expected folder layout: "
            f"{expected_layout(pipeline_class)}") from err
    return pipe.to(device)


def expected_layout(pipeline_class: str) -> str:
    """The folder ``<pipeline_class>.save_pretrained`` writes (what ``diffusion.model`` may point
    at), read from the pipeline's own constructor: ``model_index.json (_class_name X),
    transformer/ (XTransformer), vae/ (...), ...``; optional components are marked."""
    import inspect
    import typing

    import diffusers

    parts = [f"model_index.json (_class_name {pipeline_class})"]
    params = inspect.signature(getattr(diffusers, pipeline_class).__init__).parameters
    for name, p in params.items():
        kinds = [a for a in typing.get_args(p.annotation) if a is not type(None)] or [p.annotation]
        kinds = [a for a in kinds if isinstance(a, type) and (hasattr(a, "from_pretrained")
                                                              or hasattr(a, "from_config"))]
        if kinds:  # a component (a folder), not a config value
            optional = ", optional" if p.default is not inspect.Parameter.empty else ""
            parts.append(f"{name}/ ({' or '.join(k.__name__ for k in kinds)}{optional})")
    return ", ".join(parts)


def _absent_components(name_or_path: str) -> dict:
    """``{component: None}`` for the components a saved pipeline stored as absent.

    A pipeline saved with ``text_encoder_3=None`` (no T5) records ``[null, null]`` in
    ``model_index.json``; ``from_pretrained`` then needs them passed as None explicitly.
    """
    import json

    index = os.path.join(name_or_path, "model_index.json")
    if not os.path.isfile(index):
        return {}
    with open(index) as f:
        entries = json.load(f)
    return {k: None for k, v in entries.items()
            if not k.startswith("_") and isinstance(v, list) and v[0] is None}


def _shown(prompts: Sequence[str], over: List[Tuple[int, int]]) -> str:
    """``#i (n tokens): 'start…'`` for the first three ``(index, tokens)`` of ``over``."""
    return "; ".join(f"#{i} ({n} tokens): {prompts[i][:60]!r}" for i, n in over[:3])


def check_resolution(height: int, width: int, factor: int, why: str) -> None:
    """Raise ``ValueError`` unless both sides are positive multiples of ``factor``."""
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise ValueError(f"resolution {height}x{width} is not a positive multiple of {factor} "
                         f"({why}); use {max(factor, height - height % factor)}x"
                         f"{max(factor, width - width % factor)}")


def refuse_shift(family: str, shift) -> None:
    """Raise ``ValueError`` for a fixed ``diffusion.shift`` on a family whose schedule shifts
    with the resolution (the pipeline's ``calculate_shift``)."""
    if shift is not None:
        raise ValueError(f"shift={shift!r}; {family} shifts its schedule by the resolution "
                         f"(the pipeline's calculate_shift); leave diffusion.shift unset (null)")


class FlowAdapter:
    """A diffusers flow-matching pipeline as velocity function, reference, encoder and decoder.

    Args:
        pipe: the family's diffusers pipeline (``PIPELINE_CLASS``).
        height, width: the image resolution this adapter samples at (checked here).
        guidance_scale: the family's guidance (SD3: CFG weight; FLUX: the embedded guidance).
        finetune: ``lora`` (adds a peft adapter, base frozen; reference = adapter disabled),
            ``full`` (all transformer weights train; the reference is a frozen copy) or ``none``
            (sampling / evaluation only).
        lora_rank, lora_alpha, lora_targets: the adapter (flow_grpo: 32, 64, ``LORA_TARGETS``).
        max_sequence_length: T5 prompt tokens; CLIP always takes 77.
        shift: the schedule shift where the family has a fixed one (None: the scheduler
            config's); a family with its own shift rule rejects a value.
        frames: frames per video of a video family (``MEDIA == "video"``); None for images
            (an image family rejects a number).
        gradient_checkpointing: recompute each transformer block in the backward pass
            (diffusers' ``enable_gradient_checkpointing``): less activation memory, the same
            gradient, about one more forward of time.

    Raises:
        ValueError: unknown ``finetune`` mode, lora_rank < 1, a resolution the pipeline cannot
            make.
    """

    PIPELINE_CLASS = ""
    """The diffusers pipeline class this adapter wraps (its line in ``models.FAMILIES``)."""
    LORA_TARGETS: Tuple[str, ...] = ()
    """peft ``target_modules`` of the transformer (flow_grpo's attention projections)."""
    FSDP_BLOCKS: Tuple[str, ...] = ("transformer_blocks",)
    """Attributes of the transformer holding its blocks (each one an FSDP2 unit)."""
    CFG_OFF: Optional[float] = None
    """The guidance at or below which classifier-free guidance is off (SD3, Wan, Qwen-Image: 1,
    as ``v_u + w(v_c − v_u)`` is ``v_c`` at w = 1; Z-Image: 0); None: the guidance is not CFG
    (FLUX embeds it in the model's input)."""
    MEDIA = "image"
    """What :meth:`decode` makes: ``image`` (``[B, 3, H, W]``) or ``video`` (``[B, F, 3, H, W]``)."""
    LONG_TOKENIZER: Optional[str] = None
    """The pipeline attribute of the tokenizer that ``max_sequence_length`` bounds (SD3
    ``tokenizer_3``, FLUX ``tokenizer_2``); None: the family has none (prompts are not checked)."""

    def __init__(self, pipe, *, height: int = 512, width: int = 512, guidance_scale: float = 1.0,
                 finetune: str = "lora", lora_rank: int = 32, lora_alpha: float = 64.0,
                 lora_targets: Optional[Sequence[str]] = None, max_sequence_length: int = 256,
                 shift: Optional[float] = None, frames: Optional[int] = None,
                 gradient_checkpointing: bool = False):
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune={finetune!r}; expected one of {FINETUNE_MODES}")
        self.pipe, self.transformer, self.finetune = pipe, pipe.transformer, finetune
        self.height, self.width = int(height), int(width)
        self.frames = None if frames is None else int(frames)
        # a bad resolution or frame count fails before any work
        self.latent_shape(self.height, self.width, self.frames)
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length, self.shift = max_sequence_length, shift
        self._check_max_sequence_length()
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
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype = torch.float32,
                        device="cpu", pipeline_kwargs: Optional[dict] = None, **kwargs):
        """Load with :func:`load_pipeline`, then wrap; ``kwargs`` go to the adapter."""
        return cls(load_pipeline(cls.PIPELINE_CLASS, name_or_path, dtype=dtype, device=device,
                                 **(pipeline_kwargs or {})), **kwargs)

    @classmethod
    def build_tiny(cls, folder, size: int = 16, seed: int = 0, overwrite: bool = False,
                   **options) -> Path:
        """``save_pretrained`` a tiny random pipeline of this family to ``folder`` -> the folder.

        A pipeline already there (``model_index.json``) is kept unless ``overwrite``.
        ``options``: the family's own ``build_tiny_pipeline`` keywords (e.g. Wan's ``demo``).
        """
        out = Path(folder)
        if (out / "model_index.json").exists() and not overwrite:
            return out
        out.mkdir(parents=True, exist_ok=True)
        cls.build_tiny_pipeline(size, seed, **options).save_pretrained(str(out))
        return out

    # ------------------------------------------------------------ what a family implements
    @staticmethod
    def build_tiny_pipeline(size: int, seed: int):
        """A tiny random pipeline of the family making ``size x size`` images (offline)."""
        raise NotImplementedError

    def encode_prompt(self, prompts: Sequence[str]) -> Dict[str, Tensor]:
        """Cond rows for ``prompts`` (one row each), each distinct text encoded once."""
        raise NotImplementedError

    def latent_shape(self, height: Optional[int] = None, width: Optional[int] = None,
                     frames: Optional[int] = None) -> Tuple[int, ...]:
        """The latent of one sample at ``height x width`` (None: the adapter's resolution;
        ``frames``: video families, None for images); checks the resolution."""
        raise NotImplementedError

    def sigmas(self, num_steps: int) -> Tensor:
        """The noise schedule ``[T+1]`` fp32 (σ_0 = 1 ... σ_T = 0)."""
        raise NotImplementedError

    def transformer_velocity(self, model, latents: Tensor, sigma: Tensor,
                             cond: Dict[str, Tensor]) -> Tensor:
        """``model``'s velocity at ``(latents, sigma)`` in fp32, with the family's guidance."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` float32 in [0, 1] from final latents."""
        raise NotImplementedError

    def _resolution_shifted_sigmas(self, num_steps: int) -> Tensor:
        """``[T+1]``: linspace(1, 1/T, T) shifted by μ = ``calculate_shift`` of the packed image
        sequence length with the scheduler config's base / max shift (FLUX, Qwen-Image), computed
        by a copy of the pipeline's own scheduler, as their ``__call__`` does."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        mu = calculate_shift(self.latent_shape()[0], cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                             cfg.get("max_shift", 1.15))
        sched = copy.deepcopy(self.pipe.scheduler)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return sched.sigmas.float().cpu()

    def _packed_latent_shape(self, height: Optional[int], width: Optional[int],
                             frames: Optional[int], family: str) -> Tuple[int, int]:
        """``(L, C_in)`` of 2x2-packed latents (FLUX, Qwen-Image), ``L = (h/2f)·(w/2f)``, at the
        adapter's own resolution only (None: it): their positions and schedule shift depend on
        it.

        Raises:
            ValueError: a side not divisible by 2·VAE factor, another resolution, frames given.
        """
        self._check_frames(frames, family)
        height = self.height if height is None else height
        width = self.width if width is None else width
        f = self.pipe.vae_scale_factor
        check_resolution(height, width, 2 * f, f"2 x VAE factor {f}: {family} packs 2x2 latent "
                                               f"patches")
        if (height, width) != (self.height, self.width):
            raise ValueError(f"resolution {height}x{width}, but this {family} adapter was built "
                             f"for {self.height}x{self.width} (its positions and schedule shift "
                             f"depend on it); build it with height={height}, width={width}")
        return ((height // (2 * f)) * (width // (2 * f)), self.transformer.config.in_channels)

    def encode_images(self, images: Tensor) -> Tensor:
        """Latents ``[B, *latent_shape()]`` fp32 of images ``[B, 3, H, W]`` in [0, 1] at the
        adapter's resolution: the VAE posterior mean, shifted and scaled as :meth:`decode`
        undoes (families whose latents are not the VAE's grid, e.g. FLUX's packed tokens,
        override this)."""
        return self._vae_encode(images)

    @property
    def cfg(self) -> bool:
        """Whether classifier-free guidance runs (``guidance_scale > CFG_OFF``)."""
        return self.CFG_OFF is not None and self.guidance_scale > self.CFG_OFF

    def unguided(self):
        """A context within which :meth:`velocity` and :meth:`reference` are the model's own
        conditional prediction, the one the flow-matching loss trains (Diffusion-DPO). Families
        with classifier-free guidance switch it off (guidance ``CFG_OFF``); a guidance the model
        takes as an input (FLUX's embedded guidance) stays: it is part of its conditioning."""
        if self.CFG_OFF is None:
            return contextlib.nullcontext()
        return self.guidance(self.CFG_OFF)

    def training_sigmas(self) -> Tensor:
        """``[N]`` fp32: the σ grid the pipeline's scheduler is built with before any
        ``set_timesteps`` (``N = num_train_timesteps``, σ from 1 down; shifted by the config's
        shift unless the scheduler shifts dynamically), the grid flow-matching training samples
        σ from (diffusers' training scripts, flow_grpo's ``train_sd3_dpo.py``). An adapter with
        its own ``shift`` uses it for this grid too."""
        config = dict(self.pipe.scheduler.config)
        if self.shift is not None:
            config["shift"] = float(self.shift)
        return type(self.pipe.scheduler).from_config(config).sigmas.float().cpu()

    # ------------------------------------------------------------ shared
    def encode(self, prompts: Sequence[str]) -> Dict[str, Tensor]:
        """:meth:`encode_prompt` (the name before the adapter interface)."""
        return self.encode_prompt(prompts)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def velocity(self, latents: Tensor, sigma: Tensor, cond: Dict[str, Tensor]) -> Tensor:
        """The policy's velocity v(x, σ, cond) in fp32 (gradients flow when enabled)."""
        return self.transformer_velocity(self.transformer, latents, sigma, cond)

    __call__ = velocity

    @torch.no_grad()
    def reference(self, latents: Tensor, sigma: Tensor, cond: Dict[str, Tensor]) -> Tensor:
        """The reference policy's velocity (base weights), without gradients."""
        if self.ref_transformer is not None:
            return self.transformer_velocity(self.ref_transformer, latents, sigma, cond)
        with self._adapters_disabled():
            return self.transformer_velocity(self.transformer, latents, sigma, cond)

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        """The parameters the optimizer should update (LoRA weights, or the whole transformer)."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> Dict[str, Tensor]:
        """The trained weights: the LoRA tensors, or the whole transformer (``full``)."""
        return {k: v for k, v in self.transformer.state_dict().items()
                if self.finetune == "full" or "lora" in k}

    def load_trainable_state_dict(self, state: Dict[str, Tensor]) -> None:
        """Load :meth:`trainable_state_dict`'s tensors.

        Raises:
            ValueError: a trained tensor is missing (another finetune mode or LoRA rank).
        """
        missing = set(self.trainable_state_dict()) - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. "
                             f"{sorted(missing)[0]!r}); expected weights of the same finetune "
                             f"mode ({self.finetune}) and LoRA rank")
        self.transformer.load_state_dict(state, strict=False)

    def fsdp_blocks(self) -> List[torch.nn.Module]:
        """The transformer's blocks (FSDP2 units under the transformer as root)."""
        return [block for name in self.FSDP_BLOCKS
                for block in (getattr(self.transformer, name, None) or [])]

    def export(self, path: str, merge_lora: bool = False, state_dict=None) -> str:
        """The adapter's pipeline (or LoRA file) in diffusers format, loadable with diffusers'
        own ``from_pretrained`` (see :func:`mmrl.diffusion.export.export_flow_policy`)."""
        from mmrl.diffusion.export import export_flow_policy
        return export_flow_policy(self, path, merge_lora=merge_lora, state_dict=state_dict)

    export_pretrained = export

    @contextlib.contextmanager
    def guidance(self, scale: Optional[float]):
        """Within the block the guidance scale is ``scale`` (None: unchanged)."""
        saved = self.guidance_scale
        self.guidance_scale = saved if scale is None else float(scale)
        try:
            yield
        finally:
            self.guidance_scale = saved

    def _add_lora(self, rank: int, alpha: float, targets: Sequence[str]) -> None:
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"lora_rank={rank}; expected an int >= 1 (flow_grpo uses 32)")
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha,
                                                init_lora_weights="gaussian",
                                                target_modules=list(targets)))

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

    def prompt_lengths(self, prompts: Sequence[str]) -> List[int]:
        """Tokens each prompt takes in the encoder that ``max_sequence_length`` bounds
        (``LONG_TOKENIZER``; a family whose template adds tokens overrides); ``[]`` when the
        family or the loaded pipeline has no such tokenizer."""
        tok = getattr(self.pipe, self.LONG_TOKENIZER, None) if self.LONG_TOKENIZER else None
        if tok is None:
            return []
        return [len(ids) for ids in tok(list(prompts), truncation=False)["input_ids"]]

    def check_prompts(self, prompts: Sequence[str], what: str = "prompts") -> None:
        """Check prompt lengths before any work: a prompt longer than the text encoder can read
        at all is an error; one longer than ``max_sequence_length`` (cut at sampling, as the
        diffusers pipelines do) is a warning with the fix.

        Raises:
            ValueError: names each prompt over the encoder's limit (index, tokens, its start).
        """
        lengths = self.prompt_lengths(prompts)
        limit = self._encoder_limit()
        name = type(self).__name__[:-len("Adapter")] or "this family"
        over = [(i, n) for i, n in enumerate(lengths) if limit is not None and n > limit]
        if over:
            raise ValueError(f"{len(over)} of {len(lengths)} {what} are longer than the {limit} "
                             f"tokens {name}'s text encoder reads: {_shown(prompts, over)}. "
                             f"Shorten them to at most {limit} tokens")
        cut = [(i, n) for i, n in enumerate(lengths) if n > self.max_sequence_length]
        if cut:
            warnings.warn(f"{len(cut)} of {len(lengths)} {what} are longer than diffusion."
                          f"max_sequence_length={self.max_sequence_length} tokens and will be cut "
                          f"there: {_shown(prompts, cut)}. Raise max_sequence_length to "
                          f"{max(n for _, n in cut)}{self._encoder_limit_note()} to keep their "
                          f"ends", stacklevel=2)

    def _encoder_limit(self) -> Optional[int]:
        tok = getattr(self.pipe, self.LONG_TOKENIZER, None) if self.LONG_TOKENIZER else None
        limit = getattr(tok, "model_max_length", None)
        return int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else None

    def _encoder_limit_note(self) -> str:
        limit = self._encoder_limit()
        return f" (the encoder reads at most {limit})" if limit else ""

    def _check_max_sequence_length(self) -> None:
        limit = self._encoder_limit()
        if limit is not None and self.max_sequence_length > limit:
            raise ValueError(f"diffusion.max_sequence_length={self.max_sequence_length} but "
                             f"{type(self).__name__[:-len('Adapter')]}'s text encoder reads at "
                             f"most {limit} "
                             f"tokens; set max_sequence_length <= {limit}")

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
        """Per-prompt embedding tuples, encoding each text not seen before exactly once
        (``_encode_batch(prompts) -> [tuple per prompt]`` is the family's)."""
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

    @staticmethod
    def _check_cond(cond, keys) -> None:
        if not isinstance(cond, dict) or any(k not in cond for k in keys):
            raise TypeError(f"cond must be the dict returned by encode_prompt() (or its rows) "
                            f"with keys {list(keys)}; got {type(cond).__name__}")

    @staticmethod
    def _check_frames(frames: Optional[int], family: str) -> None:
        if frames is not None:
            raise ValueError(f"frames={frames!r}; {family} makes images: set diffusion.frames=0 "
                             f"(frames=None)")

    @torch.no_grad()
    def _vae_encode(self, images: Tensor) -> Tensor:
        vae = self.pipe.vae
        x = (images.to(self.device, vae.dtype) * 2 - 1)  # [0, 1] -> the VAE's [-1, 1]
        z = vae.encode(x, return_dict=False)[0].mode()  # posterior mean: deterministic
        return ((z.float() - vae.config.shift_factor) * vae.config.scaling_factor)

    def _vae_decode(self, z: Tensor) -> Tensor:
        vae = self.pipe.vae
        z = z.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)
