"""Video-R1's and TW-GRPO's reward rules, restated for paper reproduction.

The answer rewards of :mod:`mmrl.video.vl_rewards` take ``mode``: ``"lenient"`` (mmrl's own
reading, the default), ``"video_r1"`` or ``"tw_grpo"``. The two reference modes score every
completion as the reference code does, quirks included; this module holds their rules as small
functions of strings. Sources read (rules restated, no code copied):

- Video-R1 (arXiv 2503.21776), tulerfeng/Video-R1 @ 59d65c3, ``src/r1-v/src/open_r1/grpo.py``:
  ``accuracy_reward`` (``extract_answer``, ``normalize_number``, ``wer``,
  ``compute_rouge_score``) and ``format_reward``.
- TW-GRPO (arXiv 2505.24718), longmalongma/TW-GRPO @ aa529ff, ``src/open_r1/grpo.py``:
  ``accuracy_reward`` (partial credit), ``origin_accuracy_reward`` (all or nothing) and
  ``format_reward``.

The two references differ in every rule (answer extraction, format, choice scoring), hence two
modes. What the reference modes do not reproduce, on purpose:

- an unreadable ground truth is NaN or raises (``on_bad_label``), as in lenient mode; the
  references score every completion of such a sample 0 (no advantage either way);
- TW-GRPO first tries ``math_verify`` on the whole completion against the solution; it is not
  run here (math-verify 0.9.0 parses no answer from ``"<answer>B</answer>"``, so the check never
  passes on TW-GRPO's tagged letter solutions);
- Video-R1 reads the problem type of a batch's first sample, and only its exact spellings;
  here each sample's type is read, case, ``-`` and ``_`` ignored.
"""
from __future__ import annotations

import re
from typing import Optional

from .text_metrics import library_rouge_tokens, rouge_f

MODES = ("lenient", "video_r1", "tw_grpo")

# ----------------------------------------------------------------------------- answers


def first_answer_block(text: str) -> Optional[str]:
    """The inside of the **first** ``<answer>…</answer>`` block, stripped; None without one.

    The block runs from the first ``<answer>`` to the first ``</answer>`` after it, so
    ``"<answer>a<answer>b</answer>"`` gives ``"a<answer>b"`` (``re.search`` with a lazy group,
    as both references do). Linear time.
    """
    start = text.find("<answer>")
    if start < 0:
        return None
    end = text.find("</answer>", start + 8)
    return None if end < 0 else text[start + 8:end].strip()


def video_r1_answer(text: str) -> str:
    """Video-R1's answer: the first block, or ``""`` without one (which then scores 0)."""
    inside = first_answer_block(text)
    return "" if inside is None else inside


def tw_grpo_answer(text: str) -> str:
    """TW-GRPO's answer: the first block, or the whole text stripped without one."""
    inside = first_answer_block(text)
    return text.strip() if inside is None else inside


#: The ground truth as the references read it: TW-GRPO's reading of an answer (Video-R1 reads a
#: solution without a block as ``""``, and its data always has one).
reference_solution = tw_grpo_answer


# ----------------------------------------------------------------------------- format

_CLOSE_THEN_OPEN = re.compile(r"</think>\s*<answer>")


def video_r1_format_score(text: str) -> float:
    """1.0 iff ``re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", text, re.DOTALL)``.

    Linear-time restatement: the text starts with ``<think>``, ends with ``</answer>`` and
    contains ``</think>``, whitespace, ``<answer>`` (such an occurrence can overlap neither end,
    so the two lazy groups fit around it). No whitespace before or after; a second ``<think>``
    or ``<answer>`` block anywhere inside is accepted.
    """
    if not (text.startswith("<think>") and text.endswith("</answer>")):
        return 0.0
    return 1.0 if _CLOSE_THEN_OPEN.search(text) else 0.0


def tw_grpo_format_score(text: str) -> float:
    """1.0 iff TW-GRPO's check passes on ``text.strip()``: at most one ``<think>`` and one
    ``<answer>``, and ``re.search(r"<think>.*?</think>\\s*<answer>.*?</answer>[\\s!]*$")``.

    So text before ``<think>`` and ``!`` after ``</answer>`` are accepted. Linear-time
    restatement: ``</think>`` (after ``<think>``) then whitespace right before the one
    ``<answer>``, and the text, less trailing whitespace and ``!``, ends with a ``</answer>``
    that starts after ``<answer>``'s end.
    """
    text = text.strip()
    if text.count("<think>") != 1 or text.count("<answer>") != 1:
        return 0.0
    think, answer = text.find("<think>"), text.find("<answer>")
    head = text[:answer].rstrip()
    if not head.endswith("</think>") or len(head) - 8 < think + 7:
        return 0.0
    tail = _rstrip_space_bang(text)
    if not tail.endswith("</answer>") or len(tail) - 9 < answer + 8:
        return 0.0
    return 1.0


