"""Reward modes: lenient (mmrl's reading) against Video-R1's and TW-GRPO's rules, case by case.

Every row is worked by hand from the reference code's rules (tulerfeng/Video-R1 grpo.py,
longmalongma/TW-GRPO grpo.py; see mmrl.video.vl_reference). The side-by-side run of the
references' own functions on generated cases is reported in the commit, not repeated here.
"""
import math
import random

import pytest
from rouge_score import rouge_scorer

from mmrl.video import vl_reference as ref
from mmrl.video import vl_rewards as vr
from mmrl.video.train import VideoConfig

ref_rouge = ref.video_r1_rouge

OPTIONS = ["A. red", "B. blue", "C. green", "D. pink"]


def score(reward, text, solution, problem_type="multiple choice", **meta):
    md = dict(solution=solution, problem_type=problem_type, **meta)
    return float(reward([text], [None], [md])[0])


# ----------------------------------------------------------------------------- format
# text -> (lenient, video_r1, tw_grpo)
FORMAT = [
    ("<think>a</think><answer>B</answer>", 1, 1, 1),
    ("<think>a</think>\n <answer>B</answer>", 1, 1, 1),
    (" <think>a</think><answer>B</answer>\n", 1, 0, 1),       # outer whitespace: Video-R1 rejects
    ("<think>a</think><answer>B</answer><answer>C</answer>", 0, 1, 0),  # repeated <answer>
    ("<think>a<think>b</think><answer>B</answer>", 0, 1, 0),   # nested <think>
    ("<think>a</think><answer>B</answer></answer>", 0, 1, 1),  # repeated </answer>
    ("Sure. <think>a</think><answer>B</answer>", 0, 0, 1),     # text before: TW-GRPO accepts
    ("<think>a</think><answer>B</answer> !!", 0, 0, 1),        # trailing "!": TW-GRPO accepts
    ("<think>a</think><answer>B</answer> done", 0, 0, 0),
    ("<think>a</think> x <answer>B</answer>", 0, 0, 0),
    ("<answer>B</answer><think>a</think>", 0, 0, 0),
    ("<think>a</think>", 0, 0, 0),
    ("", 0, 0, 0),
]


@pytest.mark.parametrize("text, lenient, video_r1, tw_grpo", FORMAT)
def test_format_modes_hand_table(text, lenient, video_r1, tw_grpo):
    got = [score(vr.ThinkAnswerFormat(mode=m), text, None) for m in vr.MODES]
    assert got == [lenient, video_r1, tw_grpo]


# ----------------------------------------------------------------------------- multiple choice
# (completion, solution) -> (lenient exact, lenient subset, video_r1, tw_grpo subset, tw_grpo exact)
CHOICE = [
    ("<answer>B</answer>", "<answer>B</answer>", 1, 1, 1, 1, 1),
    ("<answer> B </answer>", "<answer>B</answer>", 1, 1, 1, 1, 1),
    ("<answer>b</answer>", "<answer>B</answer>", 1, 1, 0, 0, 0),        # lower case
    ("<answer>B.</answer>", "<answer>B</answer>", 1, 1, 0, 0, 0),
    ("<answer>(B)</answer>", "<answer>B</answer>", 1, 1, 0, 0, 0),
    ("<answer>B. blue</answer>", "<answer>B</answer>", 1, 1, 0, 0, 0),
    ("<answer>blue</answer>", "<answer>B</answer>", 1, 1, 0, 0, 0),     # the option's text
    ("<answer>A</answer><answer>B</answer>", "<answer>B</answer>", 1, 1, 0, 0, 0),  # last block
    ("<answer>B</answer><answer>A</answer>", "<answer>B</answer>", 0, 0, 1, 1, 1),  # first block
    ("B", "<answer>B</answer>", 0, 0, 0, 1, 1),                         # TW-GRPO: whole text
    ("<answer></answer>", "<answer>B</answer>", 0, 0, 0, 0, 0),
    ("<answer>A,C</answer>", "<answer>A,C</answer>", 1, 1, 1, 1, 1),
    ("<answer>A, C</answer>", "<answer>A,C</answer>", 1, 1, 0, 1, 1),   # Video-R1: strings
    ("<answer>C,A</answer>", "<answer>A,C</answer>", 1, 1, 0, 1, 1),
    ("<answer>A and C</answer>", "<answer>A,C</answer>", 1, 1, 0, 0, 0),
    ("<answer>a, c</answer>", "<answer>A,C</answer>", 1, 1, 0, 0, 0),
    ("<answer>A</answer>", "<answer>A,C</answer>", 0, 0.5, 0, 0.5, 0),
    ("<answer>A,A</answer>", "<answer>A,C</answer>", 0, 0.5, 0, 0.5, 0),
    ("<answer>a</answer>", "<answer>A,C</answer>", 0, 0.5, 0, 0, 0),
    ("<answer>A,B</answer>", "<answer>A,C</answer>", 0, 0, 0, 0, 0),
]


