"""Verifiable VLM rewards: hand-worked values, oracles, errors, and a seeded adversarial fuzzer."""
import math
import random
import time

import pytest
import torch

from mmrl.train.reward_fn import evaluate_reward
from mmrl.video import vl_rewards as vr

MC = "multiple choice"


def meta(solution, problem_type=MC, **kw):
    return dict(solution=solution, problem_type=problem_type, **kw)


def one(reward, text, m):
    return float(reward([text], [None], [m])[0])


# ----------------------------------------------------------------------------- format

@pytest.mark.parametrize("text, want", [
    ("<think>a</think><answer>B</answer>", 1.0),
    ("  <think>\nlet me see\n</think>\n\n<answer> B </answer>\n", 1.0),
    ("<think></think><answer></answer>", 1.0),
    ("<think>a</think>x<answer>B</answer>", 0.0),          # text between the blocks
    ("Sure! <think>a</think><answer>B</answer>", 0.0),     # text before
    ("<think>a</think><answer>B</answer> done", 0.0),      # text after
    ("<think>a<think>b</think><answer>B</answer>", 0.0),   # nested think
    ("<think>a</think><answer>B</answer><answer>C</answer>", 0.0),  # duplicated answer
    ("<answer>B</answer><think>a</think>", 0.0),           # wrong order
    ("<think>a</think>", 0.0), ("<answer>B</answer>", 0.0), ("", 0.0), (None, 0.0),
    ("<think>a</answer><answer>B</think>", 0.0),           # crossed tags
])
def test_format_hand_values(text, want):
    assert vr.think_answer_format_score(text) == want
    assert one(vr.ThinkAnswerFormat(), text, {}) == want


def test_completion_text_shapes():
    assert vr.completion_text([{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "a"}]) == "a"
    parts = [{"type": "text", "text": "<answer>"}, {"type": "text", "text": "B</answer>"}]
    assert vr.completion_text([{"role": "assistant", "content": parts}]) == "<answer>B</answer>"
    assert vr.completion_text(["<answer>", "B", "</answer>"]) == "<answer>B</answer>"
    assert vr.completion_text([2, 6]) == "[2, 6]" and vr.completion_text(None) == ""
    assert vr.completion_text(b"\xffB") == "\ufffdB"


def test_format_reads_chat_messages_and_bytes():
    msgs = [{"role": "assistant", "content": "<think>a</think><answer>B</answer>"}]
    assert vr.think_answer_format_score(msgs) == 1.0
    assert vr.think_answer_format_score("<think>é</think><answer>B</answer>".encode()) == 1.0


# ----------------------------------------------------------------------------- choices

@pytest.mark.parametrize("answer, subset, exact", [
    ("A", 0.5, 0.0), ("C", 0.5, 0.0), ("A,C", 1.0, 1.0), ("C, A", 1.0, 1.0),
    ("A and C", 1.0, 1.0), ("(A) (C)", 1.0, 1.0), ("A. red, C. green", 1.0, 1.0),
    ("A,B", 0.0, 0.0), ("B", 0.0, 0.0), ("A,B,C,D", 0.0, 0.0), ("", 0.0, 0.0),
    ("I think A", 0.0, 0.0), ("A or C", 0.0, 0.0), ("red", 0.5, 0.0), ("red, green", 1.0, 1.0),
])
def test_choice_rewards_hand_values(answer, subset, exact):
    m = meta("<answer>A,C</answer>", options=["A. red", "B. blue", "C. green", "D. pink"])
    text = f"<think>.</think><answer>{answer}</answer>"
    assert one(vr.ChoiceSubset(), text, m) == pytest.approx(subset)
    assert one(vr.ChoiceExact(), text, m) == exact


