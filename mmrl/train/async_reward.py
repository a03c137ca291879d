"""Asynchronous rewards: a round's finished samples are scored while the rest are sampled.

With ``train.reward_chunks = K > 1`` a rollout round samples its prompts in K chunks (whole
groups, about equal sample counts). Chunk k's samples go to a reward worker thread
(:class:`ChunkScorer`) while chunk k+1 is sampled; each chunk is scored by
:func:`mmrl.train.reward_fn.robust_reward` (retries, timeout, NaN rows for the samples that still
fail), so a failing chunk costs only its own rows. Results are matched to chunks by index,
whatever order they finish in, and the chunks are joined in prompt order: the rollout by the
policy's own ``concat_rollouts`` when it declares one (else
:func:`mmrl.train.rollout.concat_rollouts`), the rewards by :func:`concat_rewards`.

On-policy. The overlap stays inside a round: every chunk is sampled with the weights of the
coming update, and the update starts once the round's last chunk is scored. Scoring round N
while round N+1 is sampled (the issue's phrasing) would sample N+1 before the update on N, i.e.
train one step off-policy; that is not offered. Differs from the issue: the overlap is chunk k's
reward with chunk k+1's sampling within one round, because the loop is on-policy.

Reproducibility. The chunks draw from the loop's generator in order, so ``reward_chunks = K``
with the overlap gives bit for bit the samples, rewards and advantages of the same K chunks
scored one after the other (``overlap=False``; tests/train/test_async_reward.py). K chunks draw
other noise than one call for the whole round (a policy draws per call: one noise tensor, one
SDE seed), so K = 1 and K > 1 are different, equally distributed samples; given the samples,
the rewards are the same (a per-sample reward does not see the chunking).

Cost and gain. The worker thread shares the process: an in-process torch scorer competes with
the sampler for the CPU cores (or the GPU), a scorer served in another process
(``remote``, :mod:`mmrl.rewards.server`) runs truly beside the sampler. docs/rewards.md,
"Asynchronous rewards", has the measured numbers (benchmarks/bench_async_reward.py).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from mmrl.train.policy import capabilities_of
from mmrl.train.reward_fn import RewardBatch, robust_reward
from mmrl.train.rollout import Rollout, concat_rollouts

__all__ = ["ChunkScorer", "chunk_bounds", "chunk_rollouts", "collect_chunked",
           "concat_rewards", "check_chunkable"]


def chunk_bounds(counts: Sequence[int], chunks: int) -> List[Tuple[int, int]]:
    """``[(a, b)]`` runs of prompts (whole groups) for at most ``chunks`` chunks of about equal
    sample counts; never an empty run.

    Raises:
        ValueError: ``chunks < 1``.
    """
    if int(chunks) < 1:
        raise ValueError(f"reward chunks={chunks!r}; expected an int >= 1 (1 = no chunking)")
    P, total = len(counts), sum(int(c) for c in counts)
    if P == 0:
        return []
    cuts, run = [0], 0
    for j, c in enumerate(counts[:-1]):
        run += int(c)
        # close a chunk once its share of the samples is reached (k-th cut at k/K of the total)
        if run * chunks >= len(cuts) * total and len(cuts) < chunks:
            cuts.append(j + 1)
    cuts.append(P)
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def check_chunkable(policy) -> None:
    """Refuse chunked rollouts for a policy whose training rows are not its reward rows.

    Raises:
        ValueError: the policy declares ``row_advantages`` (tree / G²RPO rollouts).
    """
    if capabilities_of(policy).row_advantages:
        raise ValueError(f"train.reward_chunks > 1 needs rollouts whose training rows are the "
                         f"rewarded samples; {type(policy).__name__} trains other rows "
                         f"(row_advantages: tree or singular sampling); set "
                         f"train.reward_chunks=1")


def _global_groups(rollout: Rollout, ids: Sequence[int]) -> Rollout:
    """The rollout's local group ids (0..P-1 of its chunk) mapped to ``ids``."""
    table = torch.as_tensor(list(ids), dtype=torch.long)
    rollout.group_ids = table[rollout.group_ids]
    if rollout.reward_group_ids is not None:
        rollout.reward_group_ids = table[rollout.reward_group_ids]
    return rollout


def chunk_rollouts(policy, prompts: Sequence[Any], metadata: Sequence[Dict[str, Any]],
                   counts: Sequence[int], generator: torch.Generator,
                   group_ids: Sequence[int], bounds: Sequence[Tuple[int, int]]
                   ) -> Iterator[Rollout]:
    """The round's rollout, chunk by chunk (global group ids), without gradient: the policy's
    ``rollout_chunks`` when it declares ``chunked_rollout`` (one round: its per-round state,
    e.g. a rollout counter, advances once), else one ``policy.rollout`` per chunk."""
    prompts, metadata, counts = list(prompts), list(metadata), [int(c) for c in counts]
    if capabilities_of(policy).chunked_rollout:
        parts = policy.rollout_chunks(prompts, metadata, counts, generator, list(bounds))
    else:
        parts = (policy.rollout(prompts[a:b], metadata[a:b], counts[a:b], generator)
                 for a, b in bounds)
    it = iter(parts)
    for a, b in bounds:
        with torch.no_grad():
            part = next(it)
        yield _global_groups(part, group_ids[a:b])
    with torch.no_grad():  # let the policy finish the round (e.g. advance its counter)
        if next(it, None) is not None:
            raise ValueError(f"{type(policy).__name__}.rollout_chunks yielded more than the "
                             f"{len(bounds)} chunks asked for")


