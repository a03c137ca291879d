"""Per-token objectives: ``(log_ratio, adv, *, spec, valid, group_ids, logp, mask, generator)
-> (loss, ratio, low, high)``: the per-entry loss to minimize and the masks of the clipped,
zero-gradient region.

``log_ratio`` is the ratio level's output (``[B, T]`` or ``[B, 1]``); ``adv`` is ``[B, 1]`` or
``[B, T]``; ``logp`` ``[B, T]`` the current log-probs (with gradient) and ``mask`` ``[B, T]`` for
objectives that read them; ``generator`` a ``torch.Generator`` (or None) for objectives that
draw at random. Flags: ``needs_groups`` (reads ``group_ids``), ``needs_per_sequence`` (needs a
per-sequence ratio level).
"""
from __future__ import annotations

from typing import Callable

import torch

from mmrl.algo.common import entry, ratio as importance_ratio
from mmrl.registry import Registry

OBJECTIVES: Registry[Callable] = Registry("objective")


@entry(OBJECTIVES, "clip", needs_groups=False, needs_per_sequence=False)
def clip_objective(log_ratio, adv, *, spec, valid=None, group_ids=None, **_):
    """ℓ = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)·A); dual clip: ℓ = min(ℓ, −c·A) for A < 0.

    PPO (arXiv 1707.06347) with asymmetric ε (DAPO clip-higher, arXiv 2503.14476); dual clip
    per Ye et al. (arXiv 1912.09729) and verl ``clip_ratio_c``.
    Differs from ALGORITHMS.md: it writes the dual clip as max(ℓ_clip, −c·A); on a loss that
    would raise every A < 0 loss to at least c·|A| instead of bounding it, so mmrl takes the
    paper's (and verl's) cap: ℓ = min(ℓ_clip, −c·A) for A < 0.
    """
    ratio = importance_ratio(log_ratio)
    clipped = ratio.clamp(1.0 - spec.eps_low, 1.0 + spec.eps_high)
    loss = torch.maximum(-adv * ratio, -adv * clipped)
    high = (adv > 0) & (ratio > 1.0 + spec.eps_high)
    low = (adv < 0) & (ratio < 1.0 - spec.eps_low)
    if spec.dual_clip_c is not None:
        cap = -spec.dual_clip_c * adv  # constant in θ: zero gradient in the dual-clipped region
        dual = (adv < 0) & (loss > cap)
        loss = torch.where(dual, cap.expand_as(loss), loss)
        high = high | dual
    return loss, ratio, low, high


@entry(OBJECTIVES, "sapo", needs_groups=False, needs_per_sequence=False)
def sapo_objective(log_ratio, adv, *, spec, valid=None, group_ids=None, **_):
    """ℓ = −f_τ(ρ)·A, f_τ(ρ) = (4/τ)·sigmoid(τ(ρ−1)) (SAPO, arXiv 2511.20347).

    τ = τ_pos if A > 0 else τ_neg. f(1) = 2/τ and f′(1) = 1: at ρ = 1 the gradient is
    REINFORCE's. A soft gate has no zero-gradient region, so both clip fractions are 0.
    """
    ratio = importance_ratio(log_ratio)
    tau = torch.where(adv > 0, adv.new_tensor(spec.tau_pos), adv.new_tensor(spec.tau_neg))
    loss = -(4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0)) * adv
    none = torch.zeros_like(loss, dtype=torch.bool)
    return loss, ratio, none, none


@entry(OBJECTIVES, "reg", needs_groups=True, needs_per_sequence=True)
def reg_objective(log_ratio, adv, *, spec, valid=None, group_ids=None, **_):
    """ℓ_i = (A_i − Â_i)², Â_i = ε_reg·(ℓr_i − mean_g ℓr) (Reg-GRPO, arXiv 2506.07464).

    From the KL-regularized optimum π* ∝ π_old·exp(A/ε): ε·log(π*/π_old) = A − ε·log Z, and the
    group mean removes log Z. No clipping, no min. ``log_ratio`` is ``[B, 1]`` (``sequence_sum``,
    or ``sequence`` for ``length_normalize=True``); rows with an empty mask (``valid`` False)
    are left out of the group mean. Whole groups must be in the same call.
    Unconfirmed against the paper: only its abstract was reachable when this was written; the
    formula is ALGORITHMS.md's (the paper may also scale Â by the group std of ℓr).
    """
    lr = log_ratio[:, 0]  # [B, 1] -> [B]
    w = torch.ones_like(lr) if valid is None else valid[:, 0].to(lr.dtype)
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    zeros = torch.zeros(uniq.numel(), dtype=lr.dtype, device=lr.device)
    mean = zeros.index_add(0, inv, lr * w) / zeros.index_add(0, inv, w).clamp(min=1)  # [G]
    pred = spec.eps_reg * (lr - mean[inv])  # [B]
    loss = (adv[:, 0] - pred).pow(2).unsqueeze(-1)  # [B, 1]
    none = torch.zeros_like(loss, dtype=torch.bool)
    return loss, importance_ratio(log_ratio), none, none
