"""Token advantages from below the row (``algo.step_advantage``): GiGPO's step groups and
SPO-chain's Monte-Carlo values, on a job whose responses have steps.

Two parts, neither knows a method's name:

- :class:`StepAugmenter`, a round augmenter (:mod:`mmrl.train.rounds`), writes what the step
  rule reads into ``rollout.data`` (row-aligned, so DAPO's selection and concatenation keep it):
  ``step_rewards`` / ``anchors`` ``[B, T]`` from the job's step function (rule flag
  ``job_steps``), or ``spo_cuts`` / ``spo_values`` ``[B, T]`` (−2 = padding) from
  ``policy.continue_from`` (capability ``continuations``) scored by the run's reward (rule flag
  ``mc_values``);
- :data:`STEP_RULES` maps each name to ``rule(rollout, total_rewards [B], spec) -> [B, T]``,
  which :func:`mmrl.train.batch.batch_advantages` calls in place of the row estimator.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from mmrl.algo.stepwise import gigpo_advantages, spo_chain_advantages, spo_cut_points
from mmrl.registry import Registry
from mmrl.train.distributed import gathered_parameters
from mmrl.train.policy import capabilities_of
from mmrl.train.reward_fn import robust_reward
from mmrl.train.rollout import Rollout

__all__ = ["STEP_RULES", "StepAugmenter", "StepFn", "prefix_anchors", "step_advantages"]

STEP_RULES: Registry[Callable] = Registry("step advantage")

#: A job's steps: ``step_fn(rollout) -> (step_rewards [B, T] float, anchors [B, T] long)``:
#: r_t of each response token (a step) and an id of the state before it (equal ids = the same
#: state), both read where ``rollout.mask`` is True.
StepFn = Callable[[Rollout], Tuple[torch.Tensor, torch.Tensor]]


def _need(rollout: Rollout, keys, name: str) -> None:
    missing = [k for k in keys if k not in rollout.data]
    if missing:
        raise ValueError(f"algo.step_advantage={name!r} reads rollout.data {missing}, which "
                         f"this job's rollouts do not carry: the job must add a StepAugmenter "
                         f"(mmrl.train.steps; the toy job does)")


@STEP_RULES.register("gigpo")
def gigpo_rule(rollout: Rollout, total: torch.Tensor, spec) -> torch.Tensor:
    """GiGPO token advantages ``[B, T]``: every valid token is a step row of
    :func:`mmrl.algo.stepwise.gigpo_advantages` (episode group = the row's group, anchors and
    step rewards from the job); rows with a non-finite reward get 0 and stay out."""
    _need(rollout, ("step_rewards", "anchors"), "gigpo")
    ok = rollout.mask & torch.isfinite(total)[:, None]  # [B, T]
    rows, steps = ok.nonzero(as_tuple=True)
    out = torch.zeros(ok.shape, dtype=torch.float32)
    if len(rows):
        out[ok] = gigpo_advantages(
            rollout.data["step_rewards"][ok].float(), rows, steps, rollout.group_ids[rows],
            rollout.data["anchors"][ok], gamma=spec.gigpo_gamma, omega=spec.gigpo_omega,
            mode=spec.gigpo_mode).float()
    return out


@STEP_RULES.register("spo_chain")
def spo_chain_rule(rollout: Rollout, total: torch.Tensor, spec) -> torch.Tensor:
    """SPO-chain token advantages ``[B, T]`` (:func:`mmrl.algo.stepwise.spo_chain_advantages`)
    from the cut points' Monte-Carlo values the :class:`StepAugmenter` stored; rows with a
    non-finite reward get 0."""
    _need(rollout, ("spo_cuts", "spo_values"), "spo_chain")
    ok = torch.isfinite(total)
    probs = rollout.rollout_logp.float().exp()
    adv = spo_chain_advantages(probs, rollout.mask, rollout.data["spo_cuts"],
                               rollout.data["spo_values"].float(), torch.where(ok, total, 0.0),
                               threshold=spec.spo_threshold)
    return torch.where(ok[:, None], adv, torch.zeros_like(adv)).float()


def step_advantages(rollout: Rollout, total: torch.Tensor, spec) -> torch.Tensor:
    """``[B, T]`` token advantages of ``spec.step_advantage`` (``total``: each row's weighted
    reward, NaN where it failed)."""
    return STEP_RULES.get(spec.step_advantage)(rollout, total, spec)


def prefix_anchors(ids: torch.Tensor, start: int) -> torch.Tensor:
    """``[B, T]`` anchor ids: the state before response token t is ``ids[:, :start + t]``
    (prompt ⊕ the t tokens emitted so far); equal prefixes get equal ids (exact match, GiGPO's
    anchor states), prefixes of different lengths never do."""
    b, t_len = ids.shape[0], ids.shape[1] - start
    out = torch.empty(b, t_len, dtype=torch.long)
    for t in range(t_len):  # T unique calls over [B, start + t]
        _, inv = torch.unique(ids[:, :start + t], dim=0, return_inverse=True)
        out[:, t] = t * b + inv
    return out


class StepAugmenter:
    """The round augmenter that gives a round's rollout what ``spec.step_advantage`` reads.

    Args:
        spec: the resolved :class:`mmrl.algo.spec.AlgoSpec`.
        step_fn: the job's :data:`StepFn` (needed by rules flagged ``job_steps``).
        policy: checked for ``Capabilities(continuations=True)`` (rules flagged ``mc_values``).

    Raises:
        ValueError: the rule needs a step function the job did not give, or continuations the
            policy does not declare.
    """

    def __init__(self, spec, step_fn: Optional[StepFn] = None, policy=None):
        self.spec, self.step_fn = spec, step_fn
        if spec.step_needs("job_steps") and step_fn is None:
            raise ValueError(f"algo.step_advantage={spec.step_advantage!r} needs the job's "
                             f"steps (per-step rewards, anchor states); this job gives none")
        if spec.step_needs("mc_values") and policy is not None and not capabilities_of(
                policy).continuations:
            raise ValueError(capabilities_of(policy).missing(
                "continuations", type(policy).__name__,
                f"algo.step_advantage={spec.step_advantage!r}"))

    def __call__(self, rounds, rnd):
        rollout = rnd.rollout
        if self.step_fn is not None and self.spec.step_needs("job_steps"):
            rollout.data["step_rewards"], rollout.data["anchors"] = self.step_fn(rollout)
        if self.spec.step_needs("mc_values"):
            cuts, values, n = mc_values(rounds, rollout, self.spec)
            rollout.data["spo_cuts"], rollout.data["spo_values"] = cuts, values
            rounds.add_round_metrics({"spo_continuations": float(n)})
        return rnd


def mc_values(rounds, rollout: Rollout, spec) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """``(cuts [B, T], values [B, T], continuations)``: each row's kept cut points
    (:func:`spo_cut_points` of the sampler's probabilities; −2 = padding) and V(c), the mean
    weighted reward of ``spec.spo_samples`` continuations of prompt ⊕ o[:c+1]
    (``policy.continue_from``, scored by the run's reward; failed ones left out of the mean)."""
    if rollout.rollout_logp is None:
        raise ValueError("SPO's cut points read the sampler's probabilities "
                         "(Rollout.rollout_logp); the policy must declare rollout_logp")
    b, t_len = rollout.mask.shape
    kept = spo_cut_points(rollout.rollout_logp.float().exp(), rollout.mask,
                          spec.spo_threshold, spec.spo_interval)
    cuts = torch.full((b, t_len), -2, dtype=torch.long)
    values = torch.zeros(b, t_len)
    rows = torch.cat([torch.full((len(c),), i, dtype=torch.long) for i, c in enumerate(kept)]
                     + [torch.zeros(0, dtype=torch.long)])
    if not len(rows):  # no row, or no cut point anywhere
        return cuts, values, 0
    flat = torch.cat(kept)
    with gathered_parameters(rounds.fsdp), torch.no_grad():
        cont = rounds.policy.continue_from(rollout, rows, flat + 1, spec.spo_samples, rounds.gen)
    got, _ = robust_reward(rounds.reward_fn, cont.samples, cont.prompts, cont.metadata,
                           rounds.s.reward_retries, rounds.s.reward_timeout or None,
                           group_ids=cont.sample_group_ids)
    total = torch.where(got.valid, got.weighted_sum(rounds.reward_weights), float("nan"))
    v = total.view(len(rows), spec.spo_samples).nanmean(-1)
    slot = torch.cat([torch.arange(len(c)) for c in kept])
    cuts[rows, slot], values[rows, slot] = flat, torch.nan_to_num(v)
    return cuts, values, len(cont)