@pytest.mark.parametrize("answer, truth, want", [
    ("a", "A", 1.0), ("(b), c", "B,C", 1.0), ("c, (b)", "B,C", 1.0), ("b. blue", "B", 1.0),
    ("BLUE", "B", 1.0), ("b", "A", 0.0), ("(b)", "B,C", 0.0),
])
def test_choice_answers_are_case_folded(answer, truth, want):
    m = meta(f"<answer>{truth}</answer>", options=["A. red", "B. blue", "C. green"])
    text = f"<think>.</think><answer>{answer}</answer>"
    assert one(vr.ChoiceExact(), text, m) == want
    assert one(vr.Accuracy(), text, m) == want
    assert vr.parse_choice_letters(answer, m["options"]) == (
        frozenset(truth.split(",")) if want else vr.parse_choice_letters(answer.upper()))


def test_choice_three_of_four_partial_credit():
    m = meta("B, C, D")
    got = [one(vr.ChoiceSubset(), f"<answer>{a}</answer>", m) for a in ("B", "B,D", "B,C,D")]
    assert got == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_choice_answer_outside_tags_needs_tag_or_text():
    m = meta("<answer>B</answer>")
    assert one(vr.ChoiceExact(), "B", m) == 0.0
    assert one(vr.ChoiceExact(answer_source="tag_or_text"), "B", m) == 1.0
    # the last block is the answer when the model drafts one while thinking
    assert one(vr.ChoiceExact(), "<think><answer>A</answer></think><answer>B</answer>", m) == 1.0


def test_option_table_reads_letter_styles():
    assert vr.option_table(["A. red", "(B) blue", "C) green", "D: pink", "plain"]) == [
        ("A", "red"), ("B", "blue"), ("C", "green"), ("D", "pink"), ("E", "plain")]


# ----------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("answer, truth, want", [
    ("3.141", "3.14", 1.0), ("3.15", "3.14", 0.0), ("1,234", "1234", 1.0),
    ("42 meters", "42", 1.0), ("3 or 4", "3", 0.0), ("3.0", "3", 1.0), ("-2.5", "-2.50", 1.0),
    ("inf", "3", 0.0), ("1e999", "3", 0.0), ("", "3", 0.0), ("three", "3", 0.0),
    ("±3", "3", 0.0), ("+-2", "-2", 0.0), ("3 ± 1", "3", 0.0), ("+/-3", "3", 0.0),
])
def test_number_exact_hand_values(answer, truth, want):
    m = meta(f"<answer>{truth}</answer>", "numerical")
    assert one(vr.NumberExact(), f"<answer>{answer}</answer>", m) == want


@pytest.mark.parametrize("answer, truth, want", [
    ("8", "10", 0.8), ("12.5", "10", 0.75), ("25", "10", 0.0), ("-10", "10", 0.0),
    ("10", "10", 1.0), ("0", "0", 1.0), ("0.1", "0", 0.0), ("-4", "-5", 0.8), ("x", "10", 0.0),
    ("±10", "10", 0.0), ("+-10", "-10", 0.0), ("10 ± 1", "10", 0.0),
])
def test_relative_error_hand_values(answer, truth, want):
    m = meta(truth, "regression")
    assert one(vr.RelativeError(), f"<answer>{answer}</answer>", m) == pytest.approx(want)


# ----------------------------------------------------------------------------- OCR, ROUGE

def _lcs_oracle(a, b):
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(t[i - 1][j], t[i][j - 1])
    return t[-1][-1]


def test_word_error_hand_values():
    ref = "the cat sat on the mat"
    assert vr.word_error_rate(ref, "the cat sat on mat") == pytest.approx(1 / 6)
    assert vr.word_error_rate(ref, "a cat sat on the hat") == pytest.approx(2 / 6)
    m = meta(ref, "OCR")
    assert one(vr.WordError(), "<answer>the cat sat on mat</answer>", m) == pytest.approx(5 / 6)
    assert one(vr.WordError(), "<answer></answer>", m) == 0.0
    assert one(vr.WordError(), "<answer>" + "x " * 100 + "</answer>", m) == 0.0


