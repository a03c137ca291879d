"""The runner's preference stage (``pref.mode`` dpo / veripo): which step trains what, where a
preference step's pairs come from, and the held-out preference accuracy (``pref.eval_pairs``).

The stage of a step is a function of its index (:meth:`mmrl.config.pref.PrefConfig.stage`), and
so is the slice of the pair file a step reads (:func:`step_records`: shuffled epochs drawn from
the run's seed), so a run resumed from any checkpoint repeats the uninterrupted run bit for bit;
nothing beyond the runner's usual state is saved.

Online pairs (``pref.pairs=online``): the step's groups are collected exactly as a GRPO step's
(:meth:`mmrl.train.rounds.Rounds.collect`: the prompt selector learns from the run's reward),
then ranked by the run's reward or the verifier's (VerIPO), and each group gives its best and
worst sample (:func:`mmrl.algo.preference.best_worst_pairs`; a group whose scores are all equal
gives none). Groups stay whole on one rank, so a pair's two samples are on the same rank.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from mmrl.config.core import UserError
from mmrl.train.distributed import Dist
from mmrl.train.loop import score
from mmrl.train.preference import pair_accuracy, preference_step
from mmrl.train.reward_fn import RewardBatch

__all__ = ["PrefStage", "read_pair_records", "step_records", "online_pairs"]


def read_pair_records(path) -> List[Dict[str, Any]]:
    """The records of a JSONL pair file: one JSON object per non-empty line, each with
    ``chosen`` and ``rejected`` (and the job's prompt fields, read by ``pair_rollout``).

    Raises:
        UserError: a missing file, a line that is not a JSON object or lacks chosen/rejected,
            or a file without records.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"pair file {p} not found; expected a JSONL file of "
                        f'{{..., "chosen": ..., "rejected": ...}} records')
    records, problems = [], []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{p}:{n}: not JSON ({err.msg}); expected one pair record (a JSON "
                            f"object) per line")
            continue
        if not isinstance(rec, dict) or "chosen" not in rec or "rejected" not in rec:
            problems.append(f"{p}:{n}: got {line[:80]!r}; expected a JSON object with "
                            f"'chosen' and 'rejected' (and the prompt fields)")
            continue
        records.append(rec)
    if problems:
        raise UserError(f"{len(problems)} bad line(s) in the pair file:\n  "
                        + "\n  ".join(problems[:50]))
    if not records:
        raise UserError(f"{p} holds no pair record; expected one JSON object per line")
    return records


def step_records(num_records: int, per_step: int, index: int, seed: int) -> List[int]:
    """Indices of the records the ``index``-th preference step reads: positions
    ``[index * per_step, (index + 1) * per_step)`` of an endless stream of shuffled epochs (epoch
    ``e`` is a permutation drawn from ``seed`` and ``e``): a function of the step alone."""
    out = []
    for pos in range(index * per_step, (index + 1) * per_step):
        epoch, j = divmod(pos, num_records)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 17)
        out.append(int(torch.randperm(num_records, generator=g)[j]))
    return out


