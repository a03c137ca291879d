"""The shared GRPO loop: rollout -> rewards -> advantages -> K epochs of micro-batched updates.

:func:`rollout_groups` and :func:`score` collect, :func:`mmrl.train.batch.batch_advantages`
turns rewards into advantages, :func:`update` trains; :func:`learn` and :func:`train_step` chain
them for one process or one rank (the runner drives the same pieces, see
:meth:`mmrl.train.runner.Run.run_step`).

Both domains drive it through :class:`GroupPolicy`: a policy rolls out a group per prompt and
recomputes ``logp [b, t]`` for a slice of samples and of T (tokens for a language model, trained
denoising steps for a flow-matching model). The loop never knows which.

Micro-batches split along samples (``micro_batch_size``) and along T (``t_chunk``); the loss
receives the mini-batch's global token and sequence counts (and each row's full length), so the
accumulated gradient equals the unsplit step's (tests/train/test_loop.py); the top-entropy mask's
threshold likewise comes from the whole mini-batch on all ranks, scored at the update's start.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from mmrl.algo.entropy import entropy_threshold, top_entropy_mask
from mmrl.algo.losses import PolicyLoss
from mmrl.train.batch import Batch, batch_advantages, compute_advantages, greedy_baseline
from mmrl.train.distributed import Dist, fsdp_lockstep, idle_pass, most_over_ranks
from mmrl.train.policy import GroupPolicy, capabilities_of
from mmrl.train.reward_fn import RewardBatch, robust_reward
from mmrl.train.rollout import Rollout, concat_rollouts

__all__ = ["Rollout", "GroupPolicy", "LoopSettings", "Batch", "compute_advantages", "update",
           "rollout_groups", "score", "collect", "batch_advantages", "train_batch",
           "concat_rollouts", "learn", "train_step"]


@dataclass
class LoopSettings:
    """The loop's knobs: fields of :class:`mmrl.config.schema.TrainConfig` with the same names
    and defaults (documented there; a test keeps them equal)."""

    group_size: int = 8
    inner_epochs: int = 1
    num_mini_batches: int = 1
    micro_batch_size: int = 0
    t_chunk: int = 0
    max_grad_norm: float = 1.0

    @classmethod
    def from_train(cls, train) -> "LoopSettings":
        """The settings of a :class:`~mmrl.config.schema.TrainConfig`, field by name."""
        return settings_from(cls, train)


def settings_from(cls, train):
    """``cls`` (a dataclass whose fields are all TrainConfig fields) filled from ``train`` by
    field name."""
    return cls(**{f.name: getattr(train, f.name) for f in fields(cls)})


def _chunks(n: int, size: int):
    size = size if size > 0 else max(n, 1)
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _mini_batches(rollout: Rollout, k: int, needs_groups: bool, gen: torch.Generator):
    """Exactly k mini-batches of row indices (some may be empty on a small shard, so every rank
    steps as often); whole groups when needed; the rollout's fixed ``mini_batch`` if it has one."""
    if rollout.mini_batch is not None:
        return rollout.fixed_mini_batches(k)
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
               lockstep: Optional[Dist] = None):
    """No-grad ``fn(rollout, rows, t0, t1)`` over the whole rollout -> [B, T] (a tuple of
    them when ``fn`` returns a tuple); ``lockstep`` (FSDP): idle calls up to the most calls
    any rank makes."""
    T = rollout.mask.shape[1]
    rows_out = []
    chunks = _chunks(len(rollout), micro)
    idle = 0 if lockstep is None else most_over_ranks(len(chunks), lockstep) - len(chunks)
    for a, b in chunks:
        rows = torch.arange(a, b)
        parts = [fn(rollout, rows, t0, t1) for t0, t1 in _chunks(T, t_chunk)]
        parts = [p if isinstance(p, tuple) else (p,) for p in parts]
        rows_out.append([torch.cat([p[k].detach().float() for p in parts], dim=1)
                         for k in range(len(parts[0]))])
    for _ in range(idle):
        fn(rollout, torch.arange(1), 0, T)
    out = tuple(torch.cat(col, dim=0) for col in zip(*rows_out))
    return out if len(out) > 1 else out[0]


