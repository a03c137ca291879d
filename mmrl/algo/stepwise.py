"""Advantages below the episode: GiGPO's step groups by anchor state (arXiv 2505.10978) and SPO's
segment advantages from Monte-Carlo values at cut points (arXiv 2505.23564, SPO-chain).

Both take what a multi-step task (an agent's steps, or a response cut into segments) knows
besides the outcome: step rewards and repeated states (GiGPO), or each token's sampling
probability and value estimates at cut points (SPO). Pure torch, vectorized, no ``.item()``;
the training rows are the steps (GiGPO: one row per step, ``[S]`` advantages) or the tokens
(SPO: ``[B, T]`` advantages). ``benchmarks/bench_steps.py`` runs both on a tiny chain task;
:mod:`mmrl.train.steps` makes them ``algo.step_advantage`` (token advantages on a job with steps,
``benchmarks/bench_steps_toy.py``).
"""
from __future__ import annotations

from typing import List

import torch

from mmrl.algo.groups import Groups

__all__ = ["discounted_returns", "gigpo_advantages", "spo_chain_advantages", "spo_cut_points"]

GIGPO_MODES = ("mean_std_norm", "mean_norm")


def discounted_returns(step_rewards: torch.Tensor, traj_ids: torch.Tensor, steps: torch.Tensor,
                       gamma: float) -> torch.Tensor:
    """R_t = Σ_{k ≥ t} γ^(k−t) r_k within each trajectory ``[S]`` (GiGPO eq. 5).

    Rows may come in any order: ``traj_ids [S]`` and ``steps [S]`` (the step index t) place them.
    O(S²) pairwise sums (S = a batch's steps, thousands at most): exact and loop-free.
    """
    later = (traj_ids[None, :] == traj_ids[:, None]) & (steps[None, :] >= steps[:, None])  # [S, S]
    power = (steps[None, :] - steps[:, None]).clamp(min=0).to(step_rewards.dtype)
    discount = torch.where(later, torch.as_tensor(gamma, dtype=step_rewards.dtype) ** power, 0.0)
    return discount @ step_rewards  # [S, S] @ [S] -> [S]


def _normalized(values: torch.Tensor, keys: torch.Tensor, mode: str, eps: float) -> torch.Tensor:
    """(v − mean_key)/(F + eps), F = unbiased std (mean_std_norm) or 1; size-1 / constant -> 0."""
    uniq, inv = torch.unique(keys, return_inverse=True)
    g = Groups(values, inv, uniq.numel())
    scale = g.std[inv] + eps if mode == "mean_std_norm" else torch.ones_like(values)
    return g.zero_where_constant((values - g.mean[inv]) / scale)


def gigpo_advantages(step_rewards: torch.Tensor, traj_ids: torch.Tensor, steps: torch.Tensor,
                     group_ids: torch.Tensor, anchors: torch.Tensor, *, gamma: float = 0.95,
                     omega: float = 1.0, mode: str = "mean_std_norm",
                     eps: float = 1e-6) -> torch.Tensor:
    """A = A^E + ω·A^S per step row ``[S]`` (GiGPO, arXiv 2505.10978 eq. 8).

    - A^E: the episode return R(τ) = Σ_t r_t of the row's trajectory, normalized over every step
      row of its episode group (``group_ids``: trajectories from the same initial state; eq. 3);
    - A^S: the discounted return R_t (:func:`discounted_returns`, eq. 5) normalized over its
      step group: the rows of one episode group whose ``anchors`` (ids of the observed state,
      exact match; eq. 6) are equal (eq. 7).

    F = unbiased std (``mean_std_norm``, the example scripts) or 1 (``mean_norm``, the config
    default); eps 1e-6. A singleton step group, a size-1 group and a group whose values are all
    equal get 0 (their term).
    Differs from verl-agent ``core_gigpo.py``: a singleton episode group gets 0 (verl-agent:
    mean 0, std 1, so A^E = R); anchors are exact ids (the optional text-similarity grouping is
    not built); R(τ) is the undiscounted sum of the step rewards.

    Args:
        step_rewards: ``[S]`` float, r_t of each step (env reward, minus any penalty).
        traj_ids, steps, group_ids, anchors: ``[S]`` integer: trajectory, step index t within
            it, episode group, anchor-state id.

    Raises:
        ValueError: unknown mode or mismatched shapes.
    """
    if mode not in GIGPO_MODES:
        raise ValueError(f"unknown GiGPO mode {mode!r}; expected one of {GIGPO_MODES}")
    shapes = {t.shape for t in (step_rewards, traj_ids, steps, group_ids, anchors)}
    if len(shapes) != 1 or step_rewards.dim() != 1:
        raise ValueError(f"step_rewards, traj_ids, steps, group_ids and anchors must all be [S]; "
                         f"got shapes {sorted(tuple(s) for s in shapes)}")
    uniq, tinv = torch.unique(traj_ids, return_inverse=True)
    episode = torch.zeros(uniq.numel(), dtype=step_rewards.dtype).index_add_(
        0, tinv, step_rewards)[tinv]  # [S] R(τ) of each row's trajectory
    a_e = _normalized(episode, group_ids, mode, eps)
    # step groups: (episode group, anchor) pairs, one key per pair
    _, ginv = torch.unique(group_ids, return_inverse=True)
    _, ainv = torch.unique(anchors, return_inverse=True)
    key = ginv * (int(ainv.max()) + 1 if len(ainv) else 1) + ainv
    a_s = _normalized(discounted_returns(step_rewards, traj_ids, steps, gamma), key, mode, eps)
    return a_e + omega * a_s


