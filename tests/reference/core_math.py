"""Slow, obvious oracles for mmrl's core math: one function per formula, Python loops, float64.

Nothing here imports mmrl's implementations; each function restates ALGORITHMS.md literally.
Loss oracles loop over scalar torch tensors so that autograd gives reference gradients too.
"""
from __future__ import annotations

import inspect
import math

import torch

from tests.reference import objectives_ref

CLAMP = 20.0


# ---------------------------------------------------------------- advantages (lists of scalars)
def _members(rewards, gids, i):
    return [rewards[j] for j in range(len(rewards)) if gids[j] == gids[i]]


def _std(values):
    """Unbiased std; works on floats and on 0-d tensors (so autograd gives oracle gradients)."""
    m = sum(values) / len(values)
    return (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def adv_grpo(rewards, gids, eps=1e-4, r_max=1.0):
    out = []
    for i, r in enumerate(rewards):
        g = _members(rewards, gids, i)
        if len(g) == 1 or max(g) == min(g):
            out.append(0.0)
        else:
            out.append((r - sum(g) / len(g)) / (_std(g) + eps))
    return out


def adv_mean_center(rewards, gids, eps=1e-4, r_max=1.0):
    out = []
    for i, r in enumerate(rewards):
        g = _members(rewards, gids, i)
        out.append(0.0 if max(g) == min(g) else r - sum(g) / len(g))
    return out


def adv_batch_std(rewards, gids, eps=1e-4, r_max=1.0):
    std = _std(rewards) if len(rewards) > 1 else 0.0
    out = []
    for i, r in enumerate(rewards):
        g = _members(rewards, gids, i)
        out.append(0.0 if max(g) == min(g) else (r - sum(g) / len(g)) / (std + eps))
    return out


def adv_rloo(rewards, gids, eps=1e-4, r_max=1.0):
    out = []
    for i, r in enumerate(rewards):
        others = [rewards[j] for j in range(len(rewards)) if gids[j] == gids[i] and j != i]
        if not others or max(others + [r]) == min(others + [r]):
            out.append(0.0)
        else:
            out.append(r - sum(others) / len(others))
    return out


def adv_ngrpo(rewards, gids, eps=1e-4, r_max=1.0):
    out = []
    for i, r in enumerate(rewards):
        g = _members(rewards, gids, i) + [r_max]  # the virtual sample
        if max(g) == min(g):
            out.append(0.0)
        else:
            out.append((r - sum(g) / len(g)) / (_std(g) + eps))
    return out


ADVANTAGES = {"grpo": adv_grpo, "mean_center": adv_mean_center, "batch_std": adv_batch_std,
              "rloo": adv_rloo, "ngrpo": adv_ngrpo}


def adv_normalize_then_sum(columns, gids, weights, base="grpo", **kw):
    k_cols = [[row[k] for row in columns] for k in range(len(weights))]
    per = [ADVANTAGES[base](col, gids, **kw) for col in k_cols]
    return [sum(weights[k] * per[k][i] for k in range(len(weights))) for i in range(len(columns))]


def adv_sum_then_normalize(columns, gids, weights, base="grpo", **kw):
    summed = [sum(w * v for w, v in zip(weights, row)) for row in columns]
    return ADVANTAGES[base](summed, gids, **kw)


MULTI_REWARD = {"normalize_then_sum": adv_normalize_then_sum,
                "sum_then_normalize": adv_sum_then_normalize}


# ---------------------------------------------------------------- ratio levels (tensors, loops)
def _clamp(x):
    return torch.clamp(x, -CLAMP, CLAMP)


def ratio_token(logp, old_logp, mask):
    B, T = logp.shape
    return [[(logp[i, t] - old_logp[i, t]) if mask[i, t] else logp.new_zeros(())
             for t in range(T)] for i in range(B)]


def ratio_sequence(logp, old_logp, mask):
    B, T = logp.shape
    out = []
    for i in range(B):
        terms = [logp[i, t] - old_logp[i, t] for t in range(T) if mask[i, t]]
        out.append([sum(terms) / len(terms) if terms else logp.new_zeros(())])
    return out


def ratio_sequence_token(logp, old_logp, mask):
    B, T = logp.shape
    seq = ratio_sequence(logp, old_logp, mask)
    return [[(logp[i, t] - logp[i, t].detach() + seq[i][0].detach()) if mask[i, t]
             else seq[i][0].detach() for t in range(T)] for i in range(B)]


def ratio_sequence_sum(logp, old_logp, mask):
    B, T = logp.shape
    out = []
    for i in range(B):
        terms = [logp[i, t] - old_logp[i, t] for t in range(T) if mask[i, t]]
        out.append([sum(terms) if terms else logp.new_zeros(())])
    return out


def ratio_norm(logp, old_logp, mask, step_std=None, mean_shift=None):
    """GRPO-Guard's RatioNorm as flow_grpo writes it: s·(logp − old) + mean_shift/(2s)."""
    B, T = logp.shape
    return [[(step_std[i, t] * (logp[i, t] - old_logp[i, t])
              + mean_shift[i, t] / (2 * step_std[i, t])) if mask[i, t] and step_std[i, t] > 0
             else logp.new_zeros(()) for t in range(T)] for i in range(B)]


RATIO_LEVELS = {"token": ratio_token, "sequence": ratio_sequence,
                "sequence_token": ratio_sequence_token, "sequence_sum": ratio_sequence_sum,
                "ratio_norm": ratio_norm}


# ---------------------------------------------------------------- objectives (one entry)
def obj_clip(x, a, spec):
    rho = torch.exp(_clamp(x))
    clipped = torch.clamp(rho, 1 - spec.eps_low, 1 + spec.eps_high)
    capped = rho if spec.delta is None else torch.clamp(rho, max=spec.delta)  # TRL's delta
    loss = -torch.minimum(capped * a, clipped * a)
    if spec.dual_clip_c is not None and a < 0:
        loss = torch.minimum(loss, -spec.dual_clip_c * a * torch.ones_like(loss))
    return loss


def obj_sapo(x, a, spec):
    rho = torch.exp(_clamp(x))
    tau = spec.tau_pos if a > 0 else spec.tau_neg
    return -(4.0 / tau) * torch.sigmoid(tau * (rho - 1.0)) * a


def obj_reg(lr, adv, gids, valid, spec):
    """Per-sequence: lr, adv, gids, valid are length-B lists; returns B losses."""
    out = []
    for i in range(len(lr)):
        members = [lr[j] for j in range(len(lr)) if gids[j] == gids[i] and valid[j]]
        mean = sum(members) / len(members) if members else 0.0
        out.append((adv[i] - spec.eps_reg * (lr[i] - mean)) ** 2)
    return out


OBJECTIVES = {"clip": obj_clip, "sapo": obj_sapo, "reg": obj_reg}  # reg: per-sequence lists


# ---------------------------------------------------------------- KL (one entry)
def kl_k1(x):
    return _clamp(x)


def kl_k2(x):
    return 0.5 * _clamp(x) ** 2


def kl_k3(x):
    x = _clamp(x)
    return torch.exp(-x) + x - 1.0


KL = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


# ---------------------------------------------------------------- aggregations (loss lists)
def agg_token_mean(loss, mask, num_tokens=None, num_seqs=None, seq_lens=None, max_len=None):
    total, count = 0.0, 0
    for i in range(len(loss)):
        for t in range(len(loss[i])):
            if mask[i][t]:
                total, count = total + loss[i][t], count + 1
    return total / (num_tokens if num_tokens is not None else max(count, 1))


def agg_seq_mean_token_mean(loss, mask, num_tokens=None, num_seqs=None, seq_lens=None,
                            max_len=None):
    total = 0.0
    for i in range(len(loss)):
        n = sum(1 for t in range(len(loss[i])) if mask[i][t])
        n = seq_lens[i] if seq_lens is not None else n
        row = sum((loss[i][t] for t in range(len(loss[i])) if mask[i][t]), 0.0)
        total = total + (row / n if n > 0 else 0.0)
    return total / (num_seqs if num_seqs is not None else len(loss))


def agg_seq_mean_token_sum(loss, mask, num_tokens=None, num_seqs=None, seq_lens=None,
                           max_len=None):
    total = sum((loss[i][t] for i in range(len(loss)) for t in range(len(loss[i]))
                 if mask[i][t]), 0.0)
    return total / (num_seqs if num_seqs is not None else len(loss))


def agg_fixed_norm(loss, mask, num_tokens=None, num_seqs=None, seq_lens=None, max_len=None):
    total = sum((loss[i][t] for i in range(len(loss)) for t in range(len(loss[i]))
                 if mask[i][t]), 0.0)
    return total / ((num_seqs if num_seqs is not None else len(loss)) * max_len)


def agg_seq_mean(loss, mask, num_tokens=None, num_seqs=None, seq_lens=None, max_len=None):
    """loss: B lists of one value; mask: B lists of one bool (row non-empty)."""
    total = sum((loss[i][0] for i in range(len(loss)) if mask[i][0]), 0.0)
    return total / (num_seqs if num_seqs is not None else len(loss))


AGGREGATIONS = {"token_mean": agg_token_mean, "seq_mean_token_mean": agg_seq_mean_token_mean,
                "seq_mean_token_sum": agg_seq_mean_token_sum, "fixed_norm": agg_fixed_norm,
                "seq_mean": agg_seq_mean}
PER_SEQUENCE_LEVELS = ("sequence", "sequence_sum")


# ---------------------------------------------------------------- full policy loss
def policy_loss(spec, logp, old_logp, advantages, mask, ref_logp=None, token_weights=None,
                group_ids=None, num_tokens=None, num_seqs=None, seq_lens=None, generator=None,
                step_std=None, mean_shift=None, step_gap=None):
    """The whole loss of ``spec`` written out entry by entry (value carries autograd)."""
    B, T = logp.shape
    old_logp = old_logp.detach()
    terms = dict(step_std=step_std, mean_shift=mean_shift) if spec.ratio_level == "ratio_norm" \
        else {}
    lr = RATIO_LEVELS[spec.ratio_level](logp, old_logp, mask, **terms)
    per_seq = spec.ratio_level in PER_SEQUENCE_LEVELS
    adv = lambda i, t: advantages[i] if advantages.dim() == 1 else advantages[i, t]  # noqa: E731
    valid = [[bool(mask[i].any())] for i in range(B)] if per_seq else \
        [[bool(mask[i, t]) for t in range(T)] for i in range(B)]
    if spec.objective == "reg":
        seq = obj_reg([row[0] for row in lr], [advantages[i] for i in range(B)],
                      [int(g) for g in group_ids], [v[0] for v in valid], spec)
        loss = [[v] for v in seq]
    elif spec.objective in objectives_ref.OBJECTIVES:  # whole-call objectives (read logp)
        fn = objectives_ref.OBJECTIVES[spec.objective]
        groups = {"group_ids": [int(g) for g in group_ids]} \
            if "group_ids" in inspect.signature(fn).parameters else {}  # DRPO reads its groups
        loss = fn(lr, [[adv(i, t) for t in range(T)] for i in range(B)],
                  [[logp[i, t] for t in range(T)] for i in range(B)], valid, spec, generator,
                  **groups)
    else:
        fn = {"clip": obj_clip, "sapo": obj_sapo}[spec.objective]
        loss = [[fn(lr[i][t], adv(i, t), spec) for t in range(len(lr[i]))] for i in range(B)]
    if spec.step_reweight:  # GRPO-Guard: the objective of step t divided by its σ gap
        loss = [[loss[i][t] / step_gap[i, t] if mask[i, t] else loss[i][t] for t in range(T)]
                for i in range(B)]
    if spec.beta > 0:
        for i in range(B):
            kls = [KL[spec.kl](logp[i, t] - ref_logp[i, t]) for t in range(T) if mask[i, t]]
            if per_seq:
                loss[i][0] = loss[i][0] + spec.beta * (sum(kls) / len(kls) if kls else 0.0)
            else:
                for t in range(T):
                    if mask[i, t]:
                        loss[i][t] = loss[i][t] + spec.beta * KL[spec.kl](logp[i, t] - ref_logp[i, t])
    if token_weights is not None:
        loss = [[loss[i][t] * token_weights[i, t] for t in range(T)] for i in range(B)]
    return AGGREGATIONS[spec.aggregation](loss, valid, num_tokens=num_tokens, num_seqs=num_seqs,
                                          seq_lens=seq_lens, max_len=spec.max_len)


# ---------------------------------------------------------------- TW-GRPO token weights
def tw_weights(full_logp, mask, alpha=1.7):
    """[N, T, V] float64 log-probs, [N, T] bool mask -> [N, T] weights (TW-GRPO)."""
    N, T, V = full_logp.shape
    lp = [[[float(full_logp[i, t, v]) if mask[i, t] else -math.log(V) for v in range(V)]
           for t in range(T)] for i in range(N)]
    u = []
    for t in range(T):
        mean_v = [sum(lp[i][t][v] for i in range(N)) / N for v in range(V)]
        k = []
        for i in range(N):
            total = 0.0
            for v in range(V):
                d = min(max(mean_v[v] - lp[i][t][v], -11.0), 11.0)
                total += math.exp(d) - d - 1.0
            k.append(total)
        u.append(sum(k) / N)
    valid = [any(bool(mask[i, t]) for i in range(N)) for t in range(T)]
    vals = [u[t] for t in range(T) if valid[t]]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 0.0)
    out = torch.ones(N, T, dtype=torch.float64)
    for t in range(T):
        if valid[t]:
            w = 1.0 + (alpha - 1.0) * (u[t] - lo) / (hi - lo + 1e-8)
            for i in range(N):
                if mask[i, t]:
                    out[i, t] = w
    return out


# ---------------------------------------------------------------- DAPO soft overlong
def soft_overlong(length, max_len, cache_len):
    if length <= max_len - cache_len:
        return 0.0
    if length <= max_len:
        return ((max_len - cache_len) - length) / cache_len
    return -1.0


# ---------------------------------------------------------------- test helpers
def preset_kwargs(name, max_len=8):
    """Overrides a preset needs to resolve at all (Dr.GRPO's fixed_norm needs L_max)."""
    return {"max_len": max_len} if name == "dr_grpo" else {}
