"""Verifiable rewards for video/image question answering (Video-R1, TW-GRPO, DAPO).

Every reward is a callable ``fn(samples, prompts, metadata) -> [B]`` (float32) and composes
with :class:`mmrl.train.reward_fn.CombinedReward` as a named column. ``samples`` are completions:
strings, ``None``, bytes, or chat messages (``[{"role": "assistant", "content": ...}]``);
``metadata[i]`` carries the ground truth:

- ``solution``: ``"<answer>B</answer>"`` (Video-R1) or ``"B"``; letters ``"A,C"`` for a
  multi-answer question; a number; a ``[start, end]`` pair for temporal grounding;
- ``problem_type``: Video-R1's ``"multiple choice"``, ``"numerical"``, ``"regression"``,
  ``"OCR"``, ``"free-form"``, or ``"temporal grounding"`` (case, ``-`` and ``_`` ignored);
- ``options``: ``["A. red", "B. blue"]`` (used to read an answer that quotes an option's text);
- ``completion_length``: tokens in the completion (for :class:`SoftOverlong`).

``mode``: ``"lenient"`` (default) reads answers generously (``"b"``, ``"(B)"``, ``"42 m"``);
``"video_r1"`` / ``"tw_grpo"`` score exactly as the reference code (:mod:`.vl_reference`).
Parsing never raises on model output: empty text, missing/duplicated/nested tags, prose, unicode
and megabyte strings score 0 or a partial value, in time linear in the output's length (the
quadratic parts, WER and LCS in :mod:`.text_metrics`, are bounded by the ground truth's length).
A ground truth that cannot be read is a data error: NaN (``on_bad_label="nan"``, which the loop
drops and counts) or ``ValueError`` (``"raise"``). Registered names: ``VL_REWARDS``.
Formulas: ../shared/ALGORITHMS.md, "Rewards for VLM tasks"; documentation: docs/video_rl.md.
Torch loads when a reward is called (config checks use :func:`vl_reward_parts`, torch-free).
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from mmrl.registry import Registry

from .text_metrics import (_ocr_score, _rouge_tokens, choice_exact_score,  # noqa: F401
                           choice_subset_score, interval_iou, lcs_length, number_exact_score,
                           relative_error_score, rouge_f, rouge_n_f, rouge_tokens,
                           word_error_rate)
from .vl_reference import (MODES, reference_solution, tw_grpo_answer, tw_grpo_choice_score,
                           tw_grpo_format_score, video_r1_answer, video_r1_choice_score,
                           video_r1_float, video_r1_format_score, video_r1_numerical_score,
                           video_r1_regression_score, video_r1_rouge)

__all__ = [
    "VL_REWARDS", "PROBLEM_TYPES", "vl_reward_parts", "completion_text", "extract_tag",
    "extract_answer",
    "solution_text", "option_table", "parse_choice_letters", "parse_number", "parse_interval",
    "think_answer_format_score", "choice_subset_score", "choice_exact_score",
    "number_exact_score", "relative_error_score", "word_error_rate", "lcs_length", "rouge_n_f",
    "rouge_f", "interval_iou", "ThinkAnswerFormat", "ChoiceSubset", "ChoiceExact", "NumberExact",
    "RelativeError", "WordError", "RougeF", "TemporalIoU", "Accuracy", "SoftOverlong",
    "build_vl_reward", "normalize_problem_type", "LabelError", "VLReward", "MODES",
    "rouge_tokens", "reference_solution_text",
]

# ----------------------------------------------------------------------------- text access


def completion_text(sample: Any) -> str:
    """The text of one completion.

    ``str`` as is; ``None`` -> ""; bytes decoded (UTF-8, invalid bytes replaced); chat messages
    (``[{"role": "assistant", "content": ...}]``) -> the last message's content; content parts
    (``[{"type": "text", "text": ...}]``) and lists of strings -> joined; anything else ``str(x)``.
    """
    if sample is None:
        return ""
    if isinstance(sample, str):
        return sample
    if isinstance(sample, (bytes, bytearray)):
        return bytes(sample).decode("utf-8", errors="replace")
    if isinstance(sample, Mapping):
        return completion_text(sample["content"] if "content" in sample else sample.get("text"))
    if isinstance(sample, (list, tuple)) and all(isinstance(m, (str, Mapping)) for m in sample):
        if sample and all(isinstance(m, Mapping) and "role" in m for m in sample):
            return completion_text(sample[-1])
        return "".join(completion_text(m) for m in sample)
    return str(sample)


def extract_tag(text: str, tag: str) -> Optional[str]:
    """The inside of the **last** complete ``<tag>…</tag>`` block, stripped (None if there is none).

    Linear time (``str.rfind``), so a megabyte of unclosed tags costs one scan. The last block is
    the final answer when a model drafts one inside its reasoning.
    Differs from Video-R1/TW-GRPO: they take the first block (``re.search``).
    """
    close = text.rfind(f"</{tag}>")
    if close < 0:
        return None
    start = text.rfind(f"<{tag}>", 0, close)
    if start < 0:
        return None
    return text[start + len(tag) + 2:close].strip()


def extract_answer(sample: Any, answer_source: str = "tag") -> Optional[str]:
    """The model's answer: the last ``<answer>…</answer>`` block of the completion.

    Args:
        sample: a completion (see :func:`completion_text`).
        answer_source: ``"tag"`` (no block -> None, scored 0) or ``"tag_or_text"`` (no block ->
            the whole completion, stripped; TW-GRPO's fallback).
    """
    text = completion_text(sample)
    inside = extract_tag(text, "answer")
    if inside is None and answer_source == "tag_or_text":
        return text.strip()
    return inside


def solution_text(solution: Any) -> str:
    """Ground truth as text: ``"<answer>B</answer>"`` -> ``"B"``; numbers and lists via ``str``."""
    text = completion_text(solution)
    inside = extract_tag(text, "answer")
    return (inside if inside is not None else text).strip()


def normalize_problem_type(problem_type: Any) -> str:
    """``"Multiple-Choice"`` -> ``"multiple choice"``; ``"OCR"`` -> ``"ocr"``."""
    return re.sub(r"[\s_\-]+", " ", str(problem_type)).strip().lower()


# ----------------------------------------------------------------------------- parsers

_OPTION_HEAD = re.compile(r"^\s*[(\[]?\s*([A-Z])\s*(?:[)\].:：]|\s-)\s*(.*)$", re.S)
_ITEM = re.compile(r"^([(\[{])?\s*([A-Za-z])\s*([)\]}])?\s*([.:：\-]\s*)?(.*)$", re.S)
MAX_CHOICE_CHARS = 4096  # longer than any list of letters plus an option's text
_SPLIT = re.compile(r"\s*(?:[,;，、；/&]|\band\b)\s*", re.I)


def option_table(options: Optional[Sequence[Any]]) -> List[Tuple[str, str]]:
    """``["A. red", "(B) blue", "green"]`` -> ``[("A", "red"), ("B", "blue"), ("C", "green")]``.

    A leading letter (``A.``, ``A)``, ``(A)``, ``A:``) is read; an option without one gets the
    letter of its position.
    """
    table = []
    for i, opt in enumerate(options or []):
        text = completion_text(opt)
        head = _OPTION_HEAD.match(text)
        if head:
            table.append((head.group(1), head.group(2).strip()))
        else:
            table.append((chr(ord("A") + i) if i < 26 else f"#{i}", text.strip()))
    return table


def _bare_letter(text: str) -> bool:
    m = _ITEM.match(text.strip())
    return bool(m) and not m.group(5)


def _item_letter(item: str, by_text: Mapping[str, str]) -> Optional[str]:
    m = _ITEM.match(item)
    if m:
        opened, letter, closed, punct, rest = m.groups()
        # "A", "(A)", "A.", "A. red", "B) blue" are letters; "I think", "(A" and "(A) (C)"
        # (whose rest is another letter) are not
        if (not rest or closed or punct) and not (opened and not closed) and not (
                rest and _bare_letter(rest)):
            return letter.upper()
    key = item.strip().rstrip(".").strip().lower()
    return by_text.get(key) if key else None


def _split_letters(answer: str, by_text: Mapping[str, str]) -> Optional[set]:
    letters = set()
    for item in _SPLIT.split(answer):
        if not item:
            continue
        letter = _item_letter(item, by_text)
        if letter is not None:
            letters.add(letter)
            continue
        words = item.split()  # "A C": letters separated by spaces only
        if len(words) < 2 or not all(_bare_letter(w) for w in words):
            return None
        letters.update(_item_letter(w, {}) for w in words)
    return letters or None


def parse_choice_letters(answer: Optional[str],
                         options: Optional[Sequence[Any]] = None) -> Optional[frozenset]:
    """The set of option letters in an answer, or None when it is not a list of options.

    Accepted: letters separated by ``,`` ``;`` ``/`` ``&`` ``and`` or spaces (``"A, C"``,
    ``"A and C"``, ``"A C"``), each optionally bracketed or followed by its text (``"(A)"``,
    ``"A. red"``, ``"B) blue"``), or an option's exact text (``"red"`` -> its letter, when
    ``options`` are given; an option text containing a separator is read whole). Anything else
    (prose such as ``"I think A"``, hedges such as ``"A or B"``, empty text, more than
    ``MAX_CHOICE_CHARS`` characters) is None, which every choice reward scores 0.
    """
    if answer is None or len(answer) > MAX_CHOICE_CHARS:
        return None
    answer = answer.strip()
    if not answer:
        return None
    by_text = {t.lower(): letter for letter, t in option_table(options) if t}
    letters = _split_letters(answer, by_text)
    if letters is None:  # "A. salt and pepper", "salt and pepper": one item, not two
        whole = _item_letter(answer, by_text)
        letters = {whole} if whole else None
    return frozenset(letters) if letters else None


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+",
                     re.ASCII)


def _to_float(token: str) -> Optional[float]:
    try:
        value = float(token.replace(",", ""))
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def _numbers(text: str, limit: int):
    out = []
    for m in _NUMBER.finditer(text.replace("−", "-")):
        out.append(m.group(0))
        if len(out) >= limit:
            break
    return out


# a plus-minus hedge: "±3", "3 ± 1", "+-2", "+/- 2", "-/+2"
_HEDGE = re.compile(r"[±∓]|\+\s*/?\s*-|-\s*/\s*\+")


def parse_number(answer: Any) -> Optional[float]:
    """A finite float from an answer: the whole text if it is a number (``"1,234.5"``), else the
    only number in it (``"42 meters"``); None when there is none, several (``"3 or 4"``), a
    plus-minus hedge (``"±3"``, ``"+-2"``, ``"3 ± 1"``), or it is not finite. Numbers pass
    through (``True``/``False`` do not)."""
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, (int, float)):
        return float(answer) if math.isfinite(answer) else None
    text = completion_text(answer).strip()
    if not text or _HEDGE.search(text):
        return None
    whole = _to_float(text) if _NUMBER.fullmatch(text.replace("−", "-")) else None
    if whole is not None:
        return whole
    found = _numbers(text, limit=2)
    if len(found) != 1:
        return None
    return _to_float(found[0])


def parse_interval(answer: Any) -> Optional[Tuple[float, float]]:
    """``[start, end]`` from ``"[12.5, 20]"``, ``"12.5 - 20 s"``, ``"from 12.5 to 20"`` or a pair of
    numbers: the first two numbers; None with fewer than two, non-finite values or a plus-minus
    hedge (``"3 ± 1"``). A reversed pair is returned as given (:func:`interval_iou` scores it
    0)."""
    if isinstance(answer, (list, tuple)) and len(answer) == 2:
        a, b = parse_number(answer[0]), parse_number(answer[1])
        return None if a is None or b is None else (a, b)
    text = completion_text(answer)
    if _HEDGE.search(text):
        return None
    # "12.5-20": split a range dash from a sign before reading numbers
    found = _numbers(re.sub(r"(?<=\d)\s*-\s*(?=[\d.])", " to ", text, count=1), limit=2)
    if len(found) < 2:
        return None
    a, b = _to_float(found[0]), _to_float(found[1])
    return None if a is None or b is None else (a, b)


# ----------------------------------------------------------------------------- scores


def think_answer_format_score(sample: Any) -> float:
    """1.0 iff the completion is exactly one ``<think>…</think>`` then one ``<answer>…</answer>``.

    Whitespace is allowed before, between and after the two blocks; any other text, a second or
    nested tag, or a missing tag gives 0.0. Linear time.
    Differs from Video-R1 (``re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>")``):
    it rejects whitespace before ``<think>`` or after ``</answer>`` and accepts a second
    ``<think>`` or ``<answer>`` block (``"<think>a</think><answer>B</answer><answer>C</answer>"``
    scores 1 there); here every tag must occur once.
    Differs from TW-GRPO: it accepts text before ``<think>``, ``!`` after ``</answer>`` and a
    repeated ``</think>`` or ``</answer>``. ``mode="video_r1"`` / ``"tw_grpo"`` of
    :class:`ThinkAnswerFormat` score as they do.
    """
    text = completion_text(sample).strip()
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    if any(text.count(t) != 1 for t in tags):
        return 0.0
    pos = [text.find(t) for t in tags]
    if pos[0] != 0 or not pos[0] < pos[1] < pos[2] < pos[3]:
        return 0.0
    between = text[pos[1] + len(tags[1]):pos[2]]
    if between.strip() or pos[3] + len(tags[3]) != len(text):
        return 0.0
    return 1.0


# ----------------------------------------------------------------------------- rewards

ANSWER_SOURCES = ("tag", "tag_or_text")
BAD_LABEL_POLICIES = ("nan", "raise")


class LabelError(ValueError):
    """A ground truth that cannot be read: a data error, not a model error (``VLReward.truth``)."""


def _check_batch(samples, metadata, who: str) -> None:
    if metadata is None or len(metadata) != len(samples):
        got = "None" if metadata is None else f"{len(metadata)} dicts"
        raise ValueError(f"reward {who!r} got {len(samples)} samples and metadata {got}; pass one "
                         f"metadata dict per sample (with 'solution', 'problem_type', ...)")


def reference_solution_text(solution: Any) -> str:
    """Ground truth as the references read it: :func:`.vl_reference.reference_solution`."""
    return reference_solution(completion_text(solution))


class VLReward:
    """Base of the answer rewards: ``fn(samples, prompts, metadata) -> float32 [B]``.

    Subclasses define ``truth(meta)`` (read the ground truth, raising ``LabelError``) and
    ``score(answer, truth, meta)`` (a float for one extracted answer, which may be None), and
    list the ``modes`` they have.

    Args:
        answer_source: lenient mode only: ``"tag"`` (default; the answer must be inside
            ``<answer>…</answer>``) or ``"tag_or_text"`` (fall back to the whole completion).
        on_bad_label: ``"nan"`` (an unreadable ground truth gives NaN: the loop drops and counts
            that sample) or ``"raise"`` (``ValueError`` naming the sample).
        mode: ``"lenient"`` (mmrl's reading, default), ``"video_r1"`` or ``"tw_grpo"`` (the
            reference code's rules exactly, for paper reproduction: :mod:`.vl_reference`; the
            answer is then read as that reference does, so ``answer_source`` is not taken).

    Raises:
        ValueError: an unknown option value, a mode this reward does not have, or
            ``answer_source`` with a reference mode.
    """

    name = "vl_reward"
    needs: Tuple[str, ...] = ("solution",)
    modes: Tuple[str, ...] = ("lenient",)

    def __init__(self, answer_source: Optional[str] = None, on_bad_label: str = "nan",
                 mode: str = "lenient"):
        for arg, value, allowed in (("answer_source", answer_source, (None,) + ANSWER_SOURCES),
                                    ("on_bad_label", on_bad_label, BAD_LABEL_POLICIES),
                                    ("mode", mode, MODES)):
            if value not in allowed:
                raise ValueError(f"{type(self).__name__}: {arg}={value!r}; expected one of "
                                 f"{', '.join(map(repr, allowed))}")
        if mode not in self.modes:
            raise ValueError(f"{type(self).__name__}: mode={mode!r} is not one of its modes "
                             f"{', '.join(map(repr, self.modes))} (the reference has no such "
                             f"reward); use one of those or another reward")
        if mode != "lenient" and answer_source is not None:
            raise ValueError(f"{type(self).__name__}: answer_source={answer_source!r} with "
                             f"mode={mode!r}; a reference mode reads answers as the reference "
                             f"does (Video-R1: the first block; TW-GRPO: the first block or the "
                             f"whole text); drop answer_source or use mode='lenient'")
        self.mode, self.on_bad_label = mode, on_bad_label
        self.answer_source = answer_source or "tag"

    def answer(self, sample: Any) -> Optional[str]:
        """The answer text this reward scores (None: no answer, in lenient mode)."""
        if self.mode == "video_r1":
            return video_r1_answer(completion_text(sample))
        if self.mode == "tw_grpo":
            return tw_grpo_answer(completion_text(sample))
        return extract_answer(sample, self.answer_source)

    def truth(self, meta: Mapping[str, Any]) -> Any:
        if self.mode == "lenient":
            return solution_text(meta["solution"])
        return reference_solution_text(meta["solution"])

    def score(self, answer: Optional[str], truth: Any, meta: Mapping[str, Any]) -> float:
        raise NotImplementedError

    def score_one(self, sample: Any, meta: Mapping[str, Any], index: int = 0) -> float:
        """The reward of one completion (NaN for an unreadable ground truth)."""
        if not isinstance(meta, Mapping):
            raise TypeError(f"reward {self.name!r}: metadata[{index}] is {type(meta).__name__}; "
                            f"expected a dict with keys {list(self.needs)}")
        missing = [k for k in self.needs if k not in meta]
        if missing:
            raise ValueError(f"reward {self.name!r}: metadata[{index}] has no {missing} (keys: "
                             f"{sorted(meta)[:10]}); add them to each sample's metadata, e.g. "
                             f"from mmrl.video.data records")
        try:
            truth = self.truth(meta)
        except LabelError as err:
            if self.on_bad_label == "raise":
                raise ValueError(f"reward {self.name!r}: metadata[{index}]: {err}; fix the record "
                                 f"or use on_bad_label='nan' to drop such samples") from None
            return math.nan
        return float(self.score(self.answer(sample), truth, meta))

    def __call__(self, samples: Sequence[Any], prompts: Sequence[Any],
                 metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        _check_batch(samples, metadata, self.name)
        return _floats([self.score_one(s, m, i) for i, (s, m) in enumerate(zip(samples, metadata))])

    def __repr__(self) -> str:
        if self.mode != "lenient":
            return f"{type(self).__name__}(mode={self.mode!r})"
        return f"{type(self).__name__}(answer_source={self.answer_source!r})"


_FORMAT_RULES = {"lenient": think_answer_format_score, "video_r1": video_r1_format_score,
                 "tw_grpo": tw_grpo_format_score}


class ThinkAnswerFormat(VLReward):
    """Format reward (needs no metadata): :func:`think_answer_format_score` (lenient),
    :func:`~.vl_reference.video_r1_format_score` or :func:`~.vl_reference.tw_grpo_format_score`
    of the completion's text, by ``mode``."""

    name = "think_answer_format"
    needs = ()
    modes = MODES

    def __init__(self, mode: str = "lenient"):
        super().__init__(mode=mode)
        self._rule = _FORMAT_RULES[mode]

    def score_one(self, sample: Any, meta: Mapping[str, Any], index: int = 0) -> float:
        return self._rule(completion_text(sample))

    def __call__(self, samples, prompts, metadata=None) -> torch.Tensor:
        return _floats([self.score_one(s, {}) for s in samples])

    def __repr__(self) -> str:
        return f"ThinkAnswerFormat(mode={self.mode!r})"


def _letters_or_label_error(meta) -> frozenset:
    letters = parse_choice_letters(solution_text(meta["solution"]), meta.get("options"))
    if not letters:
        raise LabelError(f"solution {str(meta['solution'])[:60]!r} is not a list of option "
                         f"letters (expected e.g. '<answer>B</answer>' or 'A,C')")
    return letters


class ChoiceSubset(VLReward):
    """TW-GRPO soft multi-choice: :func:`choice_subset_score` on the parsed letter sets
    (lenient), or TW-GRPO's string-set rule :func:`~.vl_reference.tw_grpo_choice_score`
    (``mode="tw_grpo"``).

    Differs from TW-GRPO (lenient mode): lower-case letters (``"a"``), ``"B."``, ``"(B)"``,
    ``"A and C"`` and an option's text (``"red"``) are read as letters (TW-GRPO compares the
    raw strings between commas, so they score 0), and an empty or unreadable answer scores 0
    whatever the truth.
    """

    name = "choice_subset"
    modes = ("lenient", "tw_grpo")

    def truth(self, meta):
        if self.mode == "lenient":
            return _letters_or_label_error(meta)
        text = reference_solution_text(meta["solution"])
        if not text:
            raise LabelError(f"solution {str(meta['solution'])[:60]!r} is empty")
        return text

    def score(self, answer, truth, meta):
        if self.mode == "tw_grpo":
            return tw_grpo_choice_score(answer, truth, partial=True)
        return choice_subset_score(parse_choice_letters(answer, meta.get("options")), truth)


class ChoiceExact(ChoiceSubset):
    """Strict multi-choice (Video-R1 "multiple choice"): :func:`choice_exact_score` (lenient),
    :func:`~.vl_reference.video_r1_choice_score` (``mode="video_r1"``: string equality) or
    TW-GRPO's all-or-nothing ``origin_accuracy_reward`` (``mode="tw_grpo"``).

    Differs from Video-R1 (lenient mode): lower-case letters (``"b"``), ``"B."``, ``"(B)"``,
    ``"B. blue"``, an option's text (``"blue"``) and any order or separator of several letters
    (``"C, A"``) score 1; Video-R1 compares the two strings exactly.
    """

    name = "choice_exact"
    modes = MODES

    def truth(self, meta):
        if self.mode == "video_r1":
            _letters_or_label_error(meta)  # the label must be letters; the string is compared
            return reference_solution_text(meta["solution"])
        return super().truth(meta)

    def score(self, answer, truth, meta):
        if self.mode == "video_r1":
            return video_r1_choice_score(answer, truth)
        if self.mode == "tw_grpo":
            return tw_grpo_choice_score(answer, truth, partial=False)
        return choice_exact_score(parse_choice_letters(answer, meta.get("options")), truth)


class NumberExact(VLReward):
    """Video-R1 numerical: :func:`number_exact_score` (``decimals`` = 2) of
    :func:`parse_number` values (lenient), or Video-R1's string rule
    :func:`~.vl_reference.video_r1_numerical_score` (``mode="video_r1"``, 2 decimals)."""

    name = "number_exact"
    modes = ("lenient", "video_r1")

    def __init__(self, decimals: int = 2, answer_source: Optional[str] = None,
                 on_bad_label: str = "nan", mode: str = "lenient"):
        super().__init__(answer_source, on_bad_label, mode)
        self.decimals = int(decimals)
        if mode == "video_r1" and self.decimals != 2:
            raise ValueError(f"{type(self).__name__}: decimals={decimals} with mode='video_r1'; "
                             f"Video-R1 rounds to 2 decimals; drop decimals or use "
                             f"mode='lenient'")

    def truth(self, meta):
        text = super().truth(meta)
        value = parse_number(text) if self.mode == "lenient" else video_r1_float(text)
        if value is None or not math.isfinite(value):
            raise LabelError(f"solution {str(meta['solution'])[:60]!r} is not one finite number")
        return value if self.mode == "lenient" else text

    def score(self, answer, truth, meta):
        if self.mode == "video_r1":
            return video_r1_numerical_score(answer, truth)
        return number_exact_score(parse_number(answer), truth, self.decimals)


class RelativeError(NumberExact):
    """Video-R1 regression: :func:`relative_error_score` (lenient) or Video-R1's rule with its
    1e-9 terms, :func:`~.vl_reference.video_r1_regression_score` (``mode="video_r1"``)."""

    name = "relative_error"

    def __init__(self, answer_source: Optional[str] = None, on_bad_label: str = "nan",
                 mode: str = "lenient"):
        super().__init__(2, answer_source, on_bad_label, mode)

    def score(self, answer, truth, meta):
        if self.mode == "video_r1":
            return video_r1_regression_score(answer, truth)
        return relative_error_score(parse_number(answer), truth)


class WordError(VLReward):
    """Video-R1 OCR: 1 − min(1, WER) with whitespace words (:func:`word_error_rate`); the same
    rule in both modes, which differ in how the answer is read (``mode="video_r1"``: a
    completion without a block is the answer ``""``, which scores 1 against an empty truth)."""

    name = "word_error"
    modes = ("lenient", "video_r1")

    def score(self, answer, truth, meta):
        return 0.0 if answer is None else _ocr_score(truth, answer)


class RougeF(VLReward):
    """Video-R1 free-form: :func:`rouge_f`, the mean ROUGE-1/2/L F-measure of stemmed words
    (lenient), or ``rouge_score`` itself (:func:`~.vl_reference.video_r1_rouge`,
    ``mode="video_r1"``)."""

    name = "rouge_f"
    modes = ("lenient", "video_r1")

    def truth(self, meta):
        text = super().truth(meta)
        if not _rouge_tokens(text):
            raise LabelError(f"solution {str(meta['solution'])[:60]!r} has no words to compare")
        return text

    def score(self, answer, truth, meta):
        if self.mode == "video_r1":
            return video_r1_rouge(truth, answer)
        return 0.0 if answer is None else rouge_f(truth, answer)


class TemporalIoU(VLReward):
    """Temporal grounding: :func:`interval_iou` of the predicted and true ``[start, end]``
    (lenient only: neither reference has this reward)."""

    name = "temporal_iou"

    def truth(self, meta):
        sol = meta["solution"]
        interval = parse_interval(sol if isinstance(sol, (list, tuple)) else solution_text(sol))
        if interval is None or interval[0] > interval[1]:
            raise LabelError(f"solution {str(sol)[:60]!r} is not an interval [start, end] with "
                            f"start <= end")
        return interval

    def score(self, answer, truth, meta):
        return interval_iou(parse_interval(answer) if answer is not None else None, truth)


PROBLEM_TYPES: Dict[str, type] = {
    "multiple choice": ChoiceExact, "numerical": NumberExact, "regression": RelativeError,
    "ocr": WordError, "free form": RougeF, "temporal grounding": TemporalIoU,
}


class Accuracy(VLReward):
    """Video-R1 accuracy: per sample, the reward of its ``problem_type`` (mixed batches allowed).

    ``multiple choice`` -> :class:`ChoiceExact` (``choice="exact"``, Video-R1) or
    :class:`ChoiceSubset` (``choice="subset"``, TW-GRPO partial credit); ``numerical`` ->
    :class:`NumberExact`; ``regression`` -> :class:`RelativeError`; ``OCR`` ->
    :class:`WordError`; ``free-form`` -> :class:`RougeF`; ``temporal grounding`` ->
    :class:`TemporalIoU`. An unknown type is a bad label (NaN or ``ValueError``).

    ``mode="video_r1"``: the same dispatch with every reward in Video-R1's mode (``choice``
    must be ``"exact"``; ``temporal grounding``, which Video-R1 lacks, is a bad label).
    ``mode="tw_grpo"``: TW-GRPO's accuracy for every sample, whatever its type (no
    ``problem_type`` needed): partial credit (``choice="subset"``, the default there,
    ``accuracy_reward``) or all or nothing (``"exact"``, ``origin_accuracy_reward``).
    Differs from Video-R1: each sample's type is read (Video-R1 uses the batch's first sample's
    type for the whole batch, and only its exact spellings).
    """

    name = "accuracy"
    needs = ("solution", "problem_type")
    modes = MODES

    def __init__(self, choice: Optional[str] = None, decimals: int = 2,
                 answer_source: Optional[str] = None, on_bad_label: str = "nan",
                 mode: str = "lenient"):
        super().__init__(answer_source, on_bad_label, mode)
        choice = choice or ("subset" if mode == "tw_grpo" else "exact")
        allowed = ("exact",) if mode == "video_r1" else ("exact", "subset")
        if choice not in allowed:
            raise ValueError(f"Accuracy: choice={choice!r} with mode={mode!r}; expected "
                             f"{' or '.join(map(repr, allowed))} ('exact': all or nothing, "
                             f"'subset': TW-GRPO partial credit, which Video-R1 does not have)")
        self.choice = choice
        common = dict(answer_source=answer_source, on_bad_label=on_bad_label, mode=mode)
        if mode == "tw_grpo":
            self.needs = ("solution",)
            self.by_type: Dict[str, VLReward] = {}
            self.tw_grpo = (ChoiceSubset if choice == "subset" else ChoiceExact)(**common)
            return
        self.by_type = {k: cls(**common) for k, cls in PROBLEM_TYPES.items()
                        if mode in cls.modes and cls is not NumberExact}
        self.by_type["numerical"] = NumberExact(decimals, **common)
        if choice == "subset":
            self.by_type["multiple choice"] = ChoiceSubset(**common)

    def _reward_for(self, meta) -> VLReward:
        if self.mode == "tw_grpo":
            return self.tw_grpo
        kind = normalize_problem_type(meta["problem_type"])
        if kind not in self.by_type:
            raise LabelError(f"problem_type {meta['problem_type']!r} is not one of "
                            f"{sorted(self.by_type)} (mode {self.mode!r})")
        return self.by_type[kind]

    def truth(self, meta):
        reward = self._reward_for(meta)
        return reward, reward.truth(meta)

    def score(self, answer, truth, meta):
        reward, value = truth
        return reward.score(answer, value, meta)

    def __repr__(self) -> str:
        return f"Accuracy(choice={self.choice!r}, mode={self.mode!r})"


class SoftOverlong(VLReward):
    """DAPO soft overlong penalty in [−1, 0] from ``metadata[i][length_key]`` (token counts);
    the formula is :func:`mmrl.algo.shaping.soft_overlong_penalty`.

    Args:
        max_len: L_max, the generation limit (DAPO 20480).
        cache_len: L_cache, the ramp width (DAPO 4096).
        length_key: the metadata key holding each completion's length in tokens.
    """

    name = "soft_overlong"

    def __init__(self, max_len: int, cache_len: int, length_key: str = "completion_length"):
        from mmrl.algo.shaping import soft_overlong_penalty
        super().__init__()
        soft_overlong_penalty([0], max_len, cache_len)  # validates the two lengths
        self.max_len, self.cache_len, self.length_key = int(max_len), int(cache_len), length_key
        self.needs = (length_key,)

    def __call__(self, samples, prompts, metadata) -> torch.Tensor:
        from mmrl.algo.shaping import soft_overlong_penalty
        _check_batch(samples, metadata, self.name)
        lengths = []
        for i, meta in enumerate(metadata):
            value = meta.get(self.length_key) if isinstance(meta, Mapping) else None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"reward 'soft_overlong': metadata[{i}][{self.length_key!r}] is "
                                 f"{value!r}; expected the completion's length in tokens (the "
                                 f"trainer fills it; set length_key= if yours uses another key)")
            lengths.append(float(value))
        return soft_overlong_penalty(_floats(lengths), self.max_len, self.cache_len)

    def __repr__(self) -> str:
        return f"SoftOverlong(max_len={self.max_len}, cache_len={self.cache_len})"


