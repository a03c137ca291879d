"""Evaluation protocols on synthetic data with known accuracy (ties included)."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from mmrl.rewards import candidate_probs
from mmrl.rewards.evaluate import (bar_chart, bootstrap_ci, evaluate, pair_credits, pairs_report,
                                   ranked_list_stats, ranked_report, read_records,
                                   tune_tie_threshold)


def test_pair_credits_hand_values():
    # scores a, b; label; with tau = 0.2 on |p_a - p_b| = |tanh((s_a - s_b)/2)|
    s_a = np.array([2.0, 0.0, 0.1, 0.1, 3.0, 0.0])
    s_b = np.array([0.0, 2.0, 0.0, 0.0, 0.0, 3.0])
    labels = ["a", "a", "tie", "a", "tie", "tie"]
    # gaps: tanh(1)=.76 -> a; .76 -> b; tanh(.05)=.05 -> tie; .05 -> tie; tanh(1.5)=.9 -> a; b
    want = [1.0, 0.0, 1.0, 0.5, 0.5, 0.5]
    np.testing.assert_array_equal(pair_credits(s_a, s_b, labels, 0.2), want)
    # tau = 0: exactly equal scores are a predicted tie, nothing else is
    np.testing.assert_array_equal(pair_credits(np.array([1.0, 1.0]), np.array([1.0, 0.0]),
                                               ["tie", "b"], 0.0), [1.0, 0.0])


def _brute_force_tau(s_a, s_b, labels):
    gaps = np.abs(np.tanh((s_a - s_b) / 2))
    best, best_tau = -1, None
    for tau in sorted(set([0.0, *gaps.tolist()])):
        m = pair_credits(s_a, s_b, labels, tau).mean()
        if m > best + 1e-12:
            best, best_tau = m, tau
    return best_tau


def test_tie_threshold_tuning_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(1, 40))
        s_a, s_b = rng.normal(size=n), rng.normal(size=n)
        s_b[: n // 5] = s_a[: n // 5]  # some exact model ties
        labels = rng.choice(["a", "b", "tie"], size=n).tolist()
        assert tune_tie_threshold(s_a, s_b, labels) == pytest.approx(
            _brute_force_tau(s_a, s_b, labels)), trial


def _pairs_dataset(n_val=40, n_test=100, seed=0):
    """Records + scores where the model's gap decides; 20 % true ties with small gaps."""
    rng = np.random.default_rng(seed)
    records, scores = [], {}
    for i in range(n_val + n_test):
        split = "validation" if i < n_val else "test"
        kind = i % 5  # 0: tie (gap 0.05), 1-3: correct 'a' (gap 2), 4: wrong (says b, gap 2)
        prompt = f"p{i % 7}"
        a, b = f"img{i}a.png", f"img{i}b.png"
        label = "tie" if kind == 0 else "a"
        gap = 0.05 if kind == 0 else (2.0 if kind < 4 else -2.0)
        base = rng.normal()
        scores[(prompt, a)], scores[(prompt, b)] = base + gap, base
        records.append({"prompt": prompt, "image_a": a, "image_b": b, "label": label,
                        "split": split})
    return records, scores


def test_pairs_protocol_known_accuracy_with_ties():
    records, scores = _pairs_dataset()
    rep = pairs_report(records, scores, n_boot=200)
    # Tuned tau separates gap 0.05 (tanh .025) from gap 2 (tanh 1 = .76): ties credited 1,
    # 3/5 correct, 1/5 wrong -> accuracy 0.8 exactly.
    assert math.tanh(0.025) <= rep["tie_threshold"] < math.tanh(1.0)
    assert rep["accuracy"] == pytest.approx(0.8)
    assert rep["n_pairs"] == 100 and rep["n_validation"] == 40 and rep["n_ties"] == 20
    lo, hi = rep["ci95"]
    assert lo <= 0.8 <= hi and hi - lo < 0.25
    # Without tie prediction every true tie gets half credit: 0.2*0.5 + 0.6 = 0.7.
    assert pairs_report(records, scores, tie_threshold=-1.0, n_boot=0)["accuracy"] == \
        pytest.approx(0.7)
    per = rep["per_prompt"]
    assert sum(v["n"] for v in per.values()) == 100
    assert sum(v["n"] * v["accuracy"] for v in per.values()) == pytest.approx(80)


def test_no_validation_split_means_tau_zero():
    records, scores = _pairs_dataset()
    test_only = [r for r in records if r["split"] == "test"]
    rep = pairs_report(test_only, scores, n_boot=0)
    assert rep["tie_threshold"] == 0.0 and rep["tie_threshold_source"].startswith("0")
    assert rep["accuracy"] == pytest.approx(0.7)


