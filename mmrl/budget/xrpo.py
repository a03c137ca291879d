"""XRPO's rollout allocation by uncertainty reduction (arXiv 2510.06672), in two phases.

Every prompt of the batch first gets ``n_first`` rollouts. The uncertainty of its mean reward
is the half-width of the Student-t confidence interval h_q(n) = t_{1−α/2, n−1}·s_q/√n (s_q the
sample std, unbiased). The rest of the budget goes, one rollout at a time, to the prompt whose
next rollout shrinks h the most, Δ_q(n) = h_q(n) − h_q(n + 1) with s_q held fixed; Δ falls with
n, so taking the largest Δ's over all (prompt, n) at once is the same greedy allocation (as
:func:`mmrl.budget.allocate.knapsack_allocate`).

Status: the half-width h_q(n_q) is the paper's (read in a summary of its §3; the paper's text
and UIUC-MLSys/XRPO were not reachable here); the greedy Δh rule, α = 0.05, the two phases'
sizes and the absence of the paper's exploration bonus (its form is unconfirmed) are mmrl's.
A prompt whose first rollouts agree (s_q = 0) has Δ = 0 and gets extra rollouts only when
every prompt's Δ is 0 (ties spread evenly); the paper's in-context seeding of zero-reward
prompts is a guidance mode (``guidance: xrpo_seed``, :class:`mmrl.train.guidance.ExemplarSeeds`).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Tuple

import torch

__all__ = ["ci_half_width", "t_critical", "two_phase_rollout", "xrpo_allocate"]


def _t_two_sided_mass(t: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """P(|T_ν| < t) for integer ν ≥ 1, exactly (Abramowitz & Stegun 26.7.3 / 26.7.4)."""
    theta = torch.atan(t / nu.sqrt())
    c2, s = torch.cos(theta) ** 2, torch.sin(theta)
    odd = (nu % 2) == 1
    term = torch.where(odd, torch.cos(theta), torch.ones_like(t))  # first term of the series
    total = term.clone()
    k = torch.where(odd, torch.ones_like(nu), torch.zeros_like(nu))  # running power index
    for _ in range(int(nu.max()) // 2):
        k = k + 2
        active = k <= nu - 2
        term = torch.where(active, term * c2 * (k - 1) / k, term)
        total = torch.where(active, total + term, total)
    return torch.where(odd, (2 / math.pi) * (theta + s * torch.where(nu > 1, total, 0.0 * total)),
                       s * total)


def t_critical(alpha: float, nu: torch.Tensor) -> torch.Tensor:
    """t_{1−α/2, ν}: the two-sided critical value of Student's t, ``nu`` integer ≥ 1 (float64).

    Bisection on the exact CDF to 1e-13: ν = 1, α = 0.05 -> 12.7062; ν = 10 -> 2.2281.
    """
    nu = torch.as_tensor(nu, dtype=torch.float64)
    if (nu < 1).any() or (nu != nu.round()).any() or not 0 < alpha < 1:
        raise ValueError(f"t_critical needs integer degrees of freedom >= 1 and 0 < alpha < 1; "
                         f"got nu in [{float(nu.min())}, {float(nu.max())}], alpha {alpha}")
    lo, hi = torch.zeros_like(nu), torch.full_like(nu, 1e4)
    for _ in range(60):  # 1e4 / 2^60 ≈ 1e-14
        mid = (lo + hi) / 2
        below = _t_two_sided_mass(mid, nu) < 1 - alpha
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def ci_half_width(std: torch.Tensor, n: torch.Tensor, alpha: float = 0.05) -> torch.Tensor:
    """h(n) = t_{1−α/2, n−1}·s/√n, n ≥ 2 (XRPO's uncertainty of a prompt's mean reward)."""
    n = torch.as_tensor(n, dtype=torch.float64)
    return t_critical(alpha, n - 1) * torch.as_tensor(std, dtype=torch.float64) / n.sqrt()


@functools.lru_cache(maxsize=16)
def _unit_half_widths(alpha: float, n_first: int, n_max: int) -> torch.Tensor:
    """h(n)/s = t_{1−α/2, n−1}/√n for n = n_first … n_max (the t values do not depend on s)."""
    return ci_half_width(1.0, torch.arange(n_first, n_max + 1, dtype=torch.float64), alpha)


def xrpo_allocate(std: torch.Tensor, budget: int, n_first: int, n_max: int,
                  alpha: float = 0.05) -> torch.Tensor:
    """Rollouts per prompt ``N [P]`` (``N.sum() == budget``): ``n_first`` each, the rest by the
    largest reductions Δ_q(n) = h_q(n) − h_q(n + 1) of the confidence half-width.

    Args:
        std: ``[P]`` the first phase's reward std per prompt (unbiased).
        budget: total rollouts of the step, in [P·n_first, P·n_max].
        n_first: first-phase rollouts per prompt (>= 2: a std needs two).
        n_max: cap per prompt.

    Raises:
        ValueError: bounds or budget out of range.
    """
    std = torch.as_tensor(std, dtype=torch.float64)
    num = std.numel()
    if n_first < 2 or n_max < n_first or not num * n_first <= budget <= num * n_max:
        raise ValueError(f"xrpo_allocate: need 2 <= n_first <= n_max and P·n_first <= budget "
                         f"<= P·n_max; got n_first {n_first}, n_max {n_max}, P {num}, budget "
                         f"{budget}")
    counts = torch.full((num,), n_first, dtype=torch.long)
    extra = budget - num * n_first
    if extra:
        h = std[:, None] * _unit_half_widths(alpha, n_first, n_max)[None, :]  # [P, n_max−n_first+1]
        gains = (h[:, :-1] - h[:, 1:]).t().reshape(-1)  # column-major: ties by n, then prompt
        order = torch.sort(gains, descending=True, stable=True).indices[:extra]
        counts += torch.bincount(order % num, minlength=num)
    return counts


def two_phase_rollout(rollout: Callable, prompts: torch.Tensor, budget: int, n_first: int,
                      n_max: int, alpha: float = 0.05
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Roll out ``n_first`` per prompt, then the rest of ``budget`` by :func:`xrpo_allocate`.

    ``rollout(prompts, counts) -> (sample_prompts [B], rewards [B], group_ids [B])`` with group
    j = ``prompts[j]`` (as :meth:`mmrl.budget.sim.PromptPopulation.rollout`). Returns the two
    phases' rows together (a prompt's rows share its group id) and the counts ``[P]``.
    """
    first = torch.full((len(prompts),), n_first, dtype=torch.long)
    sp1, r1, g1 = rollout(prompts, first)
    mean = torch.zeros(len(prompts), dtype=torch.float64).index_add_(0, g1, r1.double()) / n_first
    var = torch.zeros(len(prompts), dtype=torch.float64).index_add_(
        0, g1, (r1.double() - mean[g1]) ** 2) / (n_first - 1)
    counts = xrpo_allocate(var.sqrt(), budget, n_first, n_max, alpha)
    sp2, r2, g2 = rollout(prompts, counts - n_first)
    return torch.cat([sp1, sp2]), torch.cat([r1, r2]), torch.cat([g1, g2]), counts
