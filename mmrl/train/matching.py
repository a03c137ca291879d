"""The training step of weighted matching losses (DiffusionNFT, AWM; :mod:`mmrl.algo.matching`).

A policy that declares ``Capabilities(matching=True)`` trains on forward-noised copies of its
samples instead of re-scoring its sampler's transitions. :func:`train_matching` takes the place
of :func:`mmrl.train.loop.train_batch` (the runner picks it from the capability); rewards and
advantages come from the same :func:`mmrl.train.batch.batch_advantages`.

One update: the plan (:func:`draw_plan`) draws every row's K training times and one noise seed
per (row, time) once, from the run's generator, for the *global* batch, and each rank keeps the
slice of its rows; so the draws do not depend on the data-parallel size, on micro-batching or on
the mini-batch order. Then ``inner_epochs`` x ``num_mini_batches`` optimizer steps, each summing
micro-batches along rows (``micro_batch_size``) and along K (``t_chunk``) with the loss divided by
the mini-batch's global count of valid terms (the pieces sum to the unsplit loss; data parallel
sums gradients before clipping), and finally the policy's ``match_after_update`` (the soft
update of its old / EMA model). FSDP is not supported for these objectives yet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from mmrl.algo.matching import draw_times, matching_loss
from mmrl.train.batch import Batch
from mmrl.train.distributed import Dist
from mmrl.train.loop import (LoopSettings, _accumulate, _chunks, _mini_batches, _optimizer_step,
                             _update_stats)

__all__ = ["MatchPlan", "draw_plan", "train_matching"]


@dataclass
class MatchPlan:
    """This rank's rows' draws for one update: ``times [B, K]`` long indices into the policy's
    σ grid, ``seeds [B, K]`` long (one ε per term), ``mask [B, K]`` bool."""

    times: torch.Tensor
    seeds: torch.Tensor
    mask: torch.Tensor


def draw_plan(spec, grid_size: int, rows: int, generator: torch.Generator,
              dist: Optional[Dist] = None) -> MatchPlan:
    """The draws of the global batch (every rank's rows, in rank order), this rank's slice.

    Args:
        spec: a :class:`mmrl.algo.match_presets.MatchSpec` (``times`` and its settings).
        grid_size: T, the number of σ-grid steps the times index.
        rows: this rank's row count.
    """
    d = dist or Dist()
    counts = [int(n) for n in d.all_gather_object(int(rows))]
    offset, total = sum(counts[:d.rank]), sum(counts)
    times = draw_times(spec.times, total, grid_size, generator, fraction=spec.time_fraction,
                       num_times=spec.num_times, max_fraction=spec.time_max_fraction)
    seeds = torch.randint(0, 2 ** 62, times.shape, generator=generator)
    mine = slice(offset, offset + rows)
    return MatchPlan(times[mine], seeds[mine], torch.ones(rows, times.shape[1], dtype=torch.bool))


def _backward_mini_batch(policy, fn, kwargs, batch: Batch, plan: MatchPlan, mb: torch.Tensor,
                         s: LoopSettings, d: Dist, totals: Dict[str, torch.Tensor]) -> int:
    """Accumulate one mini-batch's gradient, micro-batch by micro-batch (rows, then K chunks);
    returns the number of micro-batches run."""
    num_terms = d.all_reduce_sum(plan.mask[mb].sum().float())  # the global valid-term count
    n = 0
    for a, b in _chunks(len(mb), s.micro_batch_size):
        rows = mb[a:b]
        for k0, k1 in _chunks(plan.times.shape[1], s.t_chunk):
            terms = policy.match_terms(batch.rollout, rows, plan.times[rows, k0:k1],
                                       plan.seeds[rows, k0:k1])
            terms.mask = terms.mask & plan.mask[rows, k0:k1].to(terms.mask.device)
            adv = batch.advantages[rows].to(terms.v.device, terms.v.dtype)
            loss, stats = fn(terms, adv, num_terms=num_terms.to(terms.v.device), **kwargs)
            loss.backward()
            _accumulate(totals, {"loss": loss.detach(), **stats})
            n += 1
    return n


def train_matching(policy, optimizer: torch.optim.Optimizer, loss_fn, batch: Batch,
                   s: LoopSettings, generator: torch.Generator,
                   dist: Optional[Dist] = None) -> Dict[str, float]:
    """One update of a weighted matching loss on ``batch`` -> metrics as python floats (the
    signature of :func:`mmrl.train.loop.train_batch`; ``loss_fn`` gave the advantages and is not
    read here). A batch without a valid sample on any rank is skipped (``skipped_updates`` 1)
    and the old model is left as it is."""
    d = dist or Dist()
    metrics = dict(batch.metrics)
    if not batch.has_samples:
        return {**{k: float(v) for k, v in metrics.items()}, "skipped_updates": 1.0}
    spec = policy.match_spec()
    fn, kwargs = matching_loss(spec.loss), spec.loss_kwargs()
    plan = draw_plan(spec, policy.match_grid_size(), len(batch.rollout), generator, d)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    totals: Dict[str, torch.Tensor] = {}
    n_micro, skipped, steps = 0, 0, 0
    for _ in range(s.inner_epochs):
        for mb in _mini_batches(batch.rollout, s.num_mini_batches, False, generator):
            optimizer.zero_grad(set_to_none=True)
            n_micro += _backward_mini_batch(policy, fn, kwargs, batch, plan, mb, s, d, totals)
            grad_norm = _optimizer_step(optimizer, params, s.max_grad_norm, d)
            steps += 1
            if grad_norm is None:
                skipped += 1
            else:
                totals["grad_norm"] = totals.get("grad_norm", 0.0) + grad_norm.detach().cpu()
    policy.match_after_update(steps - skipped)
    metrics.update(_update_stats(totals, n_micro, skipped, steps, d))
    metrics["terms"] = d.all_reduce_sum(plan.mask.sum().float())
    # model evaluations of the update (rows of a forward, any rank): each term runs the current
    # model once per epoch, plus the old copy and the reference when the loss reads them
    per_term = s.inner_epochs * (1 + int(spec.reads_old) + int(spec.needs_ref))
    metrics["train_nfe"] = metrics["terms"] * per_term
    return {k: float(v) for k, v in metrics.items()}
