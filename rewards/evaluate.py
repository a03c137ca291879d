"""Reward-model evaluation on human preference data, with the published protocols.

Data formats (:mod:`mmrl.rewards.eval_data`; paths relative to the data file or ``image_root``):
``pairs`` and ``ranked`` (mmrl's JSONL), ``hpdv3`` (HPDv3's published test JSON, pair or ranking
items, detected) and ``videogen`` (VideoGen-RewardBench's CSV of video pairs with VQ / MQ / TA /
Overall labels).

Protocols (ALGORITHMS.md "Reward-model evaluation"):

- Pairs (Pick-a-Pic, arXiv 2305.01569 §5): ``p = softmax(s_a, s_b)``; predict a tie when
  ``|p_a − p_b| ≤ τ``; credit 1 for an exact match, 0.5 when exactly one of (prediction, label) is
  a tie, else 0. ``τ`` maximizes the mean credit on the ``validation`` records and is then applied
  to the ``test`` records (with no validation records, ``τ = 0``: only exactly equal scores tie).
- Ranked (ImageRewardDB test, arXiv 2304.05977; HPDv2 test, arXiv 2306.09341): pair accuracy over
  the pairs with different human ranks, a model tie counting as wrong, in one of two
  :data:`RANKED_PROTOCOLS`: ``pairwise_pooled`` (correct / pairs summed over all lists; the
  ImageReward paper's) or ``per_list_mean`` (each list's accuracy, then the mean over lists; the
  hpsv2 package's ``evaluation.py``, behind the HPS v2 paper's ImageRewardDB column). Both are
  always in the report; ``accuracy`` is the chosen one. And HPDv2's inversion score, the mean over
  lists of ``1 − inversions / (n(n−1)/2)``.
- HPDv3 (hpsv3 1.0.0 ``evaluate/evaluate.py``, HPSv3 paper arXiv 2508.03789): *pair* items are
  correct iff ``s(path1) > s(path2)``; equal scores are counted apart (``n_equal``) and are not
  correct; accuracy = correct / items. *Ranking* items: every pair with different ``ranking``
  values (smaller = better) is correct iff the better one scores strictly higher (equal ranks
  skipped, model ties wrong), pooled over all pairs of all items (:func:`pairwise_report`).
- VideoGen-RewardBench (VideoAlign ``eval_videogen_rewardbench.py`` / ``calc_accuracy.py``,
  arXiv 2501.13918): per label dimension, ``m = s_A − s_B`` and the human ``h`` = 1 (A), −1 (B),
  0 (same). Without ties: ``C / (C + D)`` over ``h ≠ 0``, a model tie (``m = 0``) counting as
  D. With ties: the tie-calibrated accuracy of arXiv 2305.14324,
  ``max over ε ∈ {|m|} of (C + T_hm) / N`` where a pair with ``|m| ≤ ε`` is a model tie and
  ``T_hm`` counts the pairs both tie (:func:`tie_calibrated_accuracy`; the same threshold scan
  as the Pick-a-Pic τ, :func:`threshold_scan`, with credit 1 only for an exact match).
- Pairwise judges (objects with ``compare(a, b, prompts) -> P(a preferred)``, no per-item
  score): every human-ordered pair is judged in both orders; a judgement is correct when it
  gives the human's choice P > 0.5 (P = 0.5 is a model tie, wrong); accuracy is the mean over
  both orders, ``accuracy_by_order`` shows position bias. On videogen data the oriented margin
  ``P − 0.5`` takes the place of ``m`` (both orders, both metrics).
- Optional preference probabilities (``probs=True``): ``p = softmax(scores)`` over the candidates
  of one prompt (:func:`mmrl.rewards.candidate_probs`; PickScore's paper reads its logits this way,
  arXiv 2305.01569 §3), reported as the mean probability of the human's choice.
- 95 % percentile bootstrap intervals resample records (pairs, lists or items) with a fixed seed.

Differs from hpsv3 evaluate.py: it passes ``dtype=`` to ``HPSv3RewardInferencer``, which takes
no such parameter (a TypeError before anything is scored); in ranking mode it passes the item's
one prompt string with its list of images, so ``zip`` pairs each image with one *character* of
the prompt (mmrl scores every image with the whole prompt); its ranking accuracy reads only the
first worker's results against the whole list (wrong with more than one process; mmrl pools
every item); it opens paths as written, relative to the working directory (mmrl: relative to
the JSON's folder or ``image_root``). A (prompt, image) that recurs is scored once here.

Differs from VideoAlign calc_accuracy.py: the tie threshold moves by whole values of ``|m|``
(every pair with ``|m| ≤ ε`` ties); its loop moves one pair at a time and also scores the
part-way states where pairs with equal ``|m|`` are split, which no ε gives (the two agree when
the ``|m|`` are distinct). An empty label cell is left out of its dimension
(``n_unlabelled``); VideoAlign's pandas map makes it NaN, counted as wrong in both metrics, so
its numbers are ours × N / (N + n_unlabelled) at the same ε. Videos are keyed by (prompt, path)
(VideoAlign: by path, keeping the first row's prompt; the same when a video has one prompt).
"""
from __future__ import annotations

