"""Per-token objectives: ``(log_ratio, adv, *, spec, valid, group_ids, logp, mask, generator)
-> (loss, ratio, low, high)``: the per-entry loss to minimize and the masks of the clipped,
zero-gradient region.

``log_ratio`` is the ratio level's output (``[B, T]`` or ``[B, 1]``); ``adv`` is ``[B, 1]`` or
``[B, T]``; ``logp`` ``[B, T]`` the current log-probs (with gradient) and ``mask`` ``[B, T]`` for
objectives that read them; ``generator`` a ``torch.Generator`` (or None) for objectives that
draw at random. Flags: ``needs_groups`` (reads ``group_ids``), ``needs_per_sequence`` (needs a
per-sequence ratio level), ``needs_token_ratio`` (the loss is per token ``[B, T]``, built from
``logp``: a per-sequence ratio level does not fit; ``sequence_token`` does), ``whole_sequence``
(needs all of a row's tokens in one call: the T axis must not be chunked), ``binary_rewards``
(``adv`` is each row's reward r ∈ {0, 1}, one per row ``[B]``, not an advantage: the objective
is no policy-gradient surrogate of A, and a dense reward is a misuse the job configs refuse).

The ``low`` / ``high`` masks mark the zero-gradient (clipped) region, except for CISPO, whose
masks mark the truncated importance weights (the gradient there is the truncated weight times
REINFORCE's, as verl's ``pg_clipfrac``); ``clip_cov`` adds its randomly detached tokens to
``high``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from mmrl.algo.common import LOG_RATIO_CLAMP, entry, ratio as importance_ratio
from mmrl.algo.drpo import drpo_objective
from mmrl.registry import Registry

OBJECTIVES: Registry[Callable] = Registry("objective")


@entry(OBJECTIVES, "clip", needs_groups=False, needs_per_sequence=False, needs_token_ratio=False,
       whole_sequence=False, binary_rewards=False)
def clip_objective(log_ratio, adv, *, spec, valid=None, group_ids=None, **_):
    """ℓ = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)·A); dual clip: ℓ = min(ℓ, −c·A) for A < 0;
    TRL's two-sided δ: ℓ = −min(min(ρ, δ)·A, clip(ρ, 1−ε_low, 1+ε_high)·A).

    PPO (arXiv 1707.06347) with asymmetric ε (DAPO clip-higher, arXiv 2503.14476); dual clip
    per Ye et al. (arXiv 1912.09729) and verl ``clip_ratio_c``; δ per INTELLECT-2 (arXiv
    2505.07291 §4.1) and TRL ``GRPOConfig.delta``. δ = c ≥ 1+ε_high gives the dual clip's value;
    δ < 1+ε_high also caps ρ at δ for A > 0 (zero gradient once ρ > δ).
    Differs from ALGORITHMS.md: it writes the dual clip as max(ℓ_clip, −c·A); on a loss that
    would raise every A < 0 loss to at least c·|A| instead of bounding it, so mmrl takes the
    paper's (and verl's) cap: ℓ = min(ℓ_clip, −c·A) for A < 0.
    Differs from TRL: ρ = exp(clamp(x, ±20)) (TRL's δ branch uses the unclamped ratio).
    """
    ratio = importance_ratio(log_ratio)
    clipped = ratio.clamp(1.0 - spec.eps_low, 1.0 + spec.eps_high)
    capped = ratio if spec.delta is None else ratio.clamp(max=spec.delta)
    loss = torch.maximum(-adv * capped, -adv * clipped)
    top = 1.0 + spec.eps_high if spec.delta is None else min(spec.delta, 1.0 + spec.eps_high)
    high = (adv > 0) & (ratio > top)
    low = (adv < 0) & (ratio < 1.0 - spec.eps_low)
    if spec.delta is not None:  # A < 0: both terms constant once ρ > max(δ, 1+ε_high)
        high = high | ((adv < 0) & (ratio > max(spec.delta, 1.0 + spec.eps_high)))
    if spec.dual_clip_c is not None:
        cap = -spec.dual_clip_c * adv  # constant in θ: zero gradient in the dual-clipped region
        dual = (adv < 0) & (loss > cap)
        loss = torch.where(dual, cap.expand_as(loss), loss)
        high = high | dual
    return loss, ratio, low, high


@entry(OBJECTIVES, "sapo", needs_groups=False, needs_per_sequence=False, needs_token_ratio=False,
       whole_sequence=False, binary_rewards=False)
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


@entry(OBJECTIVES, "reg", needs_groups=True, needs_per_sequence=True, needs_token_ratio=False,
       whole_sequence=False, binary_rewards=False)
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


# ---------------------------------------------------------------- REINFORCE-form objectives
# ℓ = −sg(w)·A·logp: the gradient is −w·A·∇logp with a constant weight w; the loss *value* is
# −w·A·logp (not 0 at ρ = 1), as TRL and verl compute it: compare it to the ratio objectives
# through gradients only.
def _valid_logp(logp, valid):
    """``logp`` where ``valid``, else 0: padding may hold ±inf log-probs (0·inf would be NaN)."""
    if logp is None:
        raise ValueError("this objective reads the current log-probs: pass logp=[B, T] (with "
                         "gradient); PolicyLoss passes it for you")
    return logp if valid is None else torch.where(valid, logp, torch.zeros_like(logp))


def _token_flags(**extra):
    return dict(needs_groups=False, needs_per_sequence=False, needs_token_ratio=True,
                binary_rewards=False, **extra)


@entry(OBJECTIVES, "cispo", **_token_flags(whole_sequence=False))
def cispo_objective(log_ratio, adv, *, spec, valid=None, logp=None, **_):
    """ℓ = −sg(clip(ρ, 1−ε_low, 1+ε_high))·A·logp (CISPO, MiniMax-M1, arXiv 2506.13585).

    verl's convention (``loss_mode="cispo"``): a two-sided clip of the stop-gradient weight,
    ρ = exp(clamp(x, ±20)); every token keeps a gradient −w·A·∇logp. At ρ = 1 it is REINFORCE.
    ``low`` / ``high`` mark truncated weights (ρ below / above the range; verl's pg_clipfrac),
    where the gradient is *not* zero.
    Differs from paper: the paper leaves the lower bound effectively off (large ε^IS_low) and
    tunes ε^IS_high; set ``eps_low`` close to 1 for that. For TRL's absolute cap use
    ``cispo_cap``.
    """
    ratio = importance_ratio(log_ratio)
    weight = ratio.clamp(1.0 - spec.eps_low, 1.0 + spec.eps_high).detach()
    loss = -weight * adv * _valid_logp(logp, valid)
    return loss, ratio, ratio < 1.0 - spec.eps_low, ratio > 1.0 + spec.eps_high


@entry(OBJECTIVES, "cispo_cap", **_token_flags(whole_sequence=False))
def cispo_cap_objective(log_ratio, adv, *, spec, valid=None, logp=None, **_):
    """ℓ = −sg(min(ρ, cap))·A·logp, cap = ``cispo_cap`` (CISPO as TRL computes it).

    TRL ``loss_type="cispo"`` (arXiv 2506.13585; cap 5.0 per ScaleRL, arXiv 2510.13786): an
    absolute cap on the weight, no lower bound. ``high`` marks capped weights (ρ > cap), where
    the gradient is −cap·A·∇logp, not zero; ``low`` is empty.
    Differs from TRL: TRL reads the cap from ``epsilon_high`` and silently falls back to
    ``epsilon`` = 0.2 (an absolute cap of 0.2 on ρ) when it is unset; mmrl's field is its own,
    default 5.0. TRL uses the unclamped ρ; mmrl clamps x to ±20 first (same below e^20).
    """
    ratio = importance_ratio(log_ratio)
    loss = -ratio.clamp(max=spec.cispo_cap).detach() * adv * _valid_logp(logp, valid)
    return loss, ratio, torch.zeros_like(ratio, dtype=torch.bool), ratio > spec.cispo_cap


@entry(OBJECTIVES, "gpg", **_token_flags(whole_sequence=False))
def gpg_objective(log_ratio, adv, *, spec, valid=None, logp=None, **_):
    """ℓ = −A·logp: plain REINFORCE, no ratio, no clip (GPG, arXiv 2504.02546; verl ``gpg``).

    ``ratio`` is returned for the statistics only. Pair it with the ``gpg`` advantage.
    """
    ratio = importance_ratio(log_ratio)
    none = torch.zeros_like(ratio, dtype=torch.bool)
    return -adv * _valid_logp(logp, valid), ratio, none, none


@entry(OBJECTIVES, "vespo", **_token_flags(whole_sequence=True))
def vespo_objective(log_ratio, adv, *, spec, valid=None, logp=None, **_):
    """ℓ_i,t = −sg(φ_i)·A·logp, φ(W) = W^k·exp(λ(1 − W)), log W_i = Σ_t m·x (VESPO, arXiv
    2602.10693; TRL ``loss_type="vespo"``).

    log W_i = clamp(Σ_t m·clamp(x, ±20), log 1e-8, 20) (a sum, not a mean); (k, λ) =
    (vespo_k_pos, vespo_lambda_pos) where A ≥ 0, else the ``_neg`` pair; φ is computed in log
    space, λ + k·log W − λ·W, and non-finite values become 0. φ(1) = 1: at ρ = 1 it is
    REINFORCE. Needs whole rows (the sum runs over the row). No zero-gradient region. With
    ratio level ``sequence_token`` every token holds log s_i = Σ_t x / |o_i|: the same sum.
    Differs from TRL: λ ≤ 0 is refused (TRL floors λ at 1e-4); TRL's vLLM importance weights
    enter log W there (mmrl's rollout correction is a separate axis); TRL holds k and λ in
    float32 (``torch.where`` of Python floats), so a λ such as 0.7 differs from mmrl's float64
    by ~1e-8 relative.
    """
    x = log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    x = x if valid is None else torch.where(valid, x, torch.zeros_like(x))
    log_w = x.sum(-1, keepdim=True).clamp(math.log(1e-8), LOG_RATIO_CLAMP)  # [B, T] -> [B, 1]
    pos = adv >= 0
    k = torch.where(pos, adv.new_tensor(spec.vespo_k_pos), adv.new_tensor(spec.vespo_k_neg))
    lam = torch.where(pos, adv.new_tensor(spec.vespo_lambda_pos),
                      adv.new_tensor(spec.vespo_lambda_neg))
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(0.0, 0.0, 0.0)
    loss = -phi * adv * _valid_logp(logp, valid)
    none = torch.zeros_like(loss, dtype=torch.bool)
    return loss, importance_ratio(log_ratio), none, none


# ---------------------------------------------------------------- covariance-selected tokens
# Clip-Cov / KL-Cov (arXiv 2505.22617): tokens whose (A, logp) covariance is large drive the
# entropy collapse; a few of them are detached (clip_cov) or KL-penalized (kl_cov). The
# covariance is over the valid tokens of the *call* (one micro-batch on one rank), as verl
# computes it. Differs from an unsplit batch: a different micro-batch size selects different
# tokens. Both entries need whole rows (no T chunking), so a call sees whole sequences as
# verl's micro-batches do. Selection reads values only (no gradient, no host sync).
def _token_cov(adv, logp, valid):
    """Cov_t = (A_t − mean A)·(logp_t − mean logp), means over ``valid`` tokens; detached."""
    with torch.no_grad():
        a, lp = adv.expand(valid.shape), torch.where(valid, logp, torch.zeros_like(logp))
        n = valid.sum().clamp(min=1)
        a_mean = torch.where(valid, a, 0.0).sum() / n
        return (a - a_mean) * (lp - lp.sum() / n)  # [B, T]


def _pick_count(valid, fraction: float):
    """max(⌊fraction·N⌋, 1) with N the valid tokens, as a 0-d tensor (no host sync)."""
    return torch.floor(valid.sum().to(torch.float64) * fraction).clamp(min=1)


def _rank(keys):
    """0-based position of every entry of ``keys`` in ascending order (stable), same shape."""
    order = torch.sort(keys.flatten(), stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(),
                                                                    device=order.device))
    return rank.view(keys.shape)


def _random_pick(candidates, n, generator):
    """A uniformly random subset of min(n, #candidates) of the True entries of ``candidates``:
    each gets a U(0, 1) key (one ``torch.rand`` of the full shape, float64, from
    ``generator``); the n smallest keys among the candidates are picked."""
    device = candidates.device if generator is None else generator.device
    keys = torch.rand(candidates.shape, generator=generator, dtype=torch.float64, device=device)
    keys = torch.where(candidates, keys.to(candidates.device), torch.inf)
    return candidates & (_rank(keys) < n)


@entry(OBJECTIVES, "clip_cov", **_token_flags(whole_sequence=True))
def clip_cov_objective(log_ratio, adv, *, spec, valid=None, logp=None, generator=None, **_):
    """ℓ = c_t·max(−ρA, −clip(ρ, 1−ε_low, 1+ε_high)·A), c_t = 0 on a random pick of
    covariance-selected tokens, else 1 (Clip-Cov, arXiv 2505.22617; verl ``clip_cov``).

    Candidates: valid tokens not already clipped by PPO (−clip(ρ)A > −ρA) with
    ``clip_cov_lb`` < Cov_t < ``clip_cov_ub``; max(⌊cov_ratio·N⌋, 1) of them (or all, if fewer)
    are picked uniformly at random with ``generator`` and contribute no loss and no gradient,
    while keeping their place in the normalizer. ``high`` also marks the picked tokens.
    Differs from verl: ρ = exp(clamp(x, ±20)); the pick draws one U(0, 1) key per token from
    ``generator`` (verl: ``torch.randperm`` of the candidates from the global generator).
    """
    valid = torch.ones_like(log_ratio, dtype=torch.bool) if valid is None else valid
    ratio = importance_ratio(log_ratio)
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1.0 - spec.eps_low, 1.0 + spec.eps_high)
    cov = _token_cov(adv, _valid_logp(logp, valid), valid)
    candidates = valid & ~(l2 > l1) & (cov > spec.clip_cov_lb) & (cov < spec.clip_cov_ub)
    picked = _random_pick(candidates, _pick_count(valid, spec.cov_ratio), generator)
    loss = torch.where(picked, torch.zeros_like(l1), torch.maximum(l1, l2))
    high = ((adv > 0) & (ratio > 1.0 + spec.eps_high)) | picked
    return loss, ratio, (adv < 0) & (ratio < 1.0 - spec.eps_low), high


@entry(OBJECTIVES, "kl_cov", **_token_flags(whole_sequence=True))
def kl_cov_objective(log_ratio, adv, *, spec, valid=None, logp=None, **_):
    """ℓ = −ρA + β·|x|·[t in top-k Cov] (KL-Cov, arXiv 2505.22617; verl ``kl_cov``).

    No PPO clip. The k = max(⌊cov_ratio·N⌋, 1) valid tokens with the largest covariance get
    the penalty β·|x| (β = ``kl_cov_coef``, x = logp − old_logp; gradient β·sign(x)·∇logp);
    ties go to the earlier token (row-major). No token is selected when none is valid. No
    zero-gradient region: both masks are empty.
    Differs from verl: ρ = exp(clamp(x, ±20)); verl's tie order is ``torch.topk``'s.
    """
    valid = torch.ones_like(log_ratio, dtype=torch.bool) if valid is None else valid
    ratio = importance_ratio(log_ratio)
    cov = _token_cov(adv, _valid_logp(logp, valid), valid)
    top = valid & (_rank(torch.where(valid, -cov, torch.inf)) < _pick_count(valid, spec.cov_ratio))
    penalty = torch.where(top, spec.kl_cov_coef * log_ratio.abs(), torch.zeros_like(ratio))
    none = torch.zeros_like(ratio, dtype=torch.bool)
    return -adv * ratio + penalty, ratio, none, none


entry(OBJECTIVES, "drpo", needs_groups=True, needs_per_sequence=False, needs_token_ratio=True,
      whole_sequence=True, binary_rewards=True)(drpo_objective)  # DRPO, arXiv 2510.04474 (mmrl.algo.drpo)
