"""The advantage stage of a step: a scored rollout -> a :class:`Batch` (rows, rewards,
advantages, reward metrics) for :func:`mmrl.train.loop.update`.

Under data parallelism a group may span ranks, so the preset's estimator runs on the rewards
gathered from every rank and each rank keeps its own rows' advantages; a policy with the
``row_advantages`` capability (training rows that are not reward rows: tree edges, G²RPO
branches) computes them itself, its groups whole on one rank, and a step advantage
(``algo.step_advantage``, :mod:`mmrl.train.steps`) gives token advantages ``[B, T]``.

What an estimator reads besides the rewards is declared by its flags (never its name): rows'
token counts (``needs_lengths``, gathered with the rewards) and a baseline reward per row
(``needs_baseline``: :func:`greedy_baseline`, the reward of one greedy completion per group,
ReMax) and each row's token-mean old log-prob (``needs_seq_logp``: :func:`row_mean_logp`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from mmrl.algo.advantages import MULTI_REWARD, group_advantages, group_stats
from mmrl.algo.losses import PolicyLoss
from mmrl.train.distributed import Dist, gathered_parameters
from mmrl.train.policy import GroupPolicy, capabilities_of
from mmrl.train.reward_fn import RewardBatch, robust_reward
from mmrl.train.rollout import Rollout

__all__ = ["Batch", "batch_advantages", "compute_advantages", "greedy_baseline", "row_mean_logp"]


def compute_advantages(rewards: RewardBatch, group_ids: torch.Tensor, loss_fn: PolicyLoss,
                       multi_reward: Optional[str] = None,
                       reward_weights: Optional[Dict[str, float]] = None,
                       lengths: Optional[torch.Tensor] = None,
                       baseline: Optional[torch.Tensor] = None,
                       seq_logp: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B]`` advantages from one or several reward columns with the preset's estimator.

    ``multi_reward``: None = the spec's (``algo.multi_reward``); used with several columns, and
    with one when the method declares ``one_column`` (gdpo). ``lengths [B]`` / ``baseline
    [B, K]`` / ``seq_logp [B]``: for estimators that need them (``needs_lengths`` /
    ``needs_baseline`` / ``needs_seq_logp``); entries' extra hyper-parameters come from the spec,
    and a stateful entry's state from ``loss_fn.adv_state`` (updated: call once per step).
    """
    spec = loss_fn.spec
    method = multi_reward or spec.multi_reward
    hp = dict(eps=spec.adv_eps, r_max=spec.r_max, adv_clip=spec.adv_clip, lengths=lengths,
              seq_logp=seq_logp, hparams=spec, state=getattr(loss_fn, "adv_state", None))
    if rewards.values.shape[1] == 1 and not MULTI_REWARD.get(method).one_column:
        return group_advantages(rewards.values[:, 0], group_ids, spec.advantage, **hp,
                                baseline=None if baseline is None else baseline[:, 0])
    weights = [float((reward_weights or {}).get(n, 1.0)) for n in rewards.names]
    return group_advantages(rewards.values, group_ids, method, weights=weights,
                            base=spec.advantage, baseline=baseline, **hp)


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
                     rewards: RewardBatch, *, multi_reward: Optional[str] = None,
                     reward_weights: Optional[Dict[str, float]] = None,
                     dist: Optional[Dist] = None,
                     baseline: Optional[torch.Tensor] = None) -> Batch:
    """The advantages of a scored rollout: the policy's ``advantages`` hook (rows that are not
    reward rows), else the preset's estimator on the rewards gathered over ranks. Rows with an
    invalid (NaN/inf or failed) reward, or a non-finite ``baseline`` (``[len(rollout), K]``,
    :func:`greedy_baseline`), are dropped, or under FSDP masked out."""
    d = dist or Dist()
    if capabilities_of(policy).row_advantages:  # rows != reward rows (trees, G2RPO)
        adv, metrics = _hook_advantages(policy.advantages, rollout, rewards, d, reward_weights)
        return Batch(rollout, rewards, adv, metrics)
    if loss_fn.spec.needs_steps:  # token advantages [B, T] (GiGPO, SPO: mmrl.train.steps)
        from mmrl.train.steps import step_advantages
        rule = lambda r, rw: step_advantages(  # noqa: E731
            r, torch.where(rw.valid, rw.weighted_sum(reward_weights), float("nan")),
            loss_fn.spec)
        adv, metrics = _hook_advantages(rule, rollout, rewards, d, reward_weights)
        return Batch(rollout, rewards, adv, metrics)
    if baseline is not None:  # a failed greedy reward: the rows have no baseline, drop them
        rewards = RewardBatch(rewards.values, rewards.names,
                              rewards.valid & torch.isfinite(baseline).all(-1))
    extras = {"lengths": rollout.mask.sum(-1) if loss_fn.spec.needs_lengths else None,
              "baseline": baseline,
              "seq_logp": row_mean_logp(policy, rollout) if loss_fn.spec.needs_seq_logp else None}
    adv, metrics = _global_advantages(rewards, rollout.group_ids, loss_fn, d, multi_reward,
                                      reward_weights, extras)
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
                       d: Dist, multi_reward: Optional[str], reward_weights,
                       extras: Dict[str, Optional[torch.Tensor]]) -> Tuple[torch.Tensor, Dict]:
    """Advantages of this rank's valid rows, computed on the rewards (and ``extras``: lengths,
    baseline; None when not needed) gathered from every rank (a group may span ranks, and some
    estimators whiten over the whole batch), and the global reward metrics."""
    n_local = torch.tensor([len(rewards.valid)])
    offset = int(d.all_gather_rows(n_local)[:d.rank].sum())
    values = d.all_gather_rows(rewards.values)  # [B_global, K]
    valid = d.all_gather_rows(rewards.valid)
    gids = d.all_gather_rows(group_ids)
    more = {k: None if v is None else d.all_gather_rows(v)[valid] for k, v in extras.items()}
    full = RewardBatch(values[valid], rewards.names, valid[valid])
    adv = torch.zeros(len(valid))
    if len(full.values):
        adv[valid] = compute_advantages(full, gids[valid], loss_fn, multi_reward,
                                        reward_weights, **more).float()
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


