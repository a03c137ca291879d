"""The video job's SFT targets (``video.sft_steps``; TON's first stage, arXiv 2505.16854): one
target completion per record, its thought dropped with probability ``video.thought_dropout``
(:func:`mmrl.video.thinking.thought_dropout`), for :class:`mmrl.train.sft_stage.SFTStage`.

A record's target by ``video.think_style``:

- ``tags``: ``<think>{thought}</think><answer>{answer}</answer>``. The thought is the record's
  reasoning: Video-R1-COT's ``process`` field (its ``<think>`` tags stripped), else its
  ``solution_steps`` joined by newlines (the guidance records' field), else a ``reasoning``
  field. A record without any is not an SFT example (counted; none at all is an error). The
  answer is the inside of the ``solution``'s ``<answer>…</answer>`` (Video-R1 writes
  ``"<answer>B</answer>"``), else the solution as text.
- ``filler`` (the tiny thinking demo, which decodes only answer letters and a space): ``k``
  spaces and the answer letter, ``k`` uniform in ``[max_new_tokens // 2, max_new_tokens − 2]``
  (a thought that leaves room for the letter and the end token). The synthetic demo records
  carry no reasoning (``solution`` is ``"<answer>B</answer>"``), so this thought is length
  only, as the warm start of ``benchmarks/bench_thinking.py`` was.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, List, Optional

from mmrl.config.core import UserError

from .data import VLRecord
from .thinking import thinks, thought_dropout

__all__ = ["SFTExample", "record_answer", "record_thought", "sft_target", "build_sft_stage"]

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK = re.compile(r"^\s*<think>(.*)</think>\s*$", re.DOTALL)


@dataclass
class SFTExample:
    """One SFT example: the record (its prompt) and the target completion."""

    record: VLRecord
    target: str


def record_answer(record: VLRecord) -> str:
    """The answer text of a record's ``solution`` (the inside of ``<answer>…</answer>`` when
    there is one)."""
    sol = record.solution if isinstance(record.solution, str) else str(record.solution)
    found = _ANSWER.search(sol)
    return (found.group(1) if found else sol).strip()


def record_thought(record: VLRecord) -> Optional[str]:
    """A record's reasoning for the ``tags`` target (see the module), or None."""
    process = record.extra.get("process")
    if isinstance(process, str) and process.strip():
        inner = _THINK.match(process)
        return (inner.group(1) if inner else process).strip()
    if record.solution_steps:
        return "\n".join(record.solution_steps)
    reasoning = record.extra.get("reasoning")
    return reasoning.strip() if isinstance(reasoning, str) and reasoning.strip() else None


def sft_target(record: VLRecord, style: str, rng: random.Random, p: float,
               max_new_tokens: int = 12) -> Optional[str]:
    """The target of ``record`` (see the module) after thought dropout with probability ``p``;
    None for a ``tags`` record without reasoning.

    Raises:
        ValueError: a ``filler`` record whose answer is not one character.
    """
    answer = record_answer(record)
    if style == "filler":
        if len(answer) != 1:
            raise ValueError(f"{record.source}: answer {answer!r}; think_style filler needs a "
                             f"one-character answer (a letter)")
        lo = max(1, max_new_tokens // 2)
        target = " " * rng.randint(lo, max(lo, max_new_tokens - 2)) + answer
    else:
        thought = record_thought(record)
        if thought is None:
            return None
        target = f"<think>{thought}</think><answer>{answer}</answer>"
    return thought_dropout(target, p, rng, style)


def build_sft_stage(c, records: List[VLRecord], per_step: int, repeats: int, seed: int):
    """The :class:`mmrl.train.sft_stage.SFTStage` of video config ``c`` (None when
    ``sft_steps`` is 0): the records that have a target, ``per_step`` records a step with
    ``repeats`` targets each.

    Raises:
        UserError: SFT steps and not one record with a target.
    """
    from mmrl.train.sft_stage import SFTData, SFTStage
    if not c.sft_steps:
        return None
    probe = random.Random(0)
    usable = [r for r in records
              if c.think_style == "filler" or record_thought(r) is not None]
    if not usable:
        raise UserError(f"video.sft_steps={c.sft_steps}: no record of video.data has a "
                        f"reasoning for the SFT target (Video-R1-COT's 'process', "
                        f"'solution_steps' or 'reasoning'); use such data or sft_steps: 0")
    for r in usable[:1]:  # a bad answer is the user's error, before the run starts
        try:
            sft_target(r, c.think_style, probe, 0.0, c.max_new_tokens)
        except ValueError as err:
            raise UserError(f"video.sft_steps: {err}") from None
    if len(usable) < len(records):
        print(f"video: SFT uses {len(usable)} of {len(records)} records (the others carry no "
              f"reasoning)", flush=True)

    def make(i: int, rng: random.Random) -> Any:
        r = usable[i]
        return SFTExample(r, sft_target(r, c.think_style, rng, c.thought_dropout,
                                        c.max_new_tokens))

    def kept(e: SFTExample) -> bool:
        return thinks(e.target, c.think_style)

    return SFTStage(c.sft_steps, SFTData(len(usable), make, kept), per_step, repeats, seed,
                    c.sft_lr)