def _brute_ranked(scores, ranks):
    correct = pairs = inv = 0
    n = len(scores)
    for i, j in itertools.combinations(range(n), 2):
        if ranks[i] == ranks[j]:
            continue
        pairs += 1
        human_i = ranks[i] < ranks[j]
        if scores[i] != scores[j] and (scores[i] > scores[j]) == human_i:
            correct += 1
        else:
            inv += 1
    return correct, pairs, 1 - inv / (n * (n - 1) / 2)


def test_ranked_list_hand_values_and_model_ties():
    # ranks 1 (best)..4; model agrees except it ties images 2 and 3 -> 5 of 6 correct
    assert ranked_list_stats([4.0, 3.0, 3.0, 1.0], [1, 2, 3, 4]) == (5, 6, pytest.approx(5 / 6))
    # human tie between images 0 and 1 is not counted; model reverses 2 vs 3
    c, p, inv = ranked_list_stats([3.0, 2.0, 0.0, 1.0], [1, 1, 2, 3])
    assert (c, p) == (4, 5) and inv == pytest.approx(1 - 1 / 6)
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(2, 9))
        s = rng.integers(0, 4, size=n).astype(float)  # many model ties
        r = rng.integers(1, 5, size=n)
        assert ranked_list_stats(s, r) == pytest.approx(_brute_ranked(s.tolist(), r.tolist()))


def test_ranked_report_pools_pairs_and_averages_inversions():
    records = [{"prompt": "x", "images": ["a", "b", "c"], "ranks": [1, 2, 3]},
               {"prompt": "y", "images": ["d", "e"], "ranks": [2, 1]}]
    scores = {("x", "a"): 3, ("x", "b"): 1, ("x", "c"): 2, ("y", "d"): 5, ("y", "e"): 5}
    rep = ranked_report(records, scores, n_boot=100)
    assert rep["accuracy"] == pytest.approx(2 / 4)  # x: 2 of 3 correct; y: model tie -> wrong
    assert rep["inversion_score"] == pytest.approx(((1 - 1 / 3) + 0.0) / 2)
    assert rep["per_prompt"]["x"]["accuracy"] == pytest.approx(2 / 3)
    assert rep["n_pairs"] == 4 and rep["n_lists"] == 2


def test_ranked_protocols_hand_values():
    # x: ranks 1, 2, 3; the model orders (a, c, b): 2 of 3 pairs right.
    # y: 2 of 2 human-ordered pairs right (d and e tie for the humans: not a pair).
    # z: fully tied by the humans: no pair; left out of per_list_mean, counted.
    records = [{"prompt": "x", "images": ["a", "b", "c"], "ranks": [1, 2, 3]},
               {"prompt": "y", "images": ["d", "e", "f"], "ranks": [1, 1, 2]},
               {"prompt": "z", "images": ["g", "h"], "ranks": [1, 1]}]
    scores = {("x", "a"): 3, ("x", "b"): 1, ("x", "c"): 2, ("y", "d"): 5, ("y", "e"): 4,
              ("y", "f"): 0, ("z", "g"): 1, ("z", "h"): 2}
    pooled = ranked_report(records, scores, n_boot=0)
    mean = ranked_report(records, scores, n_boot=200, protocol="per_list_mean")
    assert pooled["protocol"] == "pairwise_pooled" and mean["protocol"] == "per_list_mean"
    assert pooled["accuracy"] == pytest.approx((2 + 2) / (3 + 2))  # 0.8
    assert mean["accuracy"] == pytest.approx((2 / 3 + 2 / 2) / 2)  # 0.8333
    assert pooled["accuracy_by_protocol"] == mean["accuracy_by_protocol"] == {
        "pairwise_pooled": pytest.approx(0.8), "per_list_mean": pytest.approx(5 / 6)}
    assert mean["n_lists_fully_tied"] == 1 and mean["n_lists"] == 3
    lo, hi = mean["ci95"]  # resamples the two lists' accuracies (2/3 and 1)
    assert 2 / 3 - 1e-12 <= lo <= 5 / 6 <= hi <= 1 + 1e-12


def test_protocol_errors():
    records = [{"prompt": "x", "images": ["a", "b"], "ranks": [1, 2]}]
    with pytest.raises(ValueError, match=r"protocol 'per_prompt'; expected one of "
                                         r"\['pairwise_pooled', 'per_list_mean'\]"):
        ranked_report(records, {("x", "a"): 1, ("x", "b"): 0}, protocol="per_prompt")
    with pytest.raises(ValueError, match="'per_list_mean' averages ranked lists.*--format ranked"):
        evaluate({}, "unused.jsonl", "pairs", protocol="per_list_mean")


