"""Slow, obvious oracles for the advantage estimators of issue 17 (REINFORCE++, OPO, ReMax,
pass@k, GPG, GDPO): Python loops over floats (or 0-d tensors, so autograd gives reference
gradients), restating ALGORITHMS-peers.md with mmrl's documented edge cases. Nothing here
imports mmrl.

Every function takes ``(rewards, gids, eps, r_max, lengths=None, baseline=None)``; the
token-weighted ones expand each row into ``lengths[i]`` token copies, literally.
"""
from __future__ import annotations

from tests.reference.core_math import ADVANTAGES as CORE, _members

WHITEN_EPS = 1e-8


def _group_mean_or_zero(rewards, gids, i):
    """r_i − mean of i's group, 0 for a singleton or a group whose values are all equal."""
    g = _members(rewards, gids, i)
    if len(g) == 1 or max(g) == min(g):
        return 0.0 * rewards[i]
    return rewards[i] - sum(g) / len(g)


def _whiten_tokens(values, lengths):
    """Each row's value copied onto its tokens; (v − mean)/sqrt(var + 1e-8) over the tokens."""
    tokens = [values[i] for i in range(len(values)) for _ in range(int(lengths[i]))]
    if len(tokens) <= 1 or max(tokens) == min(tokens):
        return [0.0 * v for v in values]
    mean = sum(tokens) / len(tokens)
    var = sum((t - mean) ** 2 for t in tokens) / (len(tokens) - 1)
    return [(v - mean) / (var + WHITEN_EPS) ** 0.5 if lengths[i] > 0 else 0.0 * v
            for i, v in enumerate(values)]


def adv_reinforce_pp(rewards, gids, eps=1e-4, r_max=1.0, lengths=None, baseline=None):
    return _whiten_tokens(list(rewards), lengths)


def adv_reinforce_pp_baseline(rewards, gids, eps=1e-4, r_max=1.0, lengths=None, baseline=None):
    v = [_group_mean_or_zero(rewards, gids, i) for i in range(len(rewards))]
    return _whiten_tokens(v, lengths)


def adv_opo(rewards, gids, eps=1e-4, r_max=1.0, lengths=None, baseline=None):
    out = []
    for i, r in enumerate(rewards):
        idx = [j for j in range(len(rewards)) if gids[j] == gids[i]]
        g = [rewards[j] for j in idx]
        if len(g) == 1 or max(g) == min(g):
            out.append(0.0 * r)
            continue
        total = sum(float(lengths[j]) for j in idx)
        b = (sum(float(lengths[j]) * rewards[j] for j in idx) / total if total > 0
             else sum(g) / len(g))
        out.append(r - b)
    return out


def adv_remax(rewards, gids, eps=1e-4, r_max=1.0, lengths=None, baseline=None):
    return [r - b for r, b in zip(rewards, baseline)]


def adv_passk(rewards, gids, eps=1e-4, r_max=1.0, lengths=None, baseline=None):
    out = [0.0 * r for r in rewards]
    for gid in dict.fromkeys(gids):
        idx = [j for j in range(len(rewards)) if gids[j] == gid]
        g = [rewards[j] for j in idx]
        if len(g) == 1 or max(g) == min(g):
            continue
        best = next(j for j in idx if rewards[j] == max(g))  # first row holding the maximum
        top2 = max(rewards[j] for j in idx if j != best)
        # tied runners-up share the gradient equally (the value is the same)
        tied = [rewards[j] for j in idx if j != best and rewards[j] == top2]
        second = sum(tied) / len(tied)
        mean = sum(g) / len(g)
        std = (sum((v - mean) ** 2 for v in g) / (len(g) - 1)) ** 0.5
        out[best] = (rewards[best] - second) / (std + eps)
    return out


def adv_gpg(rewards, gids, eps=1e-4, r_max=1.0, lengths=None, baseline=None):
    nonzero = sum(1 for r in rewards if r != 0.0)
    alpha = len(rewards) / max(nonzero, 1)
    return [alpha * _group_mean_or_zero(rewards, gids, i) for i in range(len(rewards))]


ADVANTAGES = {"reinforce_pp": adv_reinforce_pp,
              "reinforce_pp_baseline": adv_reinforce_pp_baseline, "opo": adv_opo,
              "remax": adv_remax, "passk": adv_passk, "gpg": adv_gpg}
"""The new estimators' oracles; :data:`ALL` adds core_math's."""

ALL = {**CORE, **ADVANTAGES}


def adv_gdpo(columns, gids, weights, base="grpo", eps=1e-4, **kw):
    """Per column base(r^k), weighted sum R, then (R − mean)/(std + eps) over the sequences."""
    k_cols = [[row[k] for row in columns] for k in range(len(weights))]
    per = [ALL[base](col, gids, eps=eps, **kw) for col in k_cols]
    total = [sum(weights[k] * per[k][i] for k in range(len(weights))) for i in range(len(columns))]
    if len(total) == 1 or max(total) == min(total):
        return [0.0 * t for t in total]
    mean = sum(total) / len(total)
    std = (sum((t - mean) ** 2 for t in total) / (len(total) - 1)) ** 0.5
    return [(t - mean) / (std + eps) for t in total]


MULTI_REWARD = {"gdpo": adv_gdpo}

from tests.reference import rules_ref as _rules  # noqa: E402  (issue 18 lane R's estimators)

ADVANTAGES.update(_rules.ADVANTAGES)
ALL.update(_rules.ADVANTAGES)
MULTI_REWARD.update(_rules.MULTI_REWARD)
from tests.reference.length_ref import adv_reward  # noqa: E402  (DRPO's A = r)

ADVANTAGES["reward"] = ALL["reward"] = adv_reward