@dataclass
class _Inputs:
    """What every micro-batch of an update reads, row-aligned with the rollout."""

    rollout: Rollout
    advantages: torch.Tensor  # [B], or [B, T] token advantages
    seq_lens: torch.Tensor  # [B] full lengths, exact under T chunking
    old_logp: Optional[torch.Tensor]  # [B, T]; None: on-policy (the detached logp is old)
    ref_logp: Optional[torch.Tensor]  # [B, T]; None: no KL, or the policy's own KL
    token_weights: Optional[torch.Tensor]  # [B, T]
    own_kl: Optional[Callable] = None  # policy.logp_and_kl when the KL is the policy's own
    with_entropy: Optional[Callable] = None  # policy.logp_and_entropy for the entropy bonus
    start_entropy: Optional[torch.Tensor] = None  # [B, T] no grad, for the top-entropy mask
    generator: Optional[torch.Generator] = None  # the update's, for objectives that draw
    step_terms: Optional[Callable] = None  # policy.logp_and_step_terms (GRPO-Guard)


def _inputs(policy: GroupPolicy, loss_fn: PolicyLoss, rollout: Rollout, advantages, s,
            t_chunk: int, lockstep: Optional[Dist], token_weights) -> _Inputs:
    """Score the old and reference log-probs an update needs (no grad), once per update."""
    spec = loss_fn.spec
    on_policy = s.inner_epochs == 1 and s.num_mini_batches == 1
    old_logp = start_entropy = None
    if spec.top_entropy_quantile < 1:  # one scoring pass gives both
        old_logp, start_entropy = _score_all(policy.logp_and_entropy, rollout,
                                             s.micro_batch_size, t_chunk, lockstep)
        old_logp = None if on_policy else old_logp
    elif not on_policy:
        old_logp = _score_all(policy.logp, rollout, s.micro_batch_size, t_chunk, lockstep)
    own_kl = policy.logp_and_kl if spec.needs_ref and capabilities_of(policy).own_kl else None
    ref_logp = (_score_all(policy.ref_logp, rollout, s.micro_batch_size, t_chunk)
                if spec.needs_ref and own_kl is None else None)
    with_entropy = policy.logp_and_entropy if spec.entropy_coef > 0 else None
    if with_entropy is not None and own_kl is not None:
        raise ValueError("entropy_coef > 0 with a policy's own KL (beta > 0) needs logp, KL and "
                         "entropy from one forward, which the policy contract lacks; drop one")
    return _Inputs(rollout, advantages, rollout.mask.sum(-1), old_logp, ref_logp, token_weights,
                   own_kl, with_entropy, start_entropy, step_terms=policy.logp_and_step_terms
                   if spec.needs_step_terms else None)


def _entropy_keep(x: _Inputs, spec, mb: torch.Tensor, d: Dist) -> Optional[torch.Tensor]:
    """``[B, T]`` bool top-entropy mask of mini-batch ``mb`` (False elsewhere), τ from the valid
    tokens' start-of-update entropies of the whole mini-batch on every rank; None when off."""
    if x.start_entropy is None:
        return None
    mask = x.rollout.mask[mb].to(x.start_entropy.device)
    values = d.all_gather_rows(x.start_entropy[mb][mask])  # [n valid tokens, all ranks]
    tau = entropy_threshold(values, spec.top_entropy_quantile)
    keep = torch.zeros(x.rollout.mask.shape, dtype=torch.bool)
    keep[mb] = top_entropy_mask(x.start_entropy[mb], mask, spec.top_entropy_quantile,
                                tau).cpu()
    return keep