import os
import sys
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mmrl.rewards.eval_data import (DIMENSIONS, FORMATS, LABELS, PreferenceData, load_image,
                                    load_video, read_data, read_records, resolve)

__all__ = ["DIMENSIONS", "FORMATS", "LABELS", "RANKED_PROTOCOLS", "PreferenceData", "bar_chart",
           "bootstrap_ci", "check_options", "check_protocol", "evaluate", "is_judge",
           "judge_margins", "oriented_pairs", "pair_credits", "pairs_report", "pairwise_report",
           "ranked_list_stats", "ranked_report", "read_data", "read_records", "score_media",
           "threshold_scan", "tie_calibrated_accuracy", "tune_tie_threshold", "videogen_report"]

#: How ranked lists' pair accuracies become one number (``protocol=`` / ``--protocol``).
RANKED_PROTOCOLS = {
    "pairwise_pooled": "sum of correct pairs / sum of human-ordered pairs over all lists "
                       "(ImageReward paper)",
    "per_list_mean": "mean over lists of each list's correct / human-ordered pairs; lists with "
                     "no human-ordered pair are left out (hpsv2 evaluation.py, HPS v2 paper)",
}


# ----------------------------------------------------------------------------- pairs

def pair_credits(s_a: np.ndarray, s_b: np.ndarray, labels: Sequence[str],
                 tau: float) -> np.ndarray:
    """Pick-a-Pic credit per pair: 1 exact, 0.5 if exactly one side is a tie, else 0.

    Args:
        s_a, s_b: ``[N]`` model scores of image a and b.
        labels: N human labels in ``("a", "b", "tie")``.
        tau: tie threshold on ``|p_a − p_b|`` with ``p = softmax(s_a, s_b)``.
    Returns:
        ``[N]`` float64 credits.
    """
    diff = _prob_gap(s_a, s_b)
    pred = np.where(diff <= tau, 2, np.where(s_a > s_b, 0, 1))  # 0 = a, 1 = b, 2 = tie
    lab = np.array([LABELS.index(x) for x in labels])
    return np.where(pred == lab, 1.0, np.where((pred == 2) | (lab == 2), 0.5, 0.0))


def _prob_gap(s_a, s_b) -> np.ndarray:
    # |p_a − p_b| for p = softmax(s_a, s_b) is |tanh((s_a − s_b) / 2)| (float64: no overflow).
    return np.abs(np.tanh((np.asarray(s_a, np.float64) - np.asarray(s_b, np.float64)) / 2.0))


def threshold_scan(gap: np.ndarray, c_tie: np.ndarray, c_dir: np.ndarray,
                   candidates: np.ndarray) -> Tuple[float, float]:
    """``(t*, total)``: the candidate ``t`` maximizing
    ``Σ_i [gap_i ≤ t]·c_tie_i + [gap_i > t]·c_dir_i`` (the smallest among equals) and that total.

    One sorted scan, O(N log N): the tie-threshold search shared by the Pick-a-Pic τ
    (:func:`tune_tie_threshold`) and the tie-calibrated accuracy (:func:`tie_calibrated_accuracy`).

    Args:
        gap: ``[N]`` non-negative gaps; a pair is predicted a tie when its gap is ``≤ t``.
        c_tie, c_dir: ``[N]`` credit of each pair when predicted a tie / a preference.
        candidates: ``[K]`` thresholds, ascending.
    """
    gap = np.asarray(gap, np.float64)
    order = np.argsort(gap, kind="stable")
    cum_tie = np.concatenate([[0.0], np.cumsum(np.asarray(c_tie, np.float64)[order])])
    cum_dir = np.concatenate([[0.0], np.cumsum(np.asarray(c_dir, np.float64)[order])])
    k = np.searchsorted(gap[order], candidates, side="right")  # [K] pairs tied at each t
    total = cum_tie[k] + (cum_dir[-1] - cum_dir[k])
    best = int(np.argmax(total))
    return float(candidates[best]), float(total[best])


def tune_tie_threshold(s_a: np.ndarray, s_b: np.ndarray, labels: Sequence[str]) -> float:
    """The τ in ``{0} ∪ {|p_a − p_b|}`` with the highest mean credit (the smallest on ties)."""
    diff = _prob_gap(s_a, s_b)
    lab = np.array([LABELS.index(x) for x in labels])
    direction = np.where(np.asarray(s_a) > np.asarray(s_b), 0, 1)
    c_tie = np.where(lab == 2, 1.0, 0.5)  # credit when predicting tie
    c_dir = np.where(direction == lab, 1.0, np.where(lab == 2, 0.5, 0.0))
    return threshold_scan(diff, c_tie, c_dir, np.unique(np.concatenate([[0.0], diff])))[0]


