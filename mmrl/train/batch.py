"""The advantage stage of a step: a scored rollout -> a :class:`Batch` (rows, rewards,
advantages, reward metrics) for :func:`mmrl.train.loop.update`.

Under data parallelism a group may span ranks, so the preset's estimator runs on the rewards
gathered from every rank and each rank keeps its own rows' advantages; a policy with the
``row_advantages`` capability (training rows that are not reward rows: tree edges, G²RPO
branches) computes them itself, its groups whole on one rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from mmrl.algo.advantages import group_advantages, group_stats
from mmrl.algo.losses import PolicyLoss
from mmrl.train.distributed import Dist
from mmrl.train.policy import GroupPolicy, capabilities_of
from mmrl.train.reward_fn import RewardBatch
from mmrl.train.rollout import Rollout

__all__ = ["Batch", "batch_advantages", "compute_advantages"]


def compute_advantages(rewards: RewardBatch, group_ids: torch.Tensor, loss_fn: PolicyLoss,
                       multi_reward: str = "sum_then_normalize",
                       reward_weights: Optional[Dict[str, float]] = None) -> torch.Tensor:
    """``[B]`` advantages from one or several reward columns with the preset's estimator."""
    spec = loss_fn.spec
    hp = dict(eps=spec.adv_eps, r_max=spec.r_max, adv_clip=spec.adv_clip)
    if rewards.values.shape[1] == 1:
        return group_advantages(rewards.values[:, 0], group_ids, spec.advantage, **hp)
    weights = [float((reward_weights or {}).get(n, 1.0)) for n in rewards.names]
    return group_advantages(rewards.values, group_ids, multi_reward, weights=weights,
                            base=spec.advantage, **hp)


@dataclass
class Batch:
    """A step's scored rows, ready for :func:`mmrl.train.loop.update`: this rank's rollout
    (rows whose reward failed dropped, or under FSDP kept with ``row_keep`` False), their
    rewards, ``[len(rollout)]`` advantages, and the reward metrics over every rank's rows."""

    rollout: Rollout
    rewards: RewardBatch
    advantages: torch.Tensor
    metrics: Dict[str, torch.Tensor]

    @property
    def has_samples(self) -> bool:
        """Did any rank keep a valid sample?"""
        return float(self.metrics["samples"]) > 0


def batch_advantages(policy: GroupPolicy, loss_fn: PolicyLoss, rollout: Rollout,
                     rewards: RewardBatch, *, multi_reward: str = "sum_then_normalize",
                     reward_weights: Optional[Dict[str, float]] = None,
                     dist: Optional[Dist] = None) -> Batch:
    """The advantages of a scored rollout: the policy's ``advantages`` hook (rows that are not
    reward rows), else the preset's estimator on the rewards gathered over ranks. Rows with an
    invalid (NaN/inf or failed) reward are dropped, or under FSDP masked out."""
    d = dist or Dist()
    if capabilities_of(policy).row_advantages:  # rows != reward rows (trees, G2RPO)
        adv, metrics = _hook_advantages(policy, rollout, rewards, d, reward_weights)
        return Batch(rollout, rewards, adv, metrics)
    adv, metrics = _global_advantages(rewards, rollout.group_ids, loss_fn, d, multi_reward,
                                      reward_weights)
    if rewards.num_invalid and d.active and d.grad_sync == "fsdp":
        # FSDP needs the same forwards on every rank: keep the rows, mask them out
        keep = rewards.valid
        full = torch.zeros(len(keep))
        full[keep] = adv
        adv, rollout.mask = full, rollout.mask & keep[:, None]
        rollout.row_keep = keep  # dropped rows do not count as sequences
    elif rewards.num_invalid:  # NaN/inf or failed rewards: drop those samples, count them
        rollout, rewards = rollout.select(rewards.valid), rewards.select(rewards.valid)
    return Batch(rollout, rewards, adv, metrics)


def _global_advantages(rewards: RewardBatch, group_ids: torch.Tensor, loss_fn: PolicyLoss,
                       d: Dist, multi_reward: str, reward_weights) -> Tuple[torch.Tensor, Dict]:
    """Advantages of this rank's valid rows, computed on the rewards gathered from every rank
    (a group may span ranks), and the global reward metrics."""
    n_local = torch.tensor([len(rewards.valid)])
    offset = int(d.all_gather_rows(n_local)[:d.rank].sum())
    values = d.all_gather_rows(rewards.values)  # [B_global, K]
    valid = d.all_gather_rows(rewards.valid)
    gids = d.all_gather_rows(group_ids)
    full = RewardBatch(values[valid], rewards.names, valid[valid])
    adv = torch.zeros(len(valid))
    if len(full.values):
        adv[valid] = compute_advantages(full, gids[valid], loss_fn, multi_reward,
                                        reward_weights).float()
    local = adv[offset:offset + len(rewards.valid)][rewards.valid]
    total = full.weighted_sum(reward_weights)
    metrics = {"dropped_samples": (~valid).sum().float(), "samples": valid.sum().float()}
    if len(total):
        gstats = group_stats(total, gids[valid])
        metrics.update({"reward_mean": total.mean(), "reward_std": total.std(unbiased=False),
                        "zero_std_frac": gstats["zero_std_frac"],
                        "adv_abs_mean": adv[valid].abs().mean(),
                        **{f"reward/{n}": full.column(n).mean() for n in full.names}})
    return local, metrics


def _hook_advantages(policy, rollout: Rollout, rewards: RewardBatch, d: Dist,
                     reward_weights) -> Tuple[torch.Tensor, Dict]:
    """Advantages from ``policy.advantages`` (whole groups live on one rank) + reward metrics."""
    adv = policy.advantages(rollout, rewards).float()  # [R]
    if adv.shape != (len(rollout),):
        raise ValueError(f"policy.advantages returned {tuple(adv.shape)}; expected "
                         f"[{len(rollout)}] (one per training row of the rollout)")
    total = d.all_gather_rows(rewards.weighted_sum(reward_weights))
    valid = torch.isfinite(total)
    metrics = {"dropped_samples": (~valid).sum().float(), "samples": valid.sum().float()}
    if valid.any():
        metrics.update({"reward_mean": total[valid].mean(),
                        "reward_std": total[valid].std(unbiased=False),
                        "adv_abs_mean": d.all_gather_rows(adv).abs().mean(),
                        **{f"reward/{n}": _finite_mean(d.all_gather_rows(rewards.column(n)))
                           for n in rewards.names}})
    return adv, metrics


def _finite_mean(x: torch.Tensor) -> torch.Tensor:
    ok = torch.isfinite(x)
    return x[ok].mean() if ok.any() else torch.tensor(float("nan"))
