"""Qwen-Image (``QwenImagePipeline``) behind the flow adapter interface.

Latents are the pipeline's packed tokens ``[B, L, 4C]``: ``prepare_latents`` draws
``[B, 1, C, h, w]`` (one VAE frame: the VAE is a video VAE) and packs 2×2 latent patches, so an
image latent has no frame axis left. The text encoder is a Qwen2.5-VL read through a chat
template whose first ``prompt_template_encode_start_idx`` (34) tokens are dropped; the
transformer sees the rest (prompt + the template's end) with a mask. Guidance is "true CFG": a
second forward on the negative prompt, combined as v_u + w(v_c − v_u) and rescaled per token to
the conditional prediction's norm (``QwenImagePipeline.__call__``). The schedule's shift μ
depends on the image sequence length (``calculate_shift``), so an adapter is built for one
resolution.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mmrl.diffusion.models.base import FlowAdapter, refuse_shift
from mmrl.diffusion.models.tiny_parts import byte_qwen_tokenizer, check_size
from mmrl.diffusion.schedule import cfg_combine

Tensor = torch.Tensor

#: flow_grpo's Qwen-Image LoRA targets (zhtmike/flow_grpo @27b6ef8 : scripts/train_qwenimage.py,
#: a fork of yifan123/flow_grpo carrying its Qwen-Image trainer): the joint attention's image and
#: text projections plus both streams' MLPs.
QWEN_IMAGE_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
                           "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj",
                           "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                           "txt_mlp.net.0.proj", "txt_mlp.net.2")



class QwenImageAdapter(FlowAdapter):
    """A Qwen-Image pipeline at a fixed resolution as velocity function, reference and decoder.

    Args (beyond :class:`~mmrl.diffusion.models.base.FlowAdapter`'s):
        height, width: the image resolution (multiples of 2·VAE factor = 16).
        guidance_scale: the pipeline's ``true_cfg_scale`` (flow_grpo: 4); > 1 runs CFG against
            ``negative_prompt``, <= 1 one conditional forward.
        max_sequence_length: text tokens after the template's dropped prefix (pipeline default
            512, at most 1024).
        shift: must be None: the shift follows the resolution.
        negative_prompt: the CFG negative prompt (flow_grpo: ``" "``).
        cfg_uncond_grad: with CFG, whether training back-propagates through the negative
            prompt's forward too (True, as flow_grpo's Qwen-Image trainer; False runs it without
            gradient).

    Raises:
        ValueError: a shift, a resolution the pipeline cannot make, frames, or
            max_sequence_length above the pipeline's 1024.
    """

    PIPELINE_CLASS = "QwenImagePipeline"
    CFG_OFF = 1.0
    LORA_TARGETS = QWEN_IMAGE_LORA_TARGETS
    FSDP_BLOCKS = ("transformer_blocks",)
    LONG_TOKENIZER = "tokenizer"

    def __init__(self, pipe, *, guidance_scale: float = 4.0, max_sequence_length: int = 512,
                 shift: Optional[float] = None, negative_prompt: str = " ",
                 cfg_uncond_grad: bool = True, **kwargs):
        refuse_shift("Qwen-Image", shift)
        super().__init__(pipe, guidance_scale=guidance_scale,
                         max_sequence_length=max_sequence_length, **kwargs)
        self.negative_prompt, self.cfg_uncond_grad = negative_prompt, cfg_uncond_grad
        if self.finetune != "none":
            self._freeze_unused_text_output()
        f = pipe.vae_scale_factor
        # the transformer's RoPE grid, as __call__'s img_shapes: (frames, h/2, w/2) per sample
        self._img_shape = (1, self.height // f // 2, self.width // f // 2)

    def _freeze_unused_text_output(self) -> None:
        """Freeze the last block's text-stream output (``attn.to_add_out``, ``txt_mlp``; their
        LoRA too): the transformer drops the text stream after its last block, so they never get
        a gradient (flow_grpo trains them in name only); frozen, the optimizer and the gradient
        norm see only weights that train."""
        last = self.transformer.transformer_blocks[-1]
        for name, p in last.named_parameters():
            if name.startswith(("attn.to_add_out", "txt_mlp.")):
                p.requires_grad_(False)

    @contextlib.contextmanager
    def _adapters_disabled(self):
        try:
            with super()._adapters_disabled():
                yield
        finally:  # peft's enable_adapters marks every adapter weight trainable again
            if self.finetune != "none":
                self._freeze_unused_text_output()

    def latent_shape(self, height: Optional[int] = None, width: Optional[int] = None,
                     frames: Optional[int] = None) -> Tuple[int, int]:
        """``(L, 4C)``: the packed latent of one image, ``L = (h/2f)·(w/2f)`` (``height`` /
        ``width`` None: the adapter's resolution).

        Raises:
            ValueError: a side not divisible by 2·VAE factor, a resolution other than the
                adapter's (its positions and schedule depend on it), or frames given.
        """
        return self._packed_latent_shape(height, width, frames, "Qwen-Image")

    def sigmas(self, num_steps: int) -> Tensor:
        """The schedule ``[T+1]`` of ``QwenImagePipeline.__call__``: linspace(1, 1/T, T) shifted
        by μ = calculate_shift(L) with the scheduler config's base / max shift and sequence
        lengths (Qwen-Image: 0.5 / 0.9, 256 / 8192, exponential time shift, stretched so the last
        σ > 0 is ``shift_terminal`` 0.02), computed by a copy of the pipeline's own scheduler."""
        return self._resolution_shifted_sigmas(num_steps)

    # ------------------------------------------------------------------ text
    def prompt_lengths(self, prompts: Sequence[str]) -> List[int]:
        """Tokens the transformer would read per prompt, what ``max_sequence_length`` bounds:
        the chat template around the prompt, minus the template's dropped prefix (34 tokens with
        Qwen's tokenizer), i.e. the prompt's tokens + the template's end."""
        tok, pipe = self.pipe.tokenizer, self.pipe
        texts = [pipe.prompt_template_encode.format(p) for p in prompts]
        drop = pipe.prompt_template_encode_start_idx
        return [len(ids) - drop for ids in tok(texts, truncation=False)["input_ids"]]

    def _encoder_limit(self) -> Optional[int]:
        # the pipeline cuts the templated text at tokenizer_max_length + the dropped prefix
        return int(getattr(self.pipe, "tokenizer_max_length", 1024))

    def _warn_truncation(self, prompts: Sequence[str]) -> None:
        """Nothing: Qwen-Image's limits are checked by :meth:`check_prompts` (CLIP has none)."""

    def _encode_batch(self, prompts):
        emb, mask = self.pipe.encode_prompt(prompt=list(prompts), device=self.device,
                                            max_sequence_length=self.max_sequence_length)
        lengths = [emb.shape[1]] * len(prompts) if mask is None else mask.sum(1).tolist()
        return [(e[:n].clone(),) for e, n in zip(emb, lengths)]  # each prompt's own tokens

    @staticmethod
    def _padded(rows: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """``([P, S, D] zero-padded, [P, S] long mask)`` from ``P`` tensors ``[n_i, D]``."""
        size = max(r.shape[0] for r in rows)
        emb = torch.stack([torch.cat([r, r.new_zeros(size - r.shape[0], r.shape[1])])
                           for r in rows])
        mask = torch.stack([torch.arange(size, device=r.device) < r.shape[0] for r in rows])
        return emb, mask.long()

    def encode_prompt(self, prompts: Sequence[str]) -> Dict[str, Tensor]:
        """Cond rows ``{"emb": [P, S, D], "mask": [P, S]}`` (Qwen2.5-VL last hidden states of
        the templated prompt, its prefix dropped, padded to the longest row) plus ``"neg_emb"``,
        ``"neg_mask"`` (the negative prompt, every row) when CFG is on; each text encoded once.

        Raises:
            ValueError: no prompts, or a prompt that is not a string.
        """
        emb, mask = self._padded([r[0] for r in self._lookup(prompts)])
        cond = {"emb": emb, "mask": mask}
        if self.cfg:
            neg = self._lookup([self.negative_prompt])[0][0]
            cond["neg_emb"] = neg.expand(len(prompts), *neg.shape)
            cond["neg_mask"] = torch.ones(neg.shape[:1], dtype=torch.long,
                                          device=neg.device).expand(len(prompts), -1)
        return cond

    # ------------------------------------------------------------------ the transformer
    def transformer_velocity(self, model, latents: Tensor, sigma: Tensor,
                             cond: Dict[str, Tensor]) -> Tensor:
        """The Qwen-Image transformer's velocity in fp32 on packed latents; with CFG, the
        pipeline's true CFG: v = c·‖v_c‖/‖c‖ per token, c = v_u + w(v_c − v_u)."""
        keys = ("emb", "mask") + (("neg_emb", "neg_mask") if self.cfg else ())
        self._check_cond(cond, keys)
        dtype, h = model.dtype, latents.to(model.dtype)
        # The pipeline passes (1000·σ)/1000; the same float ops keep its results bit-comparable.
        t = (sigma.to(latents.device) * 1000).to(dtype) / 1000
        img_shapes = [[self._img_shape]] * latents.shape[0]

        def run(emb, mask):
            emb, mask = _trimmed(emb, mask)
            return model(hidden_states=h, timestep=t, guidance=None,
                         encoder_hidden_states_mask=mask, encoder_hidden_states=emb.to(dtype),
                         img_shapes=img_shapes, return_dict=False)[0]

        v_cond = run(cond["emb"], cond["mask"])
        if not self.cfg:
            return v_cond.float()
        # two forwards, as the pipeline: each text keeps its own length (no padding to a pair)
        with _no_grad_if(not self.cfg_uncond_grad):
            v_uncond = run(cond["neg_emb"], cond["neg_mask"])
        v_cond, v_uncond = v_cond.float(), v_uncond.float()
        combined = cfg_combine(v_uncond, v_cond, self.guidance_scale)
        # fp32 norms: the rescale divides by the combined prediction's per-token norm
        return combined * (v_cond.norm(dim=-1, keepdim=True)
                           / combined.norm(dim=-1, keepdim=True))

    # ------------------------------------------------------------------ the VAE
    def _latent_stats(self, dtype, device) -> Tuple[Tensor, Tensor]:
        """``(mean, 1/std)`` ``[1, C, 1, 1, 1]`` of the VAE config, as the pipeline builds them."""
        cfg = self.pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(device, dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(device, dtype)
        return mean, inv_std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` float32 in [0, 1] from packed final latents ``[B, L, 4C]``:
        unpacked to ``[B, C, 1, h, w]``, de-normalized with the VAE's latents_mean / std, decoded,
        the single frame taken."""
        vae, f = self.pipe.vae, self.pipe.vae_scale_factor
        z = self.pipe._unpack_latents(latents, self.height, self.width, f).to(vae.dtype)
        mean, inv_std = self._latent_stats(z.dtype, z.device)
        x = vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]  # [B, 3, H, W]
        return (x.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Packed latents ``[B, L, 4C]`` of images ``[B, 3, H, W]`` in [0, 1]: the VAE posterior
        mean of the one-frame video, normalized by latents_mean / std (what :meth:`decode`
        undoes), packed by the pipeline's ``_pack_latents``."""
        vae = self.pipe.vae
        x = (images.to(self.device, vae.dtype) * 2 - 1).unsqueeze(2)  # [B, 3, 1, H, W]
        z = vae.encode(x, return_dict=False)[0].mode()  # [B, C, 1, h, w], deterministic
        mean, inv_std = self._latent_stats(z.dtype, z.device)
        z = ((z - mean) * inv_std)[:, :, 0].float()  # [B, C, h, w]
        return self.pipe._pack_latents(z, *z.shape)

    @staticmethod
    def build_tiny_pipeline(size: int = 16, seed: int = 0):
        """:func:`build_tiny_qwen_image`."""
        return build_tiny_qwen_image(size, seed)


def _trimmed(emb: Tensor, mask: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """Drop the columns that are padding in every row; the mask becomes None when every token
    is valid, as ``QwenImagePipeline.encode_prompt`` passes it (so a batch of prompts of one
    length runs the transformer exactly as the pipeline does)."""
    size = int(mask.sum(1).max())  # host sync: the text length is a shape
    emb, mask = emb[:, :size], mask[:, :size]
    return emb, (None if bool(mask.all()) else mask)


def _no_grad_if(off: bool):
    """``torch.no_grad()`` when ``off``, else a context that changes nothing."""
    return torch.no_grad() if off else contextlib.nullcontext()


#: Qwen-Image's scheduler config (Qwen/Qwen-Image scheduler/scheduler_config.json): exponential
#: time shift with μ from the image sequence length between (256, 0.5) and (8192, 0.9), the last
#: σ > 0 stretched to 0.02.
QWEN_IMAGE_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                            max_shift=0.9, num_train_timesteps=1000, shift=1.0,
                            shift_terminal=0.02, time_shift_type="exponential",
                            use_dynamic_shifting=True)

#: Words of the pipeline's system prompt that Qwen's BPE keeps whole: added to the tiny byte-level
#: tokenizer so the template's prefix is 34 tokens there too (prompt_template_encode_start_idx).
_TEMPLATE_WORDS = ("system", "user", "assistant", "Describe", " the", " image", " by",
                   " detailing", " color", " shape", " size", " texture", " quantity", " text",
                   " spatial", " relationships", " of", " objects", " and", " background")
_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
             "<|image_pad|>", "<|video_pad|>")


def build_tiny_qwen_image(size: int = 16, seed: int = 0):
    """A ``QwenImagePipeline`` with tiny random weights producing ``size × size`` images.

    A two-block transformer (2 heads of 16, RoPE axes 4+6+6) on 16 packed channels (the VAE's 4
    latent channels × 2×2 patches); a Qwen-Image VAE with one spatial down-sampling (factor 2,
    so ``size`` must be a multiple of 4); a two-layer Qwen2.5-VL text encoder of width 32 with a
    one-block vision tower; a byte-level ``Qwen2Tokenizer`` built in code whose added words make
    the chat template's dropped prefix exactly 34 tokens, as with Qwen's own tokenizer; Qwen-Image's
    scheduler config.

    Args:
        size: image side in pixels (a multiple of 4).
        seed: torch seed of the random initialization (same seed and size, same weights).

    Raises:
        ValueError: size < 2 or not a multiple of 4.
    """
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,
                           QwenImagePipeline, QwenImageTransformer2DModel)

    check_size(size, 4, "the tiny Qwen-Image packs 2x2 patches of a VAE with factor 2")
    tokenizer = _byte_qwen2_tokenizer()
    # Construction order after the seed fixes the weights: transformer, VAE, text encoder.
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                 temperal_downsample=[False], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                 latents_std=[1.5, 0.8, 2.0, 1.1])
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
                             vae=vae, text_encoder=_tiny_qwen25_vl(tokenizer),
                             tokenizer=tokenizer, transformer=transformer)


def _byte_qwen2_tokenizer():
    """The byte-level tiny Qwen tokenizer (:func:`~mmrl.diffusion.models.tiny_parts.
    byte_qwen_tokenizer`) with the Qwen chat specials and :data:`_TEMPLATE_WORDS` as added
    (non-special) tokens, so the template's dropped prefix is 34 tokens as with Qwen's own."""
    from tokenizers import AddedToken

    tok = byte_qwen_tokenizer(_SPECIALS)
    tok.add_tokens([AddedToken(w, normalized=False, special=False) for w in _TEMPLATE_WORDS])
    return tok


def _tiny_qwen25_vl(tok):
    """A two-layer Qwen2.5-VL of width 32 (4 heads of 8, mRoPE sections 1+1+2) with a one-block
    vision tower (the pipeline reads only the text path); seed the torch RNG first."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {k: tok.convert_tokens_to_ids(t) for k, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                 "mrope_section": [1, 1, 2]},
                bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.pad_token_id)
    vision = dict(depth=1, num_heads=2, hidden_size=16, intermediate_size=32, out_hidden_size=32,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))

