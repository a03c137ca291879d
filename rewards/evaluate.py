"""Reward-model evaluation on human preference data, with the published protocols.

Data (JSONL, one record a line; image paths relative to the data file or ``image_root``):

- ``pairs``: ``{"prompt": str, "image_a": path, "image_b": path, "label": "a" | "b" | "tie",
  "split": "validation" | "test"}`` (``split`` optional, default ``test``).
- ``ranked``: ``{"prompt": str, "images": [paths], "ranks": [ints]}``; rank 1 is the best, equal
  ranks are human ties.

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
- Optional preference probabilities (``probs=True``): ``p = softmax(scores)`` over the candidates
  of one prompt (:func:`mmrl.rewards.candidate_probs`; PickScore's paper reads its logits this way,
  arXiv 2305.01569 §3), reported as the mean probability of the human's choice.
- 95 % percentile bootstrap intervals resample records (pairs or lists) with a fixed seed.
"""
from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

LABELS = ("a", "b", "tie")
FORMATS = ("pairs", "ranked")
#: How ranked lists' pair accuracies become one number (``protocol=`` / ``--protocol``).
RANKED_PROTOCOLS = {
    "pairwise_pooled": "sum of correct pairs / sum of human-ordered pairs over all lists "
                       "(ImageReward paper)",
    "per_list_mean": "mean over lists of each list's correct / human-ordered pairs; lists with "
                     "no human-ordered pair are left out (hpsv2 evaluation.py, HPS v2 paper)",
}


# ----------------------------------------------------------------------------- data