@pytest.mark.parametrize("text, solution, exact, subset, video_r1, tw_sub, tw_exact", CHOICE)
def test_choice_modes_hand_table(text, solution, exact, subset, video_r1, tw_sub, tw_exact):
    rewards = [vr.Accuracy(), vr.Accuracy(choice="subset"), vr.Accuracy(mode="video_r1"),
               vr.Accuracy(mode="tw_grpo"), vr.Accuracy(mode="tw_grpo", choice="exact")]
    got = [score(r, text, solution, options=OPTIONS) for r in rewards]
    assert got == pytest.approx([exact, subset, video_r1, tw_sub, tw_exact])
    # the single rewards agree with the dispatching one
    assert score(vr.ChoiceExact(mode="video_r1"), text, solution) == video_r1
    assert score(vr.ChoiceSubset(mode="tw_grpo"), text, solution) == pytest.approx(tw_sub)


def test_tw_grpo_accuracy_ignores_the_problem_type():
    md = [{"solution": "<answer>A,C</answer>"}, {"solution": "3", "problem_type": "numerical"}]
    texts = ["<answer>C</answer>", "<answer>3.0</answer>"]
    out = vr.Accuracy(mode="tw_grpo")(texts, [None] * 2, md)
    assert out.tolist() == [0.5, 0.0]   # "3.0" is not the string "3"


# ----------------------------------------------------------------------------- numbers
# (answer, truth, problem type) -> (lenient, video_r1)
NUMBERS = [
    ("3.0", "3", "numerical", 1, 0),          # Video-R1: "." on one side only
    ("1,234", "1234", "numerical", 1, 0),     # "," counts as a decimal mark there
    ("42 meters", "42", "numerical", 1, 0),   # Video-R1: the whole answer must be a number
    ("3.141", "3.14", "numerical", 1, 1),
    ("1_000", "1000", "numerical", 0, 1),     # Python's float reads "1_000"
    ("±3", "3", "numerical", 0, 0),           # plus-minus hedges are no answer
    ("+-2", "-2", "numerical", 0, 0),
    ("3 ± 1", "3", "numerical", 0, 0),
    ("+/- 2", "2", "numerical", 0, 0),
    ("±3", "3", "regression", 0, 0),
    ("+-2", "-2", "regression", 0, 0),
    ("3 ± 1", "3", "regression", 0, 0),
    ("8", "10", "regression", 0.8, 1 - (2 + 1e-9) / (10 + 1e-9)),
    ("10", "10", "regression", 1, 1 - 1e-9 / (10 + 1e-9)),   # just below 1 there
    ("0", "0", "regression", 1, 0),           # truth 0: Video-R1 gives 0 to every answer
    ("0.1", "0", "regression", 0, 0),
    ("nan", "10", "regression", 0, 1),        # Video-R1: NaN ratio clipped to 0 -> reward 1
    ("inf", "10", "regression", 0, 0),
]


@pytest.mark.parametrize("answer, truth, kind, lenient, video_r1", NUMBERS)
def test_number_modes_hand_table(answer, truth, kind, lenient, video_r1):
    text, solution = f"<think>t</think><answer>{answer}</answer>", f"<answer>{truth}</answer>"
    # float32 output
    assert score(vr.Accuracy(), text, solution, kind) == pytest.approx(lenient, abs=1e-7)
    assert score(vr.Accuracy(mode="video_r1"), text, solution, kind) == pytest.approx(
        video_r1, abs=1e-7)


def test_regression_score_at_truth_zero_and_exact_answers():
    assert vr.relative_error_score(0.0, 0.0) == 1.0
    assert ref.video_r1_regression_score("0", "0") == 0.0
    assert ref.video_r1_regression_score("10", "10") == 1 - 1e-9 / (10 + 1e-9) < 1.0


# ----------------------------------------------------------------------------- OCR, free-form

def test_ocr_modes_differ_only_in_reading_the_answer():
    for answer, want in (("the cat sat on mat", 5 / 6), ("", 0.0)):
        text = f"<answer>{answer}</answer>"
        for mode in ("lenient", "video_r1"):
            got = score(vr.Accuracy(mode=mode), text, "the cat sat on the mat", "OCR")
            assert got == pytest.approx(want)
    # no block: lenient scores no answer 0; Video-R1 reads "", equal to an empty truth
    assert score(vr.WordError(), "no tags", "") == 0.0
    assert score(vr.WordError(mode="video_r1"), "no tags", "") == 1.0


