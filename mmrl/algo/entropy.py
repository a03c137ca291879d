"""Per-token entropy of the policy and the top-entropy token mask.

H_t = logsumexp(z) − Σ_v softmax(z)_v·z_v = −Σ_v p_v·log p_v, on the logits ``z`` the loss's
log-probs come from (temperature-scaled, restricted where the sampler restricts them). Entries
at −inf (banned tokens) have p = 0 and add 0.

Memory: :func:`logp_and_entropy` runs ``chunk_size`` positions at a time and, with a callable
source under gradient, recomputes each chunk's ``[B, c, V]`` in the backward pass (activation
checkpointing), so neither the forward nor the saved tensors hold ``[B, T, V]`` for whole rows.

The mask (:func:`top_entropy_mask`) keeps the tokens with H ≥ τ, τ = the (1 − q)-quantile of
the valid tokens' entropies (TRL ``top_entropy_quantile``, arXiv 2506.01939).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
from torch.utils.checkpoint import checkpoint

from mmrl.algo.common import chunk_source

Tensor = torch.Tensor
LogitSource = Union[Tensor, Callable[[int, int], Tensor]]


def token_entropy(logits: Tensor) -> Tensor:
    """H = −Σ_v p_v log p_v over the last axis ``[..., V] -> [...]``, in fp32 (or fp64).

    Args:
        logits: ``[..., V]`` float; −inf entries are tokens that cannot occur.

    Returns:
        ``[...]`` entropy in nats, with gradient; NaN-free for −inf entries (0·(−inf) never
        formed, forward or backward).
    """
    lp = torch.log_softmax(_upcast(logits), -1)
    # where() before the product: exp(−inf)·(−inf) is NaN, and so is its gradient.
    finite = torch.where(torch.isfinite(lp), lp, torch.zeros_like(lp))
    return -(lp.exp() * finite).sum(-1)


def _upcast(x: Tensor) -> Tensor:
    # fp32 at least: a bf16 softmax·logit sum over ~1e5 entries loses the entropy's digits
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _chunk(logits: Tensor, tokens: Tensor) -> Tuple[Tensor, Tensor]:
    """``(logp [b, c], entropy [b, c])`` of ``tokens [b, c]`` under ``logits [b, c, V]``."""
    lp = torch.log_softmax(_upcast(logits), -1)
    finite = torch.where(torch.isfinite(lp), lp, torch.zeros_like(lp))
    return lp.gather(-1, tokens[..., None])[..., 0], -(lp.exp() * finite).sum(-1)


def logp_and_entropy(logits: LogitSource, tokens: Tensor, *, chunk_size: int = 64,
                     recompute: bool = True) -> Tuple[Tensor, Tensor]:
    """``(log p(tokens) [B, T], H [B, T])`` from one pass over the logits, ``chunk_size``
    positions at a time.

    Args:
        logits: ``[B, T, V]`` float, or a callable ``(t0, t1) -> [B, t1 − t0, V]`` that computes
            one chunk on demand (e.g. the lm head on a slice of hidden states).
        tokens: ``[B, T]`` long, the sampled tokens.
        chunk_size: positions per chunk (peak O(B·chunk_size·V)).
        recompute: with a callable under gradient, checkpoint each chunk (its ``[B, c, V]`` is
            recomputed in the backward pass instead of saved).

    Returns:
        both ``[B, T]`` float32 (float64 for float64 logits), with gradient.

    Raises:
        ValueError: bad shapes or ``chunk_size`` < 1.
    """
    if tokens.dim() != 2 or chunk_size < 1:
        raise ValueError(f"tokens {tuple(tokens.shape)}, chunk_size={chunk_size}; expected "
                         f"tokens [B, T] and chunk_size >= 1")
    B, T = tokens.shape
    get = chunk_source(logits, B, T, "logits", "B, T")  # B, T from tokens
    save_less = recompute and callable(logits) and torch.is_grad_enabled()
    lps, ents = [], []
    for t0 in range(0, T, chunk_size):
        t1 = min(T, t0 + chunk_size)
        tok = tokens[:, t0:t1]

        def run(t0=t0, t1=t1, tok=tok):
            z = get(t0, t1)  # [B, c, V]
            if z.shape[:2] != (B, t1 - t0):
                raise ValueError(f"logits({t0}, {t1}) returned {tuple(z.shape)}; expected "
                                 f"[{B}, {t1 - t0}, V]")
            return _chunk(z, tok.to(z.device))

        lp, h = checkpoint(run, use_reentrant=False) if save_less else run()
        lps.append(lp)
        ents.append(h)
    if not lps:
        empty = tokens.new_zeros((B, 0), dtype=torch.float32)
        return empty, empty.clone()
    return torch.cat(lps, 1), torch.cat(ents, 1)


def entropy_threshold(values: Tensor, quantile: float) -> Tensor:
    """τ = the (1 − q)-quantile of ``values`` (linear interpolation), 0-d; +inf when empty.

    ``values`` are the valid tokens' entropies (all ranks' for a global threshold). q = 1 gives
    the minimum (every token kept), q = 0 the maximum. Differs from TRL: no gather here; the
    caller passes the entropies of the whole optimizer mini-batch (see the loop).

    Raises:
        ValueError: ``quantile`` outside [0, 1].
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile={quantile!r}; expected a number in [0, 1] "
                         f"(0.2 in arXiv 2506.01939; 1 keeps every token)")
    values = values.detach().flatten()
    if values.numel() == 0:
        return values.new_tensor(float("inf"))
    # sort + lerp (= torch.quantile's 'linear'), which refuses inputs over 2^24 elements
    v = values.sort().values
    pos = (v.numel() - 1) * (1.0 - quantile)
    lo = int(pos)
    hi = min(lo + 1, v.numel() - 1)
    return torch.lerp(v[lo], v[hi], v.new_tensor(pos - lo))


def top_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float,
                     threshold: Optional[Tensor] = None) -> Tensor:
    """M_e = [H ≥ τ] ∧ m ``[B, T]`` bool: the valid tokens in the top ``quantile`` of entropy.

    TRL ``get_high_entropy_mask`` (arXiv 2506.01939): ties at τ are kept; no valid token gives
    an all-false mask.

    Args:
        entropy: ``[B, T]`` float per-token entropy (read without gradient).
        mask: ``[B, T]`` bool, True = valid token.
        quantile: q in [0, 1], the share of tokens to keep.
        threshold: τ computed elsewhere (e.g. over all ranks' tokens); default: from the valid
            entries of ``entropy``.

    Raises:
        ValueError: shape mismatch or ``quantile`` outside [0, 1].
    """
    if entropy.shape != mask.shape or mask.dtype != torch.bool:
        raise ValueError(f"entropy {tuple(entropy.shape)} and mask {mask.dtype} "
                         f"{tuple(mask.shape)}; expected the same [B, T], mask bool")
    if threshold is None:
        threshold = entropy_threshold(entropy.detach()[mask], quantile)
    return (entropy.detach() >= threshold.to(entropy.device, entropy.dtype)) & mask