def tie_calibrated_accuracy(h: np.ndarray, m: np.ndarray) -> Tuple[float, float]:
    """``(acc*, ε*)``: accuracy with ties, ``max_{ε ∈ {|m_i|}} (C + T_hm) / N`` (arXiv 2305.14324
    Alg. 1, "tie calibration"; VideoAlign ``calc_accuracy_with_ties``), the smallest best ε.

    A pair with ``|m| ≤ ε`` is a model tie; credit 1 when the model and the human agree exactly
    (same side, C, or both tie, T_hm), else 0 (D, T_h, T_m). ε is calibrated on the evaluated
    pairs themselves, as the paper does.

    Args:
        h: ``[N]`` human labels, 1 (first preferred), -1 (second), 0 (tie).
        m: ``[N]`` model margins (``s_first − s_second``).
    Raises:
        ValueError: no pairs.
    """
    h, m = np.asarray(h, np.float64), np.asarray(m, np.float64)
    if h.size == 0:
        raise ValueError("tie-calibrated accuracy of no pairs; nothing to evaluate")
    c_tie = (h == 0).astype(np.float64)
    c_dir = ((np.sign(m) == h) & (h != 0)).astype(np.float64)
    gap = np.abs(m)
    eps, total = threshold_scan(gap, c_tie, c_dir, np.unique(gap))
    return total / h.size, eps


# ----------------------------------------------------------------------------- ranked

def ranked_list_stats(scores: Sequence[float], ranks: Sequence[float]) -> Tuple[int, int, float]:
    """``(correct, pairs, inversion_score)`` for one ranked list.

    ``pairs`` counts pairs with different human ranks; a pair is correct when the model's scores
    order it strictly the same way (a model tie is wrong). ``inversion_score`` is
    ``1 − (pairs − correct) / (n(n−1)/2)`` (HPDv2; human-tied pairs are never inversions).
    """
    s, r = np.asarray(scores, np.float64), np.asarray(ranks, np.float64)
    n = len(s)
    i, j = np.triu_indices(n, k=1)
    human = np.sign(r[j] - r[i])  # +1: i is better (lower rank)
    model = np.sign(s[i] - s[j])  # +1: model prefers i
    counted = human != 0
    correct = int(((human == model) & counted).sum())
    pairs = int(counted.sum())
    return correct, pairs, 1.0 - (pairs - correct) / (n * (n - 1) / 2)


# ----------------------------------------------------------------------------- bootstrap

def bootstrap_ci(num: np.ndarray, den: Optional[np.ndarray] = None, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> Tuple[float, float]:
    """Percentile bootstrap interval of ``Σ num / Σ den`` over resampled units (den = 1 each)."""
    num = np.asarray(num, np.float64)
    den = np.ones_like(num) if den is None else np.asarray(den, np.float64)
    n = len(num)
    if n == 0 or n_boot <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, n_boot, 256):  # chunks bound memory at 256·n indices
        idx = rng.integers(0, n, size=(min(256, n_boot - start), n))
        d = den[idx].sum(1)
        stats.append(np.where(d > 0, num[idx].sum(1) / np.maximum(d, 1e-300), np.nan))
    stats = np.concatenate(stats)
    lo, hi = np.nanpercentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- metrics

def pairs_report(records: Sequence[Mapping], scores: Mapping[Tuple[str, str], float],
                 tie_threshold: Optional[float] = None, n_boot: int = 1000,
                 seed: int = 0, probs: bool = False) -> Dict[str, Any]:
    """Pick-a-Pic protocol on ``records`` given ``scores[(prompt, image)]``.

    ``tie_threshold`` fixes τ; None tunes it on the validation records (0 when there are none).
    ``probs`` adds ``mean_prob_preferred``: the mean over test pairs with a human choice of
    ``p = softmax(s_a, s_b)`` of the chosen image (PickScore's probability when the scores are
    its logits, ``normalize="none"``).
    """
    val = [r for r in records if r.get("split", "test") == "validation"]
    test = [r for r in records if r.get("split", "test") == "test"]
    if not test:
        raise ValueError("no test records (split 'test' or no split); nothing to report")

    def arrays(recs):
        s_a = np.array([scores[(r["prompt"], r["image_a"])] for r in recs])
        s_b = np.array([scores[(r["prompt"], r["image_b"])] for r in recs])
        return s_a, s_b, [r["label"] for r in recs]

    if tie_threshold is None:
        tau = tune_tie_threshold(*arrays(val)) if val else 0.0
        how = "tuned on validation" if val else "0 (no validation split)"
    else:
        tau, how = float(tie_threshold), "given"
    s_a, s_b, labels = arrays(test)
    credits = pair_credits(s_a, s_b, labels, tau)
    per_prompt: Dict[str, List[float]] = OrderedDict()
    for r, c in zip(test, credits):
        per_prompt.setdefault(r["prompt"], []).append(float(c))
    rep = {
        "metric": "pair_accuracy", "protocol": "pairwise_pooled",
        "accuracy": float(credits.mean()),
        "ci95": list(bootstrap_ci(credits, n_boot=n_boot, seed=seed)),
        "n_pairs": len(test), "n_validation": len(val),
        "n_ties": int(sum(r["label"] == "tie" for r in test)),
        "tie_threshold": tau, "tie_threshold_source": how,
        "per_prompt": {p: {"n": len(v), "accuracy": float(np.mean(v))}
                       for p, v in per_prompt.items()},
    }
    if probs:
        import torch
        from mmrl.rewards.scorers import candidate_probs
        n = len(test)
        s = torch.tensor(np.stack([s_a, s_b], 1), dtype=torch.float64).reshape(-1)  # [n, 2] -> [2n]
        p = candidate_probs(s, torch.arange(n).repeat_interleave(2)).view(n, 2).numpy()
        chosen = [(i, LABELS.index(lab)) for i, lab in enumerate(labels) if lab != "tie"]
        rep["mean_prob_preferred"] = (float(np.mean([p[i, k] for i, k in chosen])) if chosen
                                      else None)
    return rep


