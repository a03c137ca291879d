"""Guidance in the budget simulator: hinted re-rolls of all-fail groups (mmrl.train.guidance's
GHPO, Scaf-GRPO, Guide and XRPO's in-context seeding, reduced to a Bernoulli prompt).

A tabular prompt has no context, so what a hint does is **mmrl's modelling assumption**, with
three constants (all options of ``mmrl sim budget``; the docs sweep the ones that decide):

- **hint level l raises the logit by l·g**: a rollout of prompt i under a level-l hint succeeds
  with ``p_l = σ(θ_i + l·g)`` (``hint_gain`` g, levels 1 … ``hint_levels`` L; GHPO's prefix
  ratios .25/.5/.75 are levels 1–3, Scaf-GRPO's tiers its levels, Guide's full hint level L,
  XRPO's exemplars of *other* prompts level 1).
- **on-policy hinted rows move the plain prompt by a fraction τ** (``hint_transfer``): GHPO and
  Scaf train a hinted row under the hinted prompt; in the model its GRPO term
  ``A_j (r_j − p_l)`` (the exact score of the hinted Bernoulli) is applied to θ_i times τ —
  τ = 1: what the hinted context learns is learnt for the plain prompt; τ = 0: nothing is.
- **rows trained for the plain prompt** (Guide, XRPO seeding: ``retarget``) use the plain
  prompt's score ``r_j − p`` (p = σ(θ_i)), the exact off-policy gradient of the plain Bernoulli,
  times an importance weight: Guide the truncated rollout correction
  ``w = min(π(r|q) / π(r|q,h), is_cap)`` (``algo.rollout_is: token_truncate``, C_max 3),
  XRPO seeding w = 1 (``algo.rollout_is: none``, like ExPO).

A group is all-fail when it has >= 2 rows and no success. Per mode: ``ghpo`` re-rolls such a
group whole at level 1, then 2, … while it stays all-fail; ``scaf`` samples every level once
and the lowest successful one replaces the group's first row; ``guide`` re-rolls the group whole
at level L; ``xrpo_seed`` re-rolls it whole at level 1. Every re-rolled sample counts against
the run's rollout budget.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import torch

from mmrl.budget.sim_config import GUIDANCE_MODES

__all__ = ["GUIDANCE_MODES", "apply_guidance"]


def _per_group(inv: torch.Tensor, n: int, values: torch.Tensor) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64).index_add_(0, inv, values.double())


def apply_guidance(mode: str, logits: torch.Tensor, sample_prompts: torch.Tensor,
                   rewards: torch.Tensor, group_ids: torch.Tensor, s,
                   generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor,
                                                        torch.Tensor, Dict[str, int]]:
    """Re-roll the all-fail groups of one try by ``mode`` (see the module).

    Args:
        logits: ``[P]`` the plain prompts' θ.
        sample_prompts, rewards, group_ids: ``[B]`` the try's rows.
        s: :class:`mmrl.budget.sim_config.SimSettings` (hint_gain, hint_levels, hint_transfer,
            is_cap).

    Returns:
        ``(rewards [B], q [B], c [B], stats)``: the rows' rewards after guidance, the success
        probability each row's score uses (``r − q``), the factor on its GRPO term, and
        ``guided_groups`` / ``guided_rescued`` / ``guided_rollouts`` (extra samples drawn).
    """
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"guidance {mode!r}: expected one of {', '.join(GUIDANCE_MODES)}")
    theta = logits[sample_prompts]  # [B]
    p = torch.sigmoid(theta)
    stats = {"guided_groups": 0, "guided_rescued": 0, "guided_rollouts": 0}
    if mode == "none" or rewards.numel() == 0:
        return rewards, p.clone(), torch.ones_like(p), stats
    ids, inv = group_ids.unique(return_inverse=True)  # inv: [B] row -> group slot
    n = _per_group(inv, len(ids), torch.ones_like(rewards))
    dead = (n >= 2) & (_per_group(inv, len(ids), rewards) == 0)  # [G] all-fail slots
    rows = _GuidedRows(theta, p, rewards.clone(), p.clone(), torch.ones_like(p), inv, len(ids))
    stats["guided_groups"] = int(dead.sum())
    drawn = {"ghpo": _staged, "scaf": _lowest_level, "guide": _whole,
             "xrpo_seed": _whole}[mode](rows, dead, mode, s, generator)
    won = _per_group(inv, len(ids), rows.rewards) > 0
    stats.update(guided_rescued=int((dead & won).sum()), guided_rollouts=drawn)
    return rows.rewards, rows.q, rows.c, stats


@dataclasses.dataclass
class _GuidedRows:
    """A try's rows as guidance edits them (``[B]`` each; ``inv``: row -> group slot)."""
    theta: torch.Tensor
    p: torch.Tensor
    rewards: torch.Tensor
    q: torch.Tensor
    c: torch.Tensor
    inv: torch.Tensor
    groups: int


def _bernoulli(p: torch.Tensor, generator) -> torch.Tensor:
    return (torch.rand(p.shape, generator=generator, dtype=torch.float64) < p).double()


def _staged(x: _GuidedRows, dead, mode, s, generator) -> int:
    """GHPO: whole group at level 1, 2, … while it stays all-fail; on-policy (q = p_l, c = τ)."""
    todo, drawn = dead[x.inv], 0
    for level in range(1, s.hint_levels + 1):
        if not todo.any():
            break
        ph = torch.sigmoid(x.theta + level * s.hint_gain)
        new = _bernoulli(ph, generator)
        x.rewards, x.q = torch.where(todo, new, x.rewards), torch.where(todo, ph, x.q)
        x.c = torch.where(todo, torch.full_like(x.c, s.hint_transfer), x.c)
        drawn += int(todo.sum())
        won = _per_group(x.inv, x.groups, torch.where(todo, new, 0.0)) > 0
        todo = todo & ~won[x.inv]
    return drawn


def _whole(x: _GuidedRows, dead, mode, s, generator) -> int:
    """Guide (level L, truncated IS weight) / XRPO seeding (level 1, w = 1): whole group,
    trained for the plain prompt (q stays p)."""
    rows = dead[x.inv]
    ph = torch.sigmoid(x.theta + (s.hint_levels if mode == "guide" else 1) * s.hint_gain)
    new = _bernoulli(ph, generator)
    x.rewards = torch.where(rows, new, x.rewards)
    if mode == "guide":
        w = torch.where(new > 0, x.p / ph, (1 - x.p) / (1 - ph)).clamp(max=s.is_cap)
        x.c = torch.where(rows, w, x.c)
    return int(rows.sum())


def _lowest_level(x: _GuidedRows, dead, mode, s, generator) -> int:
    """Scaf-GRPO: one sample per level; the lowest success replaces the group's first row."""
    first = torch.full((x.groups,), len(x.rewards), dtype=torch.long).scatter_reduce_(
        0, x.inv, torch.arange(len(x.rewards)), "amin")[dead]  # [D] first row of each group
    lv = torch.arange(1, s.hint_levels + 1, dtype=torch.float64)
    ph = torch.sigmoid(x.theta[first, None] + s.hint_gain * lv[None, :])  # [D, L]
    hit = _bernoulli(ph, generator) > 0
    ok = hit.any(1)
    lowest = hit.double().argmax(1)  # the first level that succeeded
    swap = first[ok]
    x.rewards[swap], x.q[swap], x.c[swap] = 1.0, ph[ok, lowest[ok]], s.hint_transfer
    return int(ph.numel())