def read_records(path: str, fmt: str) -> List[Dict[str, Any]]:
    """Read and validate a JSONL file in ``fmt`` (``pairs`` or ``ranked``); all errors at once.

    Raises:
        ValueError: unknown format, or records with missing/invalid fields (lists every bad line).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}; expected one of {FORMATS}")
    records, errors = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as err:
                errors.append(f"line {lineno}: not JSON ({err})")
                continue
            problem = _check_pair(rec) if fmt == "pairs" else _check_ranked(rec)
            if problem:
                errors.append(f"line {lineno}: {problem}")
            else:
                records.append(rec)
    if errors:
        more = f" (+{len(errors) - 10} more)" if len(errors) > 10 else ""
        raise ValueError(f"{path}: {len(errors)} bad {fmt} record(s): " + "; ".join(errors[:10])
                         + more + f". Expected {_FORMAT_HELP[fmt]}")
    if not records:
        raise ValueError(f"{path} holds no records; expected {_FORMAT_HELP[fmt]}")
    return records


_FORMAT_HELP = {
    "pairs": '{"prompt": str, "image_a": path, "image_b": path, "label": "a"|"b"|"tie", '
             '"split": "validation"|"test" (optional)} per line',
    "ranked": '{"prompt": str, "images": [paths], "ranks": [ints, 1 = best]} per line',
}


def _check_pair(rec) -> str:
    if not isinstance(rec, dict):
        return "not an object"
    missing = [k for k in ("prompt", "image_a", "image_b", "label") if k not in rec]
    if missing:
        return f"missing {missing}"
    if rec["label"] not in LABELS:
        return f"label {rec['label']!r} not in {LABELS}"
    if rec.get("split", "test") not in ("validation", "test"):
        return f"split {rec['split']!r} not in ('validation', 'test')"
    return ""


def _check_ranked(rec) -> str:
    if not isinstance(rec, dict):
        return "not an object"
    missing = [k for k in ("prompt", "images", "ranks") if k not in rec]
    if missing:
        return f"missing {missing}"
    if len(rec["images"]) != len(rec["ranks"]) or len(rec["images"]) < 2:
        return (f"{len(rec['images'])} images and {len(rec['ranks'])} ranks; expected equal "
                f"lengths >= 2")
    if not all(isinstance(r, (int, float)) for r in rec["ranks"]):
        return "ranks must be numbers"
    return ""


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


def tune_tie_threshold(s_a: np.ndarray, s_b: np.ndarray, labels: Sequence[str]) -> float:
    """The τ in ``{0} ∪ {|p_a − p_b|}`` with the highest mean credit (the smallest on ties)."""
    diff = _prob_gap(s_a, s_b)
    candidates = np.unique(np.concatenate([[0.0], diff]))
    lab = np.array([LABELS.index(x) for x in labels])
    direction = np.where(s_a > s_b, 0, 1)
    c_tie = np.where(lab == 2, 1.0, 0.5)  # credit when predicting tie
    c_dir = np.where(direction == lab, 1.0, np.where(lab == 2, 0.5, 0.0))
    order = np.argsort(diff, kind="stable")
    cum_tie = np.concatenate([[0.0], np.cumsum(c_tie[order])])
    cum_dir = np.concatenate([[0.0], np.cumsum(c_dir[order])])
    k = np.searchsorted(diff[order], candidates, side="right")  # pairs predicted tie at each τ
    total = cum_tie[k] + (cum_dir[-1] - cum_dir[k])
    return float(candidates[int(np.argmax(total))])


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
    if fmt == "pairs" and protocol != "pairwise_pooled":
        raise ValueError(f"protocol {protocol!r} averages ranked lists; pairs data is scored "
                         f"pair by pair (Pick-a-Pic): drop the protocol or use --format ranked")
    return protocol


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


# ----------------------------------------------------------------------------- scoring

def needed_images(records: Iterable[Mapping], fmt: str) -> List[Tuple[str, str]]:
    """Unique ``(prompt, image)`` keys in first-seen order (a score depends on both)."""
    keys: Dict[Tuple[str, str], None] = OrderedDict()
    for r in records:
        for im in ((r["image_a"], r["image_b"]) if fmt == "pairs" else r["images"]):
            keys[(r["prompt"], im)] = None
    return list(keys)


def score_keys(scorer, keys: Sequence[Tuple[str, str]], image_root: str, chunk: int = 64,
               progress: bool = True, label: str = "") -> Dict[Tuple[str, str], float]:
    """``{(prompt, image): score}``, loading ``chunk`` images at a time from ``image_root``."""
    from PIL import Image
    from tqdm import tqdm
    out: Dict[Tuple[str, str], float] = {}
    bar = tqdm(total=len(keys), desc=f"scoring {label}".strip(), unit="img", file=sys.stderr,
               disable=not progress)
    for start in range(0, len(keys), chunk):
        part = keys[start:start + chunk]
        images = []
        for _, rel in part:
            path = rel if os.path.isabs(rel) else os.path.join(image_root, rel)
            if not os.path.exists(path):
                raise FileNotFoundError(f"image {rel!r} not found at {path}; image paths are "
                                        f"relative to the data file's folder or --image-root")
            with Image.open(path) as im:
                im.load()
                images.append(im)
        values = scorer(images, [p for p, _ in part]).detach().cpu().tolist()
        out.update(zip(part, values))
        bar.update(len(part))
    bar.close()
    return out


def evaluate(scorers: Mapping[str, Any], data: str, fmt: str, image_root: Optional[str] = None,
             tie_threshold: Optional[float] = None, n_boot: int = 1000, seed: int = 0,
             progress: bool = True, protocol: str = "pairwise_pooled",
             probs: bool = False) -> Dict[str, Any]:
    """Score ``data`` with every scorer and report the protocol's metrics per scorer.

    Args:
        protocol: ranked data: ``"pairwise_pooled"`` or ``"per_list_mean"``
            (:data:`RANKED_PROTOCOLS`); pairs data takes only ``"pairwise_pooled"``.
        probs: add the mean softmax probability of the human's choice (see the module doc).
    Returns:
        ``{"data", "format", "protocol", "n_records", "n_boot", "seed", "scorers": {name:
        report}}`` where ``report`` is :func:`pairs_report` or :func:`ranked_report` output.
    """
    check_protocol(protocol, fmt)
    records = read_records(data, fmt)
    root = image_root or os.path.dirname(os.path.abspath(data))
    keys = needed_images(records, fmt)
    result = {"data": os.path.abspath(data), "format": fmt, "protocol": protocol,
              "n_records": len(records),
              "n_boot": n_boot, "seed": seed, "scorers": OrderedDict()}
    for name, scorer in scorers.items():
        scores = score_keys(scorer, keys, root, progress=progress, label=name)
        rep = (pairs_report(records, scores, tie_threshold, n_boot, seed, probs) if fmt == "pairs"
               else ranked_report(records, scores, n_boot, seed, protocol, probs))
        rep["scale"] = getattr(scorer, "scale", "")
        result["scorers"][name] = rep
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
