"""Thinking control for the video job: how a completion's thought is read, TON's thought dropout,
and :class:`ThinkingRounds`, the round augmenter behind ``video.length_reward`` and
``video.mode_reward`` (the math is :mod:`mmrl.algo.length`).

Thought styles (``video.think_style``):

- ``tags``: the thought is the inside of the last ``<think>…</think>`` block; a completion
  thinks when it is not blank (TON's skipped thought is ``"<think>\\n\\n</think>"``).
- ``filler``: the completion is a thought of filler characters followed by a one-character
  answer (the tiny demo's ``"   B"``, see benchmarks/bench_thinking.py): the thought is every
  character before the last non-blank one, and a completion thinks when there is any.

The augmenter runs after the others (difficulty re-rolls, T-GRPO), reads the ``accuracy``
column (correct = full credit, accuracy >= 1) and each row's token count, computes its columns
on the rows gathered from every rank, and keeps this rank's share:

- ``length_reward: kimi`` adds a ``length`` column, Kimi k1.5's length reward;
  ``grpo_lambda`` the same only in groups whose accuracy >= ``length_switch_accuracy``
  (GRPO-λ, unconfirmed); ``serial_decay`` replaces the accuracy of each correct row by
  decay^k, k = correct rows of its group with fewer tokens (S-GRPO's decaying reward applied to
  the parallel group, unconfirmed: see :meth:`ThinkingRounds.__call__`).
- ``mode_reward: true`` adds a ``mode`` column (KAT-V1 mode supervision, unconfirmed).

Metrics (means over the step's valid rows): ``think_frac``, ``thought_chars``, and for
``grpo_lambda`` ``length_groups_on`` (share of groups that got the length reward).
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Dict, List, Optional

import torch

from mmrl.algo.length import (kimi_length_reward, mode_reward, serial_decay_reward,
                              switched_length_reward)

__all__ = ["THINK_STYLES", "LENGTH_REWARDS", "thought_text", "thought_dropout",
           "ThinkingRounds", "thinking_columns"]

THINK_STYLES = ("tags", "filler")
LENGTH_REWARDS = ("none", "kimi", "grpo_lambda", "serial_decay")
LENGTH_COLUMN, MODE_COLUMN = "length", "mode"


def thought_text(text: str, style: str = "tags") -> Optional[str]:
    """The thought of a completion (see the module), or None when it has none (``tags``: no
    complete ``<think>…</think>`` block).

    Raises:
        ValueError: an unknown ``style``.
    """
    if style == "tags":
        close = text.rfind("</think>")
        start = text.rfind("<think>", 0, close) if close >= 0 else -1
        return None if start < 0 else text[start + len("<think>"):close]
    if style == "filler":
        body = text.rstrip()
        return body[:-1] if body else None
    raise ValueError(f"think style {style!r}; expected one of {', '.join(THINK_STYLES)}")


def thinks(text: str, style: str = "tags") -> bool:
    """Did the completion think? ``tags``: a non-blank thought; ``filler``: any character."""
    thought = thought_text(text, style)
    if thought is None:
        return False
    return bool(thought.strip()) if style == "tags" else len(thought) > 0


def thought_dropout(target: str, p: float, rng: random.Random, style: str = "tags") -> str:
    """TON's thought dropout (arXiv 2505.16854; kokolerk/TON ``sft_grpo_data.py``) of one SFT
    target: with probability ``p`` its thought is replaced by an empty one
    (``"<think>\\n\\n</think>"`` + the rest; ``filler``: the answer character alone), else the
    target is kept. TON uses p = 0.5 before its GRPO stage (whose rewards are accuracy and
    format only: nothing rewards skipping).

    Raises:
        ValueError: ``p`` outside [0, 1], a ``tags`` target without a thought block, or an
            unknown style.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p!r}; expected a probability in [0, 1] (TON: 0.5)")
    if thought_text(target, style) is None:
        raise ValueError(f"target {target[:60]!r} has no thought in style {style!r}; expected "
                         f"'<think>...</think>' + answer (tags) or filler + answer (filler)")
    if rng.random() >= p:
        return target
    if style == "filler":
        return target.rstrip()[-1]
    return "<think>\n\n</think>" + target[target.rfind("</think>") + len("</think>"):]


def thinking_columns(length_reward: str, mode: bool) -> Dict[str, float]:
    """The reward columns :class:`ThinkingRounds` adds, with weight 1 each."""
    out = {LENGTH_COLUMN: 1.0} if length_reward in ("kimi", "grpo_lambda") else {}
    return {**out, MODE_COLUMN: 1.0} if mode else out


