"""Diffusion-DPO's flow-matching scores, and the image pairs they score.

A flow-matching model has no tractable log-likelihood of an image; Diffusion-DPO (Wallace et al.,
arXiv 2311.12908, Eq. 14) replaces log π(x0) by the negative denoising error at one forward-noised
copy of x0. In the flow-matching form (flow_grpo ``scripts/train_sd3_dpo.py``, SD3.5-M):

    σ = sigmas_train[⌊u·N⌋],  u = sigmoid(n), n ~ N(0, 1)     (logit-normal(0, 1))
    x_σ = (1 − σ)·x0 + σ·ε,   ε ~ N(0, I)
    e(x0) = mean over the latent dims of (v(x_σ, σ) − (ε − x0))²       (fp32)

with the same σ and ε for the two images of a pair, so that the difference of their errors
measures the model and not the draw. The policy's score of an image is −½·e, its reference's
−½·e_ref; DPO's loss on these scores,

    −log σ(β·[(−½e_w + ½e_ref_w) − (−½e_l + ½e_ref_l)])
        = −log σ(−½β·[(e_w − e_ref_w) − (e_l − e_ref_l)]),

is flow_grpo's loss block (β = 100 there). :meth:`mmrl.diffusion.policy.DiffusionGroupPolicy.
pair_scores` assembles it; this module holds the pieces (pure tensors) and the pair-image reader.

Differs from flow_grpo: one (σ, ε) draw per pair per call (flow_grpo accumulates
``num_train_timesteps`` draws over a batch); a group whose rewards are all equal gives no online
pair (flow_grpo pairs indices 1 and 0); online pairs are sampled by the policy (flow_grpo: by the
reference adapter); the reference stays frozen (no ``ref_update_step`` refresh); file images are
encoded with the VAE posterior mean (Diffusion-DPO's ``train.py`` draws a posterior sample).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch

Tensor = torch.Tensor
PAIR_FIELDS = ("prompt", "chosen", "rejected")
"""The fields of a pair record: the prompt, and the chosen and the rejected image's paths."""


def pair_noise(num_pairs: int, latent_shape: Sequence[int], train_sigmas: Tensor,
               generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """``(σ [P], ε [P, *L])`` fp32 on the CPU: one noise level and one noise per pair.

    σ is the training grid's entry at index ⌊u·N⌋ with u logit-normal(0, 1) (diffusers'
    ``compute_density_for_timestep_sampling("logit_normal", 0, 1)``, as flow_grpo's DPO script
    samples it). u is drawn first, then ε, both from ``generator``.

    Args:
        num_pairs: P.
        latent_shape: one sample's latent shape L.
        train_sigmas: ``[N]`` the scheduler's training grid (``FlowAdapter.training_sigmas``).
        generator: a CPU generator (the loop's).
    """
    n = train_sigmas.shape[0]
    u = torch.sigmoid(torch.randn(num_pairs, generator=generator))
    # sigmoid rounds to exactly 1.0 in fp32 beyond n ≈ 17; keep the index on the grid
    index = (u * n).long().clamp(max=n - 1)
    eps = torch.randn((num_pairs, *latent_shape), generator=generator)
    return train_sigmas.float()[index], eps


def denoising_error(velocity_fn: Callable[..., Tensor], x0: Tensor, eps: Tensor, sigma: Tensor,
                    cond: Dict[str, Tensor]) -> Tensor:
    """``e [R]`` fp32 = mean over the latent dims of (v(x_σ, σ) − (ε − x0))², x_σ = (1 − σ)x0 + σε.

    Args:
        velocity_fn: ``(latents, sigma [R], cond) -> velocity`` fp32 (a flow adapter, or its
            ``reference``); gradients flow when it lets them.
        x0, eps: ``[R, *L]`` clean latents and noise (any latent rank: packed FLUX tokens too).
        sigma: ``[R]`` noise levels in [0, 1].
        cond: the adapter's cond rows for the R samples.
    """
    x0, eps, sigma = x0.float(), eps.float(), sigma.float()
    s = sigma.reshape(-1, *[1] * (x0.dim() - 1))  # [R] -> [R, 1, ...] for any latent rank
    v = velocity_fn((1 - s) * x0 + s * eps, sigma, cond).float()
    return (v - (eps - x0)).square().flatten(1).mean(1)  # [R, *L] -> [R]


def check_pair_records(records: Sequence[Mapping[str, Any]]) -> None:
    """Raise ``ValueError`` naming the first record that is not ``{"prompt": str, "chosen": path,
    "rejected": path, ...}`` (a malformed file is the user's to fix; an unreadable image is
    counted instead, see :func:`read_pair_images`)."""
    for i, r in enumerate(records):
        bad = [k for k in PAIR_FIELDS if not isinstance(r.get(k) if isinstance(r, Mapping)
                                                        else None, str)]
        if bad:
            raise ValueError(f"pair record {i}: {r!r:.200} lacks string field(s) {bad}; "
                             f"expected {{\"prompt\": text, \"chosen\": image path, "
                             f"\"rejected\": image path}} per record")


def read_pair_images(records: Sequence[Mapping[str, Any]], height: int,
                     width: int) -> Tuple[List[int], Tensor, Dict[str, int]]:
    """``(kept, images [2K, 3, height, width], skipped)``: the chosen images of the K records
    whose two images could be read, then their rejected images, float32 in [0, 1].

    Each image is resized to cover ``height x width`` and center-cropped (PIL
    ``ImageOps.fit``, bicubic). ``kept`` are the records' indices; a record with an unreadable
    or missing image is left out and counted in ``skipped["unreadable_image"]``.
    """
    from PIL import Image, ImageOps

    def load(path: str) -> Tensor:
        with Image.open(os.path.expanduser(path)) as im:
            fit = ImageOps.fit(im.convert("RGB"), (width, height), Image.Resampling.BICUBIC)
        return torch.frombuffer(bytearray(fit.tobytes()), dtype=torch.uint8).reshape(
            height, width, 3).permute(2, 0, 1).float() / 255  # [H, W, 3] -> [3, H, W]

    kept, chosen, rejected, skipped = [], [], [], {}
    for i, r in enumerate(records):
        try:
            pair = load(r["chosen"]), load(r["rejected"])
        except (OSError, ValueError, Image.DecompressionBombError):
            # OSError: missing, unreadable or truncated files (UnidentifiedImageError is one)
            skipped["unreadable_image"] = skipped.get("unreadable_image", 0) + 1
            continue
        kept.append(i)
        chosen.append(pair[0])
        rejected.append(pair[1])
    images = torch.stack(chosen + rejected) if kept else torch.zeros(0, 3, height, width)
    return kept, images, skipped
