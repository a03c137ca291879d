"""Per-group statistics of one reward column, and the batch whitening some estimators apply.

:class:`Groups` computes every group's count, mean, unbiased variance, max and "constant" flag
with ``index_add_`` / ``scatter_reduce`` (no loop over groups, no ``.item()``);
:func:`token_whiten` (verl ``masked_whiten``: token-weighted) and :func:`batch_whiten` (TRL's
GDPO step: per sequence) normalize over the whole batch. Used by :mod:`mmrl.algo.advantages`.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["Groups", "WHITEN_EPS", "batch_whiten", "safe_sqrt", "token_whiten"]


class Groups:
    """Vectorized per-group statistics of one reward column ``r [B]``."""

    def __init__(self, r: torch.Tensor, inv: torch.Tensor, num_groups: int,
                 lengths: Optional[torch.Tensor] = None, baseline: Optional[torch.Tensor] = None,
                 seq_logp: Optional[torch.Tensor] = None):
        self.r, self.inv, self.G = r, inv, num_groups
        self.lengths, self.baseline = lengths, baseline  # [B] each, or None (not needed)
        self.seq_logp = seq_logp  # [B] token-mean old log-prob per row, or None (not needed)
        self.count = self.sum_by_group(torch.ones_like(r))  # [G]
        self.mean = self.sum_by_group(r) / self.count  # [G]
        centered = r - self.mean[inv]  # [B]
        # Unbiased (Bessel) variance; a singleton's denominator is clamped to 1 (its var is 0).
        self.var = self.sum_by_group(centered * centered) / (self.count - 1).clamp(min=1)
        hi = torch.full((num_groups,), -torch.inf, dtype=r.dtype, device=r.device)
        lo = torch.full((num_groups,), torch.inf, dtype=r.dtype, device=r.device)
        hi = hi.scatter_reduce(0, inv, r.detach(), reduce="amax")  # only compared, never used
        lo = lo.scatter_reduce(0, inv, r.detach(), reduce="amin")  # as a value: no gradient
        # Exact equality test: a mean of equal floats may differ from them in the last bit.
        self.constant, self.max = hi == lo, hi  # [G] bool (singletons included), [G]
        # A constant group's advantage is 0 whatever its std; using 1 there keeps sqrt'(0) = inf
        # out of the backward (0 * inf = NaN) when rewards carry gradients.
        self.std = safe_sqrt(self.var, self.constant)  # [G]

    def sum_by_group(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.G, dtype=x.dtype, device=x.device).index_add_(0, self.inv, x)

    def zero_where_constant(self, adv: torch.Tensor) -> torch.Tensor:
        return torch.where(self.constant[self.inv], torch.zeros_like(adv), adv)


def safe_sqrt(var: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """sqrt(var), with 1 where ``zero`` marks a variance that is exactly 0 (value unused there)."""
    return torch.where(zero, torch.ones_like(var), var).sqrt()


WHITEN_EPS = 1e-8
"""Added to the variance under the square root in token-weighted whitening (verl masked_whiten)."""


def token_whiten(v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(v_i − μ) / sqrt(σ² + 1e-8), μ and unbiased σ² over the batch's valid tokens.

    Row i holds one value ``v_i`` repeated on its ``lengths_i`` tokens, so it counts
    ``lengths_i`` times (verl ``masked_whiten`` of v broadcast over the response mask).
    Rows with no token and every row of a batch whose counted values are all equal (or that
    has at most one token) get exactly 0.
    Differs from verl: verl divides the mean by Σm + 1e-8 (a relative 1e-8/Σm) and raises on
    at most one valid token.
    """
    w = lengths.to(v.dtype)  # [B]
    n = w.sum()
    counted = lengths > 0
    mean = (w * v).sum() / n.clamp(min=1)
    var = (w * (v - mean) ** 2).sum() / (n - 1).clamp(min=1)
    hi = torch.where(counted, v.detach(), -torch.inf).max()  # only compared: no gradient
    lo = torch.where(counted, v.detach(), torch.inf).min()
    adv = (v - mean) / torch.sqrt(var + WHITEN_EPS)
    return torch.where(counted & (hi != lo), adv, torch.zeros_like(adv))


def batch_whiten(v: torch.Tensor, eps: float) -> torch.Tensor:
    """(v_i − mean_B v) / (std_B v + eps), unbiased std over the B sequences (TRL GDPO).

    A batch of one sequence, or whose values are all equal, gets exactly 0.
    """
    mean = v.mean()
    var = ((v - mean) ** 2).sum() / max(v.numel() - 1, 1)
    constant = v.detach().max() == v.detach().min()
    adv = (v - mean) / (safe_sqrt(var, constant) + eps)
    return torch.where(constant, torch.zeros_like(adv), adv)
