"""Drive the shared loop for a whole run: seeding, prompt order, checkpoints and exact resume,
signals, metrics, progress, final weights.

Checkpoints (``mmrl.train.checkpoint``) hold the trainable weights, the optimizer, every RNG and the
prompt selector's state, so a run resumed from step k ends with the same weights, bit for bit
on CPU, as a run that was never interrupted. SIGTERM/SIGINT finish the current step, write a
checkpoint and exit cleanly (a second SIGINT stops at once).
"""
from __future__ import annotations

import json
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from mmrl.train import checkpoint as ckpt
from mmrl.config.core import UserError
from mmrl.train.distributed import (full_state, init_distributed, load_full_state, maybe_destroy,
                              shard_policy)
from mmrl.train.loop import LoopSettings
from mmrl.train.policy import capabilities_of, check_policy
from mmrl.train.observe import (MetricsLog, StopRequest, log_samples, progress_bar, report_step,
                          throughput)
from mmrl.algo.losses import PolicyLoss
from mmrl.train.rounds import Round, RoundAugmenter, RoundsMixin
from mmrl.train.run_folder import claim_output_dir

__all__ = ["Run", "run_training", "Round", "RoundAugmenter", "seed_everything",
           "policy_weights", "load_policy_weights"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return the generator the loop uses for sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def policy_weights(policy) -> Dict[str, torch.Tensor]:
    """The policy's trainable state (``policy.state_dict()`` or its ``.model``'s)."""
    if hasattr(policy, "state_dict"):
        return policy.state_dict()
    return policy.model.state_dict()


def load_policy_weights(policy, weights: Dict[str, torch.Tensor]) -> None:
    target = policy if hasattr(policy, "load_state_dict") else policy.model
    target.load_state_dict(weights)


class Run(RoundsMixin):
    """The state of one training run (built by :func:`run_training`); the collection of
    rollout rounds lives in :class:`mmrl.train.rounds.RoundsMixin`."""

    def __init__(self, config, policy, reward_fn, prompts, metadata, optimizer=None,
                 selector=None, augmenters: Sequence[RoundAugmenter] = ()):
        t = self.t = config.train
        if not prompts:
            raise ValueError("no prompts to train on; check the job's prompt source")
        self.config, self.policy, self.reward_fn = config, policy, reward_fn
        self.augmenters = list(augmenters)
        self.prompts = list(prompts)
        self.metadata = list(metadata) if metadata is not None else [{} for _ in self.prompts]
        self.out = Path(t.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.gen = seed_everything(t.seed)  # rollouts and mini-batch order
        self.prompt_gen = torch.Generator().manual_seed(t.seed + 1)  # prompt order
        self.loss_fn = PolicyLoss(config.algo.preset, **config.algo.overrides())
        self.dist = init_distributed(t.parallel)
        self.fsdp = None
        if self.dist.active and t.parallel == "fsdp":
            self._check_fsdp()
            self.fsdp = shard_policy(policy)  # before the optimizer sees the parameters
        params = [p for p in policy.parameters() if p.requires_grad]
        self.opt = optimizer or torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        if t.prompts_per_step > len(self.prompts):
            raise ValueError(f"train.prompts_per_step={t.prompts_per_step} but there are only "
                             f"{len(self.prompts)} prompt(s); lower prompts_per_step (a batch "
                             f"holds distinct prompts) or add prompts")
        if selector is None:
            from mmrl.budget.selection import make_selector
            selector = make_selector(t.selector, len(self.prompts), **t.selector_hparams)
        self.selector = selector
        self.settings = LoopSettings(t.group_size, t.inner_epochs, t.num_mini_batches,
                                     t.micro_batch_size, t.t_chunk, t.max_grad_norm)
        self.step, self.history, self.bad_in_row, self.empty_in_row = 0, [], 0, 0
        self.run_id: Optional[str] = None  # set by claim_output()
        self.drop_cause = ""  # why the last step had no valid sample
        self.save_failed = False  # did the last checkpoint write fail (rank 0)?
        self.round_metrics: Dict[str, float] = {}
        self.round_means: Dict[str, tuple] = {}
        # Every rank draws the same prompts; each samples with its own stream, so identical
        # prompts on different ranks never get identical noise.
        self.gen.manual_seed(t.seed + 7919 * self.dist.rank)
        self.dist.broadcast_parameters(params)
        self.gens = {"loop": self.gen, "prompts": self.prompt_gen}

    def _check_fsdp(self) -> None:
        t, world = self.t, self.dist.world
        if t.t_chunk:
            raise ValueError(f"train.parallel=fsdp needs train.t_chunk=0 (got {t.t_chunk}): "
                             f"ranks' responses differ in length, so their T chunks would "
                             f"differ in number; bound memory with micro_batch_size instead")
        if (t.prompts_per_step * t.group_size) % world:
            raise ValueError(f"train.parallel=fsdp runs the same number of forwards on every "
                             f"rank: prompts_per_step * group_size = "
                             f"{t.prompts_per_step * t.group_size} must be divisible by the "
                             f"{world} ranks")
        if self.whole_groups() and t.prompts_per_step % world:
            raise ValueError(f"train.parallel=fsdp with whole groups per rank (this preset or "
                             f"sampler): train.prompts_per_step={t.prompts_per_step} must be "
                             f"divisible by the {world} ranks")
        if t.dynamic_sampling_tries:
            raise ValueError("train.parallel=fsdp cannot use dynamic_sampling_tries (a rank "
                             "may keep no group at all, and every rank must run the same "
                             "forwards); use parallel=ddp")

    # ------------------------------------------------------------------ checkpoints
    def claim_output(self) -> None:
        """Rank 0 makes sure output_dir is this run's (:func:`mmrl.train.run_folder.claim_output_dir`);
        every rank gets the run id, or raises the same error."""
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
        rngs = self.dist.all_gather_object(ckpt.rng_state(self.gens))  # one per rank
        if self.fsdp is not None:  # collective: every rank takes part, rank 0 gets it all
            weights, optim = full_state(self.fsdp, self.opt)
            weights.update(_extras(policy_weights(self.policy)))  # e.g. a rollout counter
        else:
            weights, optim = policy_weights(self.policy), self.opt.state_dict()
        if not self.dist.is_main:
            self.dist.barrier()
            return None
        state = {"step": self.step, "rng": rngs[0], "rng_per_rank": rngs,
                 "bad_in_row": self.bad_in_row, "empty_in_row": self.empty_in_row,
                 "run_id": self.run_id,
                 "selector": self.selector.state_dict() if self.selector else None,
                 "augmenters": [a.state_dict() if hasattr(a, "state_dict") else None
                                for a in self.augmenters]}
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
        mode = self.t.resume
        if mode == "never":
            return None
        folder = ckpt.latest_checkpoint(self.out / "checkpoints", self.run_id) \
            if mode == "auto" else Path(mode)
        if folder is None:
            return None
        data = ckpt.load_checkpoint(folder)
        if self.fsdp is not None:
            weights = dict(data["weights"])
            extras = _extras(weights)
            for k in extras:
                del weights[k]
            load_full_state(self.fsdp, self.opt, weights, data["optimizer"])
            if extras:
                self.policy.load_extra_state(extras)
        else:
            load_policy_weights(self.policy, data["weights"])
            self.opt.load_state_dict(data["optimizer"])
        state = data["state"]
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        if len(per_rank) != self.dist.world:
            raise ValueError(f"{folder} was written by {len(per_rank)} rank(s) but this run has "
                             f"{self.dist.world}; resume with the same number of processes")
        ckpt.set_rng_state(per_rank[self.dist.rank], self.gens)
        self.step, self.bad_in_row = int(state["step"]), int(state["bad_in_row"])
        self.empty_in_row = int(state.get("empty_in_row", 0))
        if self.selector is not None and state.get("selector") is not None:
            self.selector.load_state_dict(state["selector"])
        for aug, saved in zip(self.augmenters, state.get("augmenters") or []):
            if saved is not None and hasattr(aug, "load_state_dict"):
                aug.load_state_dict(saved)
        return folder

    def run_step(self) -> Dict[str, float]:
        from mmrl.train.loop import learn
        tic = time.time()
        report = None
        self.round_metrics, self.round_means = {}, {}
        if self.t.dynamic_sampling_tries:
            rollout, rewards, error, report = self.collect_dynamic()
        else:
            rollout, rewards, error = self.collect_round()
        nonfinite = rewards.invalid_report()  # learn() drops those rows
        res = learn(self.policy, self.opt, self.loss_fn, rollout, rewards, self.settings,
                    self.gen, multi_reward=self.config.algo.multi_reward,
                    reward_weights=self.config.algo.reward_weights, dist=self.dist,
                    reward_error=error)
        m = {k: v for k, v in res.items() if isinstance(v, float)}
        if report is not None:
            m.update({"dynamic_tries": float(report.tries),
                      "dynamic_groups_kept": float(report.groups_kept),
                      "dynamic_groups_dropped": float(report.groups_dropped)})
        m.update(self.step_round_metrics())
        self.drop_cause = "" if m.get("samples", 1.0) > 0 else _drop_cause(
            res.get("reward_error"), nonfinite, m.get("dropped_samples", 0.0),
            res["rollout"].skipped)
        m["step_time"] = time.time() - tic
        m.update(throughput(m, res["rollout"], self.dist))
        if res.get("reward_error"):
            print(f"warning: step {self.step}: the reward failed ({res['reward_error']}); "
                  f"{int(m['dropped_samples'])} sample(s) dropped", file=sys.stderr, flush=True)
        if self.t.sample_log_every and self.step % self.t.sample_log_every == 0 and \
                self.dist.is_main:
            log_samples(self.out / "samples.jsonl", self.step, res["rollout"], res["rewards"])
        return m


def _drop_cause(reward_error: Optional[str], nonfinite: str, dropped: float,
                skipped: Dict[str, int]) -> str:
    """Why a step had no valid sample, and what to do about it (for the stop message)."""
    if reward_error:
        return (f"every sample was dropped because {reward_error}. Fix the reward (call "
                f"mmrl.train.reward_fn.evaluate_reward(fn, samples, prompts, metadata) on a few "
                f"samples to see the error; a TimeoutError: raise train.reward_timeout)")
    if nonfinite:
        return (f"the reward returned NaN/inf for every sample ({nonfinite}). Make it return "
                f"finite numbers")
    if dropped == 0:
        why = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "reasons not given"
        return (f"the policy returned no samples: every prompt's input was skipped ({why}; "
                f"e.g. unreadable videos or images). Check the dataset")
    return f"all {int(dropped)} sample(s) were dropped. Check the reward and the inputs"


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


def _step_rewards(r: "Run") -> List[float]:
    """Mean reward of each step that had samples: this session's, or (a resumed run that had
    nothing left to do) the ones metrics.jsonl recorded, so the summary never reports nan."""
    rewards = [h["reward_mean"] for h in r.history if "reward_mean" in h]
    path = r.out / "metrics.jsonl"
    if not rewards and path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rewards = [row["reward_mean"] for row in rows if "reward_mean" in row]
    return rewards


def _extras(weights: Dict[str, Any]) -> Dict[str, Any]:
    """Entries of a policy's state dict that are not module weights (``mmrl_*`` keys)."""
    return {k: v for k, v in weights.items() if k.startswith("mmrl_")}


def _export(r: Run, say, final: Optional[Dict[str, torch.Tensor]]) -> None:
    """The final model in Hugging Face format under output_dir/hf, written by rank 0; under FSDP
    from ``final`` (the gathered full weights), as the live ones are sharded."""
    if not r.t.export or not capabilities_of(r.policy).export:
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
                 selector=None, augmenters: Sequence[RoundAugmenter] = ()) -> Dict[str, Any]:
    """Train ``policy`` for ``config.train.steps`` iterations; returns a summary dict.

    Writes ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and ``final.pt`` under
    ``config.train.output_dir``; resumes from the newest complete checkpoint there when
    ``train.resume=auto``. ``augmenters`` rework each collected round (see :class:`Round`).
    """
    from mmrl.config.schema import save_config
    r = Run(config, policy, reward_fn, prompts, metadata, optimizer, selector, augmenters)
    t, main = r.t, r.dist.is_main
    say = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)
    r.claim_output()
    if main:
        save_config(config, r.out / "config.yaml")
    resumed = r.resume()
    if resumed is not None:
        say(f"resumed from {resumed} (step {r.step})"
            + (f"; the run is already complete ({t.steps} steps): nothing to do. Use "
               f"train.resume=never train.overwrite=true or another train.output_dir to "
               f"start over"
               if r.step >= t.steps else ""))
    log = MetricsLog(r.out, r.step, wandb_project=t.wandb_project,
                     config=config.to_dict()) if main else None
    bar = progress_bar(t.steps, r.step, t.progress and main)
    start, stopped = time.time(), None
    try:
        with StopRequest() as stop:
            while r.step < t.steps and stopped is None:
                m = r.run_step()
                if log is not None:
                    log.write(r.step, m)
                    report_step(bar, r.step, m, t)
                r.history.append(m)
                r.bad_in_row = r.bad_in_row + 1 if m.get("skipped_updates", 0) > 0 else 0
                r.empty_in_row = r.empty_in_row + 1 if r.drop_cause else 0
                r.step += 1
                if r.bad_in_row >= t.max_bad_steps or r.empty_in_row >= t.max_bad_steps:
                    r.save()
                    raise _bad_steps_error(r)
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
    if stopped is not None:
        say(f"stopped by signal {int(stopped)} after step {r.step - 1}; {r.saved_note()}; "
            f"resume with train.resume=auto")
    else:
        folder, final = r.save(), None
        if r.history and all(h.get("samples", 1.0) == 0 for h in r.history):
            raise _bad_steps_error(r)  # not one valid sample in the whole run: nothing learned
        if main:  # the final weights, unsharded, as a plain state dict
            final = ckpt.load_checkpoint(folder)["weights"] if folder is not None else \
                {k: v.detach().cpu() for k, v in policy_weights(policy).items()}
            ckpt.save_atomic(final, r.out / "final.pt")
        _export(r, say, final)
    if r.dist.active and r.fsdp is None:
        _check_ranks_agree(r, say)
    maybe_destroy(r.dist)
    rewards = _step_rewards(r)
    k = max(1, min(5, len(rewards) // 4))
    return {"steps": r.step, "seconds": time.time() - start, "stopped": stopped,
            "reward_first": float(np.mean(rewards[:k])) if rewards else float("nan"),
            "reward_last": float(np.mean(rewards[-k:])) if rewards else float("nan"),
            "output_dir": str(r.out), "history": r.history}