def test_candidate_probs_hand_values_and_gradient():
    s = torch.tensor([0.0, math.log(3.0), 7.0, 100.0, 100.0 + math.log(4.0)],
                     requires_grad=True)
    p = candidate_probs(s, ["a", "a", "b", "c", "c"])
    torch.testing.assert_close(p, torch.tensor([0.25, 0.75, 1.0, 0.2, 0.8]))  # no overflow
    torch.testing.assert_close(candidate_probs(s.detach(), torch.tensor([0, 0, 1, 2, 2])),
                               p.detach())
    # d p_1 / d s_j = p_1 (1[j = 1] - p_j) within the group, 0 outside it.
    p[1].backward()
    torch.testing.assert_close(s.grad, torch.tensor([-0.75 * 0.25, 0.75 * 0.25, 0, 0, 0]))
    with pytest.raises(ValueError, match="2 groups for 5 scores"):
        candidate_probs(s.detach(), ["a", "b"])
    assert candidate_probs(torch.zeros(0), []).shape == (0,)  # an empty batch, not an error


def test_reports_probs_hand_values():
    ln = math.log
    pairs = [{"prompt": "p", "image_a": "a1", "image_b": "b1", "label": "a"},
             {"prompt": "q", "image_a": "a2", "image_b": "b2", "label": "b"},
             {"prompt": "r", "image_a": "a3", "image_b": "b3", "label": "tie"}]
    scores = {("p", "a1"): ln(3), ("p", "b1"): 0.0, ("q", "a2"): 0.0, ("q", "b2"): ln(4),
              ("r", "a3"): 5.0, ("r", "b3"): -5.0}
    rep = pairs_report(pairs, scores, n_boot=0, probs=True)
    assert rep["mean_prob_preferred"] == pytest.approx((3 / 4 + 4 / 5) / 2)  # tie left out
    assert "mean_prob_preferred" not in pairs_report(pairs, scores, n_boot=0)
    ranked = [{"prompt": "x", "images": ["a", "b", "c"], "ranks": [2, 1, 1]},
              {"prompt": "y", "images": ["d", "e"], "ranks": [1, 2]}]
    scores = {("x", "a"): 0.0, ("x", "b"): ln(2), ("x", "c"): ln(5), ("y", "d"): 1.0,
              ("y", "e"): 1.0}
    rep = ranked_report(ranked, scores, n_boot=0, probs=True)
    assert rep["mean_prob_best"] == pytest.approx((7 / 8 + 1 / 2) / 2)  # x: b and c tie for 1st


def test_cli_eval_protocol_and_probs(tmp_path, capsys):
    from mmrl.cli.app import main
    from PIL import Image
    # Two lists scored by brightness: x (3 images) all right, y (2 images) wrong.
    recs = [{"prompt": "x", "images": ["x0.png", "x1.png", "x2.png"], "ranks": [1, 2, 3]},
            {"prompt": "y", "images": ["y0.png", "y1.png"], "ranks": [1, 2]}]
    for name, v in (("x0", 200), ("x1", 100), ("x2", 0), ("y0", 0), ("y1", 255)):
        Image.new("RGB", (4, 4), (v, v, v)).save(tmp_path / f"{name}.png")
    data = tmp_path / "ranked.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    base = ["reward", "eval", "--scorer", "brightness", "--data", str(data), "--format",
            "ranked", "--bootstrap", "0", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "r")]) == 0
    assert "accuracy 75.00%" in capsys.readouterr().out  # 3 of 4 pairs
    rep = json.load(open(tmp_path / "r" / "report.json"))
    assert rep["protocol"] == "pairwise_pooled"
    assert rep["scorers"]["brightness"]["accuracy_by_protocol"] == {
        "pairwise_pooled": pytest.approx(0.75), "per_list_mean": pytest.approx(0.5)}
    assert main(base + ["--protocol", "per_list_mean", "--probs"]) == 0
    out = capsys.readouterr().out
    # p(best) over brightness logits: x: e^.784 / (e^.784 + e^.392 + 1), y: 1 / (1 + e)
    xs = np.array([200, 100, 0]) / 255
    p_best = (np.exp(xs[0]) / np.exp(xs).sum() + 1 / (1 + np.exp(1.0))) / 2
    assert "accuracy 50.00%" in out and "(per_list_mean)" in out
    assert f"mean p(best) {p_best:.4f}" in out
    assert main(base[:6] + ["--format", "pairs", "--protocol", "per_list_mean"]) == 2
    assert "averages ranked lists" in capsys.readouterr().err


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    x = (np.arange(200) % 4 != 0).astype(float)  # mean 0.75
    a, b = bootstrap_ci(x, n_boot=500, seed=3), bootstrap_ci(x, n_boot=500, seed=3)
    assert a == b and a[0] < 0.75 < a[1]
    se = math.sqrt(0.75 * 0.25 / 200)
    assert a[1] - a[0] == pytest.approx(2 * 1.96 * se, rel=0.25)
    assert bootstrap_ci(np.ones(5), n_boot=100) == (1.0, 1.0)