def spo_cut_points(token_probs: torch.Tensor, mask: torch.Tensor, threshold: float = 0.9,
                   interval: int = 5) -> List[torch.Tensor]:
    """Per row, the kept cut points c = t − 1 of the tokens t with p_t < threshold, every
    ``interval``-th from the first (SPO-chain; the release's ``[::cutpoint_interval]``).

    c = −1 means "before the first token" (its value is V(prompt)). Returns B LongTensors
    (ragged: rows differ in how many uncertain tokens they have).
    """
    out = []
    for p, m in zip(token_probs, mask):  # per row: ragged by nature
        t = torch.nonzero((p < threshold) & m)[:, 0]
        out.append((t - 1)[::interval])
    return out


def spo_chain_advantages(token_probs: torch.Tensor, mask: torch.Tensor, cuts: torch.Tensor,
                         values: torch.Tensor, rewards: torch.Tensor,
                         threshold: float = 0.9) -> torch.Tensor:
    """SPO-chain token advantages ``[B, T]`` (arXiv 2505.23564; AIFrameResearch/SPO
    ``_compute_token_advantages``).

    Token values: V(c_k) at each kept cut point c_k (``cuts [B, C]``, −2 = padding, −1 = the
    prompt; ``values [B, C]``) and the reward r at the row's last valid token. The token holding
    a value gets (its value − the previous value) — 0 at the first valued token unless c_1 = −1
    (then V(prompt) is the base); every other token takes the advantage of the next valued token
    at or after it (segment (c_{k−1}, c_k] shares it); tokens with p_t > threshold get 0. A row
    without any cut point gets 0 everywhere (the release). Padding gets 0.
    """
    b, t_len = mask.shape
    dtype = rewards.dtype
    val = torch.full((b, t_len), float("nan"), dtype=dtype)
    last = (mask.sum(-1) - 1).clamp(min=0)  # [B] last valid token
    val[torch.arange(b), last] = rewards
    inside = cuts >= 0
    rows = torch.arange(b)[:, None].expand_as(cuts)
    val[rows[inside], cuts[inside]] = values[inside].to(dtype)
    has_base = (cuts == -1).any(-1)  # [B]
    base = torch.where(cuts == -1, values.to(dtype), 0.0).sum(-1)  # [B] V(prompt) where given
    valued = ~torch.isnan(val)
    # previous value of each valued token: forward-fill over the valued positions
    idx = torch.where(valued, torch.arange(t_len)[None, :], -1)
    prev_idx = torch.cat([torch.full((b, 1), -1), idx.cummax(-1).values[:, :-1]], 1)
    prev = torch.where(prev_idx >= 0, val.gather(1, prev_idx.clamp(min=0)), base[:, None])
    has_prev = (prev_idx >= 0) | has_base[:, None]
    adv_at = torch.where(valued & has_prev, val - prev, torch.zeros_like(val))
    adv_at = torch.where(valued, adv_at, float("nan"))
    # every token takes the advantage of the next valued token at or after it (backward fill)
    nxt = torch.where(valued, torch.arange(t_len)[None, :], t_len)
    nxt = nxt.flip(-1).cummin(-1).values.flip(-1).clamp(max=t_len - 1)
    adv = adv_at.gather(1, nxt)
    no_cut = ~(cuts >= -1).any(-1)  # [B] not even the prompt is a cut point
    keep = mask & (token_probs <= threshold) & ~no_cut[:, None] & ~torch.isnan(adv)
    return torch.where(keep, adv, torch.zeros_like(adv))
