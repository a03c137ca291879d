"""Preference optimization on the shared contracts: what a policy gives the preference losses.

A preference step trains on P pairs (chosen, rejected) of completions of the same prompt. The
pairs come from a file (``pref.pairs_file``) or are built online from a rollout's groups (the
best and the worst sample of each group by the run's reward, or by a verifier in VerIPO's loop).
A policy that declares ``Capabilities(preference=True)`` provides:

    pair_rollout(records) -> (Rollout, chosen_rows, rejected_rows)
        the completions of pair records (a file's), ready to be scored; records whose inputs
        are unusable are left out and counted in ``Rollout.skipped``
    pair_scores(rollout, chosen_rows, rejected_rows, generator, with_ref) -> PrefScores
        with gradient on the policy's side

For a language model the scores are the completion tokens' log-probs (``T`` = tokens). For a
flow-matching model they are Diffusion-DPO's pseudo log-likelihoods −½·e, e the mean squared
error of the predicted velocity on a forward-noised copy of the sample (``T`` = 1, one noise
level and one noise shared by the two samples of a pair): DPO's loss on these scores is
Diffusion-DPO's (arXiv 2311.12908; flow_grpo's flow-matching form).

:func:`preference_step` is one optimizer step of a preference loss on P pairs (micro-batched,
normalized by the global pair count, gradients summed over ranks, clipped; a non-finite step is
skipped); :func:`pair_accuracy` is the held-out preference accuracy of the implicit reward
(``pref.eval_pairs``). The runner's stage that builds the pairs is :mod:`mmrl.train.pref_stage`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from mmrl.train.distributed import Dist, idle_pass, most_over_ranks

__all__ = ["PrefScores", "preference_step", "pair_accuracy", "pair_chunks", "PAIR_STATS"]

PAIR_STATS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")
"""The preference loss's stats that a step reports (as ``pref_<name>``). Like the loss, each is
Σ over the call's pairs / the global pair count, so their sums over micro-batches and ranks are
the means over every pair of the step."""


@dataclass
class PrefScores:
    """Scores of P pairs under the policy (with gradient) and the reference (without).

    Attributes:
        chosen_logp, rejected_logp: ``[P, T]`` float, with gradient.
        chosen_mask, rejected_mask: ``[P, T]`` bool, True where a token / step counts.
        chosen_ref, rejected_ref: ``[P, T]`` the reference policy's, detached; None when the
            step did not ask for them (``with_ref=False``: reference-free losses).
    """

    chosen_logp: torch.Tensor
    rejected_logp: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_mask: torch.Tensor
    chosen_ref: Optional[torch.Tensor] = None
    rejected_ref: Optional[torch.Tensor] = None


def pair_chunks(num_pairs: int, micro_batch_size: int) -> List[Tuple[int, int]]:
    """``[(a, b), ...]`` slices of ``num_pairs`` pairs, ``micro_batch_size // 2`` pairs each (a
    pair is two samples; ``train.micro_batch_size`` counts samples); one slice when it is 0."""
    size = max(micro_batch_size // 2, 1) if micro_batch_size > 0 else max(num_pairs, 1)
    return [(a, min(a + size, num_pairs)) for a in range(0, num_pairs, size)]


def _pair_loss(policy, pref_loss, rollout, chosen_rows, rejected_rows, generator, num_pairs,
               inputs):
    """``(loss, stats)`` of one micro-batch of pairs, with gradient; ``inputs``: the loss's
    per-pair ``[p]`` keyword inputs (win rates)."""
    s = policy.pair_scores(rollout, chosen_rows, rejected_rows, generator,
                           pref_loss.spec.needs_ref)
    ref = {} if not pref_loss.spec.needs_ref else dict(
        chosen_ref=s.chosen_ref.to(s.chosen_logp), rejected_ref=s.rejected_ref.to(s.rejected_logp))
    inputs = {k: v.to(s.chosen_logp) for k, v in inputs.items()}
    return pref_loss(s.chosen_logp, s.rejected_logp, s.chosen_mask.to(s.chosen_logp.device),
                     s.rejected_mask.to(s.rejected_logp.device), num_pairs=num_pairs, **ref,
                     **inputs)


def preference_step(policy, optimizer: torch.optim.Optimizer, pref_loss, rollout,
                    chosen_rows: torch.Tensor, rejected_rows: torch.Tensor, settings,
                    generator: torch.Generator, dist: Optional[Dist] = None,
                    pair_inputs: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, float]:
    """One optimizer step of ``pref_loss`` on this rank's pairs -> metrics (python floats).

    ``policy.pair_scores`` in micro-batches of ``settings.micro_batch_size // 2`` pairs, each
    loss normalized by the **global** pair count, so the gradient summed over micro-batches and
    ranks is the single-process gradient of all pairs; then the loop's optimizer step (clip to
    ``settings.max_grad_norm``; a non-finite gradient skips the step).

    Args:
        policy: declares ``Capabilities(preference=True)`` (:mod:`mmrl.train.preference`).
        pref_loss: a :class:`mmrl.algo.preference.PreferenceLoss` (its ``spec.needs_ref``
            decides whether the reference is scored).
        rollout, chosen_rows, rejected_rows: this rank's pairs, ``[P]`` long row indices each
            (P may be 0 on a rank; every rank must call).
        settings: :class:`mmrl.train.loop.LoopSettings` (``micro_batch_size``,
            ``max_grad_norm``).
        generator: handed to ``pair_scores`` (a flow policy draws its noise from it).
        pair_inputs: further ``[P]`` keyword inputs of the loss, row p for pair p (SPPO's
            ``chosen_win`` / ``rejected_win``), sliced with the micro-batches.

    Returns:
        ``loss`` (the step's loss, summed over ranks), ``grad_norm`` (nan when skipped),
        ``skipped_updates`` (1 for a non-finite gradient), ``pairs`` (global count) and
        ``pref_<stat>`` for :data:`PAIR_STATS` (means over every pair). Without a pair on any
        rank nothing is trained and ``pairs`` is 0.
    """
    from mmrl.train.loop import _optimizer_step  # the loop's clip / skip, one implementation
    d = dist or Dist()
    P = len(chosen_rows)
    if len(rejected_rows) != P:
        raise ValueError(f"preference_step: {P} chosen rows but {len(rejected_rows)} rejected "
                         f"rows; expected one rejected row per chosen row (pairs)")
    num_pairs = d.all_reduce_sum(torch.tensor(float(P)))
    if float(num_pairs) == 0:
        return {"pairs": 0.0, "skipped_updates": 0.0}
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    chunks = pair_chunks(P, settings.micro_batch_size) if P else []
    sums = torch.zeros(1 + len(PAIR_STATS))  # loss, then PAIR_STATS: each Σ_pairs / num_pairs
    for a, b in chunks:
        loss, stats = _pair_loss(policy, pref_loss, rollout, chosen_rows[a:b],
                                 rejected_rows[a:b], generator, num_pairs,
                                 {k: v[a:b] for k, v in (pair_inputs or {}).items()})
        loss.backward()
        sums += torch.stack([loss.detach()] + [stats[k].detach() for k in PAIR_STATS]).float().cpu()
    if d.active and d.grad_sync == "fsdp" and len(rollout):  # same forwards on every rank
        for _ in range(most_over_ranks(len(chunks), d) - len(chunks)):
            idle_pass(policy, rollout)
    grad_norm = _optimizer_step(optimizer, params, settings.max_grad_norm, d)
    totals = d.all_reduce_sum(sums)
    out = {"loss": totals[0], "pairs": num_pairs,
           "grad_norm": torch.tensor(float("nan")) if grad_norm is None else grad_norm,
           "skipped_updates": torch.tensor(float(grad_norm is None))}
    out.update({f"pref_{k}": v for k, v in zip(PAIR_STATS, totals[1:])})
    return {k: float(v) for k, v in out.items()}


@torch.no_grad()
def pair_accuracy(policy, rollout, chosen_rows: torch.Tensor, rejected_rows: torch.Tensor,
                  micro_batch_size: int, generator: torch.Generator,
                  dist: Optional[Dist] = None) -> Dict[str, float]:
    """Preference accuracy of the implicit reward ``β·Σ_t (log π − log π_ref)`` on held-out
    pairs: the share of pairs whose chosen sample has the larger log-ratio sum (a tie counts
    one half, so the reference policy itself scores 0.5); β > 0 does not change the order.

    Returns:
        ``accuracy``, ``margin`` (mean of Σ log-ratio(chosen) − Σ log-ratio(rejected)) and
        ``pairs``, over every rank's pairs (every rank must call).

    Raises:
        ValueError: the policy's ``pair_scores`` gave no reference scores.
    """
    d = dist or Dist()
    sums = torch.zeros(3, dtype=torch.float64)  # [Σ accuracy, Σ margin, pairs]
    for a, b in pair_chunks(len(chosen_rows), micro_batch_size) if len(chosen_rows) else []:
        s = policy.pair_scores(rollout, chosen_rows[a:b], rejected_rows[a:b], generator, True)
        if s.chosen_ref is None or s.rejected_ref is None:
            raise ValueError(f"{type(policy).__name__}.pair_scores(..., with_ref=True) returned "
                             f"no reference scores; pref.eval_pairs needs the reference policy")
        margin = (_log_ratio_sum(s.chosen_logp, s.chosen_ref, s.chosen_mask)
                  - _log_ratio_sum(s.rejected_logp, s.rejected_ref, s.rejected_mask)).cpu()
        acc = (margin > 0).double() + 0.5 * (margin == 0).double()
        sums += torch.stack([acc.sum(), margin.sum(), torch.tensor(float(b - a))]).double()
    sums = d.all_reduce_sum(sums)
    n = float(sums[2])
    return {"accuracy": float(sums[0]) / max(n, 1.0) if n else float("nan"),
            "margin": float(sums[1]) / n if n else float("nan"), "pairs": n}


def _log_ratio_sum(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[p]`` Σ_t (log π − log π_ref) over the valid tokens / steps, in float64."""
    return ((logp.double() - ref.double().to(logp.device)) * mask.to(logp.device)).sum(-1)
