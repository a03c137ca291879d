"""Pairs and win rates from a rollout's groups (pure tensors, vectorized over groups).

- :func:`best_worst_pairs`: each group's best and worst sample by reward (online DPO pairs;
  flow_grpo's train_sd3_dpo.py, SPPO's y_w / y_l).
- :func:`win_rates`: SPPO's P̂_i = mean_j σ(s_i − s_j) within the group.
- :func:`level_pairs`: TRPA's pairs of samples at distinct preference levels of a group.

``group_ids [B]`` is any integer labelling (not necessarily contiguous or sorted).
"""
from __future__ import annotations

from typing import Tuple

import torch

from mmrl.algo.common import Tensor

__all__ = ["best_worst_pairs", "level_pairs", "win_rates"]


def _check(name: str, values: Tensor, group_ids: Tensor) -> None:
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"{name} must be a 1-D tensor [B], got {got}")
    if not isinstance(group_ids, torch.Tensor) or group_ids.shape != values.shape \
            or group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        got = (f"{group_ids.dtype} {tuple(group_ids.shape)}" if isinstance(group_ids, torch.Tensor)
               else type(group_ids).__name__)
        raise ValueError(f"group_ids must be an integer tensor [B]={tuple(values.shape)}, got "
                         f"{got}; pass the rollout's group ids")


def best_worst_pairs(rewards: Tensor, group_ids: Tensor) -> Tuple[Tensor, Tensor]:
    """``(chosen_rows, rejected_rows)`` LongTensor ``[P]``: per group the row of the highest and
    of the lowest reward, groups in ascending id order.

    Ties go to the first row (lowest index). A group whose rewards are all equal (a group of
    one included) gives no pair: P ≤ G. Differs from flow_grpo, which pairs rows 1 and 0 of an
    all-equal group (a pair with no preference in it).

    Args:
        rewards: ``[B]`` float, finite. group_ids: ``[B]`` integer.

    Raises:
        ValueError: bad shapes or dtypes, or a non-finite reward (rank it first or drop it).
    """
    _check("rewards", rewards, group_ids)
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        raise ValueError(f"rewards must be finite to rank a group; rows {bad[:8]} are not; "
                         f"drop those rows or give them a reward")
    groups, inv = torch.unique(group_ids, return_inverse=True)  # [G], [B]
    B, G = rewards.shape[0], groups.shape[0]
    rows = torch.arange(B, device=rewards.device)
    top = rewards.new_full((G,), -torch.inf).scatter_reduce(0, inv, rewards, "amax")
    low = rewards.new_full((G,), torch.inf).scatter_reduce(0, inv, rewards, "amin")
    first = rows.new_full((G,), B)

    def first_row(at: Tensor) -> Tensor:  # [G] lowest row index where `at`
        return first.scatter_reduce(0, inv, torch.where(at, rows, B), "amin")

    best, worst = first_row(rewards == top[inv]), first_row(rewards == low[inv])
    keep = top > low
    return best[keep], worst[keep]


def win_rates(scores: Tensor, group_ids: Tensor) -> Tensor:
    """``[B]`` P̂_i = (1/N_g)·Σ_{j in g} σ(s_i − s_j), the diagonal counting ½ (SPPO, arXiv
    2405.00675; uclaml/SPPO compute_prob.py with PairRM scores s).

    Built from a ``[B, B]`` matrix: fine for the batch of one optimizer step (B in the
    thousands); a group of one has P̂ = ½.

    Raises:
        ValueError: bad shapes or dtypes.
    """
    _check("scores", scores, group_ids)
    same = group_ids[:, None] == group_ids[None, :]  # [B, B]
    prob = torch.sigmoid(scores[:, None] - scores[None, :])  # [B, B], ½ on the diagonal
    return torch.where(same, prob, 0.0).sum(-1) / same.sum(-1).to(prob.dtype)


def level_pairs(levels: Tensor, group_ids: Tensor, *, kappa: float = 2.5,
                top_level: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
    """``(i, j, scale)`` ``[K]``: every pair of rows of one group with levels[i] < levels[j]
    (lower is better), in row-major order; scale = κ where levels[i] == ``top_level`` else 1.

    TRPA (arXiv 2504.04524; compute_pairwise_policy_loss): levels 1 correct, 2 parsed but wrong,
    3 unparseable, 4 format error; pairs anchored at a correct answer get κβ (pass
    ``scale`` as ``pair_scale`` to a PreferenceLoss with scaled_pairs, e.g. preset trpa).

    Raises:
        ValueError: bad shapes or dtypes.
    """
    _check("levels", levels, group_ids)
    better = (group_ids[:, None] == group_ids[None, :]) & (levels[:, None] < levels[None, :])
    i, j = better.nonzero(as_tuple=True)  # [K] each, row-major
    one = torch.ones((), dtype=torch.get_default_dtype(), device=levels.device)
    scale = torch.where(levels[i] == top_level, one * kappa, one)
    return i, j, scale