def test_rouge_hand_value():
    # R1 F = 2/3, R2 F = 1/2, RL F = 2/3 -> mean 11/18
    assert vr.rouge_f("The cat sat.", "the cat ran") == pytest.approx(11 / 18)
    assert vr.rouge_f("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert vr.rouge_f("the cat sat", "") == 0.0
    m = meta("<answer>The cat sat.</answer>", "free-form")
    assert one(vr.RougeF(), "<answer>the cat ran</answer>", m) == pytest.approx(11 / 18)


def test_lcs_matches_dp_oracle_on_random_sequences():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 90))]
        assert vr.lcs_length(a, b) == _lcs_oracle(a, b)


def test_rouge_n_clips_repeated_ngrams():
    # hyp "the the the" vs ref "the cat": unigram overlap clipped to 1: P 1/3, R 1/2 -> F 0.4
    assert vr.rouge_n_f(["the", "cat"], ["the", "the", "the"], 1) == pytest.approx(0.4)


# ----------------------------------------------------------------------------- temporal IoU

@pytest.mark.parametrize("answer, want", [
    ("[4, 8]", 1 / 3), ("4-8", 1 / 3), ("from 4 to 8 seconds", 1 / 3), ("4.0s - 8.0s", 1 / 3),
    ("[2, 6]", 1.0), ("[3, 5]", 0.5), ("[8, 4]", 0.0), ("[7, 9]", 0.0), ("[4]", 0.0), ("", 0.0),
])
def test_temporal_iou_hand_values(answer, want):
    m = meta([2.0, 6.0], "temporal grounding")
    assert one(vr.TemporalIoU(), f"<answer>{answer}</answer>", m) == pytest.approx(want)
    assert one(vr.Accuracy(), f"<answer>{answer}</answer>", m) == pytest.approx(want)


# ----------------------------------------------------------------------------- soft overlong

def test_soft_overlong_reuses_dapo_penalty():
    r = vr.SoftOverlong(max_len=20480, cache_len=4096)
    md = [{"completion_length": n} for n in (100, 16384, 18432, 20480, 30000)]
    assert r([""] * 5, [None] * 5, md).tolist() == pytest.approx([0, 0, -0.5, -1, -1])
    with pytest.raises(ValueError, match="completion_length.*length in tokens"):
        r([""], [None], [{}])
    with pytest.raises(ValueError, match="cache_len"):
        vr.SoftOverlong(max_len=10, cache_len=20)


# ----------------------------------------------------------------------------- accuracy dispatch

def test_accuracy_dispatches_per_sample_in_a_mixed_batch():
    samples = ["<answer>B</answer>", "<answer>3.14</answer>", "<answer>8</answer>",
               "<answer>the cat sat on mat</answer>", "<answer>A</answer>"]
    md = [meta("B"), meta("3.14", "numerical"), meta("10", "regression"),
          meta("the cat sat on the mat", "OCR"), meta("A,C", "Multiple-Choice")]
    exact = vr.Accuracy()(samples, [None] * 5, md)
    subset = vr.Accuracy(choice="subset")(samples, [None] * 5, md)
    assert exact.dtype == torch.float32
    assert exact.tolist() == pytest.approx([1, 1, 0.8, 5 / 6, 0])
    assert subset.tolist() == pytest.approx([1, 1, 0.8, 5 / 6, 0.5])


def test_bad_labels_give_nan_or_raise_with_the_sample_index():
    md = [meta("B"), meta("not letters at all"), meta("x", "haiku")]
    out = vr.Accuracy()(["<answer>B</answer>"] * 3, [None] * 3, md)
    assert out[0] == 1 and math.isnan(out[1]) and math.isnan(out[2])
    batch = evaluate_reward(vr.Accuracy(), ["<answer>B</answer>"] * 3, [None] * 3, md)
    assert batch.num_invalid == 2  # the loop drops and counts them
    with pytest.raises(ValueError, match=r"metadata\[1\].*not a list of option letters"):
        vr.Accuracy(on_bad_label="raise")(["<answer>B</answer>"] * 3, [None] * 3, md)
    with pytest.raises(ValueError, match=r"metadata\[2\].*problem_type 'haiku'"):
        vr.Accuracy(on_bad_label="raise")(["x"] * 3, [None] * 3, [md[0], md[0], md[2]])


