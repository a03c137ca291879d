"""Reward weights that adapt during training (dynamic reward weighting, arXiv 2509.11452) and the
fixed-weight multi-objective sum (safe multi-objective GRPO, arXiv 2503.21819).

The scalar reward is r_i = m·Σ_k w_k r_i^k (Σ_k w_k = 1). Two ways to adapt it, both from
yining610/dynamic-reward-weighting:

- hypervolume-guided (:class:`HypervolumeWeighting`): w fixed, the multiplier m grows with how
  much the newest objective vector adds to the hypervolume of the vectors seen so far;
- gradient-based (:func:`gradient_weight_update`): w moves towards the objectives whose policy
  gradients agree most with all the others (influence I_k = Σ_j ⟨g_k, g_j⟩).

Pure math on numbers and tensors; :class:`mmrl.train.reward_weighting.DynamicRewardWeights`
applies them to a run's reward columns.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch

__all__ = ["HypervolumeWeighting", "gradient_weight_update", "hv_multiplier", "hypervolume",
           "influence"]


def hypervolume(points: Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """Volume of ∪_p [ref, p] (every objective maximized): the hypervolume of ``points``.

    A point below ``ref`` in some objective adds nothing there (its box is clamped at ref).
    Exact, by slicing the last objective (HSO: While et al. 2006); fine for the tens of points
    a run's buffer holds. ``points [n, d]``, ``ref [d]``; n = 0 gives 0.
    """
    ref = [float(x) for x in ref]
    pts = [[max(float(x), r) for x, r in zip(p, ref)] for p in points]
    if any(len(p) != len(ref) for p in pts):
        raise ValueError(f"every point needs {len(ref)} objectives (like ref), got lengths "
                         f"{sorted({len(p) for p in pts})}")
    pts = [p for p in pts if all(x > r for x, r in zip(p, ref))]  # zero-volume boxes dropped
    return _hso(pts, ref)


def _hso(pts: List[List[float]], ref: List[float]) -> float:
    if not pts:
        return 0.0
    if len(ref) == 1:
        return max(p[0] for p in pts) - ref[0]
    pts = sorted(pts, key=lambda p: p[-1], reverse=True)
    total = 0.0
    for i, p in enumerate(pts):  # slice between this point's height and the next lower one
        below = pts[i + 1][-1] if i + 1 < len(pts) else ref[-1]
        if p[-1] > below:
            total += _hso([q[:-1] for q in pts[:i + 1]], ref[:-1]) * (p[-1] - below)
    return total


def hv_multiplier(contribution: float) -> float:
    """m = 0.5 + 1.5·tanh(max(c, 0)) ∈ [0.5, 2): the reward multiplier of a hypervolume gain c.

    A vector that adds nothing (c ≤ 0) halves the reward scale; a large gain nearly doubles it.
    yining610/dynamic-reward-weighting ``hypervolumn_contribution.py`` compute_score.
    """
    return 0.5 + 1.5 * math.tanh(max(float(contribution), 0.0))


class HypervolumeWeighting:
    """Hypervolume-guided reward multiplier (arXiv 2509.11452; the authors' code).

    The buffer starts with the first objective vector (the initial model's: also the reference
    point), m = 1. :meth:`update` with a new vector p: c = HV(B ∪ {p}) − HV(B); p joins B when
    c > 0; m = :func:`hv_multiplier` (c). Objectives to minimize are negated first.

    Args:
        maximize: one bool per objective (release: accuracy True, conciseness False, format
            True).
    """

    def __init__(self, maximize: Sequence[bool]):
        self.sign = [1.0 if m else -1.0 for m in maximize]
        self.buffer: List[List[float]] = []
        self.multiplier = 1.0

    def update(self, point: Sequence[float]) -> float:
        """Add an objective vector; returns the new multiplier m (the first call sets ref, m 1)."""
        if len(point) != len(self.sign):
            raise ValueError(f"got {len(point)} objective values, expected {len(self.sign)} "
                             f"(one per entry of maximize)")
        p = [s * float(x) for s, x in zip(self.sign, point)]
        if not self.buffer:
            self.buffer, self.multiplier = [p], 1.0
            return self.multiplier
        before = hypervolume(self.buffer, self.buffer[0])
        gain = hypervolume(self.buffer + [p], self.buffer[0]) - before
        if gain > 0:
            self.buffer.append(p)
        self.multiplier = hv_multiplier(gain)
        return self.multiplier

    def state_dict(self) -> Dict:
        return {"buffer": [list(p) for p in self.buffer], "multiplier": self.multiplier}

    def load_state_dict(self, state: Dict) -> None:
        self.buffer = [list(p) for p in state["buffer"]]
        self.multiplier = float(state["multiplier"])


def influence(grads: torch.Tensor) -> torch.Tensor:
    """I_k = Σ_j ⟨g_k, g_j⟩ ``[K]`` from per-objective gradients ``grads [K, P]`` (fp64)."""
    g = grads.detach().to(torch.float64)
    return (g @ g.t()).sum(1)  # [K, K] -> [K]


def gradient_weight_update(weights: torch.Tensor, influence_k: torch.Tensor, lr: float,
                           reg: float = 1e-5) -> torch.Tensor:
    """w' = softmax(log w + lr·I/reg) ``[K]`` (arXiv 2509.11452, gradient-based weighting).

    ``influence_k [K]``: I_k = Σ_j ⟨g_k, g_j⟩ (:func:`influence` of the per-objective policy
    gradients; the release takes them over layers 10–25 only); ``lr``: the actor's current
    learning rate (η_t); ``reg``: λ_reg = 1e-5 as the release. Updated every step
    (weight_accumulation_steps = 1). No min/max clipping (the release's config has one,
    commented out in its code), so a weight can underflow to 0 and stay there (log 0 = −inf).
    Example: w = (½, ½), I = (2, 0), lr/reg = ½·ln 3 -> (¾, ¼).

    Raises:
        ValueError: negative or all-zero weights, or shapes that do not match.
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    i = torch.as_tensor(influence_k, dtype=torch.float64)
    if w.dim() != 1 or i.shape != w.shape or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"need non-negative weights [K] (not all 0) and influence [K]; got "
                         f"weights {w.tolist()} and influence shape {tuple(i.shape)}")
    return torch.softmax(w.log() + lr * i / reg, 0)
