"""Importance-ratio levels: ``(logp, old_logp, mask) -> log_ratio``.

``[B, T]`` for token levels, ``[B, 1]`` for per-sequence levels (attribute ``per_sequence``).
``whole_sequence = True`` marks levels that need all of a row's tokens in one call (the T axis
must not be chunked).
"""
from __future__ import annotations

from typing import Callable

from mmrl.algo.common import Tensor, entry, masked_log_ratio, num_tokens
from mmrl.registry import Registry

RATIO_LEVELS: Registry[Callable] = Registry("ratio level")


@entry(RATIO_LEVELS, "token", per_sequence=False, whole_sequence=False)
def token_log_ratio(logp, old_logp, mask) -> Tensor:
    """x_i,t = logp − old_logp -> ``[B, T]`` (PPO / GRPO token ratio)."""
    return masked_log_ratio(logp, old_logp, mask)


@entry(RATIO_LEVELS, "sequence", per_sequence=True, whole_sequence=True)
def sequence_log_ratio(logp, old_logp, mask) -> Tensor:
    """log s_i = Σ_t m x / |o_i| -> ``[B, 1]`` (GSPO, arXiv 2507.18071 eq. 7)."""
    x = masked_log_ratio(logp, old_logp, mask)
    return x.sum(-1, keepdim=True) / num_tokens(mask).to(x.dtype)  # [B, T] -> [B, 1]


@entry(RATIO_LEVELS, "sequence_token", per_sequence=False, whole_sequence=True)
def sequence_token_log_ratio(logp, old_logp, mask) -> Tensor:
    """log s_i,t = logp − sg(logp) + sg(log s_i) -> ``[B, T]`` (GSPO-token, 2507.18071 eq. 13).

    Same value as ``sequence`` on every token; the gradient flows per token.
    """
    seq = sequence_log_ratio(logp, old_logp, mask).detach()  # [B, 1]
    return masked_log_ratio(logp, logp.detach(), mask) + seq  # [B, T]


@entry(RATIO_LEVELS, "sequence_sum", per_sequence=True, whole_sequence=True)
def sequence_sum_log_ratio(logp, old_logp, mask) -> Tensor:
    """ℓr_i = Σ_t m x -> ``[B, 1]`` (Reg-GRPO's sequence log-ratio, arXiv 2506.07464)."""
    return masked_log_ratio(logp, old_logp, mask).sum(-1, keepdim=True)