def test_missing_metadata_is_a_clear_error():
    with pytest.raises(ValueError, match=r"metadata\[0\] has no \['problem_type'\]"):
        vr.Accuracy()(["<answer>B</answer>"], [None], [{"solution": "B"}])
    with pytest.raises(ValueError, match="one metadata dict per sample"):
        vr.ChoiceExact()(["a", "b"], [None, None], [meta("A")])
    with pytest.raises(ValueError, match="answer_source='answer'.*'tag', 'tag_or_text'"):
        vr.ChoiceExact(answer_source="answer")


# ----------------------------------------------------------------------------- registry, combined

def test_registry_and_combined_reward_columns():
    assert set(vr.VL_REWARDS.names()) == {
        "think_answer_format", "choice_subset", "choice_exact", "number_exact", "relative_error",
        "word_error", "rouge_f", "temporal_iou", "accuracy", "soft_overlong"}
    combined = vr.build_vl_reward({"think_answer_format": 0.5,
                                   "accuracy": {"weight": 1.0, "choice": "subset"},
                                   "soft_overlong": {"max_len": 100, "cache_len": 20}})
    assert combined.weights == {"think_answer_format": 0.5, "accuracy": 1.0, "soft_overlong": 1.0}
    md = [dict(meta("A,C"), completion_length=n) for n in (10, 90)]
    samples = ["<think>x</think><answer>A</answer>", "<answer>A,C</answer>"]
    batch = evaluate_reward(combined, samples, [None, None], md)
    assert batch.names == ["think_answer_format", "accuracy", "soft_overlong"]
    assert torch.allclose(batch.values, torch.tensor([[1, 0.5, 0], [0, 1, -0.5]]))
    assert batch.weighted_sum(combined.weights).tolist() == pytest.approx([1.0, 0.5])


def test_registry_errors_teach():
    with pytest.raises(ValueError, match="did you mean 'accuracy'"):
        vr.build_vl_reward(["acuracy"])
    with pytest.raises(TypeError, match="bad options.*accepts"):
        vr.build_vl_reward({"accuracy": {"choise": "subset"}})
    with pytest.raises(TypeError, match="weight 'high' is not a number"):
        vr.build_vl_reward({"accuracy": "high"})
    with pytest.raises(ValueError, match="empty spec"):
        vr.build_vl_reward({})


# ----------------------------------------------------------------------------- adversarial fuzzing

PIECES = ["<think>", "</think>", "<answer>", "</answer>", "<answer", "answer>", "A", "B", "C",
          ",", " and ", "(", ")", ".", "3.14", "-7", "1,234", "1e309", "nan", "inf", "[2, 6]",
          "\n", " ", "\t", "é", "答案", "🙂", "\u200b", "\x00", "\ud800", "<think><think>",
          "the cat sat", "−5", "%", "0x1F", "{", "}", "<|im_end|>", "\\", "..."]
FUZZ_META = [meta("<answer>A,C</answer>", options=["A. red", "B. blue", "C. the cat sat"]),
             meta("B"), meta("3.14", "numerical"), meta("10", "regression"),
             meta("0", "regression"),
             meta("the cat sat on the mat", "OCR"), meta("the cat sat", "free-form"),
             meta([2, 6], "temporal grounding")]


def _fuzz_outputs(seed: int, n: int):
    rng = random.Random(seed)
    specials = [None, b"\xff\xfe<answer>A</answer>", 17, 3.5, [], [{"content": None}],
                [{"role": "assistant", "content": "<answer>B</answer>"}], {"content": "x"},
                "<answer>" * 50_000, "x" * 1_000_000, "<think>" + "y" * 500_000 + "</think>",
                "<answer>" + "A, " * 100_000 + "</answer>",
                "<answer>" + "9" * 400_000 + "</answer>"]
    for _ in range(n):
        yield "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 30)))
    yield from specials