def test_rouge_stems_like_rouge_score():
    lib = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)

    def library(ref, hyp):
        s = lib.score(ref, hyp)
        return (s["rouge1"].fmeasure + s["rouge2"].fmeasure + s["rougeL"].fmeasure) / 3

    assert vr.rouge_tokens("Running dogs") == ["run", "dog"]
    assert vr.rouge_f("running dogs", "run dog") == library("running dogs", "run dog") == 1.0
    # [the, cat, studi] vs [the, cat, studi, now]: R1 F = 6/7, R2 F = 4/5, RL F = 6/7
    pair = ("The cats studies.", "the cat studying now")
    assert vr.rouge_f(*pair) == library(*pair) == pytest.approx((6 / 7 + 4 / 5 + 6 / 7) / 3)
    for mode in ("lenient", "video_r1"):
        got = score(vr.RougeF(mode=mode), "<answer>run dog</answer>", "running dogs", "free-form")
        assert got == 1.0
    # lenient keeps letters of every script; rouge_score keeps [a-z0-9] only
    assert vr.rouge_f("猫 sat", "猫 sat") == 1.0
    assert score(vr.RougeF(mode="video_r1"), "<answer>猫 ran</answer>", "猫 sat", "free-form") == 0


def test_rouge_equals_rouge_score_on_random_ascii_text():
    lib = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    words = ["running", "run", "runs", "dogs", "dog", "the", "cat", "cats", "sitting", "sat",
             "studies", "studying", "well-known", "dog's", "42", "A", "Quickly", "fences."]
    rng = random.Random(11)
    for _ in range(200):
        ref = " ".join(rng.choices(words, k=rng.randint(1, 8)))
        hyp = " ".join(rng.choices(words, k=rng.randint(0, 12)))
        s = lib.score(ref, hyp)
        want = (s["rouge1"].fmeasure + s["rouge2"].fmeasure + s["rougeL"].fmeasure) / 3
        assert vr.rouge_f(ref, hyp) == want                       # lenient: ASCII agrees
        assert ref_rouge(ref, hyp) == want                        # video_r1: bit for bit


# ----------------------------------------------------------------------------- choosing a mode

def test_modes_are_options_of_the_reward_spec_and_the_video_config():
    spec = {"think_answer_format": {"weight": 0.5, "mode": "video_r1"},
            "accuracy": {"weight": 1.0, "mode": "video_r1"}}
    assert VideoConfig(rewards=spec).problems() == []
    combined = vr.build_vl_reward(spec)
    md = [{"solution": "<answer>B</answer>", "problem_type": "multiple choice"}] * 2
    out = combined([" <think>a</think><answer>b</answer>",
                    "<think>a</think><answer>B</answer><answer>C</answer>"], [None] * 2, md)
    assert {k: v.tolist() for k, v in out.items()} == {"think_answer_format": [0.0, 1.0],
                                                        "accuracy": [0.0, 1.0]}
    assert repr(vr.Accuracy(mode="tw_grpo")) == "Accuracy(choice='subset', mode='tw_grpo')"


def test_mode_errors_teach():
    with pytest.raises(ValueError, match=r"mode='videor1'; expected one of 'lenient', "
                                         r"'video_r1', 'tw_grpo'"):
        vr.Accuracy(mode="videor1")
    with pytest.raises(ValueError, match=r"ChoiceSubset: mode='video_r1' is not one of its modes "
                                         r"'lenient', 'tw_grpo'"):
        vr.ChoiceSubset(mode="video_r1")
    with pytest.raises(ValueError, match="answer_source='tag_or_text' with mode='tw_grpo'"):
        vr.Accuracy(mode="tw_grpo", answer_source="tag_or_text")
    with pytest.raises(ValueError, match="choice='subset' with mode='video_r1'"):
        vr.Accuracy(mode="video_r1", choice="subset")
    with pytest.raises(ValueError, match="decimals=3 with mode='video_r1'"):
        vr.NumberExact(decimals=3, mode="video_r1")
    with pytest.raises(TypeError, match="bad options"):
        vr.build_vl_reward({"temporal_iou": {"mode": "video_r1", "weight": 1.0, "x": 1}})


def test_reference_modes_keep_bad_labels_as_data_errors():
    md = [{"solution": "[2, 6]", "problem_type": "temporal grounding"},
          {"solution": "three", "problem_type": "numerical"},
          {"solution": "<answer>B</answer>", "problem_type": "multiple choice"}]
    out = vr.Accuracy(mode="video_r1")(["<answer>[2, 6]</answer>", "<answer>3</answer>",
                                        "<answer>B</answer>"], [None] * 3, md)
    assert math.isnan(out[0]) and math.isnan(out[1]) and out[2] == 1.0
    with pytest.raises(ValueError, match=r"metadata\[0\].*temporal grounding.*video_r1"):
        vr.Accuracy(mode="video_r1", on_bad_label="raise")(["x"], [None], md[:1])
