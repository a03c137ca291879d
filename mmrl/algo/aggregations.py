"""Loss aggregations: ``(loss, mask, *, num_tokens, num_seqs, seq_lens, max_len, empty_rows)
-> scalar``.

Each entry reads the keywords it needs. ``num_tokens`` / ``num_seqs`` are the optimizer step's
global counts, so micro-batch losses sum to the full-batch loss. Flag ``averages_rows``: the
entry divides by a row count, so ``empty_rows`` decides whether rows without a valid token
count in it (``count``, mmrl's default) or not (``skip``, verl's ``agg_loss``); with global
counts the caller counts the rows the same way (the loop does).
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


def _rows(loss: Tensor, mask: Tensor, num_seqs, seq_lens, empty_rows: str) -> Tensor:
    """The row count to divide by: ``num_seqs`` when given, else the local rows (all of them,
    or under ``empty_rows='skip'`` those with a valid token; ``seq_lens`` gives a row's full
    length when the T axis is chunked); at least 1."""
    if num_seqs is not None:
        return _den(num_seqs, loss.new_ones(()))
    if empty_rows == "skip":
        lens = mask.sum(-1) if seq_lens is None else torch.as_tensor(seq_lens)
        return (lens > 0).sum().to(loss).clamp(min=1)
    if empty_rows != "count":
        raise ValueError(f"empty_rows={empty_rows!r}; expected 'count' or 'skip'")
    return loss.new_tensor(float(mask.shape[0])).clamp(min=1)


@entry(AGGREGATIONS, "token_mean", per_sequence=False, averages_rows=False)
def token_mean(loss, mask, *, num_tokens=None, **_):
    """Σ_i,t m ℓ / Σ_i,t m, over the *global* batch when ``num_tokens`` is given (DAPO)."""
    local = mask.sum().to(loss.dtype).clamp(min=1)
    return torch.where(mask, loss, 0.0).sum() / _den(num_tokens, local)


@entry(AGGREGATIONS, "seq_mean_token_mean", per_sequence=False, averages_rows=True)
def seq_mean_token_mean(loss, mask, *, num_seqs=None, seq_lens=None, empty_rows="count", **_):
    """mean_i (Σ_t m ℓ / |o_i|) (original GRPO). |o_i| = ``seq_lens`` when the T axis is chunked.

    The mean is over all B rows (``num_seqs`` when global), an empty row contributing 0; with
    ``empty_rows='skip'`` over the non-empty rows (verl ``seq-mean-token-mean``).
    """
    row_len = torch.as_tensor(mask.sum(-1) if seq_lens is None else seq_lens).to(loss)  # [B]
    per_row = torch.where(mask, loss, 0.0).sum(-1) / row_len.clamp(min=1)  # [B, T] -> [B]
    return per_row.sum() / _rows(loss, mask, num_seqs, seq_lens, empty_rows)


@entry(AGGREGATIONS, "seq_mean_token_sum", per_sequence=False, averages_rows=True)
def seq_mean_token_sum(loss, mask, *, num_seqs=None, seq_lens=None, empty_rows="count", **_):
    """mean_i Σ_t m ℓ (rows counted as in ``seq_mean_token_mean``)."""
    den = _rows(loss, mask, num_seqs, seq_lens, empty_rows)
    return torch.where(mask, loss, 0.0).sum() / den


@entry(AGGREGATIONS, "fixed_norm", per_sequence=False, averages_rows=True)
def fixed_norm(loss, mask, *, num_seqs=None, max_len=None, seq_lens=None, empty_rows="count",
               **_):
    """Σ_i,t m ℓ / (B · L_max), L_max a constant (Dr.GRPO, arXiv 2503.20783).

    B counts rows as in ``seq_mean_token_mean`` (``skip``: verl ``seq-mean-token-sum-norm``).
    """
    if max_len is None:
        raise ValueError("aggregation 'fixed_norm' needs max_len (the max completion length); "
                         "pass max_len=<int> to PolicyLoss / resolve_algo")
    den = _rows(loss, mask, num_seqs, seq_lens, empty_rows) * max_len
    return torch.where(mask, loss, 0.0).sum() / den


@entry(AGGREGATIONS, "seq_mean", per_sequence=True, averages_rows=True)
def seq_mean(loss, mask, *, num_seqs=None, empty_rows="count", **_):
    """mean_i ℓ_i over per-sequence losses ``[B, 1]``; ``mask [B, 1]`` marks non-empty rows."""
    return torch.where(mask, loss, 0.0).sum() / _rows(loss, mask, num_seqs, None, empty_rows)