def _floats(values) -> torch.Tensor:
    import torch
    return torch.tensor(values, dtype=torch.float32)


VL_REWARDS: Registry[Callable[..., VLReward]] = Registry("vl reward")
for _cls in (ThinkAnswerFormat, ChoiceSubset, ChoiceExact, NumberExact, RelativeError, WordError,
             RougeF, TemporalIoU, Accuracy, SoftOverlong):
    VL_REWARDS.register(_cls.name, _cls)


def _construct(name: str, options: Mapping[str, Any]) -> VLReward:
    cls = VL_REWARDS.get(name)
    try:
        return cls(**options)
    except TypeError as err:
        import inspect
        accepted = [p for p in inspect.signature(cls).parameters]
        raise TypeError(f"vl reward {name!r}: bad options {dict(options)} ({err}); it accepts "
                        f"{accepted or 'no options'}") from None


def build_vl_reward(spec: Union[Sequence[str], Mapping[str, Any]]) -> CombinedReward:
    """A :class:`~mmrl.train.reward_fn.CombinedReward` of :func:`vl_reward_parts` ``(spec)``,
    one column each; ``.weights`` of the result feeds the multi-reward advantages."""
    from mmrl.train.reward_fn import CombinedReward
    return CombinedReward(vl_reward_parts(spec))


