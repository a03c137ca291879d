"""Text metrics of the free-text rewards: word error rate (OCR) and ROUGE-1/2/L (free-form);
and the scores of parsed answers (multiple choice, numbers, intervals).

Pure functions, used by :mod:`mmrl.video.vl_rewards` (which re-exports them). Time
is linear in the hypothesis for a fixed reference: WER stops early when the hypothesis has
≥ 2× the reference's words, and ROUGE-L's LCS is bit-parallel.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["word_error_rate", "lcs_length", "porter_stem", "rouge_tokens", "library_rouge_tokens",
           "rouge_n_f", "rouge_f"]


def _edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = prev[j - 1] if r == h else 1 + min(prev[j], cur[j - 1], prev[j - 1])
        prev = cur
    return prev[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance / max(1, words in the reference) (whitespace words,
    case-sensitive, as Video-R1's ``wer``). O(m·n) time, O(n) memory."""
    return _edit_distance(reference.split(), hypothesis.split()) / max(1, len(reference.split()))


def _ocr_score(reference: str, hypothesis: str) -> float:
    """1 − min(1, WER); the edit distance is ≥ |n − m|, so a hypothesis of ≥ 2m words is 0
    without the O(m·n) table (a megabyte of output costs one split)."""
    ref, hyp = reference.split(), hypothesis.split()
    m = max(1, len(ref))
    if abs(len(hyp) - len(ref)) >= m:
        return 0.0
    return max(0.0, 1.0 - _edit_distance(ref, hyp) / m)


def _rouge_tokens(text: str) -> List[str]:
    """Lower-cased runs of letters/digits (rouge_score's tokenizer, extended to unicode)."""
    return re.findall(r"[^\W_]+", text.lower())


_STEMS: Dict[str, str] = {}
_PORTER: List[Any] = []
MAX_STEM_CACHE = 200_000  # distinct words kept; past it the cache starts over


def _import(module: str, what: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"free-form ROUGE needs {what} ({err}); install it with pip install "
                          f"'mmrl[video]' (or rouge-score==0.1.2, which brings nltk)") from None


def porter_stem(token: str) -> str:
    """rouge_score's stemming rule: NLTK's Porter stemmer on words longer than 3 characters,
    shorter ones as they are (cached: training answers repeat a small vocabulary)."""
    stem = _STEMS.get(token)
    if stem is None:
        if len(token) > 3 and not _PORTER:
            _PORTER.append(_import("nltk.stem.porter", "NLTK's Porter stemmer").PorterStemmer())
        stem = _PORTER[0].stem(token) if len(token) > 3 else token
        if len(_STEMS) >= MAX_STEM_CACHE:
            _STEMS.clear()
        _STEMS[token] = stem
    return stem


class _CachedStemmer:
    """The stemmer handed to ``rouge_score.tokenize.tokenize`` (it calls ``.stem``)."""

    stem = staticmethod(porter_stem)


def rouge_tokens(text: str) -> List[str]:
    """ROUGE tokens: :func:`_rouge_tokens`, each longer than 3 characters Porter-stemmed
    (``"Running dogs"`` -> ``["run", "dog"]``), as ``rouge_score`` with ``use_stemmer=True``."""
    stems = _STEMS
    return [stems[t] if t in stems else porter_stem(t) for t in _rouge_tokens(text)]


