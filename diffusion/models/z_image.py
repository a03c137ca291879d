"""Z-Image / Z-Image-Turbo (``ZImagePipeline``) behind the flow adapter interface.

What the pipeline does and the adapter repeats (diffusers 0.42.1 ``pipeline_z_image.py``):

- Latents ``[B, C, H/f, W/f]`` (``prepare_latents``); the transformer takes them as a list of
  ``[C, 1, h, w]`` (a frame axis of 1) and patchifies 2x2, so sides are multiples of 2·f.
- Text: the prompt goes through the Qwen3 chat template (one user turn, generation prompt,
  ``enable_thinking=True``), is padded to ``max_sequence_length`` and the **second to last**
  hidden state is kept at the mask's positions only: one ``[L_i, D]`` tensor per prompt, of its
  own length. The adapter stores them zero-padded with a mask and hands the transformer the same
  per-sample list.
- Schedule: ``linspace(1, 1/T, T)`` through the scheduler's shift (Z-Image-Turbo: fixed shift 3;
  with ``use_dynamic_shifting`` the resolution's μ, as FLUX).
- Timestep: the transformer takes ``(1000 - t) / 1000`` with ``t = 1000·σ`` (≈ 1 − σ: 0 at
  noise, 1 at the image), the reverse of SD3's / FLUX's convention.
- Sign: the transformer predicts x0 − ε and the pipeline negates it before the scheduler's Euler
  step; the adapter returns the negated output, ε − x0, mmrl's samplers' velocity.
- CFG ``v = v_c + w·(v_c − v_u)`` (``guidance_scale = w > 0`` turns it on; Z-Image-Turbo runs
  w = 0), with the pipeline's optional renormalisation and truncation (see
  :class:`ZImageAdapter`).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mmrl.diffusion.models.base import FlowAdapter, check_resolution
from mmrl.diffusion.models.tiny_parts import byte_qwen_tokenizer, check_size, tiny_vae

Tensor = torch.Tensor

#: The attention projections of every Z-Image block (main ``layers`` and both refiners): the
#: attention half of Flow-Factory's default Z-Image targets (X-GenGroup/Flow-Factory @5405453 :
#: src/flow_factory/models/z_image/z_image.py ``default_target_modules``, which adds the
#: feed-forward ``w1``/``w2``/``w3``; pass them in ``lora_targets`` to train those too).
Z_IMAGE_LORA_TARGETS = ("attention.to_k", "attention.to_out.0", "attention.to_q",
                        "attention.to_v")

#: Qwen3's chat template reduced to what ``ZImagePipeline._encode_prompt`` renders: one user turn
#: and the generation prompt; ``enable_thinking=False`` would add the empty think block.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}")


class ZImageAdapter(FlowAdapter):
    """A Z-Image pipeline at a fixed resolution as velocity function, reference and decoder.

    Args (beyond :class:`~mmrl.diffusion.models.base.FlowAdapter`'s):
        guidance_scale: the pipeline's CFG weight w (``v_c + w(v_c − v_u)``); 0 disables CFG
            (one model row per sample; Z-Image-Turbo). Default 5.0 as ``ZImagePipeline``.
        max_sequence_length: Qwen3 tokens of the templated prompt (default 512, the pipeline's).
        shift: the schedule shift (None: the scheduler config's); refused when the scheduler
            shifts by the resolution (``use_dynamic_shifting``).
        negative_prompt: the unconditional prompt of CFG ("" as the pipeline).
        cfg_truncation: CFG is off on rows whose ``(1000 − 1000σ)/1000 > cfg_truncation`` (the
            pipeline's per-step rule, applied here per row from σ, so every sampler gets it;
            1.0, the default, never truncates).
        cfg_normalization: > 0 scales the guided prediction of a sample down to at most
            ``cfg_normalization · ‖v_c‖`` (the pipeline's ``cfg_normalization``; True there is
            1.0); 0 = off (default).
        cfg_uncond_grad: with CFG, whether the training forward back-propagates through the
            unconditional rows (False: a separate no-grad forward, flow_grpo's detach).
    """

    PIPELINE_CLASS = "ZImagePipeline"
    CFG_OFF = 0.0
    LORA_TARGETS = Z_IMAGE_LORA_TARGETS
    FSDP_BLOCKS = ("noise_refiner", "context_refiner", "layers")
    LONG_TOKENIZER = "tokenizer"  # Qwen3; max_sequence_length bounds the templated prompt

    def __init__(self, pipe, *, guidance_scale: float = 5.0, max_sequence_length: int = 512,
                 shift: Optional[float] = None, negative_prompt: str = "",
                 cfg_truncation: float = 1.0, cfg_normalization: float = 0.0,
                 cfg_uncond_grad: bool = True, **kwargs):
        if shift is not None and pipe.scheduler.config.get("use_dynamic_shifting", False):
            raise ValueError(f"shift={shift!r}, but this Z-Image scheduler shifts its schedule by "
                             f"the resolution (use_dynamic_shifting); leave diffusion.shift unset "
                             f"(null)")
        if float(cfg_normalization) < 0:
            raise ValueError(f"cfg_normalization={cfg_normalization!r}; expected 0 (off) or a "
                             f"norm ratio > 0 (the pipeline's True is 1.0)")
        super().__init__(pipe, guidance_scale=guidance_scale,
                         max_sequence_length=max_sequence_length, shift=shift, **kwargs)
        self.negative_prompt = negative_prompt
        self.cfg_truncation = float(cfg_truncation)
        self.cfg_normalization = float(cfg_normalization)
        self.cfg_uncond_grad = cfg_uncond_grad

    def latent_shape(self, height: Optional[int] = None, width: Optional[int] = None,
                     frames: Optional[int] = None) -> Tuple[int, int, int]:
        """``(C, height/f, width/f)``, as ``ZImagePipeline.prepare_latents`` (None: the adapter's
        resolution).

        Raises:
            ValueError: a side not divisible by 2·f (the transformer's 2x2 patches), frames
                given, or, with a dynamically shifted schedule, another resolution than the
                adapter's.
        """
        self._check_frames(frames, "Z-Image")
        height = self.height if height is None else height
        width = self.width if width is None else width
        f = self.pipe.vae_scale_factor
        check_resolution(height, width, 2 * f,
                         f"2 x VAE factor {f}: the Z-Image transformer patchifies 2x2")
        if self._dynamic_shift() and (height, width) != (self.height, self.width):
            raise ValueError(f"resolution {height}x{width}, but this Z-Image adapter was built "
                             f"for {self.height}x{self.width} and its scheduler shifts by the "
                             f"resolution; build it with height={height}, width={width}")
        return (self.transformer.config.in_channels, height // f, width // f)

    def sigmas(self, num_steps: int) -> Tensor:
        """The schedule ``[T+1]`` of ``ZImagePipeline.__call__``: ``linspace(1, 1/T, T)``
        through the pipeline's own scheduler (its shift, or μ of the resolution when it shifts
        dynamically; ``shift`` replaces the config's fixed shift)."""
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_steps={num_steps!r}; expected an int >= 1")
        sched = copy.deepcopy(self.pipe.scheduler)
        if self.shift is not None:
            sched = type(sched).from_config({**sched.config, "shift": float(self.shift)})
        _, h, w = self.latent_shape()
        cfg = sched.config
        mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                             cfg.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps).tolist(), mu=mu)
        return sched.sigmas.float().cpu()

    def _dynamic_shift(self) -> bool:
        return bool(self.pipe.scheduler.config.get("use_dynamic_shifting", False))

    def _encode_batch(self, prompts):
        # a copy: the pipeline's _encode_prompt writes the templated text into the list it gets
        emb, _ = self.pipe.encode_prompt(list(prompts), device=self.device,
                                         do_classifier_free_guidance=False,
                                         max_sequence_length=self.max_sequence_length)
        return [(e,) for e in emb]  # one [L_i, D] per prompt, L_i its own token count

    @staticmethod
    def _padded(rows: List[Tuple[Tensor, ...]]) -> Tuple[Tensor, Tensor]:
        """``[P, S, D]`` zero-padded embeddings and ``[P, S]`` bool mask (S = the longest)."""
        longest = max(r[0].shape[0] for r in rows)
        emb = rows[0][0].new_zeros(len(rows), longest, rows[0][0].shape[1])
        mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=emb.device)
        for i, (e,) in enumerate(rows):
            emb[i, :e.shape[0]], mask[i, :e.shape[0]] = e, True
        return emb, mask

    def encode_prompt(self, prompts: Sequence[str]) -> Dict[str, Tensor]:
        """Cond rows ``{"emb": [P, S, D], "mask": [P, S]}`` (the Qwen3 states each prompt keeps,
        zero-padded to the longest; ``mask`` marks its own tokens) plus ``"neg_emb"``,
        ``"neg_mask"`` when CFG is on; each distinct text encoded once.

        Raises:
            ValueError: no prompts, or a prompt that is not a string.
        """
        emb, mask = self._padded(self._lookup(prompts))
        cond = {"emb": emb, "mask": mask}
        if self.cfg:
            neg, neg_mask = self._padded(self._lookup([self.negative_prompt]))
            cond["neg_emb"] = neg.expand(len(prompts), -1, -1)
            cond["neg_mask"] = neg_mask.expand(len(prompts), -1)
        return cond

    def transformer_velocity(self, model, latents: Tensor, sigma: Tensor,
                             cond: Dict[str, Tensor]) -> Tensor:
        """The velocity ε − x0 in fp32: minus the transformer's output (the pipeline negates it),
        CFG-combined as the pipeline on the rows whose σ the truncation leaves guided."""
        self._check_cond(cond, ("emb", "mask") + (("neg_emb", "neg_mask") if self.cfg else ()))
        dtype, rows = model.dtype, latents.shape[0]
        # the pipeline's t = 1000·σ (scheduler.timesteps) and the model's (1000 - t) / 1000
        t = sigma.to(latents.device).float() * 1000
        t = ((1000 - t) / 1000).expand(rows)
        x = list(latents.to(dtype).unsqueeze(2).unbind(0))  # R x [C, 1, h, w]
        caps = self._caps(cond["emb"], cond["mask"], dtype)

        def run(x, t, caps):  # -> [n, C, h, w] fp32, the pipeline's noise_pred sign
            out = model(x, t, caps, return_dict=False)[0]
            return -torch.stack([o.float() for o in out]).squeeze(2)

        guided = self._guided_rows(t)
        if not bool(guided.any()):
            return run(x, t, caps)
        negs = self._caps(cond["neg_emb"], cond["neg_mask"], dtype)
        if not self.cfg_uncond_grad and torch.is_grad_enabled():  # flow_grpo's detach
            with torch.no_grad():
                v_u = run(x, t, negs)
            v_c = run(x, t, caps)
        else:  # one forward on [cond; uncond] rows, the pipeline's order: [R] -> [2R]
            v_c, v_u = run(x + x, torch.cat([t, t]), caps + negs).chunk(2)
        v = self._combine(v_c, v_u)
        return torch.where(guided.view(-1, *[1] * (v.dim() - 1)), v, v_c)

    @staticmethod
    def _caps(emb: Tensor, mask: Tensor, dtype) -> List[Tensor]:
        return [e[m].to(dtype) for e, m in zip(emb, mask.to(emb.device))]

    def _guided_rows(self, t: Tensor) -> Tensor:
        """``[R]`` bool: rows CFG applies to (w > 0 and not truncated; the pipeline compares its
        float timestep norm with the float ``cfg_truncation`` in double precision)."""
        if not self.cfg:
            return torch.zeros(t.shape, dtype=torch.bool, device=t.device)
        return ~(t.double() > self.cfg_truncation)

    def _combine(self, v_c: Tensor, v_u: Tensor) -> Tensor:
        """``v_c + w(v_c − v_u)`` per sample, renormalised to ``≤ k‖v_c‖`` when k > 0 (the
        pipeline's loop, in the velocity's sign: the norms are sign-free)."""
        v = v_c + self.guidance_scale * (v_c - v_u)
        if self.cfg_normalization > 0:
            dims = tuple(range(1, v.dim()))
            pos = torch.linalg.vector_norm(v_c, dim=dims, keepdim=True)
            new = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
            limit = pos * self.cfg_normalization
            v = torch.where(new > limit, v * (limit / new), v)
        return v

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` float32 in [0, 1] from final latents ``[B, C, h, w]``."""
        return self._vae_decode(latents)

    def prompt_lengths(self, prompts: Sequence[str]) -> List[int]:
        """Qwen3 tokens of each prompt after the pipeline's chat template (what
        ``max_sequence_length`` cuts: the template adds ~10 tokens around the text)."""
        tok = self.pipe.tokenizer
        if tok is None:
            return []
        texts = [self._templated(tok, p) for p in prompts]
        return [len(ids) for ids in tok(texts, truncation=False)["input_ids"]]

    @staticmethod
    def _templated(tok, prompt: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=True)

    def _warn_truncation(self, prompts: Sequence[str]) -> None:
        """Nothing: Z-Image has no fixed-length CLIP; its one cut, at ``max_sequence_length``,
        is warned about by :meth:`check_prompts` before the job samples."""

    @staticmethod
    def build_tiny_pipeline(size: int = 16, seed: int = 0):
        """:func:`build_tiny_z_image`."""
        return build_tiny_z_image(size, seed)


def build_tiny_z_image(size: int = 16, seed: int = 0):
    """A ``ZImagePipeline`` with tiny random weights producing ``size × size`` images.

    A transformer with one refiner block per stream and one main block (dim 32, 2 heads, RoPE
    axes 4+6+6, 2x2 patches on 4 latent channels; its timestep MLP's hidden width is fixed at
    1024 by diffusers, so ≈0.33M parameters), a one-block VAE (factor 1: latents are
    image-sized), a two-layer Qwen3 text encoder (hidden 32) and a byte-level ``Qwen2Tokenizer``
    with the Qwen specials and :data:`QWEN3_CHAT_TEMPLATE`, built in code. The scheduler is
    Z-Image-Turbo's: fixed shift 3, no dynamic shifting.

    Args:
        size: image side in pixels (even: the transformer patchifies 2x2).
        seed: torch seed of the random initialization (same seed and size, same weights).

    Raises:
        ValueError: size < 2 or odd.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    check_size(size, 2, "the Z-Image transformer patchifies 2x2")
    tokenizer = _byte_qwen_tokenizer()
    # Construction order after the seed fixes the weights: transformer, VAE, text encoder.
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6],
        axes_lens=[1024, 64, 64])
    vae = tiny_vae(size, shift_factor=0.1159, scaling_factor=0.3611)  # Z-Image's (FLUX) VAE
    encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id))
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                          text_encoder=encoder, tokenizer=tokenizer, transformer=transformer)


def save_tiny_z_image(out_dir, size: int = 16, seed: int = 0, overwrite: bool = False) -> Path:
    """Build the tiny Z-Image pipeline and ``save_pretrained`` it to ``out_dir`` -> the folder
    (kept if a pipeline is there, unless ``overwrite``)."""
    return ZImageAdapter.build_tiny(out_dir, size=size, seed=seed, overwrite=overwrite)


def _byte_qwen_tokenizer():
    """The byte-level tiny Qwen tokenizer (:func:`~mmrl.diffusion.models.tiny_parts.
    byte_qwen_tokenizer`): padding on the right, the Qwen3 chat template."""
    tok = byte_qwen_tokenizer(["<|im_start|>", "<|im_end|>"], model_max_length=1024)
    tok.padding_side = "right"
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok
