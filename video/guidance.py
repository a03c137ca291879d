"""The video job's hints for the guidance augmenters (:mod:`mmrl.train.guidance`): a record's
``hints`` / ``solution_steps`` (Video-R1 JSONL extended, :class:`mmrl.video.data.VLRecord`)
become a ``Hint:`` line under the question (:func:`mmrl.video.data.format_question`), the
media unchanged.

- hint levels (Keye, Scaf-GRPO, Guide): level l = the record's first l ``hints`` joined by
  spaces (Scaf-GRPO's released ``build_new_message``), abstract to concrete;
- solution prefix (GHPO): the first round(ω · len) characters of the reference solution, the
  ``solution_steps`` joined by newlines (else the ``solution`` field), after GHPO's sentence
  "The following text is the beginning part of the answer, which you can refer to for solving
  the problem:" (hkgc-1/GHPO ``ghpo_trainer.py``);
- answer (ExPO, unconfirmed): "The correct answer is {solution}. Explain why, step by step."
- exemplars (XRPO seeding, unconfirmed): the K corpus records whose questions share the most
  words with this one (Jaccard; XRPO retrieves by an embedding model), each as
  "Question: … Answer: …" (its reference solution, cut at ``EXEMPLAR_CHARS``) under "Solved
  examples of other questions:"; text only (their media are not shown), in the ``Hint:`` line.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

__all__ = ["VideoHints", "GHPO_PREFIX", "EXEMPLAR_CHARS"]

EXEMPLAR_CHARS = 600
"""An exemplar's question and solution are each cut to this many characters (XRPO truncates
long exemplars; its bound is unconfirmed)."""

GHPO_PREFIX = ("The following text is the beginning part of the answer, which you can refer to "
               "for solving the problem:\n")


class VideoHints:
    """:class:`mmrl.train.guidance.HintPrompts` of the video job.

    Args:
        media: the job's prompt builder (:class:`mmrl.video.rounds._Media`: records,
            template, system prompt, video sampling).
    """

    def __init__(self, media):
        self.media = media

    def level_hints(self, meta: Dict[str, Any]) -> List[str]:
        hints = self.media.record(meta).hints
        return [" ".join(hints[:k]) for k in range(1, len(hints) + 1)]

    def prefix_hint(self, meta: Dict[str, Any], ratio: float) -> Optional[str]:
        record = self.media.record(meta)
        text = "\n".join(record.solution_steps) or _text(record.solution)
        n = int(round(ratio * len(text)))
        return GHPO_PREFIX + text[:n] if n > 0 else None

    def answer_hint(self, meta: Dict[str, Any]) -> Optional[str]:
        answer = _text(self.media.record(meta).solution)
        return f"The correct answer is {answer}. Explain why, step by step." if answer else None

    def exemplar_hint(self, prompt: Any, meta: Dict[str, Any], corpus, k: int) -> Optional[str]:
        words = _words(self.media.record(meta).problem)

        def overlap(entry):
            other = _words(self.media.record(entry[1]).problem)
            return len(words & other) / max(len(words | other), 1)

        shots = []
        for _, m in sorted(corpus, key=overlap, reverse=True):  # stable: corpus order on ties
            record = self.media.record(m)
            answer = "\n".join(record.solution_steps) or _text(record.solution)
            if answer:
                shots.append(f"Question: {record.problem.strip()[:EXEMPLAR_CHARS]}\n"
                             f"Answer: {answer[:EXEMPLAR_CHARS]}")
            if len(shots) == k:
                break
        return ("Solved examples of other questions:\n" + "\n\n".join(shots)) if shots else None

    def with_hint(self, prompt: Any, meta: Dict[str, Any], hint: str):
        return self.media.prompt(self.media.record(meta), meta, hint=hint, tag="guided")


def _words(text: str) -> set:
    return set(str(text).lower().split())


def _text(solution: Any) -> str:
    """The ground truth as text, ``<answer>`` tags removed (``"<answer>B</answer>"`` -> B)."""
    text = str(solution).strip()
    for tag in ("<answer>", "</answer>"):
        text = text.replace(tag, "")
    return text.strip()