def _micro_loss(policy: GroupPolicy, loss_fn: PolicyLoss, x: _Inputs, rows: torch.Tensor,
                t0: int, t1: int, norm: Dict[str, torch.Tensor],
                keep: Optional[torch.Tensor] = None):
    """``(loss, stats)`` of rows ``rows`` and steps ``[t0, t1)``, with gradient; ``keep``: the
    mini-batch's top-entropy mask ``[B, T]``."""
    kl, entropy, terms = None, None, {}
    if x.step_terms is not None:  # one forward: logp, the step terms, the KL when beta > 0
        logp, st = x.step_terms(x.rollout, rows, t0, t1, with_kl=x.own_kl is not None)
        kl, terms = st.kl, st.loss_kwargs(logp)
    elif x.with_entropy is not None:
        logp, entropy = x.with_entropy(x.rollout, rows, t0, t1)
        entropy = entropy.to(logp)
    elif x.own_kl is not None:
        logp, kl = x.own_kl(x.rollout, rows, t0, t1)
    else:
        logp = policy.logp(x.rollout, rows, t0, t1)
    if keep is not None:
        norm = dict(norm, entropy_mask=keep[rows, t0:t1].to(logp.device))
    old = logp.detach() if x.old_logp is None else x.old_logp[rows, t0:t1].to(logp)
    adv = x.advantages[rows] if x.advantages.dim() == 1 else x.advantages[rows, t0:t1]
    return loss_fn(
        logp, old, adv.to(logp), x.rollout.mask[rows, t0:t1].to(logp.device),
        ref_logp=None if x.ref_logp is None else x.ref_logp[rows, t0:t1].to(logp),
        token_weights=None if x.token_weights is None else x.token_weights[rows, t0:t1].to(logp),
        group_ids=x.rollout.group_ids[rows], seq_lens=x.seq_lens[rows],
        kl=None if kl is None else kl.to(logp), entropy=entropy, generator=x.generator, **norm,
        **terms, **x.rollout.sampler_terms(rows, t0, t1, logp))  # rollout_is, off_policy


def _backward_mini_batch(policy: GroupPolicy, loss_fn: PolicyLoss, x: _Inputs,
                         mb: torch.Tensor, s: LoopSettings, t_chunk: int, d: Dist,
                         lockstep: Optional[Dist], totals: Dict[str, torch.Tensor]) -> int:
    """Accumulate the gradient of one mini-batch's loss, micro-batch by micro-batch (rows, then
    T chunks); returns the number of micro-batches run. The loss is normalized by the
    mini-batch's global token and sequence counts, so the pieces sum to the unsplit loss."""
    keep = x.rollout.row_keep  # rows kept for FSDP's lockstep but dropped: no sequence
    rows = torch.ones(len(mb), dtype=torch.bool) if keep is None else keep[mb]
    if loss_fn.spec.empty_rows == "skip":  # verl: rows without a valid token do not count
        rows = rows & x.rollout.mask[mb].any(-1)
    counts = d.all_reduce_sum(torch.stack([x.rollout.mask[mb].sum(), rows.sum()]).float())
    norm = dict(num_tokens=counts[0], num_seqs=counts[1])  # global counts
    entropy_keep = _entropy_keep(x, loss_fn.spec, mb, d)
    micro = _chunks(len(mb), s.micro_batch_size)
    idle = 0 if lockstep is None else most_over_ranks(len(micro), d) - len(micro)
    n = 0
    for a, b in micro:
        for t0, t1 in _chunks(x.rollout.mask.shape[1], t_chunk):
            loss, stats = _micro_loss(policy, loss_fn, x, mb[a:b], t0, t1, norm, entropy_keep)
            loss.backward()
            _accumulate(totals, stats)
            n += 1
    for _ in range(idle):
        idle_pass(policy, x.rollout)
    return n


