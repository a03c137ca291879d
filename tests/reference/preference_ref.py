"""Slow, obvious oracles for the preference losses and pair builders: Python loops over pairs
and tokens, float64, one function per formula, restating ../shared/ALGORITHMS-seed.md section D
(and robust DPO, arXiv 2403.00409); nothing here imports mmrl.

Log-probs come as nested lists ``[P][T]`` of 0-d tensors (they carry autograd), masks as nested
bools; ``spec`` is read by attribute (a PrefSpec). Rewards, scores, levels, group ids are lists.
"""
from __future__ import annotations

import math

import torch


def _logsig(z):
    """log σ(z), written two ways so that neither branch overflows."""
    return -torch.log1p(torch.exp(-z)) if float(z.detach()) >= 0 else z - torch.log1p(torch.exp(z))


def score(logp, mask, ref=None, weights=None, mean=False):
    """s = Σ_t w_t (logp_t − ref_t) over the valid tokens (÷ their count with ``mean``)."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for t, valid in enumerate(mask):
        if not valid:
            continue
        x = logp[t] - (0.0 if ref is None else float(ref[t]))
        total = total + x * (1.0 if weights is None else float(weights[t]))
        count += 1
    return total / max(count, 1) if mean else total


def pair_loss(spec, s_w, s_l, beta, win_w=None, win_l=None):
    """ℓ of one pair from its two scores (``beta`` already times the pair's scale)."""
    eps, name = spec.label_smoothing, spec.loss
    z = beta * (s_w - s_l - spec.gamma_beta_ratio)
    if name == "sigmoid":  # DPO Eq. 7; cDPO; SimPO
        return -(1 - eps) * _logsig(z) - eps * _logsig(-z)
    if name == "hinge":
        return torch.clamp(1 - z, min=0)
    if name == "robust":  # rDPO: [(1−ε)ℓ(z) − εℓ(−z)]/(1 − 2ε), ℓ = −log σ
        return ((1 - eps) * -_logsig(z) - eps * -_logsig(-z)) / (1 - 2 * eps)
    if name == "ipo":
        return (s_w - s_l - 1 / (2 * beta)) ** 2
    if name == "sppo":
        return 0.5 * ((s_w - (win_w - 0.5) / beta) ** 2 + (s_l - (win_l - 0.5) / beta) ** 2)
    if name == "sppo_single":
        eta_p = (win_w - 0.5) / beta
        return 0.5 * ((s_w - eta_p) ** 2 + (s_l + eta_p) ** 2)
    raise KeyError(f"no oracle for preference loss {name!r}")


def preference_loss(spec, cw, rw, cm, rm, cref=None, rref=None, num_pairs=None, win_w=None,
                    win_l=None, guide_w=None, guide_l=None, scale=None):
    """Σ_p ℓ_p / num_pairs, looping over pairs; TGDPO's weights 1 ± αβ d_t; SimPO's SFT term."""
    total = torch.zeros((), dtype=torch.float64)
    for p in range(len(cw)):
        gw = None if guide_w is None else [1 + spec.alpha * spec.beta * float(d)
                                           for d in guide_w[p]]
        gl = None if guide_l is None else [1 - spec.alpha * spec.beta * float(d)
                                           for d in guide_l[p]]
        s_w = score(cw[p], cm[p], None if cref is None else cref[p], gw, spec.length_normalize)
        s_l = score(rw[p], rm[p], None if rref is None else rref[p], gl, spec.length_normalize)
        beta = spec.beta * (1.0 if scale is None else float(scale[p]))
        loss = pair_loss(spec, s_w, s_l, beta, None if win_w is None else float(win_w[p]),
                         None if win_l is None else float(win_l[p]))
        if spec.sft_weight > 0:
            loss = loss - spec.sft_weight * score(cw[p], cm[p], mean=True)
        total = total + loss
    return total / (len(cw) if num_pairs is None else num_pairs)


def best_worst(rewards, gids):
    """[(best, worst)] per group in ascending id order; first row on ties; all-equal: none."""
    out = []
    for g in sorted(set(gids)):
        rows = [i for i, x in enumerate(gids) if x == g]
        best = worst = rows[0]
        for i in rows:
            if rewards[i] > rewards[best]:
                best = i
            if rewards[i] < rewards[worst]:
                worst = i
        if rewards[best] != rewards[worst]:
            out.append((best, worst))
    return out


def win_rates(scores, gids):
    """P̂_i = mean over j of its group of σ(s_i − s_j) (½ for j = i)."""
    out = []
    for i, g in enumerate(gids):
        rows = [j for j, x in enumerate(gids) if x == g]
        out.append(sum(1 / (1 + math.exp(-(scores[i] - scores[j]))) for j in rows) / len(rows))
    return out


def level_pairs(levels, gids, kappa, top_level=1):
    """[(i, j, scale)] for i < j row-major with the same group and levels[i] < levels[j]."""
    out = []
    for i in range(len(levels)):
        for j in range(len(levels)):
            if gids[i] == gids[j] and levels[i] < levels[j]:
                out.append((i, j, kappa if levels[i] == top_level else 1.0))
    return out