def _hook_advantages(fn, rollout: Rollout, rewards: RewardBatch, d: Dist,
                     reward_weights) -> Tuple[torch.Tensor, Dict]:
    """Advantages from ``fn(rollout, rewards)`` (``policy.advantages``, or a step rule: whole
    groups live on one rank), ``[R]`` or token advantages ``[R, T]``, + reward metrics."""
    adv = fn(rollout, rewards).float()  # [R] or [R, T]
    if adv.shape not in ((len(rollout),), tuple(rollout.mask.shape)):
        raise ValueError(f"the advantages hook returned {tuple(adv.shape)}; expected "
                         f"[{len(rollout)}] (one per training row of the rollout) or "
                         f"{list(rollout.mask.shape)} (one per token)")
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


def row_mean_logp(policy: GroupPolicy, rollout: Rollout) -> torch.Tensor:
    """``[B]`` float32: each row's mean old log-prob over its valid tokens (0 for an empty row).

    The sampler's ``rollout.rollout_logp`` when it reported them, else one no-grad scoring pass
    of the policy (``policy.logp`` over every row, before the update: the old policy).
    """
    with torch.no_grad():
        logp = rollout.rollout_logp
        if logp is None:
            logp = policy.logp(rollout, torch.arange(len(rollout)), 0, rollout.mask.shape[1])
        m = rollout.mask
        total = torch.where(m, logp.float().cpu(), torch.zeros((), dtype=torch.float32))
        return total.sum(-1) / m.sum(-1).clamp(min=1)


def _finite_mean(x: torch.Tensor) -> torch.Tensor:
    ok = torch.isfinite(x)
    return x[ok].mean() if ok.any() else torch.tensor(float("nan"))


def greedy_baseline(policy: GroupPolicy, reward_fn, rollout: Rollout,
                    groups: Dict[int, Tuple[Any, Dict[str, Any]]], generator: torch.Generator,
                    *, dist: Optional[Dist] = None, fsdp=None, reward_retries: int = 2,
                    reward_timeout: Optional[float] = None) -> torch.Tensor:
    """``[len(rollout), K]``: each row's baseline, the K reward columns of one greedy
    completion of its group's prompt (ReMax, arXiv 2310.10505); NaN where it failed.

    The groups present on any rank are split over the ranks (group k of the sorted ids on rank
    k mod world), each greedy completion is rolled out once (``policy.greedy_rollout``, under
    no grad; collective under FSDP) and scored with the run's reward, and the rewards are
    shared with every rank.

    Args:
        groups: global group id -> (prompt, metadata) as handed to ``policy.rollout``.
        generator: passed to ``greedy_rollout`` (a greedy decode need not draw from it).
    """
    d = dist or Dist()
    ids = torch.unique(d.all_gather_rows(rollout.group_ids)).tolist()
    mine = [g for k, g in enumerate(ids) if k % d.world == d.rank]
    found: Dict[int, list] = {}
    with gathered_parameters(fsdp), torch.no_grad():
        greedy = policy.greedy_rollout([groups[g][0] for g in mine],
                                       [groups[g][1] for g in mine], generator) if mine else None
    if greedy is not None and len(greedy.samples):
        scored, _ = robust_reward(reward_fn, greedy.samples, greedy.prompts, greedy.metadata,
                                  reward_retries, reward_timeout)
        values = torch.where(scored.valid[:, None], scored.values, float("nan"))
        # a prompt the policy could not use (e.g. an unreadable video) has no row: NaN below
        found = {mine[int(k)]: v.tolist() for k, v in zip(greedy.group_ids, values)}
    table = {g: v for part in d.all_gather_object(found) for g, v in part.items()}
    k = len(next(iter(table.values()))) if table else 1
    nan = [float("nan")] * k
    return torch.tensor([table.get(g, nan) for g in rollout.group_ids.tolist()],
                        dtype=torch.float32).reshape(len(rollout), k)
