"""Slow, obvious oracles for MixGRPO and G²RPO as their authors' code runs them, written from
/work/shared/ALGORITHMS-flow.md ("MixGRPO", "G²RPO", the "dpm2" line under DiffusionNFT):
float64 Python loops, the schedule state machine iterated one rollout at a time, the post grid
from MixGRPO's own formula. Nothing here imports mmrl.
"""
from __future__ import annotations

import math

import torch


def _alpha_lam(sigma):
    alpha = 1.0 - sigma
    lam = math.log(alpha) - math.log(sigma) if 0 < sigma < 1 else (
        -math.inf if sigma >= 1 else math.inf)
    return alpha, lam


def dpm2_ode(velocity_fn, x, sigmas, start=0, history=None):
    """DPM-Solver++ 2M over ``sigmas[start:]`` in float64; returns (x, evaluations per row).

    ``history``: list of (σ, x̂0) of earlier steps. Step to σ_t from s0 with s1 = the previous
    history entry: first order (DDIM η = 0 in its α/σ form) when the history is empty, σ_t = 0
    or α_s1 = 0; otherwise the midpoint 2M update.
    """
    x = x.double()
    hist = list(history or [])
    sig = [float(s) for s in sigmas]
    evals = 0
    for j in range(start, len(sig) - 1):
        s0, t = sig[j], sig[j + 1]
        v = velocity_fn(x.float(), torch.full((x.shape[0],), s0), None).double()
        evals += 1
        d0 = x - s0 * v
        alpha_t, lam_t = _alpha_lam(t)
        alpha_s0, lam_s0 = _alpha_lam(s0)
        if not hist or t == 0.0 or hist[-1][0] >= 1.0:
            if t == 0.0:
                x_new = d0
            else:  # DDIM: x_t = σ_t/σ_s0 · x − α_t (e^{−h} − 1) D0
                h = lam_t - lam_s0
                x_new = t / s0 * x - alpha_t * (math.exp(-h) - 1.0) * d0
        else:
            s1, d_prev = hist[-1]
            _, lam_s1 = _alpha_lam(s1)
            h = lam_t - lam_s0
            r0 = (lam_s0 - lam_s1) / h
            d1 = (d0 - d_prev) / r0
            x_new = t / s0 * x - alpha_t * (math.exp(-h) - 1.0) * (d0 + 0.5 * d1)
        hist.append((s0, d0))
        x = x_new
    return x, evals


def mixgrpo_post_grid(num_steps, last, c, shift):
    """MixGRPO-Flash: n = ⌊max((T − last)·c, 1)⌋, shift(linspace(1 − (last+1)/T, 0, n))."""
    n = int(math.floor(max((num_steps - last) * c, 1)))
    u_star = 1.0 - (last + 1) / num_steps
    us = [u_star + (0.0 - u_star) * i / (n - 1) for i in range(n)] if n > 1 else [u_star]
    return [shift * u / (1 + (shift - 1) * u) for u in us]


class WindowStates:
    """MixGRPO's GRPOTrainingStates, literally: read ``window()``, then ``update()`` once per
    iteration."""

    def __init__(self, strategy, num_steps, W, iters_per_group, overlap_step, roll_back=True,
                 n_max=10, n_min=1, tau=13, k=0.1, rng=None):
        self.strategy, self.W, self.M = strategy, W, num_steps - 2
        self.every, self.step, self.roll_back = iters_per_group, overlap_step, roll_back
        self.n_max, self.n_min, self.tau, self.k, self.rng = n_max, n_min, tau, k, rng
        self.cur, self.count = 0, 0

    def window(self):
        if self.strategy == "random":
            self.cur = int(torch.randint(0, self.M - self.W + 1, (1,), generator=self.rng))
        return list(range(self.cur, min(self.cur + self.W, self.M)))

    def _dwell(self):
        if self.strategy == "decay":
            return max(self.n_min, math.floor(self.n_max * (1 - self.cur / self.M)
                                              + self.n_min * self.cur / self.M))
        if self.strategy == "exp_decay":
            return math.ceil(self.every * math.exp(-self.k * max(0, self.cur - self.tau)))
        return self.every

    def update(self):
        if self.strategy == "random":
            return
        self.count += 1
        if self.count >= self._dwell():
            self.count = 0
            self.cur += self.step
            if self.cur > self.M:
                self.cur = 0 if self.roll_back else self.M


def g2rpo_image(velocity_fn, x_k1, sigmas, k, g):
    """The authors' completion after the SDE step at k: S = σ[0:k+2] ⊕ σ[k+2::g]; Euler over S
    at positions k+1 … |S| − 3, and at the last evaluated position |S| − 2 the image
    x̂0 = z − σ·v. Returns (x̂0 in float64, evaluations per row)."""
    sig = [float(s) for s in sigmas]
    S = sig[:k + 2] + sig[k + 2::g]
    z, evals = x_k1.double(), 0
    for j in range(k + 1, len(S) - 1):
        v = velocity_fn(z.float(), torch.full((z.shape[0],), S[j]), None).double()
        evals += 1
        if j == len(S) - 2:
            return z - S[j] * v, evals
        z = z + (S[j + 1] - S[j]) * v
    raise ValueError("empty completion")