def _optimizer_step(optimizer: torch.optim.Optimizer, params, max_grad_norm: float,
                    d: Dist) -> Optional[torch.Tensor]:
    """Sum gradients over ranks, clip, step; the gradient norm, or None when it was not finite
    (the step is skipped: a NaN/inf gradient never reaches the weights)."""
    d.sum_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        params, max_grad_norm if max_grad_norm > 0 else math.inf)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    return grad_norm


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
    t_chunk = 0 if spec.sequence_level else s.t_chunk
    lockstep = fsdp_lockstep(d, len(rollout), t_chunk)
    x = _inputs(policy, loss_fn, rollout, advantages, s, t_chunk, lockstep, token_weights)
    x.generator = generator  # clip_cov's random pick: reproducible, and saved on resume
    # not policy.parameters(): under FSDP2 it may list a unit's temporary unsharded tensors
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    totals: Dict[str, torch.Tensor] = {}
    n_updates, skipped = 0, 0
    for _ in range(s.inner_epochs):
        for mb in _mini_batches(rollout, s.num_mini_batches, spec.needs_groups, generator):
            optimizer.zero_grad(set_to_none=True)
            n_updates += _backward_mini_batch(policy, loss_fn, x, mb, s, t_chunk, d, lockstep,
                                              totals)
            grad_norm = _optimizer_step(optimizer, params, s.max_grad_norm, d)
            if grad_norm is None:
                skipped += 1
            else:
                totals["grad_norm"] = totals.get("grad_norm", 0.0) + grad_norm.detach().cpu()
    return _update_stats(totals, n_updates, skipped, s.inner_epochs * s.num_mini_batches, d)


def _update_stats(totals: Dict[str, torch.Tensor], n_updates: int, skipped: int, steps: int,
                  d: Dist) -> Dict[str, torch.Tensor]:
    """Averages of the accumulated micro-batch stats (extremes kept), the mean loss per
    optimizer step, the mean gradient norm of the steps taken and the skipped count."""
    out = {k: v if k.endswith(("_min", "_max")) else v / max(n_updates, 1)
           for k, v in totals.items() if k != "grad_norm"}
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


def rollout_groups(policy: GroupPolicy, prompts: Sequence[Any],
                   metadata: Sequence[Dict[str, Any]], group_sizes, generator: torch.Generator,
                   group_ids: Optional[Sequence[int]] = None) -> Rollout:
    """``policy.rollout`` without gradient, its group ids mapped to ``group_ids`` (the global
    id of each prompt; default: the local index 0..P-1)."""
    with torch.no_grad():
        rollout = policy.rollout(list(prompts), list(metadata), group_sizes, generator)
    if group_ids is not None:  # local prompt index -> global group id
        table = torch.as_tensor(list(group_ids))
        rollout.group_ids = table[rollout.group_ids]
        if rollout.reward_group_ids is not None:
            rollout.reward_group_ids = table[rollout.reward_group_ids]
    return rollout


def score(reward_fn, rollout: Rollout, reward_retries: int = 2,
          reward_timeout: Optional[float] = None) -> Tuple[RewardBatch, Optional[str]]:
    """``(rewards, reward error)`` of the rollout's samples (:func:`robust_reward`: retries,
    a timeout, NaN rows on failure, each row's group id for groupwise rewards)."""
    return robust_reward(reward_fn, rollout.samples, rollout.prompts, rollout.metadata,
                         reward_retries, reward_timeout, group_ids=rollout.sample_group_ids)


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
    sizes = list(group_sizes) if group_sizes is not None else s.group_size
    rollout = rollout_groups(policy, prompts, metadata, sizes, generator, group_ids)
    rewards, error = score(reward_fn, rollout, reward_retries, reward_timeout)
    return rollout, rewards, error


