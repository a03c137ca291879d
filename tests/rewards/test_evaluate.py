"""Evaluation protocols on synthetic data with known accuracy (ties included)."""
from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch

from mmrl.rewards import candidate_probs
from mmrl.rewards.evaluate import (bar_chart, bootstrap_ci, evaluate, pair_credits, pairs_report,
                                   pairwise_report, ranked_list_stats, ranked_report, read_data,
                                   read_records, tie_calibrated_accuracy, tune_tie_threshold)


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


# ----------------------------------------------------------------------------- issue 16 formats

def _grey(path, v, size=4):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (v, v, v)).save(path)


def _hpdv3_pair_file(tmp_path):
    """4 HPDv3 pair items under data/ with images in data/imgs/ (paths relative to the JSON).

    Mean-pixel scores: 200 > 100 correct; 50 = 50 equal; 10 < 90 incorrect; 255 > 0 correct.
    """
    items = []
    for i, (v1, v2) in enumerate(((200, 100), (50, 50), (10, 90), (255, 0))):
        _grey(tmp_path / "data" / "imgs" / f"{i}_1.png", v1)
        _grey(tmp_path / "data" / "imgs" / f"{i}_2.png", v2)
        items.append({"prompt": f"p{i}", "path1": f"imgs/{i}_1.png", "path2": f"imgs/{i}_2.png",
                      "model1": "m1", "model2": "m2", "confidence": 1.0})
    path = tmp_path / "data" / "test.json"
    path.write_text(json.dumps(items))
    return path


def test_hpdv3_pair_hand_accuracy_equal_apart_relative_paths(tmp_path, monkeypatch):
    path = _hpdv3_pair_file(tmp_path)
    monkeypatch.chdir(tmp_path)  # paths resolve against the JSON's folder, not the cwd
    rep = evaluate({"mean": _PixelMean()}, str(path), "hpdv3", n_boot=0, progress=False)
    assert rep["mode"] == "pair" and rep["n_records"] == 4
    r = rep["scorers"]["mean"]
    assert r["protocol"] == "hpdv3_pair" and r["accuracy"] == pytest.approx(2 / 4)
    assert (r["n_pairs"], r["n_correct"], r["n_equal"], r["n_incorrect"]) == (4, 2, 1, 1)
    flipped = evaluate({"dark": _PixelMean(-1.0)}, str(path), "hpdv3", n_boot=0,
                       progress=False)["scorers"]["dark"]
    assert (flipped["n_correct"], flipped["n_equal"]) == (1, 1)  # the equal pair stays apart


def test_hpdv3_ranking_pools_pairs_skips_equal_ranks(tmp_path):
    # x: ranking [1, 2, 3] (smaller = better), scores 3, 1, 2: (0,1) right, (0,2) right,
    #    (1,2) wrong -> 2 of 3.  y: ranking [2, 1, 1], scores 5, 5, 0: (0,1) model tie -> wrong,
    #    (0,2) wrong, (1,2) equal ranks -> skipped.  Pooled: 2 of 5.
    items = [{"id": 7, "prompt": "x", "generations": ["x0.png", "x1.png", "x2.png"],
              "ranking": [1, 2, 3]},
             {"id": 8, "prompt": "y", "generations": ["y0.png", "y1.png", "y2.png"],
              "ranking": [2, 1, 1]}]
    for name, v in (("x0", 3), ("x1", 1), ("x2", 2), ("y0", 5), ("y1", 5), ("y2", 0)):
        _grey(tmp_path / f"{name}.png", v * 40)
    path = tmp_path / "rank.json"
    path.write_text(json.dumps(items))
    rep = evaluate({"mean": _PixelMean()}, str(path), "hpdv3", n_boot=50, progress=False)
    r = rep["scorers"]["mean"]
    assert rep["mode"] == "ranking" and r["protocol"] == "hpdv3_ranking"
    assert r["accuracy"] == pytest.approx(2 / 5)
    assert (r["n_pairs"], r["n_equal"], r["n_pairs_equal_rank"], r["n_lists"]) == (5, 1, 1, 2)
    lo, hi = r["ci95"]  # resamples the two items (2/3 and 0/2)
    assert 0 <= lo <= 2 / 5 <= hi <= 2 / 3 + 1e-12


