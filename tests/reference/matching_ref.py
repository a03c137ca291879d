"""Slow, obvious oracles for the weighted matching losses (DiffusionNFT, AWM): Python loops over
rows, times and latent elements, float64, restating ../shared/ALGORITHMS-flow.md in the papers'
own variables (x_t, x̂0 = x_t − t·v, x0); nothing here imports mmrl.

Velocities come as nested lists ``[b][K]`` of 1-D float64 tensors of latent elements (leaves of
autograd so gradients can be compared); ``x0``, ``eps`` alike; ``t``, ``mask``, ``adv`` as
nested lists of floats / bools.
"""
from __future__ import annotations

import torch


def _mean(values):
    return sum(values) / len(values)


def optimality(a, C=5.0):
    """r = clamp(clip(A, ±C)/C/2 + ½, 0, 1)."""
    a = max(-C, min(C, a))
    return max(0.0, min(1.0, a / C / 2 + 0.5))


def nft(v, v_old, v_ref, x0, eps, t, mask, adv, beta=1.0, C=5.0, kl_coef=0.0):
    """Σ_{i,k valid} ℓ_ik / #valid; ℓ = (C/β)[r·L⁺ + (1−r)·L⁻] + λ·mean_d (v − v_ref)²,
    L^± = mean_d (x̂0^± − x0)² / sg(max(mean_d |x̂0^± − x0|, 1e-5)), x̂0^± = x_t − t·v^±."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(len(v)):
        r = optimality(adv[i], C)
        for k in range(len(v[i])):
            if not mask[i][k]:
                continue
            tk = t[i][k]
            parts = []
            for sign in (+1, -1):
                sq, ab = [], []
                for j in range(v[i][k].numel()):
                    vt, vo = v[i][k][j], float(v_old[i][k][j])
                    vj = beta * vt + (1 - beta) * vo if sign > 0 else (1 + beta) * vo - beta * vt
                    xt = (1 - tk) * float(x0[i][k][j]) + tk * float(eps[i][k][j])
                    d = xt - tk * vj - float(x0[i][k][j])
                    sq.append(d * d)
                    ab.append(abs(float(d.detach())))  # the weight is stop-gradient
                parts.append(_mean(sq) / max(_mean(ab), 1e-5))
            term = C / beta * (r * parts[0] + (1 - r) * parts[1])
            if kl_coef:
                term = term + kl_coef * _mean([(v[i][k][j] - float(v_ref[i][k][j])) ** 2
                                               for j in range(v[i][k].numel())])
            total, count = total + term, count + 1
    return total / max(count, 1)


def phi_w(e, t, weighting, p=0.25):
    """AWM's φ(e)·w(t) (the negated log-prob surrogate)."""
    if weighting == "uniform":
        return e
    if weighting == "t":
        return e * t
    if weighting == "t**2":
        return e * t * t
    if weighting == "huber":
        return ((e + 1e-10) ** 0.5 - 1e-5) * t
    if weighting == "ghuber":
        return ((e + 1e-10) ** p - 1e-10 ** p) * t / p
    raise KeyError(weighting)


def awm(v, v_old, v_ref, x0, eps, t, mask, adv, weighting="ghuber", p=0.25, C=5.0,
        adv_max=1.0, clip=1.0, kl_coef=0.0, old_coef=0.0):
    """Σ_{i,k valid} ℓ_ik / #valid; ℓ = max(−A′ρ, −A′·clip(ρ)) + λ·mean_d (v − v_ref)² +
    λ_old·mean_d (v − v_old)², ρ = exp(ℓp − sg ℓp), ℓp = −φ(e)w(t), e = mean_d (v − (ε − x0))²."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(len(v)):
        a = max(-C, min(C, adv[i])) / C * adv_max
        for k in range(len(v[i])):
            if not mask[i][k]:
                continue
            n = v[i][k].numel()
            e = _mean([(v[i][k][j] - (float(eps[i][k][j]) - float(x0[i][k][j]))) ** 2
                       for j in range(n)])
            lp = -phi_w(e, t[i][k], weighting, p)
            rho = torch.exp(lp - lp.detach())
            term = torch.maximum(-a * rho, -a * rho.clamp(1 - clip, 1 + clip))
            if kl_coef:
                term = term + kl_coef * _mean([(v[i][k][j] - float(v_ref[i][k][j])) ** 2
                                               for j in range(n)])
            if old_coef:
                term = term + old_coef * _mean([(v[i][k][j] - float(v_old[i][k][j])) ** 2
                                                for j in range(n)])
            total, count = total + term, count + 1
    return total / max(count, 1)