def train_batch(policy: GroupPolicy, optimizer: torch.optim.Optimizer, loss_fn: PolicyLoss,
                batch: Batch, s: LoopSettings, generator: torch.Generator,
                dist: Optional[Dist] = None) -> Dict[str, float]:
    """K epochs of updates on ``batch`` -> metrics as python floats (one host sync); a batch
    without a valid sample on any rank is skipped (``skipped_updates`` 1)."""
    d = dist or Dist()
    metrics = dict(batch.metrics)
    if not batch.has_samples:
        return {**{k: float(v) for k, v in metrics.items()}, "skipped_updates": 1.0}
    tw = policy.token_weights(batch.rollout) if loss_fn.spec.needs_token_weights else None
    metrics.update(update(policy, optimizer, loss_fn, batch.rollout, batch.advantages, s,
                          generator, tw, d))
    metrics["tokens"] = d.all_reduce_sum(batch.rollout.mask.sum().float())
    return {k: float(v) for k, v in metrics.items()}


def learn(policy: GroupPolicy, optimizer: torch.optim.Optimizer, loss_fn: PolicyLoss,
          rollout: Rollout, rewards: RewardBatch, s: LoopSettings, generator: torch.Generator,
          *, multi_reward: Optional[str] = None,
          reward_weights: Optional[Dict[str, float]] = None, dist: Optional[Dist] = None,
          reward_error: Optional[str] = None,
          baseline: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """:func:`batch_advantages` then :func:`train_batch` on a scored rollout.

    ``multi_reward``: None = the spec's; ``baseline``: ``[B, K]`` baseline rewards for an
    estimator that needs them (:func:`mmrl.train.batch.greedy_baseline`).
    Returns metrics (python floats) plus ``rollout``/``rewards`` (the rows trained on) and
    ``reward_error``.
    """
    batch = batch_advantages(policy, loss_fn, rollout, rewards, multi_reward=multi_reward,
                             reward_weights=reward_weights, dist=dist, baseline=baseline)
    metrics = train_batch(policy, optimizer, loss_fn, batch, s, generator, dist)
    return {**metrics, "rollout": batch.rollout, "rewards": batch.rewards,
            "reward_error": reward_error}


def train_step(policy: GroupPolicy, optimizer: torch.optim.Optimizer, loss_fn: PolicyLoss,
               reward_fn, prompts: Sequence[Any], metadata: Sequence[Dict[str, Any]],
               s: LoopSettings, generator: torch.Generator, *,
               multi_reward: Optional[str] = None,
               reward_weights: Optional[Dict[str, float]] = None, reward_retries: int = 2,
               reward_timeout: Optional[float] = None,
               group_sizes: Optional[Sequence[int]] = None,
               group_ids: Optional[Sequence[int]] = None,
               dist: Optional[Dist] = None) -> Dict[str, Any]:
    """One GRPO iteration = :func:`collect` then :func:`learn` (see both for the arguments).

    ``prompts``/``metadata`` are this rank's share (all of them in a single process);
    ``dist`` is the data-parallel context (None: single process). An estimator that needs a
    baseline (ReMax) gets :func:`mmrl.train.batch.greedy_baseline` of these prompts.
    """
    rollout, rewards, error = collect(policy, reward_fn, prompts, metadata, s, generator,
                                      group_sizes=group_sizes, group_ids=group_ids,
                                      reward_retries=reward_retries,
                                      reward_timeout=reward_timeout)
    baseline = None
    if loss_fn.spec.needs_baseline:  # every rank shares its prompts: groups may span ranks
        ids = list(group_ids) if group_ids is not None else list(range(len(prompts)))
        shared = (dist or Dist()).all_gather_object(list(zip(ids, prompts, metadata)))
        groups = {g: (p, m) for part in shared for g, p, m in part}
        baseline = greedy_baseline(policy, reward_fn, rollout, groups, generator, dist=dist,
                                   reward_retries=reward_retries, reward_timeout=reward_timeout)
    return learn(policy, optimizer, loss_fn, rollout, rewards, s, generator,
                 multi_reward=multi_reward, reward_weights=reward_weights, dist=dist,
                 reward_error=error, baseline=baseline)