def test_hpdv3_malformed_items_name_item_field_and_fix(tmp_path):
    bad = [{"prompt": "a", "path1": "1.png", "path2": "2.png"},
           {"prompt": "b", "path1": "1.png"},
           {"id": 3, "prompt": "c", "generations": ["1.png", "2.png"], "ranking": [1, 2]},
           {"prompt": "d", "path1": 5, "path2": "2.png"}]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"3 bad HPDv3 pair item\(s\): item \[1\]: missing "
                       r"\['path2'\].*item \[2\] \(id 3\): a ranking item in a file of pair items"
                       r".*split the file.*item \[3\]: 'path1' is 5; expected an image path"):
        read_data(str(p), "hpdv3")
    p.write_text(json.dumps([{"id": 9, "prompt": "x", "generations": ["a", "b", "c"],
                              "ranking": [1, 2]}]))
    with pytest.raises(ValueError, match=r"item \[0\] \(id 9\): 'generations' and 'ranking' must "
                                         r"be lists of equal length >= 2; got 3 items and 2"):
        read_data(str(p), "hpdv3")
    p.write_text(json.dumps({"prompt": "x"}) + "\n" + json.dumps({"prompt": "y"}) + "\n")
    with pytest.raises(ValueError, match="not one JSON document.*use --format pairs or ranked"):
        read_data(str(p), "hpdv3")
    with pytest.raises(FileNotFoundError, match="imgs/0_1.png' not found at .*--image-root"):
        evaluate({"m": _PixelMean()}, str(_hpdv3_pair_file(tmp_path)), "hpdv3",
                 image_root=str(tmp_path), n_boot=0, progress=False)


def _brute_tie_calibrated(h, m):
    best = -1.0
    for eps in sorted(set(abs(x) for x in m)):
        credit = 0
        for hi, mi in zip(h, m):
            if abs(mi) <= eps:
                credit += hi == 0
            else:
                credit += hi != 0 and (mi > 0) == (hi > 0)
        best = max(best, credit / len(h))
    return best


def test_tie_calibrated_accuracy_hand_values_and_brute_force():
    h = [1, -1, 0, 1, 0, -1]
    m = [2.0, -0.5, 0.1, 0.1, 3.0, 0.0]
    # eps 0: C = 3 (pairs 0, 1, 3), T_hm = 0 -> 3/6; eps 0.1: C = 2, T_hm = 1 -> 3/6;
    # eps 0.5: 2/6; eps 2: 1/6; eps 3: 2/6.  The smallest best eps is 0.
    assert tie_calibrated_accuracy(h, m) == (pytest.approx(0.5), 0.0)
    # Without ties (h != 0): pairs 0, 1, 3 right, pair 5 a model tie -> 3/4.
    r = pairwise_report(np.array(h, float), np.array(m), np.arange(6), n_boot=0)
    assert r["accuracy"] == pytest.approx(0.75) and (r["n_pairs"], r["n_equal"]) == (4, 1)
    # Whole thresholds: two pairs at |m| = 0.5 tie together (VideoAlign's one-pair-at-a-time
    # loop would also score the state with only the first tied, 2/2).
    assert tie_calibrated_accuracy([0, 1], [0.5, 0.5]) == (pytest.approx(0.5), 0.5)
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 30))
        hh = rng.integers(-1, 2, size=n)
        mm = rng.integers(-3, 4, size=n) / 2.0  # many equal |m| and model ties
        acc, eps = tie_calibrated_accuracy(hh, mm)
        assert acc == pytest.approx(_brute_tie_calibrated(hh.tolist(), mm.tolist()))
        assert tie_calibrated_accuracy(hh, mm) == (acc, eps)


