"""Slow, obvious float64 oracles for mmrl.diffusion, written from the papers' own forms.

Each formula here is written the way its source code writes it (flow_grpo's factored mean,
DanceGRPO's score form, CPS with sqrt(σ′² − std²)), not the way mmrl writes it, so agreement is a
real check. Test files load it by path (pytest runs in importlib import mode).
"""
from __future__ import annotations

import math

import torch


def _gauss_logp(x_next, mean, std):
    """Per-element N(mean, std²) log-density via torch.distributions, averaged per row."""
    lp = torch.distributions.Normal(mean, std).log_prob(x_next)
    return lp.flatten(1).mean(1)


def step_reference(x, v, sigmas, i, kind, a, x_next):
    """float64 (mean, std [B], logp [B]) of one step, row by row in Python.

    Args:
        x, v, x_next: [B, *L] (any float dtype; computed in float64).
        sigmas: [T+1]. i: B step indices. kind: flow_grpo | dance | cps. a: B noise levels.
    """
    x, v, x_next, sig = (t.double() for t in (x, v, x_next, sigmas))
    means, stds, logps = [], [], []
    for b in range(x.shape[0]):
        s, s_next, lvl = float(sig[i[b]]), float(sig[i[b] + 1]), float(a[b])
        xb, vb, nb = x[b:b + 1], v[b:b + 1], x_next[b:b + 1]
        dt = s_next - s
        if kind == "flow_grpo":
            # flow_grpo sde_step_with_logprob: σ = 1 uses σ_1 = sigmas[1] in the denominator.
            denom_sigma = float(sig[1]) if s == 1.0 else s
            std_t = math.sqrt(s / (1 - denom_sigma)) * lvl
            mean = (xb * (1 + std_t ** 2 / (2 * s) * dt)
                    + vb * (1 + std_t ** 2 * (1 - s) / (2 * s)) * dt)
            std = std_t * math.sqrt(-dt)
        elif kind == "dance":
            # DanceGRPO flux_step: Euler mean plus the score-function drift.
            x0_hat = xb - s * vb
            score = -(xb - x0_hat * (1 - s)) / s ** 2
            mean = xb + dt * vb + (-0.5 * lvl ** 2 * score) * dt
            std = lvl * math.sqrt(-dt)
        elif kind == "cps":
            std = s_next * math.sin(lvl * math.pi / 2)
            x0_hat, x1_hat = xb - s * vb, xb + vb * (1 - s)
            mean = x0_hat * (1 - s_next) + x1_hat * math.sqrt(max(s_next ** 2 - std ** 2, 0.0))
        else:
            raise ValueError(kind)
        if lvl == 0:
            mean, std = xb + dt * vb, 0.0
        if kind == "cps":
            logp = -((nb - mean) ** 2).flatten(1).mean(1)
        elif std == 0:
            logp = torch.zeros(1, dtype=torch.float64)
        else:
            logp = _gauss_logp(nb, mean, torch.full_like(mean, std))
        means.append(mean)
        stds.append(std)
        logps.append(logp)
    return torch.cat(means), torch.tensor(stds, dtype=torch.float64), torch.cat(logps)


def flow_grpo_kl_reference(x, v, v_ref, sigmas, i, a, sde_type):
    """float64 ``[B]`` flow_grpo's ``kl_loss`` (before its batch mean), row by row.

    A transcription of flow_grpo (scripts/train_sd3.py and sd3_sde_with_logprob.py): both means
    from its own mean formula for ``sde_type`` 'sde' or 'cps', then
    ``((prev_sample_mean − prev_sample_mean_ref)²).mean(dims) / (2·std_dev_t²)`` with its
    ``std_dev_t`` (no sqrt(−dt) for 'sde').
    """
    x, v, v_ref, sig = (t.double() for t in (x, v, v_ref, sigmas))
    out = []
    for b in range(x.shape[0]):
        sigma, sigma_prev, lvl = float(sig[i[b]]), float(sig[i[b] + 1]), float(a[b])
        dt = sigma_prev - sigma
        means = []
        for model_output in (v[b:b + 1], v_ref[b:b + 1]):
            sample = x[b:b + 1]
            if sde_type == "sde":
                sigma_max = float(sig[1])
                std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * lvl
                means.append(sample * (1 + std_dev_t ** 2 / (2 * sigma) * dt)
                             + model_output * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt)
            else:
                std_dev_t = sigma_prev * math.sin(lvl * math.pi / 2)
                x0 = sample - sigma * model_output
                x1 = sample + model_output * (1 - sigma)
                means.append(x0 * (1 - sigma_prev)
                             + x1 * math.sqrt(sigma_prev ** 2 - std_dev_t ** 2))
        sq = ((means[0] - means[1]) ** 2).mean(dim=tuple(range(1, x.dim())))
        out.append(sq / (2 * std_dev_t ** 2))
    return torch.cat(out)


def tree_nfe(num_roots, num_steps, splits):
    """Σ_t nodes alive at t: the count a tree sampler must spend ({step: branching})."""
    alive, total = num_roots, 0
    for t in range(num_steps):
        total += alive
        alive *= splits.get(t, 1)
    return total


def group_normalize(values, groups, eps):
    """(r − mean_g)/(std_g + eps) per group with a Python loop; size-1 or constant groups -> 0."""
    out = [0.0] * len(values)
    for g in set(groups):
        members = [k for k, h in enumerate(groups) if h == g]
        vals = [values[k] for k in members]
        if len(vals) < 2 or max(vals) == min(vals):
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((r - mean) ** 2 for r in vals) / (len(vals) - 1))
        for k in members:
            out[k] = (values[k] - mean) / (std + eps)
    return out


def tree_node_rewards(leaf_rewards, parent, leaves):
    """Mean of the leaves below each node, by listing every leaf's ancestors."""
    sums, counts = [0.0] * len(parent), [0] * len(parent)
    for r, leaf in zip(leaf_rewards, leaves):
        node = leaf
        while node >= 0:
            sums[node] += r
            counts[node] += 1
            node = parent[node]
    return [s / c if c else 0.0 for s, c in zip(sums, counts)]