class ChunkScorer:
    """Scores chunks with :func:`robust_reward` on ``workers`` threads.

    At most ``max_pending`` chunks are submitted and not yet scored: :meth:`submit` blocks until
    one finishes (the sampler never runs more than ``max_pending`` chunks ahead of the reward).
    ``overlap=False`` scores in the caller's thread at :meth:`submit` (the synchronous
    reference). ``peak_pending`` records the most chunks ever pending.
    """

    def __init__(self, reward_fn, retries: int = 2, timeout: Optional[float] = None, *,
                 max_pending: int = 2, workers: int = 1, overlap: bool = True):
        if int(max_pending) < 1 or int(workers) < 1:
            raise ValueError(f"max_pending={max_pending!r}, workers={workers!r}; expected >= 1")
        self.reward_fn, self.retries, self.timeout = reward_fn, int(retries), timeout
        self.overlap, self.max_pending = bool(overlap), int(max_pending)
        self._slots = threading.BoundedSemaphore(self.max_pending)
        self._lock = threading.Lock()
        self._pending, self.peak_pending = 0, 0
        self._pool = ThreadPoolExecutor(int(workers), thread_name_prefix="mmrl-reward-chunk") \
            if self.overlap else None
        self._results: Dict[int, Future] = {}
        self.wait_seconds = 0.0  # time spent blocked on the reward (submit and results)

    def _score(self, rollout: Rollout) -> Tuple[RewardBatch, Optional[str]]:
        try:
            return robust_reward(self.reward_fn, rollout.samples, rollout.prompts,
                                 rollout.metadata, self.retries, self.timeout,
                                 group_ids=rollout.sample_group_ids)
        finally:
            with self._lock:
                self._pending -= 1
            self._slots.release()

    def submit(self, index: int, rollout: Rollout) -> None:
        """Queue chunk ``index`` (blocks while ``max_pending`` chunks are pending)."""
        tic = time.perf_counter()
        self._slots.acquire()
        self.wait_seconds += time.perf_counter() - tic
        with self._lock:
            self._pending += 1
            self.peak_pending = max(self.peak_pending, self._pending)
        if self._pool is None:
            done: Future = Future()
            done.set_result(self._score(rollout))
            self._results[index] = done
        else:
            self._results[index] = self._pool.submit(self._score, rollout)

    def results(self) -> List[Tuple[RewardBatch, Optional[str]]]:
        """Every submitted chunk's ``(rewards, error)``, in chunk-index order (waits for them;
        an exception robust_reward let through is raised here)."""
        tic = time.perf_counter()
        out = [self._results[k].result() for k in sorted(self._results)]
        self.wait_seconds += time.perf_counter() - tic
        return out

    def close(self) -> None:
        """Stop the workers (chunks not started are dropped; a running one finishes alone)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def concat_rewards(parts: Sequence[RewardBatch]) -> RewardBatch:
    """The chunks' rewards stacked in order.

    A chunk whose reward failed whole comes back as one NaN column named after the reward
    (:func:`robust_reward`); it is widened to the other chunks' columns (all NaN).

    Raises:
        ValueError: two chunks with valid rows disagree on the reward columns.
    """
    good = [p for p in parts if bool(p.valid.any())]
    names = list((good or list(parts))[0].names)
    for p in good:
        if list(p.names) != names:
            raise ValueError(f"the reward returned columns {list(p.names)} for one chunk and "
                             f"{names} for another; a reward must return the same columns for "
                             f"every batch")
    values = [p.values if list(p.names) == names else
              torch.full((len(p.valid), len(names)), float("nan")) for p in parts]
    cat = torch.cat(values) if values else torch.zeros(0, len(names))
    return RewardBatch(cat, names, torch.isfinite(cat).all(1))


def collect_chunked(policy, reward_fn, prompts: Sequence[Any],
                    metadata: Sequence[Dict[str, Any]], counts: Sequence[int],
                    generator: torch.Generator, group_ids: Sequence[int], chunks: int, *,
                    reward_retries: int = 2, reward_timeout: Optional[float] = None,
                    overlap: bool = True, max_pending: int = 2, workers: int = 1,
                    concat=None) -> Tuple[Rollout, RewardBatch, Optional[str], Dict[str, float]]:
    """Roll out ``prompts`` (``counts[p]`` samples each, global ids ``group_ids``) in
    ``chunks`` chunks, scoring each while the next is sampled.

    Returns:
        ``(rollout, rewards, reward error, metrics)``: the joined rollout and rewards (row i of
        one is row i of the other), the first chunk's reward error in chunk order (None when
        nothing failed), and ``{"reward_wait_s": seconds the sampler waited for rewards}``.

    Raises:
        ValueError: no prompts, or a policy whose training rows are not its reward rows
            (:func:`check_chunkable`).
    """
    check_chunkable(policy)
    if not len(prompts):
        raise ValueError("collect_chunked: no prompts; roll out an empty share with "
                         "mmrl.train.loop.rollout_groups")
    join = concat or (policy.concat_rollouts if capabilities_of(policy).concat_rollouts
                      else concat_rollouts)
    bounds = chunk_bounds(counts, chunks)
    scorer = ChunkScorer(reward_fn, reward_retries, reward_timeout, max_pending=max_pending,
                         workers=workers, overlap=overlap)
    parts: List[Rollout] = []
    try:
        for k, part in enumerate(chunk_rollouts(policy, prompts, metadata, counts, generator,
                                                group_ids, bounds)):
            parts.append(part)
            scorer.submit(k, part)
        scored = scorer.results()
    finally:
        scorer.close()
    rewards = concat_rewards([r for r, _ in scored])
    error = next((e for _, e in scored if e), None)
    return join(parts), rewards, error, {"reward_wait_s": scorer.wait_seconds}