class _Levels:
    """A fake video scorer with columns: level L = round(5 · mean pixel) of a video; VQ = L,
    MQ = -L, Overall = 2L (no TA column). Records what it was called with."""
    name, scale, uses_prompts, media = "levels", "grey level", True, "video"

    def __init__(self):
        self.calls, self.fps = [], []

    def __call__(self, videos, prompts, metadata=None):
        assert videos.dim() == 5  # [b, F, 3, H, W]
        self.calls.append(videos.shape[0])
        self.fps += [m.get("fps") for m in metadata]
        L = torch.round(videos.mean(dim=(1, 2, 3, 4)) * 5)
        return {"VQ": L, "MQ": -L, "Overall": 2 * L}


class _VideoJudge:
    """A fake pairwise video judge: P(a preferred) = 0.5 + 0.125 (L_a - L_b) (exact in binary)."""
    name, media = "vjudge", "video"

    def compare(self, a, b, prompts):
        assert a.dim() == b.dim() == 5 and len(a) == len(b) == len(prompts)  # [n, F, 3, H, W]
        lv = lambda v: torch.round(v.mean() * 5)  # noqa: E731
        return torch.stack([0.5 + 0.125 * (lv(x) - lv(y)) for x, y in zip(a, b)])


def _videogen_csv(tmp_path):
    """5 pairs over 4 GIFs of grey levels 1..4 (v3 has 2 frames, the others 3; 100 ms frames).

    labels (VQ, MQ, TA, Overall) per pair (A, B): p0 (v3, v0): A B same A; p1 (v1, v2):
    B same A A; p2 (v0, v1): same B B <empty>; p3 (v2, v2): A A A same; p4 (v3, v1): A A B B.
    """
    from PIL import Image
    vdir = tmp_path / "bench" / "videos"
    vdir.mkdir(parents=True)
    for k in range(4):
        frames = [Image.new("RGB", (8, 8), (51 * (k + 1),) * 3) for _ in range(2 if k == 3 else 3)]
        for t, fr in enumerate(frames):
            fr.putpixel((0, 0), (t,) * 3)  # frames differ (PIL merges identical GIF frames)
        frames[0].save(vdir / f"v{k}.gif", save_all=True, append_images=frames[1:],
                       duration=100, loop=0)
    rows = [("v3", "v0", "A", "B", "same", "A"), ("v1", "v2", "B", "same", "A", "A"),
            ("v0", "v1", "same", "B", "B", ""), ("v2", "v2", "A", "A", "A", "same"),
            ("v3", "v1", "A", "A", "B", "B")]
    path = tmp_path / "bench" / "videogen-rewardbench.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path_A", "A_model", "path_B", "B_model", "prompt", "fps_A", "VQ", "MQ",
                    "TA", "Overall"])
        for a, b, *labels in rows:
            w.writerow([f"videos/{a}.gif", "gen1", f"videos/{b}.gif", "gen2", "q", 8, *labels])
    return path