def check_protocol(protocol: str, fmt: str) -> str:
    """``protocol`` if it applies to ``fmt``; a ValueError naming the choices otherwise."""
    if protocol not in RANKED_PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}; expected one of {list(RANKED_PROTOCOLS)}")
    if fmt != "ranked" and protocol != "pairwise_pooled":
        how = {"pairs": "pairs data is scored pair by pair (Pick-a-Pic)",
               "hpdv3": "hpdv3 pools the pairs of all items (hpsv3's evaluate.py)",
               "videogen": "videogen data is scored pair by pair"}.get(fmt, f"format {fmt!r}")
        raise ValueError(f"protocol {protocol!r} averages ranked lists; {how}: drop the "
                         f"protocol or use --format ranked")
    return protocol


def check_options(fmt: str, protocol: str = "pairwise_pooled",
                  tie_threshold: Optional[float] = None, probs: bool = False) -> None:
    """Refuse options that ``fmt`` would ignore (ValueError naming the formats that take them)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}; expected one of {FORMATS}")
    check_protocol(protocol, fmt)
    if tie_threshold is not None and fmt != "pairs":
        why = ("calibrates its own (accuracy with ties)" if fmt == "videogen"
               else "predicts no ties")
        raise ValueError(f"a fixed tie threshold applies to --format pairs (Pick-a-Pic); "
                         f"{fmt} {why}: drop it")
    if probs and fmt not in ("pairs", "ranked"):
        raise ValueError(f"--probs (mean softmax probability of the human's choice) is "
                         f"reported for --format pairs and ranked, not {fmt}: drop it")


def ranked_report(records: Sequence[Mapping], scores: Mapping[Tuple[str, str], float],
                  n_boot: int = 1000, seed: int = 0, protocol: str = "pairwise_pooled",
                  probs: bool = False) -> Dict[str, Any]:
    """Pair accuracy (``protocol``, see :data:`RANKED_PROTOCOLS`) and HPDv2 inversion score.

    Args:
        records: ranked records (``prompt``, ``images``, ``ranks``; rank 1 = best).
        scores: ``{(prompt, image): score}``.
        protocol: ``"pairwise_pooled"`` or ``"per_list_mean"``; ``accuracy`` and ``ci95`` follow
            it, ``accuracy_by_protocol`` holds both.
        probs: also report ``mean_prob_best``, the mean over lists of the softmax probability
            (over the list's candidates) of the human's rank-1 image(s).
    Raises:
        ValueError: unknown protocol, or every list fully tied by the humans.
    """
    check_protocol(protocol, "ranked")
    correct, pairs, inv, per_prompt = [], [], [], OrderedDict()
    for r in records:
        c, p, v = ranked_list_stats([scores[(r["prompt"], im)] for im in r["images"]], r["ranks"])
        correct.append(c), pairs.append(p), inv.append(v)
        e = per_prompt.setdefault(r["prompt"], {"correct": 0, "pairs": 0, "inv": []})
        e["correct"] += c
        e["pairs"] += p
        e["inv"].append(v)
    correct, pairs, inv = map(np.asarray, (correct, pairs, inv))
    if pairs.sum() == 0:
        raise ValueError("every ranked list is fully tied; no pair has a human preference")
    ordered = pairs > 0
    list_acc = correct[ordered] / pairs[ordered]  # [lists with a human-ordered pair]
    by_protocol = {"pairwise_pooled": float(correct.sum() / pairs.sum()),
                   "per_list_mean": float(list_acc.mean())}
    ci = (bootstrap_ci(correct, pairs, n_boot=n_boot, seed=seed) if protocol == "pairwise_pooled"
          else bootstrap_ci(list_acc, n_boot=n_boot, seed=seed))
    rep = {
        "metric": "pair_accuracy", "protocol": protocol, "accuracy": by_protocol[protocol],
        "ci95": list(ci), "accuracy_by_protocol": by_protocol,
        "inversion_score": float(inv.mean()),
        "inversion_score_ci95": list(bootstrap_ci(inv, n_boot=n_boot, seed=seed)),
        "n_lists": len(records), "n_lists_fully_tied": int((~ordered).sum()),
        "n_pairs": int(pairs.sum()),
        "per_prompt": {p: {"n_pairs": e["pairs"],
                           "accuracy": e["correct"] / e["pairs"] if e["pairs"] else None,
                           "inversion_score": float(np.mean(e["inv"]))}
                       for p, e in per_prompt.items()},
    }
    if probs:
        rep["mean_prob_best"] = _mean_prob_best(records, scores)
    return rep


def _mean_prob_best(records, scores) -> float:
    """Mean over lists of ``Σ softmax(list scores)`` over the images with the best human rank."""
    import torch
    from mmrl.rewards.scorers import candidate_probs
    s, ids, best = [], [], []
    for k, r in enumerate(records):
        top = min(r["ranks"])
        for im, rank in zip(r["images"], r["ranks"]):
            s.append(scores[(r["prompt"], im)]), ids.append(k), best.append(rank == top)
    p = candidate_probs(torch.tensor(s, dtype=torch.float64), torch.tensor(ids))  # [images]
    mass = torch.zeros(len(records), dtype=torch.float64).index_add_(
        0, torch.tensor(ids), p * torch.tensor(best, dtype=torch.float64))  # [lists]
    return float(mass.mean())


# ----------------------------------------------------------------------------- oriented pairs

Key = Tuple[str, str]  # (prompt, path): what a score depends on


def oriented_pairs(data: PreferenceData, test_only: bool = True):
    """Every compared pair once, with the human's side: ``(first, second, h, units, n_skipped)``.

    Returns:
        first, second: ``[P]`` keys ``(prompt, path)``.
        h: ``{dimension: [P] float}`` human labels, 1 (first preferred), -1 (second), 0 (tie),
            NaN (unlabelled); one dimension ``""`` except for videogen.
        units: ``[P]`` int, the record each pair comes from (the bootstrap's unit).
        n_skipped: pairs left out because the humans tied them (``ranked``: equal ranks;
            ``pairs``: label ``tie``); videogen keeps them (its accuracy with ties needs them).
    """
    first, second, units, hs = [], [], [], []
    skipped = 0
    for u, r in enumerate(data.records):
        if data.kind == "ranked":
            ranks = r["ranks"]
            for i in range(len(ranks)):
                for j in range(i + 1, len(ranks)):
                    if ranks[i] == ranks[j]:
                        skipped += 1
                        continue
                    first.append((r["prompt"], r["images"][i]))
                    second.append((r["prompt"], r["images"][j]))
                    hs.append(1.0 if ranks[i] < ranks[j] else -1.0)  # smaller rank = better
                    units.append(u)
            continue
        if data.kind == "pairs":
            if test_only and r.get("split", "test") != "test":
                continue
            if r["label"] == "tie":
                skipped += 1
                continue
        first.append((r["prompt"], r["image_a"]))
        second.append((r["prompt"], r["image_b"]))
        units.append(u)
        if data.kind == "videogen":
            hs.append([np.nan if r["labels"].get(d) is None else float(r["labels"][d])
                       for d in data.dims])
        else:
            hs.append(1.0 if r["label"] == "a" else -1.0)
    if data.kind == "videogen":
        arr = np.asarray(hs, np.float64).reshape(len(first), len(data.dims))
        h = {d: arr[:, k] for k, d in enumerate(data.dims)}
    else:
        h = {"": np.asarray(hs, np.float64)}
    return first, second, h, np.asarray(units, np.int64), skipped


def pairwise_report(h: np.ndarray, m: np.ndarray, units: np.ndarray, n_boot: int = 1000,
                    seed: int = 0, order: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Pair accuracy over the pairs with a human preference, a model tie counting as wrong.

    ``correct_i = [h_i · m_i > 0]`` over ``h_i ∈ {1, -1}`` (ties and NaN left out); accuracy =
    Σ correct / pairs (hpsv3 evaluate.py pair mode and ``calc_rank_acc``; VideoAlign
    ``calc_accuracy_without_ties``).

    Args:
        h: ``[P]`` human side (1, -1; 0 or NaN are left out).
        m: ``[P]`` model margin ``s_first − s_second`` (a judge: ``P(first) − 0.5``).
        units: ``[P]`` record index per pair; the bootstrap resamples records.
        order: ``[P]`` judges: 0 when asked in the data's order, 1 when swapped; adds
            ``accuracy_by_order``.
    Returns:
        ``accuracy``, ``ci95``, ``n_pairs``, ``n_correct``, ``n_equal`` (model ties),
        ``n_incorrect`` (wrong side).
    Raises:
        ValueError: no pair with a human preference.
    """
    h, m = np.asarray(h, np.float64), np.asarray(m, np.float64)
    keep = (h == 1) | (h == -1)
    if not keep.any():
        raise ValueError("no pair has a human preference (all tied or unlabelled); nothing to "
                         "score")
    h, m, units = h[keep], m[keep], np.asarray(units)[keep]
    correct = h * m > 0
    equal = m == 0
    num = np.bincount(units, weights=correct.astype(np.float64))  # [records]
    den = np.bincount(units).astype(np.float64)
    has = den > 0
    rep = {"accuracy": float(correct.mean()),
           "ci95": list(bootstrap_ci(num[has], den[has], n_boot=n_boot, seed=seed)),
           "n_pairs": int(keep.sum()), "n_correct": int(correct.sum()),
           "n_equal": int(equal.sum()), "n_incorrect": int((~correct & ~equal).sum())}
    if order is not None:
        order = np.asarray(order)[keep]
        rep["accuracy_by_order"] = {
            name: float(correct[order == k].mean()) if (order == k).any() else None
            for k, name in ((0, "as_given"), (1, "swapped"))}
    return rep


def videogen_report(h: Mapping[str, np.ndarray], m: Mapping[str, np.ndarray],
                    units: np.ndarray, columns: Mapping[str, Optional[str]], n_boot: int = 1000,
                    seed: int = 0, order: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """VideoGen-RewardBench accuracies per label dimension.

    Args:
        h: ``{dimension: [P]}`` human labels (1 A, -1 B, 0 same, NaN unlabelled).
        m: ``{dimension: [P]}`` model margins ``s_A − s_B`` for that dimension.
        units: ``[P]`` pair index (the bootstrap's unit).
        columns: ``{dimension: the scorer column compared}`` (None: the single score).
        order: ``[P]`` judges: 0 / 1 for the order asked (see :func:`pairwise_report`).
    Returns:
        ``{"metric", "protocol", "accuracy" (Overall, else the first dimension, without ties),
        "ci95", "dimensions": {dimension: {"column", "accuracy_without_ties",
        "ci95_without_ties", "accuracy_with_ties", "tie_threshold", "n_pairs" (labelled),
        "n_human_ties", "n_without_ties", "n_correct", "n_equal", "n_incorrect",
        "n_unlabelled"}}}``.
    """
    dims = OrderedDict()
    for d, hd in h.items():
        labelled = ~np.isnan(hd)
        if not labelled.any():
            continue  # an empty label column
        if (hd[labelled] != 0).any():
            wo = pairwise_report(hd, m[d], units, n_boot, seed, order)
        else:  # every labelled pair a human tie: no accuracy without ties
            wo = dict.fromkeys(("accuracy", "ci95", "n_correct", "n_equal", "n_incorrect"))
            wo["n_pairs"] = 0
        acc, eps = tie_calibrated_accuracy(hd[labelled], np.asarray(m[d])[labelled])
        dims[d] = {"column": columns[d], "accuracy_without_ties": wo["accuracy"],
                   "ci95_without_ties": wo["ci95"], "accuracy_with_ties": acc,
                   "tie_threshold": eps, "n_pairs": int(labelled.sum()),
                   "n_human_ties": int((hd == 0).sum()), "n_without_ties": wo["n_pairs"],
                   "n_correct": wo["n_correct"], "n_equal": wo["n_equal"],
                   "n_incorrect": wo["n_incorrect"], "n_unlabelled": int((~labelled).sum())}
        if "accuracy_by_order" in wo:
            dims[d]["accuracy_by_order"] = wo["accuracy_by_order"]
    if not dims:
        raise ValueError(f"no labelled pair in {list(h)}; nothing to score")
    main = "Overall" if "Overall" in dims else next(iter(dims))
    return {"metric": "videogen_accuracy", "protocol": "videogen", "primary": main,
            "accuracy": dims[main]["accuracy_without_ties"],
            "ci95": dims[main]["ci95_without_ties"], "dimensions": dims}


def _videogen_columns(name: str, columns: Sequence[Optional[str]],
                      dims: Sequence[str]) -> Dict[str, Optional[str]]:
    """Each label dimension's scorer column: the same name (any case), or the single score."""
    if list(columns) == [None]:
        return {d: None for d in dims}
    lower = {str(c).lower(): c for c in columns}
    out = {d: lower.get(d.lower()) for d in dims}
    if all(c is None for c in out.values()):
        raise ValueError(f"{name} returns columns {list(columns)} but the data's labels are "
                         f"{list(dims)}; name the columns after the dimensions (VQ, MQ, TA, "
                         f"Overall) or score with a single-score scorer")
    return {d: c for d, c in out.items() if c is not None}


# ----------------------------------------------------------------------------- judges

def is_judge(obj) -> bool:
    """Whether ``obj`` is a pairwise judge: ``compare(a, b, prompts) -> P(a preferred)``."""
    return callable(getattr(obj, "compare", None))


def judge_margins(judge, first: Sequence[Key], second: Sequence[Key], root: str,
                  media: str = "image", chunk: int = 16, both_orders: bool = True,
                  progress: bool = True, label: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """``(m, order)``: oriented margins of a pairwise judge, ``[2P]`` (both orders) or ``[P]``.

    For pair i, ``m_i = P(first ≻ second) − 0.5`` (order 0) and, with ``both_orders``,
    ``m_{P+i} = 0.5 − P(second ≻ first)`` (order 1). Up to ``chunk`` consecutive pairs go to
    ``judge.compare`` together, once per order: images as PIL lists, videos as
    ``[b, F, 3, H, W]`` tensors, so a group holds pairs whose first videos share one shape and
    whose second videos share one shape.
    """
    import torch
    from tqdm import tqdm
    n = len(first)
    p = np.full((2, n), np.nan)  # [order, pair]
    bar = tqdm(total=n, desc=f"judging {label}".strip(), unit="pair", file=sys.stderr,
               disable=not progress)

    def ask(x, y, prompts, k):
        out = np.asarray(judge.compare(x, y, prompts).detach().float().cpu(),
                         np.float64).reshape(-1)
        if out.shape != (k,):
            raise ValueError(f"{label or 'judge'}.compare returned {out.shape[0]} values for "
                             f"{k} pairs; expected one P(first preferred) per pair")
        return out

    def flush(idx, a, b):
        pack = (lambda v: torch.stack(v)) if media == "video" else list
        prompts = [first[i][0] for i in idx]
        p[0, idx] = ask(pack(a), pack(b), prompts, len(idx))
        if both_orders:
            p[1, idx] = ask(pack(b), pack(a), prompts, len(idx))
        bar.update(len(idx))

    idx, a, b, shape = [], [], [], None
    for i in range(n):
        x, y = _load(first[i][1], root, media)[0], _load(second[i][1], root, media)[0]
        key = (tuple(x.shape), tuple(y.shape)) if media == "video" else None
        if idx and (key != shape or len(idx) == chunk):
            flush(idx, a, b)
            idx, a, b = [], [], []
        idx.append(i), a.append(x), b.append(y)
        shape = key
    if idx:
        flush(idx, a, b)
    bar.close()
    if not both_orders:
        return p[0] - 0.5, np.zeros(n, np.int64)
    return np.concatenate([p[0] - 0.5, 0.5 - p[1]]), np.repeat([0, 1], n)


# ----------------------------------------------------------------------------- scoring

def needed_images(records: Iterable[Mapping], fmt: str) -> List[Key]:
    """Unique ``(prompt, path)`` keys in first-seen order (a score depends on both)."""
    keys: Dict[Key, None] = OrderedDict()
    for r in records:
        for im in (r["images"] if fmt == "ranked" else (r["image_a"], r["image_b"])):
            keys[(r["prompt"], im)] = None
    return list(keys)


def _load(rel: str, root: str, media: str):
    path = resolve(rel, root)
    return load_video(path) if media == "video" else (load_image(path), None)


def score_media(scorer, keys: Sequence[Key], root: str, media: str = "image", chunk: int = 64,
                video_chunk: int = 4, progress: bool = True,
                label: str = "") -> Dict[Optional[str], Dict[Key, float]]:
    """``{column: {(prompt, path): score}}``, each key scored once (column None: a scorer that
    returns one ``Tensor[B]``; else its ``{column: Tensor[B]}`` names).

    Images go ``chunk`` at a time as PIL lists. Videos are decoded whole
    (:func:`mmrl.rewards.eval_data.load_video`) and passed as ``[b, F, 3, H, W]``, ``b`` ≤
    ``video_chunk`` consecutive videos of one shape (:func:`evaluate` uses the scorer's
    ``batch_size``), with ``metadata[i]["fps"]`` from the file (the scorer samples its frames).
    """
    import torch
    from tqdm import tqdm
    cols: Dict[Optional[str], Dict[Key, float]] = OrderedDict()
    bar = tqdm(total=len(keys), desc=f"scoring {label}".strip(), unit=media[:3],
               file=sys.stderr, disable=not progress)

    def run(part, items, meta):
        out = scorer(items, [p for p, _ in part], *([meta] if meta else []))
        for col, t in (out.items() if isinstance(out, Mapping) else [(None, out)]):
            cols.setdefault(col, {}).update(zip(part, t.detach().float().cpu().tolist()))
        bar.update(len(part))

    if media == "image":
        for start in range(0, len(keys), chunk):
            part = keys[start:start + chunk]
            run(part, [_load(rel, root, media)[0] for _, rel in part], None)
    else:
        part, vids, meta = [], [], []
        for key in keys:
            v, fps = _load(key[1], root, media)
            if vids and (v.shape != vids[0].shape or len(vids) == video_chunk):
                run(part, torch.stack(vids), meta)  # [b, F, 3, H, W]
                part, vids, meta = [], [], []
            part.append(key), vids.append(v), meta.append({} if fps is None else {"fps": fps})
        if vids:
            run(part, torch.stack(vids), meta)
    bar.close()
    return cols


def score_keys(scorer, keys: Sequence[Key], image_root: str, chunk: int = 64,
               progress: bool = True, label: str = "") -> Dict[Key, float]:
    """``{(prompt, image): score}`` of a single-score image scorer (:func:`score_media`)."""
    cols = score_media(scorer, keys, image_root, "image", chunk, progress=progress, label=label)
    if list(cols) != [None]:
        raise ValueError(f"{label or 'scorer'} returns columns {list(cols)}; use score_media")
    return cols[None]


def _check_media(name: str, scorer, data: PreferenceData) -> None:
    media = getattr(scorer, "media", "image")
    if media == data.media:
        return
    if data.media == "video":
        raise ValueError(f"{name} scores images but {data.fmt} data holds videos; lift it to "
                         f"videos with --scorer frames:scorer={name} (Python: load('frames', "
                         f"scorer={name!r}))")
    raise ValueError(f"{name} scores videos (media='video') but {data.fmt} data holds images; "
                     f"use an image scorer")


def _scorer_reports(name: str, scorer, data: PreferenceData, root: str, tie_threshold,
                    n_boot: int, seed: int, progress: bool, protocol: str, probs: bool):
    """``{report name: report}`` for one scorer (``name.column`` per column outside videogen)."""
    if is_judge(scorer):
        if tie_threshold is not None or probs:
            raise ValueError(f"{name} is a pairwise judge (no per-item score): drop "
                             f"--tie-threshold and --probs")
        first, second, h, units, skipped = oriented_pairs(data)
        # A judge that averages both orders itself (vlm_pair's both_orders=True) is order-free:
        # asking it swapped again would return 1 - P at twice the cost.
        both = not getattr(scorer, "both_orders", False)
        m, order = judge_margins(scorer, first, second, root, data.media, both_orders=both,
                                 progress=progress, label=name)
        k = 2 if both else 1
        h2 = {d: np.tile(v, k) for d, v in h.items()}
        u2 = np.tile(units, k)
        order = order if both else None
        if data.kind == "videogen":
            rep = videogen_report(h2, {d: m for d in h2}, u2, {d: None for d in h2}, n_boot,
                                  seed, order)
        else:
            rep = pairwise_report(h2[""], m, u2, n_boot, seed, order)
            rep.update(metric="pair_accuracy", n_pairs_human_tie=skipped,
                       protocol="judge_both_orders" if both else "judge_symmetrized")
        return {name: rep}
    cols = score_media(scorer, needed_images(data.records, data.kind), root, data.media,
                       video_chunk=getattr(scorer, "batch_size", 4), progress=progress,
                       label=name)
    if data.kind == "videogen":
        first, second, h, units, _ = oriented_pairs(data)
        match = _videogen_columns(name, list(cols), data.dims)
        m = {d: np.array([cols[c][a] - cols[c][b] for a, b in zip(first, second)])
             for d, c in match.items()}
        rep = videogen_report({d: h[d] for d in match}, m, units, match, n_boot, seed)
        rep["dimensions_without_column"] = [d for d in data.dims if d not in match]
        return {name: rep}
    out = OrderedDict()
    for col, scores in cols.items():
        key = name if col is None else f"{name}.{col}"
        if data.fmt == "pairs":
            out[key] = pairs_report(data.records, scores, tie_threshold, n_boot, seed, probs)
        elif data.fmt == "ranked":
            out[key] = ranked_report(data.records, scores, n_boot, seed, protocol, probs)
        else:  # hpdv3
            first, second, h, units, skipped = oriented_pairs(data)
            m = np.array([scores[a] - scores[b] for a, b in zip(first, second)])
            rep = pairwise_report(h[""], m, units, n_boot, seed)
            rep.update(metric="pair_accuracy", protocol=f"hpdv3_{data.mode}")
            if data.mode == "ranking":
                rep.update(n_lists=len(data.records), n_pairs_equal_rank=skipped)
            out[key] = rep
    return out


def evaluate(scorers: Mapping[str, Any], data: str, fmt: str, image_root: Optional[str] = None,
             tie_threshold: Optional[float] = None, n_boot: int = 1000, seed: int = 0,
             progress: bool = True, protocol: str = "pairwise_pooled",
             probs: bool = False) -> Dict[str, Any]:
    """Score ``data`` with every scorer (or pairwise judge) and report ``fmt``'s protocol.

    Args:
        scorers: ``{name: scorer}``: image or video scorers (``media``), or pairwise judges
            (``compare(a, b, prompts)``, :func:`is_judge`).
        data, fmt: the file and its format (:data:`FORMATS`, module doc of
            :mod:`mmrl.rewards.eval_data`); hpdv3 pair / ranking is detected.
        image_root: the folder paths are relative to (default: the data file's).
        tie_threshold: pairs: a fixed τ instead of tuning it on the validation split.
        protocol: ranked data: ``"pairwise_pooled"`` or ``"per_list_mean"``
            (:data:`RANKED_PROTOCOLS`); other formats take only ``"pairwise_pooled"``.
        probs: pairs / ranked: add the mean softmax probability of the human's choice.
    Returns:
        ``{"data", "format", "mode", "protocol", "n_records", "n_boot", "seed", "scorers":
        {name: report}}``; a scorer with columns gives one report per column (``name.column``)
        except on videogen, where each label dimension reads the column of its name.
    Raises:
        ValueError: an option the format does not take, a bad record, a scorer for the wrong
            media (images vs videos).
    """
    check_options(fmt, protocol, tie_threshold, probs)
    ds = read_data(data, fmt)
    for name, scorer in scorers.items():
        _check_media(name, scorer, ds)
    root = image_root or os.path.dirname(os.path.abspath(data))
    result = {"data": os.path.abspath(data), "format": fmt, "mode": ds.mode,
              "protocol": protocol, "n_records": len(ds.records), "n_boot": n_boot,
              "seed": seed, "scorers": OrderedDict()}
    if ds.kind == "videogen":
        result["dimensions"] = list(ds.dims)
    for name, scorer in scorers.items():
        for key, rep in _scorer_reports(name, scorer, ds, root, tie_threshold, n_boot, seed,
                                        progress, protocol, probs).items():
            rep["scale"] = getattr(scorer, "scale", "")
            result["scorers"][key] = rep
    return result


def bar_chart(report: Mapping[str, Any], path: str) -> str:
    """A PNG bar chart of accuracy (with 95 % CI error bars) per scorer; returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(report["scorers"])
    acc = np.array([report["scorers"][n]["accuracy"] for n in names]) * 100
    ci = np.array([report["scorers"][n]["ci95"] for n in names]) * 100
    err = np.stack([acc - ci[:, 0], ci[:, 1] - acc])
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 3.6))
    ax.bar(names, acc, yerr=err, capsize=4, color="#4C72B0")
    for x, a in enumerate(acc):
        ax.text(x, a + 1, f"{a:.1f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel(f"pair accuracy, {report.get('protocol', 'pairwise_pooled')} (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{os.path.basename(report['data'])} ({report['format']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