def _rstrip_space_bang(text: str) -> str:
    end = len(text)
    while end and (text[end - 1] == "!" or text[end - 1].isspace()):
        end -= 1
    return text[:end]


# ----------------------------------------------------------------------------- Video-R1 accuracy


def video_r1_float(text: str) -> Optional[float]:
    """Video-R1's ``normalize_number``: ``float(text.replace(",", ""))``, None if that raises.

    Python's ``float`` also reads ``"inf"``, ``"nan"``, ``"1_000"`` and other scripts' digits.
    """
    try:
        return float(text.replace(",", ""))
    except (ValueError, OverflowError):
        return None


def video_r1_choice_score(answer: str, truth: str) -> float:
    """Video-R1 multiple choice: 1 iff the two stripped strings are equal (``"b"``, ``"B."``,
    ``"(B)"`` and ``"A, C"`` against ``"A,C"`` score 0)."""
    return 1.0 if answer.strip() == truth.strip() else 0.0


def video_r1_numerical_score(answer: str, truth: str) -> float:
    """Video-R1 numerical: 0 if only one side contains ``.`` or ``,`` (``"3.0"`` vs ``"3"``,
    ``"1,234"`` vs ``"1234"``), else 1 iff ``round(float, 2)`` agree; unreadable -> 0."""
    if ("." in truth or "," in truth) != ("." in answer or "," in answer):
        return 0.0
    pred, gold = video_r1_float(answer), video_r1_float(truth)
    if pred is None or gold is None:
        return 0.0
    return 1.0 if round(gold, 2) == round(pred, 2) else 0.0


def video_r1_regression_score(answer: str, truth: str) -> float:
    """Video-R1 regression: 1 − clip((|pred − truth| + 1e-9) / (|truth| + 1e-9), 0, 1).

    Quirks kept: an exact answer scores 1 − 1e-9/(|truth| + 1e-9), just below 1; at truth 0
    every answer (0 included) scores 0; an answer ``"nan"`` scores 1 (the NaN ratio falls
    through ``max(0, ·)`` as 0).
    """
    pred, gold = video_r1_float(answer), video_r1_float(truth)
    if pred is None or gold is None:
        return 0.0
    ratio = (abs(pred - gold) + 1e-9) / (abs(gold) + 1e-9)
    return 1.0 - min(1.0, max(0.0, ratio))


def video_r1_rouge(truth: str, answer: str) -> float:
    """Video-R1 free-form: mean of ``rouge_score``'s ROUGE-1/2/L F-measures with Porter
    stemming, clipped to [0, 1]: :func:`.text_metrics.rouge_f` on the library's own tokens
    (ASCII letters and digits only; other scripts are dropped), equal to ``RougeScorer`` 0.1.2
    bit for bit and linear in the answer's length."""
    return max(0.0, min(1.0, rouge_f(truth, answer, tokenize=library_rouge_tokens)))


# ----------------------------------------------------------------------------- TW-GRPO accuracy


def tw_grpo_items(text: str) -> frozenset:
    """TW-GRPO's answer set: spaces removed, split on ``,``, each item stripped
    (``"A, C"`` -> {A, C}; ``""`` -> {""}; case and ``.``/``()`` kept)."""
    return frozenset(item.strip() for item in text.replace(" ", "").split(","))


def tw_grpo_choice_score(answer: str, truth: str, partial: bool = True) -> float:
    """TW-GRPO string matching: |P|/|S| if P ⊆ S else 0 on the item sets of answer and truth
    (``accuracy_reward``); with ``partial=False`` anything below 1 is 0
    (``origin_accuracy_reward``)."""
    pred, gold = tw_grpo_items(answer), tw_grpo_items(truth)
    if not pred <= gold:
        return 0.0
    value = len(pred) / len(gold)
    return value if partial or value >= 1 else 0.0

