"""Loss aggregations: ``(loss, mask, *, num_tokens, num_seqs, seq_lens, max_len) -> scalar``.

Each entry reads the keywords it needs. ``num_tokens`` / ``num_seqs`` are the optimizer step's
global counts, so micro-batch losses sum to the full-batch loss.
"""
from __future__ import annotations

from typing import Callable

import torch

from mmrl.algo.common import Tensor, entry
from mmrl.registry import Registry

AGGREGATIONS: Registry[Callable] = Registry("aggregation")


def _den(given, default: Tensor) -> Tensor:
    """A global normalizer passed in (number / 0-d tensor) or the local one."""
    return default if given is None else torch.as_tensor(given).to(default)


@entry(AGGREGATIONS, "token_mean", per_sequence=False)
def token_mean(loss, mask, *, num_tokens=None, **_):
    """Σ_i,t m ℓ / Σ_i,t m, over the *global* batch when ``num_tokens`` is given (DAPO)."""
    local = mask.sum().to(loss.dtype).clamp(min=1)
    return torch.where(mask, loss, 0.0).sum() / _den(num_tokens, local)


@entry(AGGREGATIONS, "seq_mean_token_mean", per_sequence=False)
def seq_mean_token_mean(loss, mask, *, num_seqs=None, seq_lens=None, **_):
    """mean_i (Σ_t m ℓ / |o_i|) (original GRPO). |o_i| = ``seq_lens`` when the T axis is chunked.

    The mean is over all B rows (``num_seqs`` when global): an empty row contributes 0.
    """
    row_len = torch.as_tensor(mask.sum(-1) if seq_lens is None else seq_lens).to(loss)  # [B]
    per_row = torch.where(mask, loss, 0.0).sum(-1) / row_len.clamp(min=1)  # [B, T] -> [B]
    return per_row.sum() / _den(num_seqs, loss.new_tensor(float(mask.shape[0])).clamp(min=1))


@entry(AGGREGATIONS, "seq_mean_token_sum", per_sequence=False)
def seq_mean_token_sum(loss, mask, *, num_seqs=None, **_):
    """mean_i Σ_t m ℓ."""
    den = _den(num_seqs, loss.new_tensor(float(mask.shape[0])).clamp(min=1))
    return torch.where(mask, loss, 0.0).sum() / den


@entry(AGGREGATIONS, "fixed_norm", per_sequence=False)
def fixed_norm(loss, mask, *, num_seqs=None, max_len=None, **_):
    """Σ_i,t m ℓ / (B · L_max), L_max a constant (Dr.GRPO, arXiv 2503.20783)."""
    if max_len is None:
        raise ValueError("aggregation 'fixed_norm' needs max_len (the max completion length); "
                         "pass max_len=<int> to PolicyLoss / resolve_algo")
    den = _den(num_seqs, loss.new_tensor(float(mask.shape[0])).clamp(min=1)) * max_len
    return torch.where(mask, loss, 0.0).sum() / den


@entry(AGGREGATIONS, "seq_mean", per_sequence=True)
def seq_mean(loss, mask, *, num_seqs=None, **_):
    """mean_i ℓ_i over per-sequence losses ``[B, 1]``; ``mask [B, 1]`` marks non-empty rows."""
    den = _den(num_seqs, loss.new_tensor(float(mask.shape[0])).clamp(min=1))
    return torch.where(mask, loss, 0.0).sum() / den
