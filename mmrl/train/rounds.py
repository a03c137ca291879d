"""How the runner collects a step's rollouts: rounds of groups, sharded over ranks, reworked by
the job's augmenters, and DAPO dynamic sampling.

:class:`RoundsMixin` is part of :class:`mmrl.train.runner.Run` (it uses the run's policy, reward,
selector, settings, generators and data-parallel context). A round augmenter is
``aug(run, round) -> round``: it may re-roll groups (:meth:`RoundsMixin.collect_groups` +
:meth:`RoundsMixin.replace_groups`) or add reward columns, using the gathered rewards
(:meth:`RoundsMixin.gathered`) and rank-independent seeds (:meth:`RoundsMixin.round_seed`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from mmrl.train.distributed import gathered_parameters, shard_samples
from mmrl.train.policy import capabilities_of
from mmrl.train.rollout import concat_rollouts

__all__ = ["Round", "RoundAugmenter", "RoundsMixin", "concat_rollouts"]


@dataclass
class Round:
    """One collection round, as the job's round augmenters see and rework it.

    Attributes:
        prompts, metadata: the round's groups; group ``group_ids[j]`` is ``prompts[j]``.
        counts: samples per group (all ranks together).
        group_ids: the global group id of each group.
        rollout, rewards, error: this rank's rows, their rewards, a reward failure (or None).
    """

    prompts: List[Any]
    metadata: List[Dict[str, Any]]
    counts: List[int]
    group_ids: List[int]
    rollout: Any
    rewards: Any
    error: Optional[str] = None


#: A round augmenter: ``aug(run, round) -> round`` (re-roll some groups, add a reward column).
RoundAugmenter = Callable[[Any, Round], Round]


class RoundsMixin:
    """Round collection for :class:`mmrl.train.runner.Run`."""

    def _update_selector(self, idx: List[int], rollout, rewards) -> None:
        """Feed the gathered (prompt, reward) pairs of a rollout round to the selector."""
        ok = rewards.valid
        gids = self.dist.all_gather_rows(rollout.sample_group_ids[ok] % len(idx))
        total = self.dist.all_gather_rows(
            rewards.weighted_sum(self.config.algo.reward_weights)[ok])
        if len(gids):
            self.selector.update(torch.tensor(idx)[gids], total, gids)

    def next_prompts(self) -> List[int]:
        return self.selector.select(self.t.prompts_per_step, self.prompt_gen).tolist()

    def counts(self, idx: List[int]) -> List[int]:
        """Samples per prompt: group_size each, or a Knapsack split of the same total."""
        t = self.t
        if t.rollout_allocation == "fixed":
            return [t.group_size] * len(idx)
        from mmrl.budget.allocate import knapsack_allocate
        probs = self.selector.success_probs()[torch.tensor(idx)]
        return knapsack_allocate(probs, len(idx) * t.group_size, t.knapsack_n_min,
                                 t.knapsack_n_max).tolist()

    def whole_groups(self) -> bool:
        """Must a group's samples stay on one rank? Yes for presets that normalize within the
        group or weight its tokens together, policies with an ``advantages`` hook, and policies
        that say so (``policy.whole_groups``, e.g. a group sharing one initial noise)."""
        spec = self.loss_fn.spec
        caps = capabilities_of(self.policy)
        return bool(spec.needs_groups or spec.needs_token_weights or caps.row_advantages or
                    caps.whole_groups)

    def shard(self, counts: Sequence[int], group_ids: Sequence[int]):
        """This rank's (position, sample count, global group id) triples for a round's groups."""
        if self.whole_groups():
            return [(j, c, g) for j, (c, g) in enumerate(zip(counts, group_ids))
                    if j % self.dist.world == self.dist.rank]
        local = shard_samples(list(counts), self.dist)
        return [(j, c, g) for j, (c, g) in enumerate(zip(local, group_ids)) if c > 0]

    def collect_groups(self, prompts: Sequence[Any], metadata: Sequence[Dict[str, Any]],
                       counts: Sequence[int], group_ids: Sequence[int]) -> Round:
        """Roll out and score this rank's share of the given groups (every rank calls it with
        the same arguments)."""
        from mmrl.train.loop import collect
        mine = self.shard(counts, group_ids)
        with gathered_parameters(self.fsdp):  # FSDP: ranks may generate different lengths
            rollout, rewards, error = collect(
                self.policy, self.reward_fn, [prompts[j] for j, _, _ in mine],
                [metadata[j] for j, _, _ in mine], self.settings, self.gen,
                group_sizes=[c for _, c, _ in mine], group_ids=[g for _, _, g in mine],
                reward_retries=self.t.reward_retries,
                reward_timeout=self.t.reward_timeout or None)
        return Round(list(prompts), list(metadata), list(counts), list(group_ids), rollout,
                     rewards, error)

    def gathered(self, rollout, values: torch.Tensor):
        """``(values, group ids)`` of every rank's rows (the same on all ranks)."""
        return (self.dist.all_gather_rows(values),
                self.dist.all_gather_rows(rollout.sample_group_ids))

    def add_round_metrics(self, values: Dict[str, float],
                          means: Optional[Dict[str, Tuple[float, float]]] = None) -> None:
        """Augmenters' metrics for this step: ``values`` are counters (summed over the step's
        rounds); ``means`` maps a name to (sum, count), reported as sum / count over the step."""
        for k, v in values.items():
            self.round_metrics[k] = self.round_metrics.get(k, 0.0) + float(v)
        for k, (total, n) in (means or {}).items():
            t0, n0 = self.round_means.get(k, (0.0, 0.0))
            self.round_means[k] = (t0 + float(total), n0 + float(n))

    def step_round_metrics(self) -> Dict[str, float]:
        """This step's augmenter metrics (counters, and means where any count was given)."""
        return {**self.round_metrics, **{k: t / n for k, (t, n) in self.round_means.items()
                                         if n > 0}}

    def all_agree(self, flags: Sequence[bool]) -> List[bool]:
        """Element-wise AND of ``flags`` over the ranks (every rank passes one flag per item):
        e.g. keep only the variants every rank could build, so ranks make the same calls."""
        every = self.dist.all_gather_object([bool(f) for f in flags])
        return [all(f[i] for f in every) for i in range(len(flags))]

    def round_seed(self, *keys: int) -> int:
        """A seed that is the same on every rank for (run seed, step, *keys): augmentations of a
        group spread over ranks must agree, and a resumed run redraws the same ones."""
        return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(
            hash((self.t.seed, self.step) + tuple(int(k) for k in keys)) % 2**63)).item())

    def replace_groups(self, rnd: Round, new: Round) -> Round:
        """``rnd`` with the rows of ``new``'s groups replaced by ``new``'s rows."""
        if rnd.rollout.reward_group_ids is not None:
            raise ValueError("replace_groups needs reward rows = training rows (this policy's "
                             "rollouts train rows that are not rewarded samples)")
        unknown = sorted(set(new.group_ids) - set(rnd.group_ids))
        if unknown:
            raise ValueError(f"replace_groups: group ids {unknown} are not in the round "
                             f"(its groups: {rnd.group_ids}); re-roll with the round's ids")
        if list(new.rewards.names) != list(rnd.rewards.names):
            raise ValueError(f"replace_groups: the re-rolled rows have reward columns "
                             f"{new.rewards.names}, the round {rnd.rewards.names}; run "
                             f"augmenters that add columns after the ones that re-roll")
        drop = torch.isin(rnd.rollout.group_ids, torch.tensor(new.group_ids, dtype=torch.long))
        concat = self.policy.concat_rollouts if capabilities_of(self.policy).concat_rollouts \
            else concat_rollouts
        rollout = concat([rnd.rollout.select(~drop), new.rollout])
        rewards = _concat_rewards([rnd.rewards.select(~drop), new.rewards])
        pos = {g: j for j, g in enumerate(rnd.group_ids)}
        prompts, metadata = list(rnd.prompts), list(rnd.metadata)
        for j, g in enumerate(new.group_ids):
            prompts[pos[g]], metadata[pos[g]] = new.prompts[j], new.metadata[j]
        return Round(prompts, metadata, rnd.counts, rnd.group_ids, rollout, rewards,
                     rnd.error or new.error)

    def collect_round(self, k: int = 0):
        """Draw prompts, roll out this rank's share, score, update the selector, then let the
        job's augmenters rework the round."""
        idx = self.next_prompts()
        rnd = self.collect_groups([self.prompts[i] for i in idx], [self.metadata[i] for i in idx],
                                  self.counts(idx), [g + k * len(idx) for g in range(len(idx))])
        self._update_selector(idx, rnd.rollout, rnd.rewards)
        for augment in self.augmenters:
            rnd = augment(self, rnd)
        return rnd.rollout, rnd.rewards, rnd.error

    def collect_dynamic(self):
        """DAPO dynamic sampling: rounds until prompts_per_step informative groups are kept.

        Every rank sees the gathered rewards, so all ranks keep the same groups and stop after
        the same round. Returns (rollout, rewards, error, report).
        """
        from mmrl.budget.allocate import DynamicSampling
        parts = []

        def produce(k):
            rollout, rewards, error = self.collect_round(k)
            parts.append((rollout, rewards, error))
            ok = rewards.valid
            total = rewards.weighted_sum(self.config.algo.reward_weights)[ok]
            return (self.dist.all_gather_rows(total),
                    self.dist.all_gather_rows(rollout.sample_group_ids[ok]))
        kept, report = DynamicSampling(self.t.prompts_per_step,
                                       self.t.dynamic_sampling_tries).collect(produce)
        rows = [(r, w, torch.isin(r.group_ids, keep) & w.valid) for (r, w, _), keep
                in zip(parts, kept)]
        concat = self.policy.concat_rollouts if capabilities_of(self.policy).concat_rollouts \
            else concat_rollouts
        rollout = concat([r.select(m) for r, _, m in rows])
        rewards = _concat_rewards([w.select(m) for _, w, m in rows])
        return rollout, rewards, next((e for *_, e in parts if e), None), report


def _concat_rewards(parts):
    from mmrl.train.reward_fn import RewardBatch
    return RewardBatch(torch.cat([p.values for p in parts]), list(parts[0].names),
                       torch.cat([p.valid for p in parts]))
