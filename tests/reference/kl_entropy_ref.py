"""Slow, obvious oracles for the KL options, the entropy bonus, the top-entropy mask and
``empty_rows``: Python loops over scalar torch tensors (autograd gives reference gradients).

Nothing here imports mmrl's implementations; each function restates
/work/shared/ALGORITHMS-peers.md ("KL to the reference", "Entropy bonus and high-entropy token
selection", verl ``agg_loss``) literally. The objectives and ratio levels come from the core
oracle (tests/reference/core_math.py).
"""
from __future__ import annotations

import math

import torch

from tests.reference import core_math as core


# ---------------------------------------------------------------- entropy
def entropy(logits):
    """H = log Σ_v e^{z_v} − Σ_v softmax(z)_v·z_v for one position (a 1-d tensor), −inf
    entries skipped (they have probability 0)."""
    zs = [logits[v] for v in range(logits.shape[0]) if math.isfinite(float(logits[v].detach()))]
    top = max(float(z.detach()) for z in zs)  # shift for a stable log-sum-exp
    total = sum(torch.exp(z - top) for z in zs)
    lse = top + torch.log(total)
    return lse - sum(torch.exp(z - lse) * z for z in zs)


def entropies(logits):
    """``[B, T, V]`` -> B lists of T entropies."""
    B, T, _ = logits.shape
    return [[entropy(logits[i, t]) for t in range(T)] for i in range(B)]


def quantile(values, q):
    """The q-quantile of a list of floats, linear interpolation between order statistics."""
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def top_entropy_mask(H, mask, q):
    """B lists of T bools: valid and H ≥ the (1 − q)-quantile of the valid H (ties kept)."""
    B, T = len(mask), len(mask[0])
    vals = [float(H[i][t].detach()) for i in range(B) for t in range(T) if mask[i][t]]
    if not vals:
        return [[False] * T for _ in range(B)]
    tau = quantile(vals, 1 - q)
    return [[bool(mask[i][t]) and float(H[i][t].detach()) >= tau for t in range(T)]
            for i in range(B)]


# ---------------------------------------------------------------- KL term
def kl_term(spec, logp, ref, log_ratio):
    """One token's KL term: the estimator on x = logp − ref, capped to ±kl_cap, times ρ (not
    detached) under kl_bias_correction (ρ = exp of the ratio level's log-ratio)."""
    kl = core.KL[spec.kl](logp - ref)
    if spec.kl_cap is not None:
        kl = torch.clamp(kl, -spec.kl_cap, spec.kl_cap)
    if spec.kl_bias_correction:
        kl = torch.exp(core._clamp(log_ratio)) * kl
    return kl


# ---------------------------------------------------------------- aggregation with empty rows
def rows_counted(mask, empty_rows):
    """The number of rows a sequence mean divides by: all, or (skip) the non-empty ones."""
    if empty_rows == "count":
        return len(mask)
    return max(sum(1 for row in mask if any(row)), 1)


def aggregate(spec, loss, valid, num_tokens=None, num_seqs=None):
    """core.AGGREGATIONS with verl's row count under ``empty_rows='skip'``."""
    if num_seqs is None and spec.aggregation != "token_mean":
        num_seqs = rows_counted(valid, spec.empty_rows)
    return core.AGGREGATIONS[spec.aggregation](loss, valid, num_tokens=num_tokens,
                                               num_seqs=num_seqs, max_len=spec.max_len)


# ---------------------------------------------------------------- the whole loss
def policy_loss(spec, logp, old_logp, advantages, mask, ref_logp=None, entropy=None,
                entropy_mask=None):
    """ℓ = agg(M_e·ℓ_obj + β·KL) − c·agg(M_e·H), written out token by token.

    ``advantages`` [B]; ``entropy`` B lists of T scalars (with autograd); ``entropy_mask`` B
    lists of T bools (default: all valid tokens, or the top-entropy mask of ``entropy`` when
    ``top_entropy_quantile < 1``).
    """
    B, T = logp.shape
    old_logp = old_logp.detach()
    lr = core.RATIO_LEVELS[spec.ratio_level](logp, old_logp, mask)
    per_seq = spec.ratio_level in core.PER_SEQUENCE_LEVELS
    m = [[bool(mask[i, t]) for t in range(T)] for i in range(B)]
    if entropy_mask is None:
        entropy_mask = (top_entropy_mask(entropy, m, spec.top_entropy_quantile)
                        if spec.top_entropy_quantile < 1 else m)
    fn = core.OBJECTIVES[spec.objective]
    lr_at = (lambda i, t: lr[i][0]) if per_seq else (lambda i, t: lr[i][t])  # noqa: E731
    loss, bonus = [], []
    for i in range(B):
        n = sum(m[i])
        kls = [kl_term(spec, logp[i, t], ref_logp[i, t], lr_at(i, t))
               for t in range(T) if m[i][t]] if spec.beta > 0 else []
        if per_seq:
            row = fn(lr[i][0], advantages[i], spec)
            row = row + spec.beta * (sum(kls) / n if n else 0.0) if kls else row
            loss.append([row])
            h = [entropy[i][t] for t in range(T) if m[i][t]] if entropy else []
            bonus.append([sum(h) / n if n else 0.0])
            continue
        row, hrow, k = [], [], 0
        for t in range(T):
            term = fn(lr[i][t], advantages[i], spec) if entropy_mask[i][t] else 0.0 * logp[i, t]
            if spec.beta > 0 and m[i][t]:
                term, k = term + spec.beta * kls[k], k + 1
            row.append(term)
            hrow.append(entropy[i][t] if entropy and entropy_mask[i][t] else 0.0)
        loss.append(row)
        bonus.append(hrow)
    valid = [[any(m[i])] for i in range(B)] if per_seq else m
    total = aggregate(spec, loss, valid)
    if spec.entropy_coef > 0:
        total = total - spec.entropy_coef * aggregate(spec, bonus, valid)
    return total
