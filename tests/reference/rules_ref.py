"""Slow, obvious oracles for lane R of issue 18 (unlikeliness, novelty sharpening, Posterior-GRPO
gating, RiskPO, GiGPO, SPO, hypervolume, XRPO's half-width): Python loops over floats (or 0-d
tensors, so autograd gives reference gradients), restating docs/seed_methods.md. Nothing here
imports mmrl.
"""
from __future__ import annotations

import itertools
import math


def _std(v):
    m = sum(v) / len(v)
    return (sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5 if len(v) > 1 else 0.0 * m


def _grpo_of(values, gids, eps):
    out = []
    for i in range(len(values)):
        g = [values[j] for j in range(len(values)) if gids[j] == gids[i]]
        if len(g) == 1 or max(g) == min(g):
            out.append(0.0 * values[i])
        else:
            out.append((values[i] - sum(g) / len(g)) / (_std(g) + eps))
    return out


def _rank(seq_logp, gids, i):
    """How many rows of i's group are less likely than i (ties: the earlier row ranks lower)."""
    return sum(1 for j in range(len(gids)) if gids[j] == gids[i] and (
        seq_logp[j] < seq_logp[i] or (seq_logp[j] == seq_logp[i] and j < i)))


def adv_unlikeliness(rewards, gids, eps=1e-4, r_max=1.0, seq_logp=None, unlikely_beta=0.25,
                     **_):
    shaped = []
    for i in range(len(rewards)):
        n = sum(1 for g in gids if g == gids[i])
        shaped.append(rewards[i] * (1 - unlikely_beta * _rank(seq_logp, gids, i) / n))
    return _grpo_of(shaped, gids, eps)


def adv_novelty_sharpen(rewards, gids, eps=1e-4, r_max=1.0, seq_logp=None, novelty_lambda=1.0,
                        **_):
    base = _grpo_of(rewards, gids, eps)
    out = []
    for i in range(len(rewards)):
        ell = [seq_logp[j] for j in range(len(gids)) if gids[j] == gids[i]]
        nu = 0.0 if max(ell) == min(ell) else (sum(ell) / len(ell) - seq_logp[i]) / (_std(ell) + eps)
        out.append(base[i] * (1 + novelty_lambda * max(nu, 0.0)) if base[i] > 0 else base[i])
    return out


def adv_posterior_gate(columns, gids, weights, base="grpo", eps=1e-4, posterior_threshold=1.0,
                       **kw):
    total = []
    for row in columns:
        ok = 1.0 if row[0] >= posterior_threshold else 0.0
        total.append(weights[0] * row[0] + ok * sum(w * x for w, x in zip(weights[1:], row[1:])))
    from tests.reference.advantages_ref import ALL
    return ALL[base](total, gids, eps=eps, **kw)


ADVANTAGES = {"unlikeliness": adv_unlikeliness, "novelty_sharpen": adv_novelty_sharpen}
MULTI_REWARD = {"posterior_gate": adv_posterior_gate}


def _quantile(values, alpha):
    """Linear interpolation between order statistics (numpy's default)."""
    v = sorted(values, key=lambda x: float(x.detach()) if hasattr(x, "detach") else x)
    pos = alpha * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def adv_mixed_var(rewards, gids, eps=1e-4, r_max=1.0, riskpo_alpha_lo=0.2, riskpo_alpha_hi=0.8,
                  riskpo_w_mix=1.5, riskpo_bundle=5, **_):
    groups = sorted(set(gids))
    rows = {g: [i for i in range(len(gids)) if gids[i] == g] for g in groups}  # batch order
    out = [0.0 * r for r in rewards]
    for b0 in range(0, len(groups), riskpo_bundle):
        members = groups[b0:b0 + riskpo_bundle]
        n_papers = min(len(rows[g]) for g in members)
        scores = [sum(rewards[rows[g][k]] for g in members) for k in range(n_papers)]
        lo, hi = _quantile(scores, riskpo_alpha_lo), _quantile(scores, riskpo_alpha_hi)
        if n_papers == 1:
            std = 1.0
        else:
            m = sum(scores) / n_papers
            var = sum((s - m) ** 2 for s in scores) / (n_papers - 1)
            std = 1.0 if float(getattr(var, 'detach', lambda: var)()) == 0 else var ** 0.5
        for k, s in enumerate(scores):
            a_r = (max(s - lo, 0.0 * s) - max(s - hi, 0.0 * s) + lo - hi) / (
                riskpo_alpha_hi - riskpo_alpha_lo + eps)
            a_c = -max(lo - s, 0.0 * s) / (riskpo_alpha_lo + eps)
            a = (riskpo_w_mix * a_c + a_r) / (riskpo_w_mix + 1) / (std + eps)
            for g in members:
                out[rows[g][k]] = a
    return out


ADVANTAGES["mixed_var"] = adv_mixed_var


def hypervolume_incl_excl(points, ref):
    """Σ over non-empty subsets T of (−1)^(|T|+1) Π_d max(min_{p∈T} p_d − ref_d, 0)."""
    total = 0.0
    for size in range(1, len(points) + 1):
        for subset in itertools.combinations(points, size):
            vol = 1.0
            for d in range(len(ref)):
                vol *= max(min(p[d] for p in subset) - ref[d], 0.0)
            total += (-1) ** (size + 1) * vol
    return total


def gigpo(step_rewards, traj_ids, steps, group_ids, anchors, gamma=0.95, omega=1.0,
          mode="mean_std_norm", eps=1e-6):
    """Loops: R(τ) per trajectory, normalized over the episode group's step rows; R_t summed
    step by step, normalized over (episode group, anchor); singleton / constant sets -> 0."""
    n = len(step_rewards)

    def norm(values, same):
        out = []
        for i in range(n):
            members = [values[j] for j in range(n) if same(i, j)]
            if len(members) == 1 or max(members) == min(members):
                out.append(0.0 * values[i])
                continue
            mean = sum(members) / len(members)
            scale = _std(members) + eps if mode == "mean_std_norm" else 1.0
            out.append((values[i] - mean) / scale)
        return out
    episode = [sum(step_rewards[j] for j in range(n) if traj_ids[j] == traj_ids[i])
               for i in range(n)]
    ret = [sum(gamma ** (steps[j] - steps[i]) * step_rewards[j] for j in range(n)
               if traj_ids[j] == traj_ids[i] and steps[j] >= steps[i]) for i in range(n)]
    a_e = norm(episode, lambda i, j: group_ids[i] == group_ids[j])
    a_s = norm(ret, lambda i, j: group_ids[i] == group_ids[j] and anchors[i] == anchors[j])
    return [a + omega * s for a, s in zip(a_e, a_s)]


def spo_chain(probs, length, cuts, values, reward, threshold=0.9):
    """One row: token values at cut points and the last token, differences to the previous
    value (or V(prompt) for c = −1), filled backwards, zeroed where p > threshold."""
    if not cuts:
        return [0.0] * len(probs)
    token_value = [None] * length
    token_value[length - 1] = reward
    base = None
    for c, v in zip(cuts, values):
        if c == -1:
            base = v
        else:
            token_value[c] = v
    adv = [None] * length
    for i in range(length):
        if token_value[i] is not None:
            adv[i] = 0.0 if base is None else token_value[i] - base
            base = token_value[i]
    for i in range(length - 2, -1, -1):
        if adv[i] is None:
            adv[i] = adv[i + 1]
    adv = [0.0 if probs[i] > threshold else adv[i] for i in range(length)]
    return adv + [0.0] * (len(probs) - length)
