"""Guidance for groups that never succeed: round augmenters that re-roll all-fail groups with
hints (GHPO, Scaf-GRPO, Keye-VL 1.5's progressive hinting, Guide, ExPO, XRPO's in-context
seeding).

A group whose every sample fails has zero advantage under every group-relative estimator: its
rollouts are spent and teach nothing. Each augmenter here finds those groups after a round is
scored (the gathered rewards, the same on every rank) and re-rolls them, or one of their rows,
with a hint built from the record, so that some sample succeeds and the group carries an
advantage. They plug into :class:`mmrl.train.rounds.Rounds` as ``aug(rounds, round) -> round``,
like the video job's :class:`mmrl.video.rounds.DifficultyRounds`; the loop is unchanged.

What a hint is belongs to the job: a :class:`HintPrompts` (the toy job's digit prefixes, the
video job's text from a record's ``hints`` / ``solution_steps`` / ``solution``) builds the hinted
prompt. The methods differ in which hint, when, and how the hinted samples are trained:

========== ============================================== =========================================
method     re-roll of an all-fail group                   trained as
========== ============================================== =========================================
ghpo       whole group, solution prefix ω = .25, .5, .75  on-policy, hinted prompt
           (staged: the next ω only while still all-fail)
keye       whole group, hint levels 1, 2, … (staged)      on-policy, hinted prompt (unconfirmed)
scaf       one row: lowest hint level that succeeds,      on-policy, hinted prompt
           after ``start_step`` exempt steps
guide      whole group, the full hint                     plain prompt; the sampler's log-probs
                                                          (hinted) in ``Rollout.rollout_logp``,
                                                          rows flagged ``Rollout.off_policy``
                                                          for ``algo.off_policy_shaping``
expo       one row: a correct answer-conditioned sample   plain prompt (unconfirmed)
xrpo_seed  whole group, K solved exemplars of other       plain prompt, like guide (unconfirmed)
           records (XRPO's in-context seeding)
========== ============================================== =========================================

Rows are "failed" when the success value (a reward column, or the weighted total) is
``<= threshold``; a group is all-fail when it has at least 2 valid rows and every one failed.
Metrics per step: ``guided_groups`` (all-fail groups re-rolled), ``guided_rescued`` (of those,
groups that have a success afterwards), ``guided_rollouts`` (extra samples drawn).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from mmrl.train.policy import capabilities_of
from mmrl.train.reward_fn import RewardBatch

__all__ = ["GUIDANCE", "Guidance", "HintPrompts", "StagedHints", "RowHint", "GuideRetarget",
           "ExemplarSeeds", "build_guidance", "failing_groups"]

GUIDANCE = ("none", "ghpo", "keye", "scaf", "guide", "expo", "xrpo_seed")
"""The ``guidance`` choices of the toy and video jobs."""


class HintPrompts(Protocol):
    """What a job supplies to build hinted prompts (``meta``: one prompt's metadata).

    Every ``*_hint`` method returns a hint (the job's type: digits, text) or None (the record
    has none). ``with_hint`` returns the (prompt, metadata) of the hinted variant.
    """

    def level_hints(self, meta: Dict[str, Any]) -> List[Any]:
        """Hint levels, abstract to concrete: level l holds the record's first l hints."""

    def prefix_hint(self, meta: Dict[str, Any], ratio: float) -> Optional[Any]:
        """The first ``round(ratio · len)`` of the reference solution (GHPO)."""

    def answer_hint(self, meta: Dict[str, Any]) -> Optional[Any]:
        """The ground-truth answer to explain (ExPO)."""

    def with_hint(self, prompt: Any, meta: Dict[str, Any], hint: Any) -> Tuple[Any, Dict]:
        """The hinted prompt and its metadata."""

    def exemplar_hint(self, prompt: Any, meta: Dict[str, Any],
                      corpus: Sequence[Tuple[Any, Dict[str, Any]]], k: int) -> Optional[Any]:
        """Up to ``k`` exemplars from ``corpus`` ((prompt, metadata) of *other* records), the
        ones most similar to this prompt, with their reference solutions (XRPO seeding)."""


@dataclasses.dataclass
class Guidance:
    """Shared settings of the augmenters.

    Attributes:
        prompts: the job's :class:`HintPrompts`.
        column: the reward column that says success (None: the weighted total).
        threshold: a row succeeds when its success value is ``> threshold``.
        start_step: no guidance before this step (Scaf-GRPO's guidance exemption).
        weights: the reward weights of the total (``algo.reward_weights``).
    """

    prompts: HintPrompts
    column: Optional[str] = None
    threshold: float = 0.0
    start_step: int = 0
    weights: Optional[Dict[str, float]] = None

    def success(self, rewards: RewardBatch) -> torch.Tensor:
        """``[B]`` float: the success value, NaN where the row's reward is invalid."""
        v = (rewards.column(self.column) if self.column is not None
             else rewards.weighted_sum(self.weights)).double()
        return torch.where(rewards.valid, v, torch.full_like(v, float("nan")))


def failing_groups(values: torch.Tensor, gids: torch.Tensor, threshold: float) -> List[int]:
    """Group ids whose >= 2 valid rows (finite ``values``) are all ``<= threshold``.

    Args:
        values: ``[B]`` success values, NaN for invalid rows (all ranks' rows).
        gids: ``[B]`` long group ids.
        threshold: success iff value > threshold.
    """
    ok = torch.isfinite(values)
    groups, inv = gids.unique(return_inverse=True)  # inv: [B] row -> group slot
    valid = torch.zeros(len(groups)).index_add_(0, inv, ok.float())
    failed = torch.zeros(len(groups)).index_add_(0, inv, (ok & (values <= threshold)).float())
    return groups[(valid >= 2) & (failed == valid)].tolist()


def _all_fail(rounds, rnd, s: Guidance) -> List[int]:
    """Positions j (into ``rnd.group_ids``) of the round's all-fail groups."""
    values, gids = rounds.gathered(rnd.rollout, s.success(rnd.rewards))
    bad = set(failing_groups(values, gids, s.threshold))
    return [j for j, g in enumerate(rnd.group_ids) if g in bad]


def _succeeded(rounds, new, s: Guidance) -> set:
    values, gids = rounds.gathered(new.rollout, s.success(new.rewards))
    ok = torch.isfinite(values) & (values > s.threshold)
    return set(gids[ok].unique().tolist())


def _redo(rnd, picks: Sequence[Tuple[int, Any, Dict[str, Any]]]):
    """collect_groups keyword arguments re-rolling group positions ``j`` as (prompt, meta)."""
    return {"prompts": [p for _, p, _ in picks], "metadata": [m for _, _, m in picks],
            "counts": [rnd.counts[j] for j, _, _ in picks],
            "group_ids": [rnd.group_ids[j] for j, _, _ in picks]}


class StagedHints:
    """GHPO (hkgc-1/GHPO) and Keye-VL 1.5 progressive hinting (arXiv 2509.01563, unconfirmed):
    an all-fail group is re-rolled whole with the stage-1 hint; a group still all-fail is
    re-rolled with the stage-2 hint, and so on. Each re-roll replaces the group's rows and keeps
    the hinted prompt (trained on-policy under it); a group still all-fail after the last stage
    keeps A = 0.

    Args:
        settings: :class:`Guidance`.
        stages: GHPO: the solution-prefix ratios ω (hkgc-1/GHPO: 0.25, 0.5, 0.75); None: the
            record's hint levels 1, 2, … (Keye; unconfirmed: the abstract names progressive
            hinting for difficult cases, not its levels or trigger).
    """

    def __init__(self, settings: Guidance, stages: Optional[Sequence[float]] = None):
        if stages is not None and not all(0.0 < w <= 1.0 for w in stages):
            raise ValueError(f"guidance ratios {list(stages)}: expected values in (0, 1] "
                             f"(GHPO: [0.25, 0.5, 0.75])")
        self.s, self.stages = settings, None if stages is None else list(stages)

    def _hint(self, meta, k: int):
        if self.stages is not None:
            return self.s.prompts.prefix_hint(meta, self.stages[k]) if k < len(
                self.stages) else None
        levels = self.s.prompts.level_hints(meta)
        return levels[k] if k < len(levels) else None

    def __call__(self, rounds, rnd):
        if rounds.step < self.s.start_step:
            return rnd
        todo = _all_fail(rounds, rnd, self.s)
        groups, rescued, drawn, k = len(todo), 0, 0, 0
        while todo:
            picks = []
            for j in todo:
                hint = self._hint(rnd.metadata[j], k)
                if hint is not None:
                    picks.append((j, *self.s.prompts.with_hint(rnd.prompts[j], rnd.metadata[j],
                                                               hint)))
            if not picks:
                break
            new = rounds.collect_groups(**_redo(rnd, picks))
            drawn += sum(new.counts)
            won = _succeeded(rounds, new, self.s)
            rescued += len(won)
            rnd = rounds.replace_groups(rnd, new)
            todo, k = [j for j, _, _ in picks if rnd.group_ids[j] not in won], k + 1
        rounds.add_round_metrics({"guided_groups": groups, "guided_rescued": rescued,
                                  "guided_rollouts": drawn})
        return rnd


def _single_process(rounds, name: str) -> None:
    if rounds.dist.world > 1:
        raise ValueError(f"guidance={name} replaces one row of a group, which mmrl does on one "
                         f"process only (got {rounds.dist.world} ranks); use ghpo, keye or "
                         f"guide (whole-group re-rolls) with data parallel")


class RowHint:
    """Scaf-GRPO (arXiv 2510.19807 §3.2, dvlab-research/Scaf-GRPO) and ExPO (arXiv 2507.02834,
    unconfirmed): one row of an all-fail group is replaced by a hinted success.

    - ``scaf``: after ``start_step`` exempt steps, every hint level of an all-fail group is
      sampled once (one batch, as the released code); the lowest level whose sample succeeds
      replaces the group's first row, trained on-policy under its hinted prompt (paper Eq. 2-4,
      no importance correction). No level succeeds: the group is left as it was.
    - ``expo``: N samples conditioned on the ground-truth answer (self-explanations); the first
      correct one replaces the group's first row, retargeted to the plain prompt (the policy's
      ``retarget``): ExPO's positives are trained as answers to the question. Unconfirmed: the
      abstract fixes neither the number of samples nor how many rows they replace.

    One process only (rows of a group may sit on several ranks).
    """

    def __init__(self, settings: Guidance, method: str, policy=None):
        if method not in ("scaf", "expo"):
            raise ValueError(f"RowHint method {method!r}: expected 'scaf' or 'expo'")
        if method == "expo":
            _need_retarget(policy, method)
        self.s, self.method = settings, method

    def _candidates(self, rnd, j: int) -> List[Tuple[Any, Dict[str, Any], int]]:
        """(prompt, metadata, samples): one sample per hint level (scaf), or N samples of the
        answer-conditioned prompt (expo)."""
        meta, prompt = rnd.metadata[j], rnd.prompts[j]
        if self.method == "scaf":
            return [(*self.s.prompts.with_hint(prompt, meta, h), 1)
                    for h in self.s.prompts.level_hints(meta)]
        answer = self.s.prompts.answer_hint(meta)
        return [] if answer is None else [(*self.s.prompts.with_hint(prompt, meta, answer),
                                           rnd.counts[j])]

    def __call__(self, rounds, rnd):
        if rounds.step < self.s.start_step:
            return rnd
        _single_process(rounds, self.method)
        todo = _all_fail(rounds, rnd, self.s)
        picks, owner = {"prompts": [], "metadata": [], "counts": [], "group_ids": []}, []
        for j in todo:
            for p, m, n in self._candidates(rnd, j):
                for key, v in zip(picks, (p, m, n, rnd.group_ids[j])):
                    picks[key].append(v)
                owner += [j] * n
        drawn = len(owner)
        rescued = 0
        if owner:
            cand = rounds.collect_groups(**picks)  # rows in candidate order (one process)
            ok = self.s.success(cand.rewards) > self.s.threshold
            for j in todo:
                rows = [i for i, o in enumerate(owner) if o == j and bool(ok[i])]
                if rows:
                    rnd = self._swap(rounds, rnd, j, cand, rows[0])
                    rescued += 1
        rounds.add_round_metrics({"guided_groups": len(todo), "guided_rescued": rescued,
                                  "guided_rollouts": drawn})
        return rnd

    def _swap(self, rounds, rnd, j: int, cand, i: int):
        """``rnd`` with group position j's first row replaced by candidate row i."""
        g = rnd.group_ids[j]
        rows = (rnd.rollout.group_ids == g).nonzero().flatten()
        keep, pick = rows[1:], torch.tensor([i])
        row = cand.rollout.select(pick)
        if self.method == "expo":  # trained as an answer to the plain question
            row = rounds.policy.retarget(row, [rnd.prompts[j]], [rnd.metadata[j]])
        rollout = rounds.concat([rnd.rollout.select(keep), row])
        rewards = RewardBatch(torch.cat([rnd.rewards.values[keep], cand.rewards.values[pick]]),
                              list(rnd.rewards.names),
                              torch.cat([rnd.rewards.valid[keep], cand.rewards.valid[pick]]))
        new = dataclasses.replace(rnd, prompts=[rnd.prompts[j]], metadata=[rnd.metadata[j]],
                                  counts=[rnd.counts[j]], group_ids=[g], rollout=rollout,
                                  rewards=rewards)
        return rounds.replace_groups(rnd, new)


def _need_retarget(policy, method: str) -> None:
    caps = capabilities_of(policy)
    if not (caps.retarget and caps.rollout_logp):
        raise TypeError(caps.missing("retarget", type(policy).__name__, f"guidance={method}")
                        + " with rollout_logp=True (hinted samples are trained for the plain "
                        "prompt, their sampler's log-probs kept); use ghpo, keye or scaf")


class GuideRetarget:
    """Guide-GRPO (arXiv 2506.13923; vaskar-open-source-research/guide_rl): an all-fail group is
    re-rolled whole with the record's full hint; the hinted rows are then trained for the plain
    prompt: the policy's ``retarget`` rescores them under it while ``Rollout.rollout_logp``
    keeps log π_old(o_t | q, h, o_<t), the distribution they were sampled from, and
    ``Rollout.off_policy`` flags them. The authors' correction is ``algo.off_policy_shaping:
    percentile`` (``off_policy_gamma: 0.9``, guide_rl ``core_algos.compute_policy_loss``): a
    flagged row's loss is −A·r/(r + γ), r = π_θ(o_t|q)/π_old(o_t|q,h), γ the row's 0.9-quantile
    of r (detached), unclipped. The older alternative is ``algo.rollout_is: token_truncate``:
    every row's clipped objective weighted by clamp(π_old(o_t|q)/π_sampler(o_t|·)).

    Differs from the authors' code: hinted groups are kept whatever their accuracy (the code
    drops groups of accuracy 0 or 1; here they have A = 0); γ is over the row's valid tokens
    (the code's one-row micro-batch tensor holds its padding positions too).
    """

    def __init__(self, settings: Guidance, policy, name: str = "guide"):
        _need_retarget(policy, name)
        self.s = settings

    def _hint(self, rnd, j: int):
        """The hint of group position j (None: the record has none): the full hint level."""
        levels = self.s.prompts.level_hints(rnd.metadata[j])
        return levels[-1] if levels else None

    def __call__(self, rounds, rnd):
        if rounds.step < self.s.start_step:
            return rnd
        todo = _all_fail(rounds, rnd, self.s)
        picks = []
        for j in todo:
            hint = self._hint(rnd, j)
            if hint is not None:
                picks.append((j, *self.s.prompts.with_hint(rnd.prompts[j], rnd.metadata[j],
                                                           hint)))
        rescued = drawn = 0
        if picks:
            new = rounds.collect_groups(**_redo(rnd, picks))
            drawn, rescued = sum(new.counts), len(_succeeded(rounds, new, self.s))
            r = new.rollout
            pos = {g: j for j, g in enumerate(rnd.group_ids)}
            gids = r.group_ids.tolist()
            plain = rounds.policy.retarget(r, [rnd.prompts[pos[g]] for g in gids],
                                           [rnd.metadata[pos[g]] for g in gids])
            plain = dataclasses.replace(plain, off_policy=torch.ones(len(plain),
                                                                     dtype=torch.bool))
            new = dataclasses.replace(new, rollout=plain, prompts=[rnd.prompts[j] for j, _, _
                                                                   in picks],
                                      metadata=[rnd.metadata[j] for j, _, _ in picks])
            rnd = rounds.replace_groups(rnd, new)
        rounds.add_round_metrics({"guided_groups": len(todo), "guided_rescued": rescued,
                                  "guided_rollouts": drawn})
        return rnd


class ExemplarSeeds(GuideRetarget):
    """XRPO's in-context seeding (arXiv 2510.06672; **unconfirmed**: the abstract says "an
    in-context seeding strategy that injects curated exemplars" for zero-reward prompts; the
    public reviews of the paper add K = 2 exemplars retrieved by embedding similarity from an
    evolving corpus of verified successes, long solutions truncated; UIUC-MLSys/XRPO was not
    reachable). An all-fail group is re-rolled whole with up to ``k`` exemplars of *other*
    records (the job's :meth:`HintPrompts.exemplar_hint`: the most similar ones, with their
    reference solutions) in its prompt, and the rows are trained for the plain prompt exactly as
    :class:`GuideRetarget` (``retarget``; with ``algo.rollout_is`` the sampler's log-probs
    correct them, without it they are trained as plain samples, like ExPO).

    The corpus (its state, saved with the checkpoint) holds the (prompt, metadata) of every
    record the run has seen solved (``pool="solved"``: a group with a success before guidance;
    XRPO's verified successes), or of every record it has drawn (``pool="dataset"``: records
    carrying a reference solution, curated rather than solved). It is the same on every rank
    (group prompts and gathered success values). What is mmrl's: whole-group re-roll, the
    similarity (the job's), solved = a success of the plain prompt (seeded successes do not
    enter), the exemplars' answers = the records' reference solutions, not the policy's text.
    """

    def __init__(self, settings: Guidance, policy, k: int = 2, pool: str = "solved"):
        super().__init__(settings, policy, "xrpo_seed")
        if k < 1 or pool not in ("solved", "dataset"):
            raise ValueError(f"xrpo_seed: got k={k}, pool={pool!r}; expected k >= 1 and pool "
                             f"'solved' or 'dataset'")
        self.k, self.pool = k, pool
        self.corpus: Dict[str, Tuple[Any, Dict[str, Any]]] = {}  # repr(prompt) -> (prompt, meta)

    def state_dict(self) -> Dict[str, Any]:
        return {"corpus": list(self.corpus.values())}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.corpus = {repr(p): (p, m) for p, m in state["corpus"]}

    def _remember(self, rounds, rnd) -> None:
        solved = None
        if self.pool == "solved":
            values, gids = rounds.gathered(rnd.rollout, self.s.success(rnd.rewards))
            solved = set(gids[torch.isfinite(values) & (values > self.s.threshold)].tolist())
        for j, g in enumerate(rnd.group_ids):
            if solved is None or g in solved:
                self.corpus.setdefault(repr(rnd.prompts[j]), (rnd.prompts[j], rnd.metadata[j]))

    def _hint(self, rnd, j: int):
        own = repr(rnd.prompts[j])
        others = [v for key, v in self.corpus.items() if key != own]
        return self.s.prompts.exemplar_hint(rnd.prompts[j], rnd.metadata[j], others,
                                            self.k) if others else None

    def __call__(self, rounds, rnd):
        self._remember(rounds, rnd)  # before the exemption too: the corpus grows from step 0
        return super().__call__(rounds, rnd)


def build_guidance(method: str, settings: Guidance, policy=None,
                   ratios: Sequence[float] = (0.25, 0.5, 0.75), exemplars: int = 2,
                   exemplar_pool: str = "solved") -> Optional[Callable]:
    """The round augmenter of ``method`` (one of :data:`GUIDANCE`; None for ``none``).

    Raises:
        ValueError: an unknown method.
        TypeError: ``guide`` / ``expo`` / ``xrpo_seed`` with a policy that cannot retarget.
    """
    if method == "none":
        return None
    makers = {"ghpo": lambda: StagedHints(settings, ratios),
              "keye": lambda: StagedHints(settings, None),
              "scaf": lambda: RowHint(settings, "scaf"),
              "expo": lambda: RowHint(settings, "expo", policy),
              "guide": lambda: GuideRetarget(settings, policy),
              "xrpo_seed": lambda: ExemplarSeeds(settings, policy, exemplars, exemplar_pool)}
    if method not in makers:
        raise ValueError(f"guidance={method!r}; expected one of {', '.join(GUIDANCE)}")
    return makers[method]()