def online_pairs(rollout, rewards: RewardBatch, weights: Optional[Dict[str, float]] = None,
                 needs_win: Optional[str] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """``(chosen_rows, rejected_rows, inputs)`` of a scored rollout: per group, the best and
    the worst valid sample by the weighted reward (rows with a non-finite reward take no part).

    ``needs_win`` (the spec's): ``"both"`` adds SPPO's ``chosen_win`` / ``rejected_win``, each
    sample's win rate in its group (:func:`mmrl.algo.preference.win_rates` on the rewards);
    ``"chosen"`` adds ``chosen_win`` = σ(r_w − r_l), the pair's own win probability under the
    same Bradley-Terry reading of the rewards (mmrl's choice: SPPO's code takes it from PairRM).
    """
    from mmrl.algo.preference import best_worst_pairs, win_rates
    valid = rewards.valid.nonzero().flatten()
    total = rewards.weighted_sum(weights)[valid]
    chosen, rejected = best_worst_pairs(total, rollout.group_ids[valid])
    inputs: Dict[str, torch.Tensor] = {}
    if needs_win == "both":
        rates = win_rates(total, rollout.group_ids[valid])
        inputs = {"chosen_win": rates[chosen], "rejected_win": rates[rejected]}
    elif needs_win == "chosen":
        inputs = {"chosen_win": torch.sigmoid(total[chosen] - total[rejected])}
    return valid[chosen], valid[rejected], inputs


class PrefStage:
    """What the runner needs for preference steps and the held-out evaluation.

    Args:
        pref: the config's :class:`mmrl.config.pref.PrefConfig`.
        policy, caps: the policy and its declared capabilities.
        verifier: the reward callable built from ``pref.verifier`` by the job (None: rank by
            the run's reward).
        seed, per_step: the run's seed, and pairs read per step from a file
            (``train.prompts_per_step``).
        read_pairs: ``read_pairs(path) -> records``, the job's reader of pair files (checks
            its record format, resolves media paths against the file's folder); default
            :func:`read_pair_records` (any JSON object with ``chosen`` and ``rejected``).

    Raises:
        TypeError: preference steps or eval pairs with a policy that does not declare
            ``Capabilities(preference=True)``, or online pairs with one whose training rows are
            not its rewarded samples.
        UserError: an unreadable pair file; ``pref.verifier`` set but not built by the job.
    """

    def __init__(self, pref, policy, caps, *, verifier=None, seed: int = 0, per_step: int = 1,
                 read_pairs=None):
        self.pref, self.seed, self.per_step, self.verifier = pref, seed, per_step, verifier
        self.active = pref.mode != "off"
        name = type(policy).__name__
        if (self.active or pref.eval_pairs) and not caps.preference:
            raise TypeError(caps.missing("preference", name, f"pref.mode={pref.mode}" if
                                         self.active else "pref.eval_pairs"))
        if pref.online and caps.row_advantages:
            raise TypeError(f"pref.pairs=online pairs rewarded samples, and {name} trains rows "
                            f"that are not its samples (row_advantages); use pref.pairs=file")
        if pref.verifier is not None and verifier is None:
            raise UserError(f"pref.verifier={pref.verifier!r} was not built by the job (it "
                            f"passes run_training(..., verifier=fn)); drop pref.verifier")
        self.loss = None
        if self.active:
            from mmrl.algo.preference import PreferenceLoss
            self.loss = PreferenceLoss(pref.preset, **pref.overrides())
        read = read_pairs or read_pair_records  # a job's own reader checks its record format
        self.records = read(pref.pairs_file) if self.active and pref.pairs == "file" else None
        self.eval_records = read(pref.eval_pairs) if pref.eval_pairs else None
        self.evals: List[Dict[str, float]] = []  # pref.eval_pairs results, start and end

    def is_pref_step(self, step: int) -> bool:
        return self.pref.stage(step) == "pref"

    def run_step(self, run) -> Dict[str, float]:
        """One preference step of ``run`` (a :class:`mmrl.train.runner.Run`) -> its metrics;
        sets ``run.drop_cause`` when a file step found no usable record on any rank."""
        tic = time.time()
        inputs = None
        if self.pref.online:
            rollout, chosen, rejected, inputs, extra = self._online(run)
        else:
            idx = step_records(len(self.records), self.per_step,
                               self.pref.pref_index(run.step), self.seed)
            rollout, chosen, rejected = _pair_rollout(run.policy, self.records, idx, run.dist)
            extra = {"pair_records_skipped": float(run.dist.all_reduce_sum(
                torch.tensor(float(sum(rollout.skipped.values())))))}
        m = preference_step(run.policy, run.opt, self.loss, rollout, chosen, rejected,
                            run.settings, run.gen, run.dist, pair_inputs=inputs)
        run.drop_cause = "" if self.pref.online or m["pairs"] > 0 else (
            f"no pair record of the step could be used ({rollout.skipped or 'none read'}); "
            f"check pref.pairs_file")
        m.update(extra)
        m["pref_step"], m["step_time"] = 1.0, time.time() - tic
        return m

    def _online(self, run):
        """The step's groups, their rewards' metrics, and the best/worst pair of each group by
        the run's reward or the verifier's."""
        got = run.rounds.collect(run.step)
        rollout, rewards = got.rollout, got.rewards
        d: Dist = run.dist
        total = d.all_gather_rows(rewards.weighted_sum(run.config.algo.reward_weights)
                                  [rewards.valid])
        extra = {**got.metrics, "samples": float(len(total)),
                 "reward_mean": float(total.mean()) if len(total) else float("nan")}
        weights = run.config.algo.reward_weights
        if self.verifier is not None:  # VerIPO: the verifier ranks the group's samples
            rewards, _ = score(self.verifier, rollout, run.t.reward_retries,
                               run.t.reward_timeout or None)
            weights = None
            ok = d.all_gather_rows(rewards.weighted_sum()[rewards.valid])
            extra["verifier_mean"] = float(ok.mean()) if len(ok) else float("nan")
        chosen, rejected, inputs = online_pairs(rollout, rewards, weights,
                                                self.loss.spec.needs_win)
        groups = d.all_gather_rows(rollout.group_ids.unique())
        extra["pair_groups_tied"] = float(len(groups)) - float(d.all_reduce_sum(
            torch.tensor(float(len(chosen)))))
        return rollout, chosen, rejected, inputs, extra

    def evaluate(self, run) -> Optional[Dict[str, float]]:
        """Preference accuracy of the implicit reward on ``pref.eval_pairs`` (every rank
        scores its share); None without eval pairs. Draws from its own generator, so it
        changes nothing a resumed run repeats."""
        if self.eval_records is None:
            return None
        idx = list(range(len(self.eval_records)))
        rollout, chosen, rejected = _pair_rollout(run.policy, self.eval_records, idx, run.dist)
        gen = torch.Generator().manual_seed(self.seed + 104_729)
        out = pair_accuracy(run.policy, rollout, chosen, rejected, run.settings.micro_batch_size,
                            gen, run.dist)
        return {"step": run.step, **out}


def _pair_rollout(policy, records, idx: List[int], d: Dist):
    """``policy.pair_rollout`` of this rank's share of records ``idx`` (every ``world``-th)."""
    mine = [records[i] for i in idx[d.rank::d.world]]
    with torch.no_grad():
        return policy.pair_rollout(mine)


def pref_config(config):
    """The run config's ``pref`` section (a default one, mode off, for a config object built
    without it)."""
    from mmrl.config.pref import PrefConfig
    return getattr(config, "pref", None) or PrefConfig()


def log_eval(run, say) -> None:
    """Evaluate ``pref.eval_pairs`` now (every rank), record it in ``run.pref_evals``, print it
    and (rank 0) append it to ``output_dir/pref_eval.jsonl``; nothing without eval pairs."""
    result = run.pref.evaluate(run)
    if result is None:
        return
    run.pref.evals.append(result)
    say(f"pref eval at step {result['step']}: implicit-reward accuracy "
        f"{result['accuracy']:.3f} on {int(result['pairs'])} held-out pairs (margin "
        f"{result['margin']:.4f})")
    if run.dist.is_main:
        with open(run.out / "pref_eval.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