def vl_reward_parts(spec: Union[Sequence[str], Mapping[str, Any]]
                    ) -> Dict[str, Tuple[VLReward, float]]:
    """``{name: (reward, weight)}`` of registered rewards (no torch needed).

    ``spec`` is a list of names (weight 1 each) or ``{name: weight}`` or
    ``{name: {"weight": w, **options}}``, e.g. ``{"think_answer_format": 0.5, "accuracy":
    {"weight": 1.0, "choice": "subset"}, "soft_overlong": {"max_len": 1024, "cache_len": 256}}``.

    Raises:
        ValueError: an unknown name (with the closest registered one) or an empty spec.
        TypeError: options a reward does not take, or a weight that is not a number.
    """
    if isinstance(spec, str):
        spec = [spec]
    items = spec.items() if isinstance(spec, Mapping) else [(n, 1.0) for n in spec]
    rewards: Dict[str, Any] = {}
    for name, entry in items:
        options = dict(entry) if isinstance(entry, Mapping) else {"weight": entry}
        weight = options.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"vl reward {name!r}: weight {weight!r} is not a number")
        rewards[name] = (_construct(name, options), float(weight))
    if not rewards:
        raise ValueError(f"build_vl_reward got an empty spec; name at least one of "
                         f"{', '.join(VL_REWARDS.names())}")
    return rewards
