"""What every loss axis shares: the ±20 log-ratio clamp, masked log-ratios, the registration
helper that attaches the flags :mod:`mmrl.algo.presets` validates against.

Log-ratios are clamped to ±20 before every ``exp``: exp(20) ≈ 4.9e8 keeps products finite in
fp32, and a ratio that far from 1 is either in a clipped/saturated region (zero gradient anyway)
or would give a ~1e8·|A| gradient no optimizer step should take; the clamp removes inf/NaN.
"""
from __future__ import annotations

import torch

from mmrl.registry import Registry

LOG_RATIO_CLAMP = 20.0
Tensor = torch.Tensor


def entry(registry: Registry, name: str, **attrs):
    """Register under ``name`` and attach metadata the presets validate against."""
    def wrap(fn):
        for key, value in attrs.items():
            setattr(fn, key, value)
        return registry.register(name, fn)
    return wrap


def masked_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """``logp − old_logp`` where ``mask``, else 0 ``[B, T]``."""
    # where, not multiply: padding may hold -inf log-probs and 0 * inf would be NaN.
    return torch.where(mask, logp - old_logp, torch.zeros_like(logp))


def num_tokens(mask: Tensor) -> Tensor:
    """``[B, 1]`` float token count per row; an empty row counts 1 (a safe divisor)."""
    return mask.sum(-1, keepdim=True).to(torch.float32).clamp(min=1)  # [B, 1]


def ratio(log_ratio: Tensor) -> Tensor:
    """exp(clamp(x, ±20)): the importance ratio, finite in fp32."""
    return torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``x`` (broadcast to ``valid``) over the True entries of ``valid``; 0 if none."""
    x = x.expand(valid.shape)
    return torch.where(valid, x, 0.0).sum() / valid.sum().clamp(min=1)


def chunk_source(source, rows: int, cols: int, name: str, dims: str):
    """``(t0, t1) -> [rows, t1 − t0, V]``: a ``[rows, cols, V]`` tensor sliced along dim 1, or the
    callable ``source`` itself (which computes each chunk on demand).

    Raises:
        ValueError: a tensor ``source`` whose shape is not ``[rows, cols, V]``.
    """
    if isinstance(source, torch.Tensor):
        if source.dim() != 3 or tuple(source.shape[:2]) != (rows, cols):
            raise ValueError(f"{name} has shape {tuple(source.shape)}; expected [{dims}, V] "
                             f"with {dims} = {rows, cols}")
        return lambda t0, t1: source[:, t0:t1]
    return source

