"""Slow, obvious oracles for the objectives that read the whole call: CISPO (both conventions),
GPG, VESPO, Clip-Cov and KL-Cov. Python loops, float64, one function per formula, restating
../shared/ALGORITHMS-peers.md; nothing here imports mmrl.

Every oracle takes nested lists ``[B][T]``: ``lr`` log-ratios and ``logp`` current log-probs
(0-d tensors that carry autograd), ``adv`` advantages per token (0-d tensors or floats),
``mask`` bools, and ``spec`` (an AlgoSpec, read by attribute), plus ``generator`` for the
random pick; it returns the per-token losses ``[B][T]`` (0 on padding).
"""
from __future__ import annotations

import math

import torch

CLAMP = 20.0


def _rho(x):
    return torch.exp(torch.clamp(x, -CLAMP, CLAMP))


def _num(x) -> float:
    """A Python float of a number or a 0-d tensor (detached: the oracle's weights are values)."""
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def _zero():
    return torch.zeros((), dtype=torch.float64)


def _grid(lr, fn):
    return [[fn(i, t) for t in range(len(lr[i]))] for i in range(len(lr))]


def obj_cispo(lr, adv, logp, mask, spec, generator=None):
    """−sg(clip(ρ, 1−ε_low, 1+ε_high))·A·logp (verl)."""
    def one(i, t):
        if not mask[i][t]:
            return _zero()
        w = min(max(_num(_rho(lr[i][t])), 1 - spec.eps_low), 1 + spec.eps_high)
        return -w * adv[i][t] * logp[i][t]
    return _grid(lr, one)


def obj_cispo_cap(lr, adv, logp, mask, spec, generator=None):
    """−sg(min(ρ, cap))·A·logp (TRL)."""
    def one(i, t):
        if not mask[i][t]:
            return _zero()
        return -min(_num(_rho(lr[i][t])), spec.cispo_cap) * adv[i][t] * logp[i][t]
    return _grid(lr, one)


def obj_gpg(lr, adv, logp, mask, spec, generator=None):
    """−A·logp."""
    return _grid(lr, lambda i, t: -adv[i][t] * logp[i][t] if mask[i][t] else _zero())


def obj_vespo(lr, adv, logp, mask, spec, generator=None):
    """−φ(W_i)·A·logp, log W_i = clamp(Σ_t clamp(x), log 1e-8, 20), φ = e^(λ + k log W − λW)."""
    out = []
    for i in range(len(lr)):
        total = sum(min(max(_num(lr[i][t]), -CLAMP), CLAMP)
                    for t in range(len(lr[i])) if mask[i][t])
        log_w = min(max(total, math.log(1e-8)), 20.0)
        row = []
        for t in range(len(lr[i])):
            a = _num(adv[i][t])
            k, lam = ((spec.vespo_k_pos, spec.vespo_lambda_pos) if a >= 0
                      else (spec.vespo_k_neg, spec.vespo_lambda_neg))
            phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
            row.append(-phi * adv[i][t] * logp[i][t] if mask[i][t] else _zero())
        out.append(row)
    return out


def _covariances(adv, logp, mask):
    """{(i, t): (A − mean A)(logp − mean logp)} over the valid tokens, as floats."""
    cells = [(i, t) for i in range(len(mask)) for t in range(len(mask[i])) if mask[i][t]]
    if not cells:
        return {}
    a_mean = sum(_num(adv[i][t]) for i, t in cells) / len(cells)
    l_mean = sum(_num(logp[i][t]) for i, t in cells) / len(cells)
    return {(i, t): (_num(adv[i][t]) - a_mean) * (_num(logp[i][t]) - l_mean) for i, t in cells}


def _count(mask, fraction):
    n_valid = sum(1 for row in mask for m in row if m)
    return max(math.floor(n_valid * fraction), 1)


def obj_clip_cov(lr, adv, logp, mask, spec, generator=None):
    """PPO clip; a random min(n, #candidates) of the candidates (not PPO-clipped, lb < Cov < ub)
    get loss 0. The pick: one U(0, 1) float64 key per position from ``generator``, drawn as one
    ``torch.rand`` of shape [B, T]; the candidates with the n smallest keys are picked."""
    B, T = len(lr), len(lr[0])
    keys = torch.rand((B, T), generator=generator, dtype=torch.float64)
    cov = _covariances(adv, logp, mask)
    terms, candidates = {}, []
    for (i, t), c in cov.items():
        rho = _rho(lr[i][t])
        l1 = -adv[i][t] * rho
        l2 = -adv[i][t] * torch.clamp(rho, 1 - spec.eps_low, 1 + spec.eps_high)
        terms[i, t] = torch.maximum(l1, l2)
        if not _num(l2) > _num(l1) and spec.clip_cov_lb < c < spec.clip_cov_ub:
            candidates.append((_num(keys[i, t]), i, t))
    picked = {(i, t) for _, i, t in sorted(candidates)[:_count(mask, spec.cov_ratio)]}
    return _grid(lr, lambda i, t: _zero() if (i, t) in picked or (i, t) not in terms
                 else terms[i, t])


def obj_kl_cov(lr, adv, logp, mask, spec, generator=None):
    """−Aρ, plus β·|x| on the k valid tokens with the largest Cov (ties: row-major order)."""
    cov = _covariances(adv, logp, mask)
    ranked = sorted(cov, key=lambda cell: (-cov[cell], cell))
    top = set(ranked[:_count(mask, spec.cov_ratio)]) if cov else set()

    def one(i, t):
        if not mask[i][t]:
            return _zero()
        loss = -adv[i][t] * _rho(lr[i][t])
        return loss + spec.kl_cov_coef * torch.abs(lr[i][t]) if (i, t) in top else loss
    return _grid(lr, one)


OBJECTIVES = {"cispo": obj_cispo, "cispo_cap": obj_cispo_cap, "gpg": obj_gpg,
              "vespo": obj_vespo, "clip_cov": obj_clip_cov, "kl_cov": obj_kl_cov}
"""Whole-call oracles: ``(lr, adv, logp, mask, spec, generator) -> [B][T]`` losses."""

CLIP_MASKS_KEEP_GRADIENT = ("cispo", "cispo_cap")
"""Objectives whose ``low`` / ``high`` masks mark truncated importance weights, where the
gradient is the truncated weight times REINFORCE's, not zero (the conformance test's
"masks mark the zero-gradient region" check does not apply)."""

RANDOM = ("clip_cov",)
"""Objectives that draw from the generator: the oracle must get a generator in the same state."""

CALL_DEPENDENT = ("clip_cov", "kl_cov")
"""Objectives whose token selection depends on which tokens share the call (the covariance and
the pick count are over the call, as verl's micro-batch): not invariant to micro-batching."""

PER_CALL_CONSTRAINT = {"drpo": {"drpo_beta": 0.0}}
"""Objectives whose KL-constraint coefficient is a function of the call's mean KL (DRPO's
sg(β·max(KL_call − δ, 0)), per call as mmrl.algo.drpo documents): invariant to micro-batching
with the constraint off (these overrides); with it on, a split equals the per-call losses."""

from tests.reference.length_ref import obj_drpo  # noqa: E402  (reads group_ids too)

OBJECTIVES["drpo"] = obj_drpo
