"""Drive the shared loop for a whole run: seeding, prompt order, checkpoints and exact resume,
signals, metrics, progress, final weights.

A step reads top to bottom in :meth:`Run.run_step`: :class:`mmrl.train.rounds.Rounds` collects
(prompts -> rollouts -> rewards -> the job's round augmenters, or DAPO dynamic sampling's
rounds), :func:`mmrl.train.batch.batch_advantages` turns the gathered rewards into advantages,
:func:`mmrl.train.loop.train_batch` runs the K epochs of updates (a matching policy's:
:func:`mmrl.train.matching.train_matching`). :func:`run_training` reads the same way: start,
train (steps, checkpoints, signals), finish (final weights, export), summary.

Checkpoints (``mmrl.train.checkpoint``) hold the trainable weights, the optimizer, the policy's
extra state (:mod:`mmrl.train.state`), every RNG and the prompt selector's and augmenters'
state, so a run resumed from step k ends with the same weights, bit for bit on CPU, as a run
that was never interrupted. SIGTERM/SIGINT finish the current step, write a checkpoint and exit
cleanly (a second SIGINT stops at once). Preference steps (``pref.mode``) are
:class:`mmrl.train.pref_stage.PrefStage`'s, SFT steps :class:`mmrl.train.sft_stage.SFTStage`'s.
"""
from __future__ import annotations

import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from mmrl.algo.losses import PolicyLoss
from mmrl.budget.selection import make_selector
from mmrl.config.core import UserError
from mmrl.config.schema import save_config
from mmrl.train import checkpoint as ckpt
from mmrl.train.batch import batch_advantages, greedy_baseline
from mmrl.train.distributed import (check_fsdp_settings, init_distributed, maybe_destroy,
                                    shard_policy)
from mmrl.train.loop import LoopSettings, train_batch
from mmrl.train.matching import train_matching
from mmrl.train.observe import (MetricsLog, StopRequest, drop_cause, log_samples, progress_bar,
                                report_step, step_rewards, throughput)
from mmrl.train.policy import check_policy
from mmrl.train.pref_stage import PrefStage, log_eval, pref_config
from mmrl.train.rounds import (Round, RoundAugmenter, Rounds, RoundSettings, check_prompts,
                               needs_whole_groups)
from mmrl.train.reward_weighting import with_reward_weighting
from mmrl.train.run_folder import claim_output_dir
from mmrl.train.state import (load_policy_state, load_policy_weights, policy_weights,
                              save_policy_state)

