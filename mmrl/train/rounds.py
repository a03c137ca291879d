"""How a step's rollouts are collected: rounds of groups drawn by the prompt selector, sharded
over ranks, rolled out and scored, reworked by the job's augmenters, and DAPO dynamic sampling.

:class:`Rounds` is built from explicit parts (the policy, the reward, the prompts, the selector,
:class:`RoundSettings`, the generators and the data-parallel context) and knows nothing of the
run that owns it: :class:`mmrl.train.runner.Run` builds one and calls :meth:`Rounds.collect`
once per step. A round augmenter is ``aug(rounds, round) -> round``: it receives the
:class:`Rounds` and may re-roll groups (:meth:`Rounds.collect_groups` +
:meth:`Rounds.replace_groups`) or add reward columns, using the gathered rewards
(:meth:`Rounds.gathered`), rank-independent seeds (:meth:`Rounds.round_seed`), agreement over
ranks (:meth:`Rounds.all_agree`) and its own metrics (:meth:`Rounds.add_round_metrics`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mmrl.budget.allocate import DynamicSampling, knapsack_allocate
from mmrl.train.async_reward import check_chunkable, collect_chunked
from mmrl.train.distributed import Dist, gathered_parameters, shard_samples
from mmrl.train.loop import rollout_groups, score, settings_from
from mmrl.train.policy import Capabilities, capabilities_of
from mmrl.train.reward_fn import RewardBatch, is_groupwise
from mmrl.train.rollout import Rollout, concat_rollouts

__all__ = ["Round", "RoundAugmenter", "RoundSettings", "Rounds", "Collected", "check_prompts",
           "needs_whole_groups", "concat_rollouts"]


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


#: A round augmenter: ``aug(rounds, round) -> round`` (re-roll some groups, add a reward column);
#: ``rounds`` is the :class:`Rounds` collecting the step.
RoundAugmenter = Callable[[Any, Round], Round]


@dataclass
class RoundSettings:
    """How a step's rounds are drawn and scored: fields of
    :class:`mmrl.config.schema.TrainConfig` with the same names and defaults (documented there;
    a test keeps them equal)."""

    prompts_per_step: int = 8
    group_size: int = 8
    rollout_allocation: str = "fixed"
    knapsack_n_min: int = 2
    knapsack_n_max: int = 128
    dynamic_sampling_tries: int = 0
    reward_retries: int = 2
    reward_timeout: float = 0.0
    reward_chunks: int = 1
    seed: int = 0

    @classmethod
    def from_train(cls, train) -> "RoundSettings":
        """The settings of a :class:`~mmrl.config.schema.TrainConfig`, field by name."""
        return settings_from(cls, train)


@dataclass
class Collected:
    """A step's collected rows on this rank: the rollout, its rewards, a reward failure (or
    None), the collection's metrics (dynamic sampling's, the augmenters'), and ``groups``: the
    (prompt, metadata) of every group id of the step's rounds (the same on every rank; a
    greedy baseline's prompts)."""

    rollout: Rollout
    rewards: RewardBatch
    error: Optional[str] = None
    metrics: Dict[str, float] = field(default_factory=dict)
    groups: Dict[int, Tuple[Any, Dict[str, Any]]] = field(default_factory=dict)


def check_prompts(prompts: Sequence[Any], prompts_per_step: int) -> None:
    """Refuse a prompt set a step cannot draw ``prompts_per_step`` distinct prompts from.

    Raises:
        ValueError: no prompts, or fewer than ``prompts_per_step``.
    """
    if not prompts:
        raise ValueError("no prompts to train on; check the job's prompt source")
    if prompts_per_step > len(prompts):
        raise ValueError(f"train.prompts_per_step={prompts_per_step} but there are only "
                         f"{len(prompts)} prompt(s); lower prompts_per_step (a batch holds "
                         f"distinct prompts) or add prompts")


def needs_whole_groups(spec, caps: Capabilities, reward_fn=None) -> bool:
    """Must a group's samples stay on one rank? Yes for presets that normalize within the group
    or weight its tokens together (``spec``: a resolved :class:`mmrl.algo.presets.AlgoSpec`;
    step advantages too: GiGPO's step groups),
    policies with the ``row_advantages`` capability, policies that declare ``whole_groups``
    (e.g. a group sharing one initial noise) and groupwise rewards (a win rate within the
    group, :func:`mmrl.train.reward_fn.is_groupwise`: a partial group would be scored wrong)."""
    return bool(spec.needs_groups or spec.needs_token_weights or caps.row_advantages or
                getattr(spec, "needs_steps", False) or
                caps.whole_groups or is_groupwise(reward_fn))