FUZZ_PAIRS = [("choice_subset", 0), ("choice_exact", 1), ("number_exact", 2),
              ("relative_error", 3), ("relative_error", 4), ("word_error", 5), ("rouge_f", 6),
              ("temporal_iou", 7)] + [("accuracy", k) for k in range(8)] + [
              ("think_answer_format", k) for k in range(8)]


def test_fuzz_every_reward_never_crashes_and_stays_in_range():
    outputs = list(_fuzz_outputs(seed=1234, n=400))
    prompts = [None] * len(outputs)
    start = time.perf_counter()
    for name, k in FUZZ_PAIRS:
        modes = vr.VL_REWARDS.get(name).modes
        for options in ({}, {"answer_source": "tag_or_text"}, {"mode": "video_r1"},
                        {"mode": "tw_grpo"}):
            mode = options.get("mode", "lenient")
            if (name == "think_answer_format" and "answer_source" in options) or (
                    mode not in modes) or (mode == "video_r1" and k == 7):  # no temporal there
                continue
            reward = vr.build_vl_reward({name: {"weight": 1.0, **options}})
            batch = evaluate_reward(reward, outputs, prompts, [FUZZ_META[k]] * len(outputs),
                                    on_invalid="raise")
            assert ((batch.values >= 0) & (batch.values <= 1)).all(), (name, k)
    # 13 megabyte-scale outputs x (38 lenient + 27 reference) reward-label-mode triples
    assert time.perf_counter() - start < 90


def test_fuzz_soft_credit_dominates_strict_and_format_is_binary():
    soft, strict = vr.ChoiceSubset(), vr.ChoiceExact()
    m = FUZZ_META[0]
    outputs = list(_fuzz_outputs(seed=99, n=500))[:500]
    s = soft(outputs, [None] * 500, [m] * 500)
    e = strict(outputs, [None] * 500, [m] * 500)
    assert (s >= e).all() and ((e == 0) | (e == 1)).all()
    assert ((s == 0) | (s == 0.5) | (s == 1)).all()
    f = vr.ThinkAnswerFormat()(outputs, [None] * 500)
    assert ((f == 0) | (f == 1)).all()
    assert s.sum() > 0 and f.sum() >= 0  # the fuzzer does produce some correct answers


# ----------------------------------------------------------------------------- reference parity
# Slow restatements of the reference rules (TW-GRPO's string-matching branch, Video-R1's
# numerical/regression/OCR branches), compared on canonical outputs where they are defined the
# same way; the documented differences (first vs last block, decimal-point check) are avoided.

def _first_block(text):
    start, end = text.find("<answer>"), text.find("</answer>")
    return text[start + 8:end].strip() if 0 <= start < end else text.strip()


def _twgrpo_soft_oracle(content, solution):
    truth = {o for o in _first_block(solution).replace(" ", "").split(",")}
    pred = {o for o in _first_block(content).replace(" ", "").split(",")}
    return len(pred) / len(truth) if pred <= truth else 0.0


def _video_r1_oracle(content, solution, kind):
    out, gt = _first_block(content), _first_block(solution)
    if kind == "numerical":
        return 1.0 if round(float(out), 2) == round(float(gt), 2) else 0.0
    if kind == "regression":
        rel = (abs(float(out) - float(gt)) + 1e-9) / (abs(float(gt)) + 1e-9)
        return 1 - min(1.0, max(0.0, rel))
    ref, hyp = gt.split(), out.split()
    d = [[i + j if i * j == 0 else 0 for j in range(len(hyp) + 1)] for i in range(len(ref) + 1)]
    for i in range(1, len(ref) + 1):
        for j in range(1, len(hyp) + 1):
            d[i][j] = d[i - 1][j - 1] if ref[i - 1] == hyp[j - 1] else 1 + min(
                d[i - 1][j], d[i][j - 1], d[i - 1][j - 1])
    return max(0.0, min(1.0, 1 - d[-1][-1] / max(1, len(ref))))