def library_rouge_tokens(text: str) -> List[str]:
    """The tokens of ``rouge_score.RougeScorer(use_stemmer=True)``: the library's own tokenizer
    (lower-case, runs of ``[a-z0-9]`` only) with the same Porter stemmer, cached."""
    return _import("rouge_score.tokenize", "the rouge-score package").tokenize(
        text, _CachedStemmer())


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison & Dix 1986).

    O(len(long) · len(short)/64) word operations with Python ints as bit vectors; tokens of the
    longer sequence absent from the shorter one cost one dict lookup."""
    if len(a) < len(b):
        a, b = b, a
    masks: Dict[Any, int] = {}
    for i, tok in enumerate(b):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(b)) - 1
    v = full
    for tok in a:
        m = masks.get(tok)
        if m is None:
            continue
        u = v & m
        v = ((v + u) | (v - u)) & full
    return len(b) - bin(v).count("1")


def _f1(overlap: float, n_pred: int, n_ref: int) -> float:
    if overlap <= 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def rouge_n_f(ref_tokens: Sequence[str], hyp_tokens: Sequence[str], n: int) -> float:
    """ROUGE-N F-measure: clipped n-gram overlap, F = 2PR/(P+R) (0 when either side is empty)."""
    ref = Counter(zip(*[ref_tokens[k:] for k in range(n)]))
    hyp = Counter(zip(*[hyp_tokens[k:] for k in range(n)]))
    overlap = sum((ref & hyp).values())
    return _f1(overlap, sum(hyp.values()), sum(ref.values()))


def rouge_f(reference: str, hypothesis: str,
            tokenize: Callable[[str], List[str]] = rouge_tokens) -> float:
    """Video-R1 free-form: mean of ROUGE-1, ROUGE-2 and ROUGE-L F-measures of Porter-stemmed
    words, in time linear in the hypothesis (bit-parallel LCS). Same formulas, in the same
    order, as ``rouge_score`` 0.1.2: with ``tokenize=library_rouge_tokens`` (Video-R1's mode)
    the value is ``RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)``'s, bit for bit
    (tested), without its O(words × words) Python table.

    Differs from Video-R1 (default ``tokenize=rouge_tokens``): letters and digits of every
    script are words (``rouge_score`` keeps only ``[a-z0-9]``, so a Chinese answer scores 0
    there); on ASCII text the two agree.
    """
    ref, hyp = tokenize(reference), tokenize(hypothesis)
    if not ref or not hyp:
        return 0.0
    rouge_l = _f1(lcs_length(ref, hyp), len(hyp), len(ref))
    return (rouge_n_f(ref, hyp, 1) + rouge_n_f(ref, hyp, 2) + rouge_l) / 3.0


def choice_subset_score(pred: Optional[frozenset], truth: frozenset) -> float:
    """TW-GRPO soft multi-choice (arXiv 2505.24718): |P|/|S| if ∅ ≠ P ⊆ S else 0."""
    if not pred or not truth or not pred <= truth:
        return 0.0
    return len(pred) / len(truth)


def choice_exact_score(pred: Optional[frozenset], truth: frozenset) -> float:
    """Strict multi-choice: 1 iff P = S (a single-answer question: the one right letter)."""
    return 1.0 if pred and pred == truth else 0.0


def number_exact_score(pred: Optional[float], truth: float, decimals: int = 2) -> float:
    """Video-R1 numerical: 1 iff round(pred, 2) == round(truth, 2).

    Differs from Video-R1 (whose rule ``mode="video_r1"`` keeps): it scores 0 when only one of
    the two strings contains ``.`` or ``,`` (``"3.0"`` vs ``"3"``, ``"1,234"`` vs ``"1234"``),
    and its answer must be one number as a whole (``"42 meters"``, ``"$42"`` score 0; here the
    only number of a short answer is read by :func:`parse_number`); here the values decide."""
    if pred is None:
        return 0.0
    return 1.0 if round(pred, decimals) == round(truth, decimals) else 0.0


def relative_error_score(pred: Optional[float], truth: float) -> float:
    """Video-R1 regression: 1 − min(1, |pred − truth| / |truth|); truth 0 -> 1 iff pred == 0.

    Differs from Video-R1 (whose rule ``mode="video_r1"`` keeps): it adds 1e-9 to both sides of
    the ratio, so an exact answer scores 1 − 1e-9/(|truth| + 1e-9) (just below 1) and at truth 0
    every answer, 0 included, scores 0; an answer ``"nan"`` scores 1 there."""
    if pred is None:
        return 0.0
    if truth == 0.0:
        return 1.0 if pred == 0.0 else 0.0
    diff = abs(pred - truth)
    if not math.isfinite(diff):
        return 0.0
    return 1.0 - min(1.0, diff / abs(truth))


def interval_iou(pred: Optional[Tuple[float, float]], truth: Tuple[float, float]) -> float:
    """Temporal IoU of ``[start, end]`` intervals; a missing or reversed prediction is 0; two
    identical points are 1."""
    if pred is None or pred[0] > pred[1]:
        return 0.0
    inter = max(0.0, min(pred[1], truth[1]) - max(pred[0], truth[0]))
    union = max(pred[1], truth[1]) - min(pred[0], truth[0])
    if not math.isfinite(union) or union <= 0.0:
        return 1.0 if tuple(pred) == tuple(truth) else 0.0
    return inter / union
