"""TW-GRPO token weights (arXiv 2505.24718): tokens where a group's samples disagree weigh more.

Memory: only a chunk of positions (and, with ``vocab_chunk``, of the vocabulary) is alive at a
time, so the peak is O(N·chunk_size·V) floats for the log-probs a chunk brings in plus
O(N·chunk_size·vocab_chunk) for the temporaries, never [N, T, V] for a whole sequence (pass a
callable to avoid materializing it at all).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from mmrl.algo.common import chunk_source

Tensor = torch.Tensor
LogpSource = Union[Tensor, Callable[[int, int], Tensor]]
_D_CLAMP = 11.0  # exp(11) ≈ 6e4: keeps Σ_v exp(d) finite in fp32 for vocabularies up to ~1e33


def _chunk_divergence(lp: Tensor, mask: Tensor, vocab_chunk: Optional[int]) -> Tensor:
    """u_t = mean_i Σ_v (exp(d) − d − 1), d = clamp(M_t − ℓp_i,t, ±11) -> ``[c]``."""
    n, c, v = lp.shape
    lp = lp.float() if lp.dtype in (torch.float16, torch.bfloat16) else lp  # fp32 for exp sums
    # Padded positions read as the uniform distribution, so they neither add nor hide disagreement.
    lp = torch.where(mask.unsqueeze(-1), lp, torch.full_like(lp, -math.log(v)))
    step = v if vocab_chunk is None else vocab_chunk
    k = torch.zeros(n, c, dtype=lp.dtype, device=lp.device)  # [N, c]
    for v0 in range(0, v, step):
        part = lp[..., v0:v0 + step]  # [N, c, v']
        d = (part.mean(0, keepdim=True) - part).clamp(-_D_CLAMP, _D_CLAMP)
        k += (torch.exp(d) - d - 1.0).sum(-1)  # [N, c, v'] -> [N, c]
    return k.mean(0)  # [N, c] -> [c]


def tw_token_weights(full_logp: LogpSource, mask: Tensor, *, alpha: float = 1.7,
                     chunk_size: int = 64, vocab_chunk: Optional[int] = None) -> Tensor:
    """w_t = 1 + (α − 1)·ũ_t, shared by one group's N samples -> ``[N, T]`` (arXiv 2505.24718).

    TW-GRPO's token weights:
    M_t = mean_i ℓp_i,t,· (full-vocabulary log-probs); d = clamp(M_t − ℓp_i,t, ±11);
    u_t = mean_i Σ_v (exp(d) − d − 1); ũ = min-max of u over valid positions (+1e-8).
    α = 1 gives all ones (plain GRPO). The weights carry no gradient.

    Args:
        full_logp: ``[N, T, V]`` float log-probs, or a callable ``(t0, t1) -> [N, t1−t0, V]``
            that computes one chunk of positions on demand.
        mask: ``[N, T]`` bool; a position is valid when any sample has a token there.
        alpha: α ≥ 0 (1.7 in the paper).
        chunk_size: positions per chunk (peak memory O(N·chunk_size·V)).
        vocab_chunk: vocabulary entries per inner step; None = the whole vocabulary.

    Returns:
        ``[N, T]`` float32 (or float64 for float64 input) weights; 1 where ``mask`` is False.

    Raises:
        ValueError: bad shapes, chunk sizes or alpha.
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool [N, T], got {mask.dtype} {tuple(mask.shape)}; "
                         f"pass mask.bool() for one group")
    if chunk_size < 1 or (vocab_chunk is not None and vocab_chunk < 1) or alpha < 0:
        raise ValueError(f"got chunk_size={chunk_size}, vocab_chunk={vocab_chunk}, alpha={alpha};"
                         f" expected chunk_size >= 1, vocab_chunk >= 1 or None, alpha >= 0")
    n, t = mask.shape
    get = chunk_source(full_logp, n, t, "full_logp", "N, T")  # N, T from mask
    parts = []
    with torch.no_grad():
        for t0 in range(0, t, chunk_size):
            t1 = min(t, t0 + chunk_size)
            lp = get(t0, t1)  # [N, t1 - t0, V]
            if lp.shape[:2] != (n, t1 - t0):
                raise ValueError(f"full_logp({t0}, {t1}) returned {tuple(lp.shape)}; expected "
                                 f"[{n}, {t1 - t0}, V]")
            parts.append(_chunk_divergence(lp.detach(), mask[:, t0:t1].to(lp.device), vocab_chunk))
        u = torch.cat(parts) if parts else torch.zeros(0, device=mask.device)  # [T]
        mask = mask.to(u.device)  # the weights live where the log-probs were computed
        valid = mask.any(0)  # [T]
        lo = torch.where(valid, u, torch.inf).amin() if t else u.new_zeros(())
        hi = torch.where(valid, u, -torch.inf).amax() if t else u.new_zeros(())
        u_norm = torch.where(valid, (u - lo) / (hi - lo + 1e-8), torch.zeros_like(u))
        w = 1.0 + (alpha - 1.0) * u_norm  # [T]
        return torch.where(mask, w.unsqueeze(0).expand(n, t), torch.ones_like(w))
