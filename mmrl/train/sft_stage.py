"""The runner's SFT stage: supervised fine-tuning steps (cross-entropy on target completions)
that run before the RL steps, on the same policy, optimizer and trainable parameters (LoRA or
full), checkpointed and resumed like any step.

TON (arXiv 2505.16854) trains in two stages: SFT on targets whose thought was dropped with
probability 0.5 (:func:`mmrl.video.thinking.thought_dropout`), then GRPO. A job that offers an
SFT stage builds an :class:`SFTStage` from its data and hands it to
:func:`mmrl.train.runner.run_training` (``sft=``); steps ``0 .. steps − 1`` are SFT steps (they
count in ``train.steps``), the rest are the run's usual steps.

**Loss.** :func:`sft_loss`: the mean over every target token of the step (all micro-batches,
all ranks) of −log π_θ(y_t | prompt, y_<t), the response tokens only (the prompt is context,
never a target), each token weighing the same (a long target weighs more than a short one, as
TRL's and LLaMA-Factory's SFT losses do).

**Policy contract.** A policy that declares ``Capabilities(sft=True)`` provides
``target_rollout(examples) -> Rollout``: one row per example (the job's object: a prompt and
its target text), the target's tokens as the response, ``mask`` True on them (the end token
included); an example whose input cannot be read has no row and is counted in
``Rollout.skipped``. The rows are scored with the policy's usual ``logp``, so the stage needs
nothing else (temperature and ``allowed_answers`` shape the distribution as in sampling).

**Data and resume.** The job gives :class:`SFTData`: ``num`` examples and
``make(i, rng) -> example`` (``rng``: a ``random.Random``, e.g. for thought dropout). SFT step
``k`` reads ``per_step`` indices of an endless stream of shuffled epochs
(:func:`mmrl.train.pref_stage.step_records`), ``repeats`` examples each (consecutive: a policy
encodes their prompt once; the video job: ``prompts_per_step`` records x ``group_size``
targets, the rows of a GRPO step), and draws its ``rng`` from the run's seed and ``k``: a
step's batch is a function of its index alone, so a run resumed mid-SFT repeats the
uninterrupted run (nothing beyond the runner's usual state is saved). Every rank builds the
whole batch and keeps every ``world``-th record's examples.

**Learning rate.** ``lr`` (None: the optimizer's) is set on the optimizer's parameter groups
for the SFT steps and the previous rates are put back after each, so the RL steps keep theirs.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

from mmrl.train.distributed import Dist, idle_pass, most_over_ranks
from mmrl.train.pref_stage import step_records

__all__ = ["sft_loss", "SFTData", "SFTStage", "sft_step", "step_rng"]


def sft_loss(logp: torch.Tensor, mask: torch.Tensor,
             num_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token-mean cross-entropy of targets: −Σ_{i,t} m_{i,t}·logp_{i,t} / N.

    Args:
        logp: ``[R, T]`` log-probs of the target tokens (with gradient).
        mask: ``[R, T]`` bool, True on target tokens (the prompt and padding are False).
        num_tokens: N, the token count the loss is normalized by (a micro-batch's loss over
            the step's global count, so the sum over micro-batches and ranks is the step's
            mean); None: this call's ``mask.sum()``.

    Returns:
        A scalar; 0 (with gradient) when there is no target token.
    """
    m = mask.to(logp.device)
    n = m.sum() if num_tokens is None else num_tokens.to(logp.device)
    return -torch.where(m, logp, torch.zeros_like(logp)).sum() / n.clamp(min=1).to(logp.dtype)


@dataclass
class SFTData:
    """The SFT examples of a job: ``num`` of them, ``make(i, rng)`` builds the ``i``-th (its
    target may depend on ``rng``: thought dropout) for the policy's ``target_rollout``;
    ``thinks(example) -> bool`` (optional) says whether a target kept its thought (the
    ``sft_think_frac`` metric)."""

    num: int
    make: Callable[[int, random.Random], Any]
    thinks: Optional[Callable[[Any], bool]] = None


def step_rng(seed: int, index: int) -> random.Random:
    """The ``random.Random`` of SFT step ``index`` of a run seeded ``seed``."""
    return random.Random(seed * 1_000_003 + 7 * index + 104_723)


