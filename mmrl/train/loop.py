"""The shared GRPO loop: rollout -> rewards -> advantages -> K epochs of micro-batched updates.

Both domains drive it through :class:`GroupPolicy`: a policy rolls out a group per prompt and
recomputes ``logp [b, t]`` for a slice of samples and of T (tokens for a language model, trained
denoising steps for a flow-matching model). The loop never knows which.

Micro-batches split along samples (``micro_batch_size``) and along T (``t_chunk``); the loss
receives the mini-batch's global token and sequence counts (and each row's full length), so the
accumulated gradient equals the unsplit step's (tests/test_loop.py checks it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from mmrl.algo.advantages import group_advantages, group_stats
from mmrl.train.distributed import Dist, fsdp_lockstep, idle_pass, most_over_ranks
from mmrl.algo.losses import PolicyLoss
from mmrl.train.reward_fn import RewardBatch, robust_reward
from mmrl.train.policy import Capabilities, GroupPolicy, capabilities_of  # noqa: F401
from mmrl.train.rollout import Rollout, concat_rollouts  # noqa: F401

__all__ = ["Rollout", "GroupPolicy", "LoopSettings", "compute_advantages", "update", "collect",
           "concat_rollouts", "learn", "train_step"]


@dataclass
class LoopSettings:
    """The loop's knobs (a subset of :class:`mmrl.config.schema.TrainConfig`)."""

    group_size: int = 8
    inner_epochs: int = 1
    num_mini_batches: int = 1
    micro_batch_size: int = 0
    t_chunk: int = 0
    max_grad_norm: float = 1.0


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