__all__ = ["Run", "run_training", "Round", "RoundAugmenter", "RunStopped", "seed_everything",
           "policy_weights", "load_policy_weights"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return the generator the loop uses for sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class Run:
    """The state of one training run (built by :func:`run_training`): the policy, its optimizer
    and loss, the data-parallel context, the step counters, and ``rounds``, the
    :class:`~mmrl.train.rounds.Rounds` that collects each step's rollouts.

    Raises:
        TypeError: the policy lacks a method it needs (:func:`mmrl.train.policy.check_policy`).
        ValueError: no prompts, too few for a step, or settings FSDP cannot run.
    """

    def __init__(self, config, policy, reward_fn, prompts, metadata, optimizer=None,
                 selector=None, augmenters: Sequence[RoundAugmenter] = (), verifier=None,
                 read_pairs=None, sft=None):
        t = self.t = config.train
        check_prompts(prompts, t.prompts_per_step)
        self.config, self.policy = config, policy
        self.out = Path(t.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.gen = seed_everything(t.seed)  # rollouts and mini-batch order
        self.prompt_gen = torch.Generator().manual_seed(t.seed + 1)  # prompt order
        self.loss_fn = PolicyLoss(config.algo.preset, **config.algo.overrides())
        self.caps = check_policy(policy, self.loss_fn.spec)
        self.pref = PrefStage(pref_config(config), policy, self.caps, verifier=verifier,
                              seed=t.seed, per_step=t.prompts_per_step, read_pairs=read_pairs)
        self.sft = sft  # an SFTStage (mmrl.train.sft_stage): the run's first steps
        if sft is not None:
            sft.check(policy, self.caps)
        whole_groups = (needs_whole_groups(self.loss_fn.spec, self.caps, reward_fn)
                        or self.pref.pref.online)  # online pairs: a pair on one rank
        self.dist = init_distributed(t.parallel)
        self.fsdp = None
        if self.dist.active and t.parallel == "fsdp":
            check_fsdp_settings(t, self.dist.world, whole_groups)
            self.fsdp = shard_policy(policy)  # before the optimizer sees the parameters
        params = [p for p in policy.parameters() if p.requires_grad]
        self.opt = optimizer or torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        self.selector = selector if selector is not None else make_selector(
            t.selector, len(prompts), **t.selector_hparams)
        self.settings = LoopSettings.from_train(t)
        self.step, self.history, self.bad_in_row, self.empty_in_row = 0, [], 0, 0
        self.run_id: Optional[str] = None  # set by claim_output()
        self.drop_cause, self.save_failed = "", False  # no-sample cause; rank 0 write failed
        # Every rank draws the same prompts; each samples with its own stream, so identical
        # prompts on different ranks never get identical noise.
        self.gen.manual_seed(t.seed + 7919 * self.dist.rank)
        self.dist.broadcast_parameters(params)
        self.gens = {"loop": self.gen, "prompts": self.prompt_gen}
        self.rounds = Rounds(policy, reward_fn, prompts, metadata,
                             settings=RoundSettings.from_train(t), selector=self.selector,
                             generator=self.gen, prompt_generator=self.prompt_gen,
                             whole_groups=whole_groups, dist=self.dist, fsdp=self.fsdp,
                             augmenters=with_reward_weighting(config.algo, augmenters),
                             reward_weights=config.algo.reward_weights)

    # ------------------------------------------------------------------ one step
    def run_step(self) -> Dict[str, float]:
        """One step, top to bottom: collect (rollouts, rewards, augmenters), advantages over
        the gathered rewards, K epochs of updates; returns the step's metrics. A preference
        step (``pref.mode``) is :meth:`PrefStage.run_step`'s."""
        if self.sft is not None and self.sft.is_sft_step(self.step):
            return self.sft.run_step(self)
        if self.pref.is_pref_step(self.step):
            return self.pref.run_step(self)
        tic = time.time()
        got = self.rounds.collect(self.step)
        nonfinite = got.rewards.invalid_report()  # batch_advantages drops those rows
        baseline = greedy_baseline(
            self.policy, self.rounds.reward_fn, got.rollout, got.groups, self.gen, dist=self.dist,
            fsdp=self.fsdp, reward_retries=self.t.reward_retries,
            reward_timeout=self.t.reward_timeout or None) if self.loss_fn.spec.needs_baseline \
            else None  # ReMax: the reward of one greedy completion per group
        batch = batch_advantages(self.policy, self.loss_fn, got.rollout, got.rewards,
                                 reward_weights=self.config.algo.reward_weights, dist=self.dist,
                                 baseline=baseline)
        train = train_matching if self.caps.matching else train_batch  # DiffusionNFT, AWM
        m = train(self.policy, self.opt, self.loss_fn, batch, self.settings, self.gen, self.dist)
        m.update(got.metrics)
        self.drop_cause = "" if m.get("samples", 1.0) > 0 else drop_cause(
            got.error, nonfinite, m.get("dropped_samples", 0.0), batch.rollout.skipped)
        m["step_time"] = time.time() - tic
        m.update(throughput(m, batch.rollout, self.dist))
        if got.error:
            print(f"warning: step {self.step}: the reward failed ({got.error}); "
                  f"{int(m['dropped_samples'])} sample(s) dropped", file=sys.stderr, flush=True)
        if self.t.sample_log_every and self.step % self.t.sample_log_every == 0 and \
                self.dist.is_main:
            log_samples(self.out / "samples.jsonl", self.step, batch.rollout, batch.rewards)
        return m

    def end_step(self, m: Dict[str, float]) -> None:
        """Record a finished step's metrics and count it.

        Raises:
            RunStopped: ``max_bad_steps`` steps in a row had a non-finite update or no valid
                sample (a checkpoint is written first).
        """
        self.history.append(m)
        self.bad_in_row = self.bad_in_row + 1 if m.get("skipped_updates", 0) > 0 else 0
        self.empty_in_row = self.empty_in_row + 1 if self.drop_cause else 0
        self.step += 1
        if self.bad_in_row >= self.t.max_bad_steps or self.empty_in_row >= self.t.max_bad_steps:
            self.save()
            raise _bad_steps_error(self)

    # ------------------------------------------------------------------ checkpoints
    def claim_output(self) -> None:
        """Rank 0 makes sure output_dir is this run's
        (:func:`mmrl.train.run_folder.claim_output_dir`); every rank gets the run id, or raises
        the same error."""
        claim: tuple = (None, None)
        if self.dist.is_main:
            try:
                claim = (claim_output_dir(self.out, self.t.resume, self.t.overwrite), None)
            except ValueError as err:
                claim = (None, str(err))
        self.run_id, error = self.dist.all_gather_object(claim)[0]
        if error:
            raise UserError(error)

    def save(self) -> Optional[Path]:
        """Write a checkpoint of this step (collective; rank 0 writes); its folder, or None on
        the other ranks and when the write failed (:meth:`saved_note`)."""
        rngs = self.dist.all_gather_object(ckpt.rng_state(self.gens))  # one per rank
        weights, optim, extra = save_policy_state(self.policy, self.caps, self.opt, self.fsdp)
        if not self.dist.is_main:
            self.dist.barrier()
            return None
        state = {"step": self.step, "rng": rngs[0], "rng_per_rank": rngs,
                 "bad_in_row": self.bad_in_row, "empty_in_row": self.empty_in_row,
                 "run_id": self.run_id, "policy_extra": extra,
                 **ckpt.parts_state(self.selector, self.rounds.augmenters,
                                    self.loss_fn.adv_state)}
        try:
            return self._write(weights, optim, state)
        finally:
            self.dist.barrier()

    def _write(self, weights, optim, state) -> Optional[Path]:
        self.save_failed = False
        try:
            return ckpt.save_checkpoint(self.out / "checkpoints", self.step, weights, optim,
                                        state, keep_last=self.t.keep_last,
                                        run_id=self.run_id)
        except OSError as err:  # e.g. disk full: the previous checkpoint is intact; go on
            print(f"warning: checkpoint at step {self.step} failed ({err}); the previous "
                  f"checkpoint is kept", file=sys.stderr, flush=True)
            self.save_failed = True
            return None

    def saved_note(self) -> str:
        """What became of the checkpoint just written, for a stop message."""
        return ("writing a checkpoint failed (see the warning above); the previous one is kept"
                if self.save_failed else "a checkpoint was written")

    def resume(self) -> Optional[Path]:
        """Load the checkpoint ``train.resume`` names (``auto``: this run's newest complete
        one); its folder, or None when there is none."""
        mode = self.t.resume
        if mode == "never":
            return None
        folder = ckpt.latest_checkpoint(self.out / "checkpoints", self.run_id) \
            if mode == "auto" else Path(mode)
        if folder is None:
            return None
        data = ckpt.load_checkpoint(folder)
        state = data["state"]
        load_policy_state(self.policy, self.caps, self.opt, data["weights"], data["optimizer"],
                          state.get("policy_extra"), self.fsdp)
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        if len(per_rank) != self.dist.world:
            raise ValueError(f"{folder} was written by {len(per_rank)} rank(s) but this run has "
                             f"{self.dist.world}; resume with the same number of processes")
        ckpt.set_rng_state(per_rank[self.dist.rank], self.gens)
        self.step, self.bad_in_row = int(state["step"]), int(state["bad_in_row"])
        self.empty_in_row = int(state.get("empty_in_row", 0))
        ckpt.load_parts_state(state, self.selector, self.rounds.augmenters,
                              self.loss_fn.adv_state)
        return folder


class RunStopped(UserError):
    """A run stopped early for a cause the user fixes (no valid samples, a diverging loss); the
    CLI prints the message without a traceback and exits 2. A checkpoint was written first."""


def _bad_steps_error(r: "Run") -> RunStopped:
    """The error that stops a run after ``max_bad_steps`` skipped steps, naming the cause."""
    last, where = r.step - 1, f"metrics so far: {r.out / 'metrics.jsonl'}"
    if r.empty_in_row:
        return RunStopped(f"{r.empty_in_row} consecutive step(s) had no valid sample to learn "
                          f"from (last step {last}): {r.drop_cause}; {r.saved_note()}; {where}")
    return RunStopped(f"{r.bad_in_row} consecutive steps had a non-finite loss or gradient "
                      f"(last step {last}); {r.saved_note()}. Lower train.lr or check the "
                      f"reward; {where}")


def _export(r: Run, say, final: Optional[Dict[str, torch.Tensor]]) -> None:
    """The final model in Hugging Face format under output_dir/hf, written by rank 0; under FSDP
    from ``final`` (the gathered full weights), as the live ones are sharded."""
    if not r.t.export or not r.caps.export:
        return
    try:
        if r.dist.is_main:
            path = r.policy.export_pretrained(
                str(r.out / "hf"), merge_lora=r.t.export_merge_lora,
                **({"state_dict": final} if r.fsdp is not None else {}))
            say(f"exported the final model (Hugging Face format) to {path}")
    except Exception as err:  # noqa: BLE001 - training is done and saved; report, go on
        print(f"warning: export to {r.out / 'hf'} failed ({type(err).__name__}: {err}); the "
              f"weights are in final.pt and {r.out / 'checkpoints'}", file=sys.stderr, flush=True)
    finally:
        r.dist.barrier()


def _check_ranks_agree(r: Run, say) -> None:
    """Data parallel keeps every rank's weights identical; verify it once at the end."""
    with torch.no_grad():
        total = sum(float(p.detach().double().sum() + p.detach().double().square().sum())
                    for p in r.policy.parameters() if p.requires_grad)
    sums = r.dist.all_gather_object(total)
    if len(set(sums)) != 1:
        raise RuntimeError(f"ranks diverged: parameter checksums {sums}; every rank must build "
                           f"the same initial weights and run the same updates")
    say(f"parameters identical on {r.dist.world} ranks (checksum {sums[0]:.6e})")


def run_training(config, policy, reward_fn, prompts: Sequence[Any],
                 metadata: Optional[Sequence[Dict[str, Any]]] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 selector=None, augmenters: Sequence[RoundAugmenter] = (),
                 verifier=None, read_pairs=None, sft=None) -> Dict[str, Any]:
    """Train ``policy`` for ``config.train.steps`` iterations; returns a summary dict.

    Writes ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and ``final.pt`` under
    ``config.train.output_dir``; resumes from the newest complete checkpoint there when
    ``train.resume=auto``. ``augmenters`` rework each collected round (see :class:`Round`);
    ``verifier`` / ``read_pairs``: see :class:`mmrl.train.pref_stage.PrefStage`; ``sft``: an
    :class:`mmrl.train.sft_stage.SFTStage` whose steps come first.
    """
    r = Run(config, policy, reward_fn, prompts, metadata, optimizer, selector, augmenters,
            verifier, read_pairs, sft)
    say = (lambda msg: print(msg, flush=True)) if r.dist.is_main else (lambda msg: None)
    _start(r, say)
    start = time.time()
    stopped = _train(r)
    _finish(r, stopped, say)
    if r.dist.active and r.fsdp is None:
        _check_ranks_agree(r, say)
    maybe_destroy(r.dist)
    return _summary(r, time.time() - start, stopped)


def _start(r: Run, say) -> None:
    """Claim the output folder, write config.yaml, resume from a checkpoint when there is one."""
    t = r.t
    r.claim_output()
    if r.dist.is_main:
        save_config(r.config, r.out / "config.yaml")
    resumed = r.resume()
    if resumed is not None:
        say(f"resumed from {resumed} (step {r.step})"
            + (f"; the run is already complete ({t.steps} steps): nothing to do. Use "
               f"train.resume=never train.overwrite=true or another train.output_dir to "
               f"start over"
               if r.step >= t.steps else ""))
    log_eval(r, say)


def _train(r: Run) -> Optional[int]:
    """Steps until ``train.steps``, logging metrics and writing checkpoints every
    ``save_every``; returns the stop signal that ended it early (None: all steps ran)."""
    t, main = r.t, r.dist.is_main
    log = MetricsLog(r.out, r.step, wandb_project=t.wandb_project,
                     config=r.config.to_dict()) if main else None
    bar = progress_bar(t.steps, r.step, t.progress and main)
    stopped = None
    try:
        with StopRequest() as stop:
            while r.step < t.steps and stopped is None:
                m = r.run_step()
                if log is not None:
                    log.write(r.step, m)
                    report_step(bar, r.step, m, t)
                r.end_step(m)
                # every rank must agree to stop after the same step (collectives follow)
                if float(r.dist.all_reduce_sum(torch.tensor(float(stop.signal is not None)))):
                    stopped = stop.signal or signal.SIGTERM
                if (t.save_every and r.step % t.save_every == 0) or stopped is not None:
                    r.save()
    finally:
        if log is not None:
            log.close()
        if bar is not None:
            bar.close()
    return stopped


def _finish(r: Run, stopped: Optional[int], say) -> None:
    """After the last step: the final checkpoint, ``final.pt`` (the unsharded weights) and the
    export; after a stop signal, only the note on how to resume."""
    if stopped is not None:
        say(f"stopped by signal {int(stopped)} after step {r.step - 1}; {r.saved_note()}; "
            f"resume with train.resume=auto")
        return
    log_eval(r, say)
    folder, final = r.save(), None
    if r.history and all(h.get("samples", 1.0) == 0 for h in r.history):
        raise _bad_steps_error(r)  # not one valid sample in the whole run: nothing learned
    if r.dist.is_main:  # the final weights, unsharded, as a plain state dict
        final = ckpt.load_checkpoint(folder)["weights"] if folder is not None else \
            {k: v.detach().cpu() for k, v in policy_weights(r.policy).items()}
        ckpt.save_atomic(final, r.out / "final.pt")
    _export(r, say, final)


def _summary(r: Run, seconds: float, stopped: Optional[int]) -> Dict[str, Any]:
    """What :func:`run_training` returns: steps, time, the stop signal, the mean reward of the
    first and last few steps, the output folder and every step's metrics."""
    rewards = step_rewards(r.history, r.out)
    k = max(1, min(5, len(rewards) // 4))
    return {"steps": r.step, "seconds": seconds, "stopped": stopped,
            "reward_first": float(np.mean(rewards[:k])) if rewards else float("nan"),
            "reward_last": float(np.mean(rewards[-k:])) if rewards else float("nan"),
            "output_dir": str(r.out), "history": r.history, "pref_eval": r.pref.evals}