def test_videogen_hand_accuracies_per_dimension(tmp_path):
    path = _videogen_csv(tmp_path)
    scorer = _Levels()
    rep = evaluate({"levels": scorer, "judge": _VideoJudge()}, str(path), "videogen",
                   n_boot=0, progress=False)
    assert sorted(scorer.calls) == [1, 3]  # 4 unique videos, each once; v3's shape apart
    assert scorer.fps == [pytest.approx(10.0)] * 4  # from the GIF's 100 ms frames
    assert rep["dimensions"] == ["VQ", "MQ", "TA", "Overall"]
    r = rep["scorers"]["levels"]
    d = r["dimensions"]
    assert list(d) == ["VQ", "MQ", "Overall"] and r["dimensions_without_column"] == ["TA"]
    # VQ: m = 3, -1, -1, 0, 2; h = 1, -1, 0, 1, 1.  w/o ties: 3 of 4 (p3 a model tie);
    # with ties: eps 0 -> (C 3 + T_hm 0) / 5, eps 1 -> (2 + 1) / 5, eps 2 -> 2/5, eps 3 -> 1/5.
    assert (d["VQ"]["accuracy_without_ties"], d["VQ"]["accuracy_with_ties"],
            d["VQ"]["tie_threshold"]) == (pytest.approx(0.75), pytest.approx(0.6), 0.0)
    assert (d["VQ"]["n_pairs"], d["VQ"]["n_human_ties"], d["VQ"]["n_equal"]) == (5, 1, 1)
    # MQ: m = -3, 1, 1, 0, -2; h = -1, 0, -1, 1, 1.  w/o ties: p0 only -> 1/4;
    # with ties: eps 0: 1/5, eps 1: (1 + 1)/5, eps 2: 2/5, eps 3: 1/5 -> 0.4 at eps 1.
    assert (d["MQ"]["accuracy_without_ties"], d["MQ"]["accuracy_with_ties"],
            d["MQ"]["tie_threshold"]) == (pytest.approx(0.25), pytest.approx(0.4), 1.0)
    # Overall: m = 6, -2, -2, 0, 4; h = 1, 1, unlabelled, 0, -1.  w/o ties: 1/3;
    # with ties over the 4 labelled: eps 0: (1 + 1)/4 (best), eps 2: 2/4, eps 4: 2/4, eps 6: 1/4.
    assert (d["Overall"]["accuracy_without_ties"], d["Overall"]["accuracy_with_ties"],
            d["Overall"]["n_unlabelled"]) == (pytest.approx(1 / 3), pytest.approx(0.5), 1)
    assert r["accuracy"] == pytest.approx(1 / 3) and r["primary"] == "Overall"
    assert d["VQ"]["column"] == "VQ"
    # The judge (no score) is asked both ways; symmetric, so both orders give the VQ margins
    # (/8): every dimension is compared with its one P.
    j = rep["scorers"]["judge"]["dimensions"]
    assert (j["VQ"]["accuracy_without_ties"], j["VQ"]["accuracy_with_ties"]) == (
        pytest.approx(0.75), pytest.approx(0.6))
    assert j["VQ"]["accuracy_by_order"] == {"as_given": 0.75, "swapped": 0.75}
    assert j["TA"]["n_without_ties"] == 2 * 4


def test_videogen_errors_name_row_field_and_fix(tmp_path):
    path = _videogen_csv(tmp_path)
    with pytest.raises(ValueError, match=r"scores images but videogen data holds videos; lift "
                                         r"it to videos with --scorer frames:scorer=m"):
        evaluate({"m": _PixelMean()}, str(path), "videogen", n_boot=0, progress=False)
    text = path.read_text().splitlines()
    text[2] = text[2].replace(",B,same,A,A", ",X,same,A,A")  # line 3: VQ label X
    text[4] = text[4].replace("videos/v2.gif,gen2", ",gen2")  # line 5: path_B empty
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"2 bad videogen row\(s\): line 3: label VQ='X'; "
                                         r"expected 'A', 'B', 'same' or empty; line 5: missing "
                                         r"or empty \['path_B'\]"):
        read_data(str(path), "videogen")
    with pytest.raises(ValueError, match="tie threshold applies to --format pairs.*videogen "
                                         "calibrates its own"):
        evaluate({}, str(path), "videogen", tie_threshold=0.1)


