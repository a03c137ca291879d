"""Slow, obvious oracles for GRPO-Guard (arXiv 2510.22319) and DanceGRPO's timestep subset,
written from ALGORITHMS-flow.md on the latents themselves (loops over dims, no core code).

- :func:`gaussian_logp`: the per-dim-averaged log-density of x′ under N(μ, s²).
- :func:`ratio_norm_from_noise`: log ρ̃ = mean_d[ξ_d·(μ_θ,d − μ_old,d)], ξ = (x′ − μ_old)/s.
- :func:`guard_loss`: the GRPO-Guard loss of a batch: for every (sample i, trained step j),
  max(−A_i ρ̃, −A_i clip(ρ̃, 1 ± ε)) / (−dt_j), mean over the sample's steps, mean over samples.
"""
from __future__ import annotations

import math


def gaussian_logp(x_next, mean, std):
    """(1/D) Σ_d log N(x′_d; μ_d, s²) for flat sequences of D numbers (tensors keep autograd)."""
    D = len(x_next)
    total = 0.0
    for d in range(D):
        total = total + (-(x_next[d] - mean[d]) ** 2 / (2 * std ** 2) - math.log(std)
                         - 0.5 * math.log(2 * math.pi))
    return total / D


def ratio_norm_from_noise(x_next, mean_old, mean_theta, std):
    """mean_d[ξ_d·(μ_θ,d − μ_old,d)] with ξ_d = (x′_d − μ_old,d)/s: RatioNorm's log-ratio."""
    D = len(x_next)
    total = 0.0
    for d in range(D):
        xi = (x_next[d] - mean_old[d]) / std
        total = total + xi * (mean_theta[d] - mean_old[d])
    return total / D


def guard_loss(x_next, mean_old, mean_theta, std, gap, adv, eps):
    """GRPO-Guard's loss: ``x_next[i][j]`` etc. are flat latents of sample i's trained step j,
    ``std[i][j]`` and ``gap[i][j]`` (−dt_j) numbers, ``adv[i]`` a number."""
    rows = []
    for i in range(len(x_next)):
        steps = []
        for j in range(len(x_next[i])):
            x = ratio_norm_from_noise(x_next[i][j], mean_old[i][j], mean_theta[i][j], std[i][j])
            rho = x.exp() if hasattr(x, "exp") else math.exp(x)
            clipped = min(max(rho, 1 - eps), 1 + eps) if not hasattr(rho, "clamp") else \
                rho.clamp(1 - eps, 1 + eps)
            a = adv[i]
            steps.append(max(-a * rho, -a * clipped) / gap[i][j])
        rows.append(sum(steps) / len(steps))
    return sum(rows) / len(rows)


def random_subset_rows(num_rows, K, fraction, generator):
    """The kept columns of each row as DanceGRPO draws them: one ``torch.randperm(K)`` per
    sample, its first ⌊K·fraction⌋ entries, in time order."""
    import torch
    k = math.floor(K * fraction)
    return [sorted(torch.randperm(K, generator=generator)[:k].tolist()) for _ in range(num_rows)]