def test_read_records_reports_every_bad_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "x", "image_a": "a", "image_b": "b", "label": "a"}) + "\n"
                 + "not json\n"
                 + json.dumps({"prompt": "x", "image_a": "a", "image_b": "b", "label": "A"}) + "\n"
                 + json.dumps({"prompt": "x", "image_a": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"3 bad pairs record\(s\): line 2: not JSON.*line 3: "
                                         r"label 'A'.*line 4: missing \['image_b', 'label'\]"):
        read_records(str(p), "pairs")
    with pytest.raises(ValueError, match="format 'pair'"):
        read_records(str(p), "pair")


class _PixelMean:
    """A scorer whose score is the mean pixel value (so accuracy is known by construction)."""
    name, scale, uses_prompts = "pixel_mean", "mean pixel in [0, 1]", False

    def __init__(self, sign=1.0):
        self.sign = sign

    def __call__(self, images, prompts, metadata=None):
        return self.sign * torch.tensor([np.asarray(im, np.float32).mean() / 255 for im in images])


def test_evaluate_end_to_end_with_images_on_disk(tmp_path):
    from PIL import Image
    recs = []
    for i in range(6):
        for k, v in (("a", 200 - i), ("b", 50 + i)):
            Image.new("RGB", (8, 8), (v, v, v)).save(tmp_path / f"{i}{k}.png")
        label = "a" if i < 4 else "b"  # brighter wins in 4 of 6 pairs
        recs.append({"prompt": f"p{i % 2}", "image_a": f"{i}a.png", "image_b": f"{i}b.png",
                     "label": label})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    rep = evaluate({"bright": _PixelMean(), "dark": _PixelMean(-1.0)}, str(data), "pairs",
                   n_boot=50, progress=False)
    assert rep["scorers"]["bright"]["accuracy"] == pytest.approx(4 / 6)
    assert rep["scorers"]["dark"]["accuracy"] == pytest.approx(2 / 6)
    png = bar_chart(rep, str(tmp_path / "acc.png"))
    assert Image.open(png).size[0] > 100


def test_convert_pickapic_parquet_and_imagerewarddb(tmp_path):
    import io
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from mmrl.rewards.convert import convert

    def jpg(v):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (v, v, v)).save(buf, format="JPEG")
        return buf.getvalue()

    src = tmp_path / "pick"
    src.mkdir()
    rows = {"caption": ["c0", "c1", "c2"], "jpg_0": [jpg(10), jpg(20), jpg(30)],
            "jpg_1": [jpg(40), jpg(50), jpg(10)], "label_0": [1.0, 0.5, 0.0],
            "label_1": [0.0, 0.5, 1.0]}
    pq.write_table(pa.table(rows), src / "test_unique-00000.parquet")
    pq.write_table(pa.table({k: v[:1] for k, v in rows.items()}),
                   src / "validation_unique-00000.parquet")
    out = tmp_path / "out" / "pairs.jsonl"
    out.parent.mkdir()
    assert convert("pickapic", str(src), str(out)) == 4
    recs = read_records(str(out), "pairs")
    assert [(r["label"], r["split"]) for r in recs] == [
        ("a", "test"), ("tie", "test"), ("b", "test"), ("a", "validation")]

    def grey(rel):  # the written image's mean pixel (JPEG keeps a flat grey within ±2)
        return float(np.asarray(Image.open(out.parent / rel), np.float32).mean())

    # image_a is jpg_0 and image_b is jpg_1, row by row (the shards' order: test, validation).
    want = [(10, 40), (20, 50), (30, 10), (10, 40)]
    got = [(grey(r["image_a"]), grey(r["image_b"])) for r in recs]
    np.testing.assert_allclose(got, want, atol=2)
    assert recs[2]["image_b"] == recs[0]["image_a"]  # identical bytes share one file

    ir = tmp_path / "ir"
    ir.mkdir()
    (ir / "test.json").write_text(json.dumps([{"id": 1, "prompt": "p", "generations":
                                               ["g/0.png", "g/1.png"], "ranking": [2, 1]}]))
    out2 = tmp_path / "ir.jsonl"
    assert convert("imagerewarddb", str(ir / "test.json"), str(out2)) == 1
    rec = read_records(str(out2), "ranked")[0]
    assert rec["images"] == ["ir/g/0.png", "ir/g/1.png"] and rec["ranks"] == [2, 1]
    with pytest.raises(ValueError, match="keys.*expected 'prompt', 'image_path', 'rank'"):
        convert("hpdv2", str(ir / "test.json"), str(out2))