def test_soft_choice_matches_tw_grpo_rule_on_canonical_answers():
    rng = random.Random(5)
    for _ in range(500):
        truth = rng.sample("ABCDE", rng.randint(1, 4))
        pred = rng.sample("ABCDE", rng.randint(1, 5))
        sep = rng.choice([",", ", "])
        content = f"<think>t</think><answer>{sep.join(pred)}</answer>"
        solution = f"<answer>{','.join(truth)}</answer>"
        want = _twgrpo_soft_oracle(content, solution)
        assert one(vr.ChoiceSubset(), content, meta(solution)) == pytest.approx(want)


def test_video_r1_types_match_the_reference_rules_on_canonical_answers():
    rng = random.Random(6)
    vocab = ["stop", "exit", "open", "24h", "cafe", "north"]
    for _ in range(300):
        kind = rng.choice(["numerical", "regression", "OCR"])
        if kind == "OCR":
            gt = " ".join(rng.choices(vocab, k=rng.randint(1, 6)))
            out = " ".join(rng.choices(vocab, k=rng.randint(0, 8)))
        else:
            gt = f"{rng.uniform(-50, 50):.{rng.choice([1, 2, 3])}f}"
            out = f"{float(gt) + rng.choice([0, 0.001, 0.004, 0.01, 0.3, 7]):.3f}"
        content, solution = f"<answer>{out}</answer>", f"<answer>{gt}</answer>"
        want = _video_r1_oracle(content, solution, kind)
        got = one(vr.Accuracy(), content, meta(solution, kind))
        assert got == pytest.approx(want), (kind, out, gt)


# ----------------------------------------------------------------------------- conformance
# Every registered reward: constructible from its name, named after its key, float32 [B] in
# range, the right answer scores its maximum and a wrong one less. A new entry needs a case here.

CASES = {  # name: (options, metadata, right completion, wrong completion, max value)
    "think_answer_format": ({}, {}, "<think>x</think><answer>B</answer>", "<answer>B</answer>", 1),
    "choice_subset": ({}, meta("A,C"), "<answer>C, A</answer>", "<answer>B</answer>", 1),
    "choice_exact": ({}, meta("B"), "<answer>B</answer>", "<answer>A</answer>", 1),
    "number_exact": ({}, meta("2.5", "numerical"), "<answer>2.50</answer>", "<answer>3</answer>",
                     1),
    "relative_error": ({}, meta("4", "regression"), "<answer>4</answer>", "<answer>5</answer>", 1),
    "word_error": ({}, meta("no entry", "OCR"), "<answer>no entry</answer>", "<answer>no</answer>",
                   1),
    "rouge_f": ({}, meta("a red ball", "free-form"), "<answer>A red ball.</answer>",
                "<answer>a ball</answer>", 1),
    "temporal_iou": ({}, meta([1, 3], "temporal grounding"), "<answer>[1, 3]</answer>",
                     "<answer>[2, 5]</answer>", 1),
    "accuracy": ({"choice": "subset"}, meta("A,C"), "<answer>A,C</answer>", "<answer>A</answer>",
                 1),
    "soft_overlong": ({"max_len": 10, "cache_len": 4}, {"completion_length": 3}, "short", "long",
                      0),
}


@pytest.mark.parametrize("name", vr.VL_REWARDS.names())
def test_conformance_of_every_registered_reward(name):
    options, m, right, wrong, best = CASES[name]
    reward = vr.VL_REWARDS.get(name)(**options)
    assert reward.name == name and repr(reward)
    md = [m, dict(m, completion_length=9) if name == "soft_overlong" else m]
    out = reward([right, wrong], [None, None], md)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (2,)
    assert out[0] == best and out[1] < best
    batch = evaluate_reward(vr.build_vl_reward({name: {"weight": 2.0, **options}}), [right, wrong],
                            [None, None], md, on_invalid="raise")
    assert batch.names == [name] and torch.equal(batch.values[:, 0], out)