def test_judge_pairs_both_orders_hand_values(tmp_path):
    class Judge:
        name, media = "judge", "image"

        def __init__(self):
            self.calls = 0

        def compare(self, a, b, prompts):
            # clear brightness gap -> 0.9 / 0.1; a close call -> 0.7 for the first shown
            # (position bias); identical -> 0.5.
            self.calls += 1
            out = []
            for x, y in zip(a, b):
                d = (np.asarray(x, np.float32).mean() - np.asarray(y, np.float32).mean()) / 255
                out.append(0.5 if d == 0 else 0.9 if d > 0.1 else 0.1 if d < -0.1 else 0.7)
            return torch.tensor(out)

    items = []
    for i, (v1, v2) in enumerate(((200, 50), (100, 110), (30, 220), (128, 128))):
        _grey(tmp_path / f"{i}a.png", v1), _grey(tmp_path / f"{i}b.png", v2)
        items.append({"prompt": "p", "path1": f"{i}a.png", "path2": f"{i}b.png"})
    (tmp_path / "t.json").write_text(json.dumps(items))
    judge = Judge()
    r = evaluate({"judge": judge}, str(tmp_path / "t.json"), "hpdv3", n_boot=0,
                 progress=False)["scorers"]["judge"]
    # as given (preferred first): 0.9 right, 0.7 right, 0.1 wrong, 0.5 equal -> 2/4;
    # swapped: P(other first) 0.1 right, 0.7 wrong, 0.9 wrong, 0.5 equal -> 1/4.
    assert r["protocol"] == "judge_both_orders" and judge.calls == 2  # one call per order
    assert r["accuracy"] == pytest.approx(3 / 8)
    assert r["accuracy_by_order"] == {"as_given": 0.5, "swapped": 0.25}
    assert (r["n_pairs"], r["n_correct"], r["n_equal"], r["n_incorrect"]) == (8, 3, 2, 3)
    # A judge that averages both orders itself (vlm_pair's default) is asked once.
    judge.both_orders, judge.calls = True, 0
    r = evaluate({"judge": judge}, str(tmp_path / "t.json"), "hpdv3", n_boot=0,
                 progress=False)["scorers"]["judge"]
    assert r["protocol"] == "judge_symmetrized" and judge.calls == 1
    assert r["accuracy"] == pytest.approx(2 / 4) and "accuracy_by_order" not in r


def test_cli_eval_hpdv3_and_videogen_round_trip(tmp_path, capsys):
    from mmrl.cli.app import main
    path = _hpdv3_pair_file(tmp_path)
    base = ["reward", "eval", "--scorer", "brightness", "--data", str(path), "--format", "hpdv3",
            "--bootstrap", "0", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "HPDv3 pair file, 4 items" in out
    assert "accuracy 50.00%" in out and "correct 2, equal 1, incorrect 1 of 4 pairs" in out
    rep = json.load(open(tmp_path / "r" / "report.json"))
    assert rep["mode"] == "pair" and rep["scorers"]["brightness"]["n_equal"] == 1
    assert main(base + ["--probs"]) == 2
    assert "--probs" in capsys.readouterr().err
    video = _videogen_csv(tmp_path)
    vbase = ["reward", "eval", "--data", str(video), "--format", "videogen", "--bootstrap", "0",
             "--quiet"]
    assert main(vbase + ["--scorer", "brightness"]) == 2
    assert "frames:scorer=brightness" in capsys.readouterr().err
    assert main(vbase + ["--scorer", "frames:scorer=brightness"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].split()[:5] == ["frames", "VQ", "w/o", "ties", "75.00%"]


def test_load_video_mp4_and_gif(tmp_path):
    from fractions import Fraction

    import av  # PyAV: in the dev and video extras (make install), never skipped
    from PIL import Image
    from mmrl.rewards.eval_data import load_video
    path = str(tmp_path / "v.mp4")
    with av.open(path, mode="w") as box:  # 3 grey frames 16x16 at 8 fps
        stream = box.add_stream("mpeg4", rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for v in (40, 120, 200):
            frame = np.full((16, 16, 3), v, np.uint8)
            box.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        box.mux(stream.encode())
    x, fps = load_video(path)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32 and fps == 8.0
    np.testing.assert_allclose(x.mean(dim=(1, 2, 3)).numpy(), np.array([40, 120, 200]) / 255,
                               atol=4 / 255)  # lossy codec
    frames = [Image.new("RGB", (4, 4), (v,) * 3) for v in (0, 255)]
    frames[0].save(tmp_path / "g.gif", save_all=True, append_images=frames[1:], duration=50)
    x, fps = load_video(str(tmp_path / "g.gif"))
    assert x.shape == (2, 3, 4, 4) and fps == pytest.approx(20.0)
    assert x[0].max() == 0 and x[1].min() == 1