class Rounds:
    """Collects each step's rollouts (see the module docstring).

    Args:
        policy, reward_fn: the policy (a :class:`mmrl.train.policy.GroupPolicy`) and the reward.
        prompts, metadata: the prompt set (metadata: one dict per prompt, or None).
        settings: how rounds are drawn and scored.
        selector: the prompt selector (:mod:`mmrl.budget.selection`); it draws
            ``prompts_per_step`` prompts per round and learns from the gathered rewards.
        generator: the rollout generator (this rank's stream); ``prompt_generator`` draws the
            prompts (the same stream on every rank).
        whole_groups: keep each group on one rank (:func:`needs_whole_groups`).
        dist: the data-parallel context (None: one process); ``fsdp``: the FSDP2 root whose
            parameters are gathered while rolling out (None without FSDP).
        augmenters: the job's round augmenters, applied in order to every round.
        reward_weights: weights of the reward columns in the total the selector and dynamic
            sampling see.

    Raises:
        ValueError: fewer prompts than ``prompts_per_step``.
    """

    def __init__(self, policy, reward_fn, prompts: Sequence[Any],
                 metadata: Optional[Sequence[Dict[str, Any]]], *, settings: RoundSettings,
                 selector, generator: torch.Generator, prompt_generator: torch.Generator,
                 whole_groups: bool = False, dist: Optional[Dist] = None, fsdp=None,
                 augmenters: Sequence[RoundAugmenter] = (),
                 reward_weights: Optional[Dict[str, float]] = None):
        check_prompts(prompts, settings.prompts_per_step)
        if settings.reward_chunks > 1:
            check_chunkable(policy)
        self.policy, self.reward_fn, self.s = policy, reward_fn, settings
        self.prompts = list(prompts)
        self.metadata = list(metadata) if metadata is not None else [{} for _ in self.prompts]
        self.selector, self.gen, self.prompt_gen = selector, generator, prompt_generator
        # a groupwise reward scores whole groups only, whoever builds the rounds
        self.whole_groups = whole_groups or is_groupwise(reward_fn)
        self.dist, self.fsdp = dist or Dist(), fsdp
        self.augmenters = list(augmenters)
        self.reward_weights = reward_weights
        self.concat = (policy.concat_rollouts if capabilities_of(policy).concat_rollouts
                       else concat_rollouts)
        self.step = 0  # the step being collected (round_seed's key)
        self.groups: Dict[int, Tuple[Any, Dict[str, Any]]] = {}  # this step's group -> prompt
        self.round_metrics: Dict[str, float] = {}
        self.round_means: Dict[str, Tuple[float, float]] = {}

    def collect(self, step: int) -> Collected:
        """Step ``step``'s rows: one round, or DAPO dynamic sampling's rounds until
        ``prompts_per_step`` informative groups are kept."""
        self.step, self.round_metrics, self.round_means, self.groups = step, {}, {}, {}
        metrics: Dict[str, float] = {}
        if self.s.dynamic_sampling_tries:
            rollout, rewards, error, report = self.collect_dynamic()
            metrics = {"dynamic_tries": float(report.tries),
                       "dynamic_groups_kept": float(report.groups_kept),
                       "dynamic_groups_dropped": float(report.groups_dropped)}
        else:
            rollout, rewards, error = self.collect_round()
        return Collected(rollout, rewards, error, {**metrics, **self.step_round_metrics()},
                         self.groups)

    # ------------------------------------------------------------------ one round
    def next_prompts(self) -> List[int]:
        """The next round's prompt indices, from the selector."""
        return self.selector.select(self.s.prompts_per_step, self.prompt_gen).tolist()

    def counts(self, idx: List[int]) -> List[int]:
        """Samples per prompt: group_size each, or a Knapsack split of the same total."""
        s = self.s
        if s.rollout_allocation == "fixed":
            return [s.group_size] * len(idx)
        probs = self.selector.success_probs()[torch.tensor(idx)]
        return knapsack_allocate(probs, len(idx) * s.group_size, s.knapsack_n_min,
                                 s.knapsack_n_max).tolist()

    def shard(self, counts: Sequence[int], group_ids: Sequence[int]):
        """This rank's (position, sample count, global group id) triples for a round's groups."""
        if self.whole_groups:
            return [(j, c, g) for j, (c, g) in enumerate(zip(counts, group_ids))
                    if j % self.dist.world == self.dist.rank]
        local = shard_samples(list(counts), self.dist)
        return [(j, c, g) for j, (c, g) in enumerate(zip(local, group_ids)) if c > 0]

    def collect_groups(self, prompts: Sequence[Any], metadata: Sequence[Dict[str, Any]],
                       counts: Sequence[int], group_ids: Sequence[int]) -> Round:
        """Roll out and score this rank's share of the given groups (every rank calls it with
        the same arguments)."""
        mine = self.shard(counts, group_ids)
        args = ([prompts[j] for j, _, _ in mine], [metadata[j] for j, _, _ in mine],
                [c for _, c, _ in mine])
        ids, timeout = [g for _, _, g in mine], self.s.reward_timeout or None
        if self.s.reward_chunks > 1 and mine:  # score chunk k while chunk k+1 is sampled
            with gathered_parameters(self.fsdp):
                rollout, rewards, error, m = collect_chunked(
                    self.policy, self.reward_fn, *args, self.gen, ids, self.s.reward_chunks,
                    reward_retries=self.s.reward_retries, reward_timeout=timeout,
                    concat=self.concat)
            self.add_round_metrics(m)
        else:
            with gathered_parameters(self.fsdp):  # FSDP: ranks may generate different lengths
                rollout = rollout_groups(self.policy, *args, self.gen, group_ids=ids)
            rewards, error = score(self.reward_fn, rollout, self.s.reward_retries, timeout)
        return Round(list(prompts), list(metadata), list(counts), list(group_ids), rollout,
                     rewards, error)

    def collect_round(self, k: int = 0) -> Tuple[Rollout, RewardBatch, Optional[str]]:
        """Draw prompts, roll out this rank's share, score, update the selector, then let the
        job's augmenters rework the round; ``k`` numbers the rounds of one step (group ids
        ``k * prompts_per_step + j``)."""
        idx = self.next_prompts()
        rnd = self.collect_groups([self.prompts[i] for i in idx], [self.metadata[i] for i in idx],
                                  self.counts(idx), [g + k * len(idx) for g in range(len(idx))])
        self._update_selector(idx, rnd.rollout, rnd.rewards)
        for augment in self.augmenters:
            rnd = augment(self, rnd)
        self.groups.update(zip(rnd.group_ids, zip(rnd.prompts, rnd.metadata)))
        return rnd.rollout, rnd.rewards, rnd.error

    def _update_selector(self, idx: List[int], rollout, rewards) -> None:
        """Feed the gathered (prompt, reward) pairs of a rollout round to the selector."""
        ok = rewards.valid
        gids = self.dist.all_gather_rows(rollout.sample_group_ids[ok] % len(idx))
        total = self.dist.all_gather_rows(rewards.weighted_sum(self.reward_weights)[ok])
        if len(gids):
            self.selector.update(torch.tensor(idx)[gids], total, gids)

    def collect_dynamic(self):
        """DAPO dynamic sampling: rounds until prompts_per_step informative groups are kept.

        Every rank sees the gathered rewards, so all ranks keep the same groups and stop after
        the same round. Returns (rollout, rewards, error, report).
        """
        parts = []

        def produce(k):
            rollout, rewards, error = self.collect_round(k)
            parts.append((rollout, rewards, error))
            ok = rewards.valid
            total = rewards.weighted_sum(self.reward_weights)[ok]
            return (self.dist.all_gather_rows(total),
                    self.dist.all_gather_rows(rollout.sample_group_ids[ok]))
        kept, report = DynamicSampling(self.s.prompts_per_step,
                                       self.s.dynamic_sampling_tries).collect(produce)
        rows = [(r, w, torch.isin(r.group_ids, keep) & w.valid) for (r, w, _), keep
                in zip(parts, kept)]
        rollout = self.concat([r.select(m) for r, _, m in rows])
        rewards = _concat_rewards([w.select(m) for _, w, m in rows])
        return rollout, rewards, next((e for *_, e in parts if e), None), report

    # ------------------------------------------------------------------ for augmenters
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
            hash((self.s.seed, self.step) + tuple(int(k) for k in keys)) % 2**63)).item())

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
        rollout = self.concat([rnd.rollout.select(~drop), new.rollout])
        rewards = _concat_rewards([rnd.rewards.select(~drop), new.rewards])
        pos = {g: j for j, g in enumerate(rnd.group_ids)}
        prompts, metadata = list(rnd.prompts), list(rnd.metadata)
        for j, g in enumerate(new.group_ids):
            prompts[pos[g]], metadata[pos[g]] = new.prompts[j], new.metadata[j]
        return Round(prompts, metadata, rnd.counts, rnd.group_ids, rollout, rewards,
                     rnd.error or new.error)


def _concat_rewards(parts: Sequence[RewardBatch]) -> RewardBatch:
    return RewardBatch(torch.cat([p.values for p in parts]), list(parts[0].names),
                       torch.cat([p.valid for p in parts]))
