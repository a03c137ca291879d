"""Slow, obvious oracles for the rollout / training mismatch correction (python floats, loops).

Restates ../shared/ALGORITHMS-peers.md "Rollout / training mismatch correction" literally (TRL's
``vllm_importance_sampling_mode`` table and ``get_off_policy_mask``), with mmrl's ±20 clamp on
the log-weight before exp. Nothing here imports mmrl. Weights are detached in the method, so
they are python floats here; the corrected loss loops over scalar torch tensors so that autograd
gives reference gradients.
"""
from __future__ import annotations

import math

from tests.reference import core_math as core

CLAMP = 20.0


def _d(old, rollout, mask, i, t):
    """old − rollout at a valid token: NaN -> 0, ±inf -> ±20; 0 on padding."""
    if not mask[i][t]:
        return 0.0
    d = float(old[i][t]) - float(rollout[i][t])
    if math.isnan(d):
        return 0.0
    return max(-CLAMP, min(CLAMP, d)) if math.isinf(d) else d


def _bounded(w, low, high, truncate):
    if truncate:
        if low is not None:
            w = max(w, low)
        if high is not None:
            w = min(w, high)
        return w
    if (low is not None and w < low) or (high is not None and w > high):
        return 0.0
    return w


def weights(mode, old, rollout, mask, low=None, high=3.0):
    """B lists: T weights (token modes) or one (sequence modes, ``none``)."""
    B, T = len(mask), len(mask[0])
    if mode == "none":
        return [[1.0] for _ in range(B)]
    truncate = mode.endswith("truncate")
    out = []
    for i in range(B):
        ds = [_d(old, rollout, mask, i, t) for t in range(T)]
        if mode.startswith("token"):
            out.append([_bounded(math.exp(max(-CLAMP, min(CLAMP, d))), low, high, truncate)
                        for d in ds])
        else:
            s = max(-CLAMP, min(CLAMP, sum(ds)))
            out.append([_bounded(math.exp(s), low, high, truncate)])
    return out


def off_policy_keep(adv, logp, sample, mask, delta):
    """B floats: 0 if A_i < 0 and mean_t (sample − logp) > delta, else 1."""
    out = []
    for i in range(len(mask)):
        terms = []
        for t in range(len(mask[i])):
            if mask[i][t]:
                x = float(sample[i][t]) - float(logp[i][t])
                terms.append(0.0 if math.isnan(x) else x)
        mean = sum(terms) / max(len(terms), 1)
        out.append(0.0 if (float(adv[i]) < 0 and mean > delta) else 1.0)
    return out


def corrected_loss(spec, logp, old_logp, advantages, mask, rollout_logp=None, ref_logp=None):
    """The loss of ``spec`` (objective clip or sapo; any aggregation; ratio level token or
    sequence), its objective times the rollout weights and the off-policy mask, KL added after."""
    B, T = logp.shape
    if spec.beta > 0 and spec.ratio_level in core.PER_SEQUENCE_LEVELS:
        raise NotImplementedError("this oracle adds a token KL only (token ratio levels)")
    old_logp = old_logp.detach()
    m = [[bool(mask[i, t]) for t in range(T)] for i in range(B)]
    per_seq = spec.ratio_level in core.PER_SEQUENCE_LEVELS
    lr = core.RATIO_LEVELS[spec.ratio_level](logp, old_logp, mask)
    fn = {"clip": core.obj_clip, "sapo": core.obj_sapo}[spec.objective]
    loss = [[fn(lr[i][t], advantages[i], spec) for t in range(len(lr[i]))] for i in range(B)]
    if rollout_logp is not None:
        w = weights(spec.rollout_is, old_logp.tolist(), rollout_logp.tolist(), m,
                    spec.rollout_is_min, spec.rollout_is_max)
        loss = [[loss[i][t] * w[i][t if len(w[i]) > 1 else 0] for t in range(len(loss[i]))]
                for i in range(B)]
    if spec.off_policy_mask is not None:
        sample = old_logp if rollout_logp is None else rollout_logp
        keep = off_policy_keep(advantages.tolist(), logp.tolist(), sample.tolist(), m,
                               spec.off_policy_mask)
        loss = [[x * keep[i] for x in loss[i]] for i in range(B)]
    if spec.beta > 0:
        for i in range(B):
            for t in range(T):
                if m[i][t]:
                    loss[i][t] = loss[i][t] + spec.beta * core.KL[spec.kl](logp[i, t]
                                                                          - ref_logp[i, t])
    valid = [[any(m[i])] for i in range(B)] if per_seq else m
    return core.AGGREGATIONS[spec.aggregation](loss, valid, max_len=spec.max_len)