def _chunks(n: int, size: int):
    size = size if size > 0 else max(n, 1)
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _mini_batches(rollout: Rollout, k: int, needs_groups: bool, gen: torch.Generator):
    """Exactly k mini-batches of row indices (some may be empty on a small data-parallel shard,
    so every rank runs the same number of optimizer steps); whole groups when needed."""
    if not needs_groups or len(rollout) == 0:
        perm = torch.randperm(len(rollout), generator=gen)
        return [perm[i * len(perm) // k:(i + 1) * len(perm) // k] for i in range(k)]
    _, inv = torch.unique(rollout.group_ids, return_inverse=True)
    order = torch.randperm(int(inv.max()) + 1, generator=gen)
    groups = [(inv == g).nonzero().flatten() for g in order.tolist()]
    return [torch.cat(part) if part else torch.zeros(0, dtype=torch.long)
            for part in _split_list(groups, k)]


def _split_list(items, k):
    n = len(items)
    return [items[i * n // k:(i + 1) * n // k] for i in range(k)]


@torch.no_grad()
def _score_all(fn, rollout: Rollout, micro: int, t_chunk: int,
               lockstep: Optional[Dist] = None) -> torch.Tensor:
    """No-grad ``fn(rollout, rows, t0, t1)`` over the whole rollout -> [B, T]; ``lockstep``
    (FSDP): idle calls up to the most calls any rank makes."""
    T = rollout.mask.shape[1]
    rows_out = []
    chunks = _chunks(len(rollout), micro)
    idle = 0 if lockstep is None else most_over_ranks(len(chunks), lockstep) - len(chunks)
    for a, b in chunks:
        rows = torch.arange(a, b)
        rows_out.append(torch.cat([fn(rollout, rows, t0, t1).detach().float()
                                   for t0, t1 in _chunks(T, t_chunk)], dim=1))
    for _ in range(idle):
        fn(rollout, torch.arange(1), 0, T)
    return torch.cat(rows_out, dim=0)


def update(policy: GroupPolicy, optimizer: torch.optim.Optimizer, loss_fn: PolicyLoss,
           rollout: Rollout, advantages: torch.Tensor, s: LoopSettings,
           generator: torch.Generator, token_weights: Optional[torch.Tensor] = None,
           dist: Optional[Dist] = None) -> Dict[str, torch.Tensor]:
    """K epochs of mini-batch updates on one rollout; returns detached averaged stats.

    With ``dist`` (data parallel), each rank holds its shard of every mini-batch: the loss is
    normalized by the mini-batch's global token/sequence counts and gradients are summed across
    ranks before clipping, so the step equals the single-process step on the global batch.
    """
    d = dist or Dist()
    spec = loss_fn.spec
    on_policy = s.inner_epochs == 1 and s.num_mini_batches == 1
    t_chunk = 0 if spec.sequence_level else s.t_chunk
    lockstep = fsdp_lockstep(d, len(rollout), t_chunk)
    old_logp = None if on_policy else _score_all(policy.logp, rollout, s.micro_batch_size,
                                                 t_chunk, lockstep)
    own_kl = policy.logp_and_kl if spec.needs_ref and capabilities_of(policy).own_kl else None
    ref_logp = (_score_all(policy.ref_logp, rollout, s.micro_batch_size, t_chunk)
                if spec.needs_ref and own_kl is None else None)
    seq_lens = rollout.mask.sum(-1)  # [B] full lengths, exact under T chunking
    T = rollout.mask.shape[1]
    # not policy.parameters(): under FSDP2 it may list a unit's temporary unsharded tensors
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    totals: Dict[str, torch.Tensor] = {}
    n_updates, skipped = 0, 0
    for _ in range(s.inner_epochs):
        for mb in _mini_batches(rollout, s.num_mini_batches, spec.needs_groups, generator):
            optimizer.zero_grad(set_to_none=True)
            keep = rollout.data.get("row_keep")
            n_seqs = torch.tensor(len(mb)) if keep is None else keep[mb].sum()
            counts = d.all_reduce_sum(torch.stack([rollout.mask[mb].sum(), n_seqs]).float())
            norm = dict(num_tokens=counts[0], num_seqs=counts[1])  # global counts
            micro = _chunks(len(mb), s.micro_batch_size)
            idle = 0 if lockstep is None else most_over_ranks(len(micro), d) - len(micro)
            for a, b in micro:
                rows = mb[a:b]
                for t0, t1 in _chunks(T, t_chunk):
                    logp, kl = ((policy.logp(rollout, rows, t0, t1), None) if own_kl is None
                                else own_kl(rollout, rows, t0, t1))
                    old = logp.detach() if on_policy else old_logp[rows, t0:t1].to(logp)
                    loss, stats = loss_fn(
                        logp, old, advantages[rows].to(logp), rollout.mask[rows, t0:t1].to(
                            logp.device),
                        ref_logp=None if ref_logp is None else ref_logp[rows, t0:t1].to(logp),
                        token_weights=None if token_weights is None else
                        token_weights[rows, t0:t1].to(logp),
                        group_ids=rollout.group_ids[rows], seq_lens=seq_lens[rows],
                        kl=None if kl is None else kl.to(logp), **norm)
                    loss.backward()
                    _accumulate(totals, stats)
                    n_updates += 1
            for _ in range(idle):
                idle_pass(policy, rollout)
            d.sum_gradients(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, s.max_grad_norm if s.max_grad_norm > 0 else math.inf)
            if not torch.isfinite(grad_norm):
                skipped += 1  # a NaN/inf gradient never reaches the weights
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.step()
            totals["grad_norm"] = totals.get("grad_norm", 0.0) + grad_norm.detach().cpu()
    out = {k: v if k.endswith(("_min", "_max")) else v / max(n_updates, 1)
           for k, v in totals.items() if k != "grad_norm"}
    steps = s.inner_epochs * s.num_mini_batches
    # micro-batch losses sum to their mini-batch's loss (local share of it under data parallel)
    out["loss"] = d.all_reduce_sum(totals.get("loss", torch.tensor(0.0))) / steps
    out["grad_norm"] = totals.get("grad_norm", torch.tensor(float("nan"))) / max(
        steps - skipped, 1)
    out["skipped_updates"] = torch.tensor(float(skipped))
    return out


def _accumulate(totals: Dict[str, torch.Tensor], stats: Dict[str, torch.Tensor]) -> None:
    """Running sums of micro-batch stats; extremes (``*_min``/``*_max``) keep the extreme."""
    for k, v in stats.items():
        v = v.detach().float().cpu()
        if k in totals and k.endswith("_min"):
            totals[k] = torch.minimum(totals[k], v)
        elif k in totals and k.endswith("_max"):
            totals[k] = torch.maximum(totals[k], v)
        else:
            totals[k] = totals.get(k, 0.0) + v


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


def collect(policy: GroupPolicy, reward_fn, prompts: Sequence[Any],
            metadata: Sequence[Dict[str, Any]], s: LoopSettings, generator: torch.Generator, *,
            group_sizes: Optional[Sequence[int]] = None,
            group_ids: Optional[Sequence[int]] = None, reward_retries: int = 2,
            reward_timeout: Optional[float] = None
            ) -> Tuple[Rollout, RewardBatch, Optional[str]]:
    """Roll out this rank's prompts and score them -> ``(rollout, rewards, reward error)``.

    Args:
        group_sizes: samples per prompt (default ``s.group_size`` each); a data-parallel shard
            or a Knapsack budget may give any count.
        group_ids: the global group id of each prompt (default 0..P-1).
    """
    with torch.no_grad():
        rollout = policy.rollout(list(prompts), list(metadata),
                                 list(group_sizes) if group_sizes is not None else s.group_size,
                                 generator)
    if group_ids is not None:  # local prompt index -> global group id
        table = torch.as_tensor(list(group_ids))
        rollout.group_ids = table[rollout.group_ids]
        if rollout.reward_group_ids is not None:
            rollout.reward_group_ids = table[rollout.reward_group_ids]
    rewards, error = robust_reward(reward_fn, rollout.samples, rollout.prompts, rollout.metadata,
                                   reward_retries, reward_timeout)
    return rollout, rewards, error


def learn(policy: GroupPolicy, optimizer: torch.optim.Optimizer, loss_fn: PolicyLoss,
          rollout: Rollout, rewards: RewardBatch, s: LoopSettings, generator: torch.Generator,
          *, multi_reward: str = "sum_then_normalize",
          reward_weights: Optional[Dict[str, float]] = None, dist: Optional[Dist] = None,
          reward_error: Optional[str] = None) -> Dict[str, Any]:
    """Advantages (gathered over ranks) and K epochs of updates on a scored rollout.

    Returns metrics (python floats; one host sync per step) plus the rollout and its rewards.
    """
    d = dist or Dist()
    if capabilities_of(policy).row_advantages:  # rows != reward rows (trees, G2RPO)
        adv, metrics = _hook_advantages(policy, rollout, rewards, d, reward_weights)
    else:
        adv, metrics = _global_advantages(rewards, rollout.group_ids, loss_fn, d, multi_reward,
                                          reward_weights)
        if rewards.num_invalid and d.active and d.grad_sync == "fsdp":
            # FSDP needs the same forwards on every rank: keep the rows, mask them out
            keep = rewards.valid
            full = torch.zeros(len(keep))
            full[keep] = adv
            adv, rollout.mask = full, rollout.mask & keep[:, None]
            rollout.data["row_keep"] = keep  # dropped rows do not count as sequences
        elif rewards.num_invalid:  # NaN/inf or failed rewards: drop those samples, count them
            rollout, rewards = rollout.select(rewards.valid), rewards.select(rewards.valid)
    extra = {"rollout": rollout, "rewards": rewards, "reward_error": reward_error}
    if float(metrics["samples"]) == 0:
        return {**{k: float(v) for k, v in metrics.items()}, "skipped_updates": 1.0, **extra}
    tw = policy.token_weights(rollout) if loss_fn.spec.needs_token_weights else None
    metrics.update(update(policy, optimizer, loss_fn, rollout, adv, s, generator, tw, d))
    metrics["tokens"] = d.all_reduce_sum(rollout.mask.sum().float())
    return {**{k: float(v) for k, v in metrics.items()}, **extra}


def train_step(policy: GroupPolicy, optimizer: torch.optim.Optimizer, loss_fn: PolicyLoss,
               reward_fn, prompts: Sequence[Any], metadata: Sequence[Dict[str, Any]],
               s: LoopSettings, generator: torch.Generator, *,
               multi_reward: str = "sum_then_normalize",
               reward_weights: Optional[Dict[str, float]] = None, reward_retries: int = 2,
               reward_timeout: Optional[float] = None,
               group_sizes: Optional[Sequence[int]] = None,
               group_ids: Optional[Sequence[int]] = None,
               dist: Optional[Dist] = None) -> Dict[str, Any]:
    """One GRPO iteration = :func:`collect` then :func:`learn` (see both for the arguments).

    ``prompts``/``metadata`` are this rank's share (all of them in a single process);
    ``dist`` is the data-parallel context (None: single process).
    """
    rollout, rewards, error = collect(policy, reward_fn, prompts, metadata, s, generator,
                                      group_sizes=group_sizes, group_ids=group_ids,
                                      reward_retries=reward_retries,
                                      reward_timeout=reward_timeout)
    return learn(policy, optimizer, loss_fn, rollout, rewards, s, generator,
                 multi_reward=multi_reward, reward_weights=reward_weights, dist=dist,
                 reward_error=error)