@dataclasses.dataclass
class ThinkingRounds:
    """Round augmenter of ``video.length_reward`` / ``video.mode_reward`` (see the module).

    Args:
        length_reward: one of :data:`LENGTH_REWARDS`.
        mode: add the ``mode`` column.
        style: one of :data:`THINK_STYLES`.
        min_accuracy: ``grpo_lambda``'s group-accuracy threshold.
        decay: ``serial_decay``'s decay base.
        accuracy: the accuracy column's name.
    """

    length_reward: str = "none"
    mode: bool = False
    style: str = "tags"
    min_accuracy: Optional[float] = None
    decay: Optional[float] = None
    accuracy: str = "accuracy"

    def __post_init__(self):
        if self.length_reward not in LENGTH_REWARDS or self.style not in THINK_STYLES:
            raise ValueError(f"length_reward={self.length_reward!r}, style={self.style!r}; "
                             f"expected one of {LENGTH_REWARDS} and one of {THINK_STYLES}")
        need = {"grpo_lambda": ("min_accuracy", self.min_accuracy),
                "serial_decay": ("decay", self.decay)}.get(self.length_reward)
        if need is not None and need[1] is None:
            raise ValueError(f"length_reward {self.length_reward!r} needs {need[0]} (its paper's "
                             f"value is not confirmed, so mmrl has no default); set it")

    def _columns(self, acc, lengths, thinks_, gids) -> Dict[str, torch.Tensor]:
        """The new or replaced columns on gathered valid rows."""
        correct = acc >= 1.0
        out: Dict[str, torch.Tensor] = {}
        if self.length_reward == "kimi":
            out[LENGTH_COLUMN] = kimi_length_reward(correct, lengths, gids)
        elif self.length_reward == "grpo_lambda":
            out[LENGTH_COLUMN] = switched_length_reward(correct, lengths, gids,
                                                        min_accuracy=self.min_accuracy)
        elif self.length_reward == "serial_decay":
            out[self.accuracy] = serial_decay_reward(correct, lengths, gids, decay=self.decay)
        if self.mode:
            out[MODE_COLUMN] = mode_reward(correct, thinks_, gids)
        return out

    def __call__(self, rounds, rnd):
        """S-GRPO here ranks a *parallel* group's correct rows by their token counts (where each
        row chose to stop): the policy contract cannot continue a completion from a truncated
        thought, so the paper's serial group of forced exits of one thought is not built."""
        from mmrl.train.reward_fn import RewardBatch
        if rnd.rollout.reward_group_ids is not None:
            raise ValueError("video.length_reward / mode_reward need one training row per "
                             "rewarded sample (their lengths); this policy trains other rows")
        r = rnd.rewards
        if self.accuracy not in r.names:
            raise ValueError(f"video.length_reward / mode_reward read the {self.accuracy!r} "
                             f"reward column (columns: {', '.join(r.names)}); add it to "
                             f"video.rewards")
        acc = torch.where(r.valid, r.column(self.accuracy).float(), float("nan"))
        think = torch.tensor([thinks(_text(s), self.style) for s in rnd.rollout.samples],
                             dtype=torch.float32)
        chars = torch.tensor([float(len(thought_text(_text(s), self.style) or ""))
                              for s in rnd.rollout.samples])
        table = torch.stack([acc, rnd.rollout.mask.sum(-1).float(), think, chars], 1)
        values, gids = rounds.gathered(rnd.rollout, table)  # [B_all, 4], every rank's rows
        offset = int(rounds.dist.all_gather_rows(torch.tensor([len(acc)]))[:rounds.dist.rank]
                     .sum())
        ok = torch.isfinite(values[:, 0])
        cols = self._columns(values[ok, 0], values[ok, 1], values[ok, 2] > 0, gids[ok])
        rounds.add_round_metrics({}, means=self._metrics(values[ok], gids[ok]))
        local = slice(offset, offset + len(acc))
        names, table_out = list(r.names), r.values.clone()
        for name, col in cols.items():
            full = torch.zeros(len(values))
            full[ok] = col
            mine = full[local].to(table_out.dtype)
            if name in names:
                table_out[:, names.index(name)] = torch.where(r.valid, mine,
                                                              table_out[:, names.index(name)])
            else:
                names.append(name)
                table_out = torch.cat([table_out, mine[:, None]], 1)
        return dataclasses.replace(rnd, rewards=RewardBatch(table_out, names, r.valid))

    def _metrics(self, values: torch.Tensor, gids: torch.Tensor) -> Dict[str, Any]:
        n = float(len(values))
        out = {"think_frac": (float((values[:, 2] > 0).sum()), n),
               "thought_chars": (float(values[:, 3].sum()), n)}
        if self.length_reward == "grpo_lambda" and n:
            from mmrl.algo.length import group_accuracy
            on = group_accuracy(values[:, 0] >= 1.0, gids) >= self.min_accuracy
            uniq = torch.unique(gids)
            first = torch.stack([(gids == g).nonzero()[0, 0] for g in uniq])
            out["length_groups_on"] = (float(on[first].sum()), float(len(uniq)))
        return out


def _text(sample) -> str:
    from .vl_rewards import completion_text
    return completion_text(sample)


def build_thinking(c) -> List[ThinkingRounds]:
    """``[ThinkingRounds]`` when the video config ``c`` asks for one (or runs SFT steps with
    the accuracy reward: the ``think_frac`` metric of the RL steps), else ``[]``."""
    watch = getattr(c, "sft_steps", 0) and "accuracy" in c.rewards
    if c.length_reward == "none" and not c.mode_reward and not watch:
        return []
    return [ThinkingRounds(c.length_reward, c.mode_reward, c.think_style,
                           c.length_switch_accuracy, c.serial_decay)]