def sft_step(policy, optimizer: torch.optim.Optimizer, rollout, settings,
             dist: Optional[Dist] = None) -> Dict[str, float]:
    """One optimizer step of :func:`sft_loss` on this rank's target rows -> metrics.

    Rows in micro-batches of ``settings.micro_batch_size`` (0: all at once), each loss over the
    step's **global** token count, gradients summed over ranks, then the loop's clip / skip
    (:func:`mmrl.train.loop._optimizer_step`).

    Returns:
        ``loss`` (the step's mean token cross-entropy), ``sft_tokens``, ``sft_targets``
        (global counts), ``grad_norm`` (nan when skipped), ``skipped_updates``.
    """
    from mmrl.train.loop import _chunks, _optimizer_step
    d = dist or Dist()
    R, T = rollout.mask.shape if len(rollout) else (0, 1)
    num_tokens = d.all_reduce_sum(rollout.mask.sum().float() if R else torch.tensor(0.0))
    targets = d.all_reduce_sum(torch.tensor(float(R)))
    out = {"sft_tokens": float(num_tokens), "sft_targets": float(targets)}
    if float(num_tokens) == 0:
        return {**out, "loss": float("nan"), "skipped_updates": 0.0}
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    chunks = _chunks(R, settings.micro_batch_size) if R else []
    total = torch.zeros(())
    for a, b in chunks:
        rows = torch.arange(a, b)
        loss = sft_loss(policy.logp(rollout, rows, 0, T), rollout.mask[a:b], num_tokens)
        loss.backward()
        total += loss.detach().float().cpu()
    if d.active and d.grad_sync == "fsdp" and R:  # same forwards on every rank
        for _ in range(most_over_ranks(len(chunks), d) - len(chunks)):
            idle_pass(policy, rollout)
    grad_norm = _optimizer_step(optimizer, params, settings.max_grad_norm, d)
    out.update(loss=float(d.all_reduce_sum(total)), skipped_updates=float(grad_norm is None),
               grad_norm=float("nan") if grad_norm is None else float(grad_norm))
    return out


class SFTStage:
    """What the runner needs for SFT steps (see the module).

    Args:
        steps: SFT steps, the run's first (0: no stage).
        data: the job's :class:`SFTData`.
        per_step: records per step (over all ranks).
        repeats: examples per record and step (their targets differ by ``rng``).
        seed: the run's seed.
        lr: the SFT steps' learning rate (None: the optimizer's).

    Raises:
        ValueError: ``steps < 0``, ``per_step < 1``, or steps with no example.
    """

    def __init__(self, steps: int, data: SFTData, per_step: int, repeats: int = 1,
                 seed: int = 0, lr: Optional[float] = None):
        if steps < 0 or per_step < 1 or repeats < 1 or (steps and data.num < 1):
            raise ValueError(f"SFTStage: steps={steps}, per_step={per_step}, repeats={repeats}, "
                             f"{data.num} example(s); expected steps >= 0, per_step >= 1, "
                             f"repeats >= 1 and examples")
        self.steps, self.data, self.per_step, self.repeats = steps, data, per_step, repeats
        self.seed, self.lr = seed, lr

    def check(self, policy, caps) -> None:
        """Raises TypeError when SFT steps run and the policy cannot build target rows."""
        if self.steps and not caps.sft:
            raise TypeError(caps.missing("sft", type(policy).__name__, "an SFT stage"))

    def is_sft_step(self, step: int) -> bool:
        return step < self.steps

    def batch(self, index: int, rank: int = 0, world: int = 1) -> list:
        """This rank's examples of SFT step ``index`` (a function of the index alone)."""
        rng = step_rng(self.seed, index)
        idx = step_records(self.data.num, self.per_step, index, self.seed)
        groups = [[self.data.make(i, rng) for _ in range(self.repeats)] for i in idx]
        return [e for g in groups[rank::world] for e in g]

    def run_step(self, run) -> Dict[str, float]:
        """One SFT step of ``run`` (a :class:`mmrl.train.runner.Run`) -> its metrics."""
        tic = time.time()
        d = run.dist
        examples = self.batch(run.step, d.rank, d.world)
        saved = [g["lr"] for g in run.opt.param_groups]
        if self.lr is not None:
            for g in run.opt.param_groups:
                g["lr"] = self.lr
        try:
            with torch.no_grad():
                rollout = run.policy.target_rollout(examples)
            m = sft_step(run.policy, run.opt, rollout, run.settings, d)
        finally:
            for g, lr in zip(run.opt.param_groups, saved):
                g["lr"] = lr
        if self.data.thinks is not None:
            kept = d.all_reduce_sum(torch.tensor(float(sum(map(self.data.thinks, examples)))))
            m["sft_think_frac"] = float(kept) / float(self.per_step * self.repeats)
        m["sft_skipped"] = float(d.all_reduce_sum(torch.tensor(float(sum(
            rollout.skipped.values())))))
        run.drop_cause = "" if m["sft_tokens"] > 0 else (
            f"no SFT target of the step could be used ({rollout.skipped or 'none built'}); "
            f"check the SFT data")
        m["sft_step"], m["step_time"] = 1.0, time.time() - tic
        return m
