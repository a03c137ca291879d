"""Importance-ratio levels: ``(logp, old_logp, mask) -> log_ratio``.

``[B, T]`` for token levels, ``[B, 1]`` for per-sequence levels (attribute ``per_sequence``).
``whole_sequence = True`` marks levels that need all of a row's tokens in one call (the T axis
must not be chunked). ``needs_step_terms = True`` marks levels that read the per-step terms of a
Gaussian transition (``step_std``, ``mean_shift``, keyword arguments ``[B, T]``; a flow policy
gives them, :class:`mmrl.train.policy.Capabilities` ``step_terms``); every level takes them as
keywords and the others ignore them.
"""
from __future__ import annotations

from typing import Callable

import torch

from mmrl.algo.common import Tensor, entry, masked_log_ratio, num_tokens
from mmrl.registry import Registry

RATIO_LEVELS: Registry[Callable] = Registry("ratio level")


@entry(RATIO_LEVELS, "token", per_sequence=False, whole_sequence=False,
       needs_step_terms=False)
def token_log_ratio(logp, old_logp, mask, **_) -> Tensor:
    """x_i,t = logp − old_logp -> ``[B, T]`` (PPO / GRPO token ratio)."""
    return masked_log_ratio(logp, old_logp, mask)


@entry(RATIO_LEVELS, "sequence", per_sequence=True, whole_sequence=True, needs_step_terms=False)
def sequence_log_ratio(logp, old_logp, mask, **_) -> Tensor:
    """log s_i = Σ_t m x / |o_i| -> ``[B, 1]`` (GSPO, arXiv 2507.18071 eq. 7)."""
    x = masked_log_ratio(logp, old_logp, mask)
    return x.sum(-1, keepdim=True) / num_tokens(mask).to(x.dtype)  # [B, T] -> [B, 1]


@entry(RATIO_LEVELS, "sequence_token", per_sequence=False, whole_sequence=True,
       needs_step_terms=False)
def sequence_token_log_ratio(logp, old_logp, mask, **_) -> Tensor:
    """log s_i,t = logp − sg(logp) + sg(log s_i) -> ``[B, T]`` (GSPO-token, 2507.18071 eq. 13).

    Same value as ``sequence`` on every token; the gradient flows per token.
    """
    seq = sequence_log_ratio(logp, old_logp, mask).detach()  # [B, 1]
    return masked_log_ratio(logp, logp.detach(), mask) + seq  # [B, T]


@entry(RATIO_LEVELS, "sequence_sum", per_sequence=True, whole_sequence=True,
       needs_step_terms=False)
def sequence_sum_log_ratio(logp, old_logp, mask, **_) -> Tensor:
    """ℓr_i = Σ_t m x -> ``[B, 1]`` (Reg-GRPO's sequence log-ratio, arXiv 2506.07464)."""
    return masked_log_ratio(logp, old_logp, mask).sum(-1, keepdim=True)


@entry(RATIO_LEVELS, "ratio_norm", per_sequence=False, whole_sequence=False, needs_step_terms=True)
def ratio_norm_log_ratio(logp, old_logp, mask, *, step_std=None, mean_shift=None, **_) -> Tensor:
    """log ρ̃ = s·(logp − old_logp) + mean_shift/(2s) -> ``[B, T]`` (GRPO-Guard's RatioNorm,
    arXiv 2510.22319).

    For a Gaussian step x′ ~ N(μ, s²) with per-dim-averaged log-densities this equals
    mean_d[ξ·(μ_θ − μ_old)], ξ = (x′ − μ_old)/s the rollout noise: log ρ̃ = 0 at θ = old and
    E_ξ[log ρ̃] = 0, where the plain log-ratio has mean −mean_shift/(2s²) < 0 (the left shift
    GRPO-Guard removes). Written as flow_grpo's scripts/train_sd3_GRPO_Guard.py computes it.
    Entries where ``mask`` is False or s = 0 (a deterministic step) are 0.

    Args:
        logp, old_logp, mask: ``[B, T]`` as every level.
        step_std: ``[B, T]`` the step's transition std s_j = σ̄_j·sqrt(−dt_j) (detached).
        mean_shift: ``[B, T]`` mean_d (μ_θ − μ_old)², with the gradient of μ_θ.

    Raises:
        ValueError: ``step_std`` or ``mean_shift`` missing or not ``[B, T]``.
    """
    for name, t in (("step_std", step_std), ("mean_shift", mean_shift)):
        if not isinstance(t, Tensor) or t.shape != logp.shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"ratio level 'ratio_norm' needs {name} [B, T]={tuple(logp.shape)}, "
                             f"got {got}; pass the policy's step terms (a flow policy with "
                             f"Capabilities(step_terms=True)) or use ratio_level 'token'")
    s = step_std.detach().to(logp.dtype)
    live = mask & (s > 0)
    safe = torch.where(live, s, torch.ones_like(s))
    x = safe * (logp - old_logp) + mean_shift.to(logp.dtype) / (2 * safe)
    return torch.where(live, x, torch.zeros_like(x))
