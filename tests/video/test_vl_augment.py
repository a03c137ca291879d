"""QA inversion consistency, frame perturbations, difficulty-aware variants, T-GRPO bonus."""
import random

import numpy as np
import pytest
import torch

from mmrl.video import vl_rewards as vr
from mmrl.video.augment import (DifficultyAugmenter, add_frame_noise, drop_frames, easier_hint,
                                harder_frames, invert_choices, invert_record, negate_question,
                                qa_inversion, shuffle_frames, temporal_contrast_bonus)
from mmrl.video.data import parse_record

STAR = {"problem": "What did the person do with the clothes?",
        "options": ["A. Lied on", "B. Took", "C. Put down", "D. Washed"],
        "solution": "<answer>C</answer>", "problem_type": "multiple choice"}


def record(**changes):
    return parse_record({**STAR, **changes}, "t.jsonl:1", ".", check_media=False)


# ----------------------------------------------------------------------------- negation

@pytest.mark.parametrize("question, want", [
    ("What did the person do with the clothes?", "What didn't the person do with the clothes?"),
    ("Which object was taken by the person?", "Which object wasn't taken by the person?"),
    ("Who is holding the cup?", "Who isn't holding the cup?"),
    ("What will the man do next?", "What won't the man do next?"),
    ("Is the man running?", "Select every option that does NOT correctly answer this question: "
                            "Is the man running?"),
    ("How many balls are there?", "Select every option that does NOT correctly answer this "
                                  "question: How many balls are there?"),
    ("What didn't he take?", "Select every option that does NOT correctly answer this question: "
                             "What didn't he take?"),
])
def test_negate_question(question, want):
    assert negate_question(question) == want


# ----------------------------------------------------------------------------- QA inversion

def test_invert_choices_hand_example():
    # STAR tutorial: "What didn't the person do…": Lied on, Took, Washed are now correct
    options, answer, order = invert_choices(STAR["options"], ["C"], rng=0, keep=3)
    texts = {o.split(". ", 1)[1] for o in options}
    assert texts == {"Lied on", "Took", "Put down", "Washed"}
    right = {options[ord(a) - 65].split(". ", 1)[1] for a in answer}
    assert right == {"Lied on", "Took", "Washed"}
    assert [o[:3] for o in options] == ["A. ", "B. ", "C. ", "D. "]
    assert [STAR["options"][i][3:] for i in order] == [o[3:] for o in options]
    # keep=None: the number of kept wrong options is uniform in [1, 3], so all three occur
    kept = {len(invert_choices(STAR["options"], ["C"], rng=seed)[1]) for seed in range(40)}
    assert kept == {1, 2, 3}


def test_qa_inversion_keeps_the_answer_set_consistent_over_many_seeds():
    rng = random.Random(7)
    for seed in range(1500):
        n = rng.randint(2, 7)
        texts = [f"opt{k}" for k in range(n)]
        correct = set(rng.sample(range(n), rng.randint(1, n - 1)))
        rec = record(options=[f"{chr(65 + k)}. {t}" for k, t in enumerate(texts)],
                     solution="<answer>" + ",".join(chr(65 + k) for k in sorted(correct)) +
                              "</answer>")
        inv = invert_record(rec, seed)
        new_texts = [o.split(". ", 1)[1] for o in inv.options]
        new_correct = vr.parse_choice_letters(vr.solution_text(inv.solution), inv.options)
        right_texts = {new_texts[ord(a) - 65] for a in new_correct}
        wrong_texts = set(new_texts) - right_texts
        assert [o[0] for o in inv.options] == [chr(65 + k) for k in range(len(inv.options))]
        assert len(set(new_texts)) == len(new_texts)                      # no duplicates
        assert wrong_texts == {texts[k] for k in correct}                 # old answers: distractors
        assert right_texts and right_texts <= {texts[k] for k in set(range(n)) - correct}
        assert inv.extra["qa_inverted"] and inv.problem_type == "multiple choice"
        # the reward agrees: the new set scores 1, any old answer scores 0
        md = [inv.metadata()] * 2
        got = vr.ChoiceExact()([inv.solution, f"<answer>{sorted(wrong_texts)[0]}</answer>"],
                               [None] * 2, md)
        assert got.tolist() == [1.0, 0.0]


def test_duplicate_option_texts_are_tracked_by_position():
    rec = record(options=["A. 3", "B. 3", "C. 5"], solution="A")
    for seed in range(50):
        inv = invert_record(rec, seed)
        assert sorted(o[3:] for o in inv.options).count("3") >= 1
        right = vr.parse_choice_letters(vr.solution_text(inv.solution))
        assert all(inv.options[ord(a) - 65][3:] in ("3", "5") for a in right)
        assert len(inv.options) == len(right) + 1


def test_inversion_errors():
    with pytest.raises(ValueError, match="needs a multiple-choice record"):
        invert_record(parse_record({"problem": "q", "solution": "3", "problem_type": "numerical"}))
    with pytest.raises(ValueError, match="non-empty proper subset"):
        invert_record(record(options=["A. x", "B. y"], solution="A,B"))
    with pytest.raises(ValueError, match=r"keep=4; expected 1..3"):
        invert_choices(STAR["options"], ["C"], 0, keep=4)


def test_qa_inversion_dataset_modes_and_determinism():
    recs = [record(), record(problem="What is the man holding?"),
            parse_record({"problem": "q", "solution": "3", "problem_type": "numerical"})]
    assert qa_inversion(recs, prob=0.0) == recs
    every = qa_inversion(recs, prob=1.0, seed=3)
    assert [r.extra.get("qa_inverted", False) for r in every] == [True, True, False]
    assert every == qa_inversion(recs, prob=1.0, seed=3)
    assert every != qa_inversion(recs, prob=1.0, seed=4)
    appended = qa_inversion(recs, prob=1.0, seed=3, mode="append")
    assert len(appended) == 5 and appended[0] is recs[0] and appended[1] == every[0]
    with pytest.raises(ValueError, match="mode='both'"):
        qa_inversion(recs, mode="both")


# ----------------------------------------------------------------------------- frames

def clip(t=10, value=None):
    frames = np.zeros((t, 6, 8, 3), np.uint8)
    frames[:] = np.arange(t, dtype=np.uint8)[:, None, None, None] * 20 if value is None else value
    return frames


def test_frame_noise_statistics_clipping_and_determinism():
    gray = clip(20, value=128)
    noisy = add_frame_noise(gray, std=25.0, rng=0)
    assert noisy.dtype == np.uint8 and noisy.shape == gray.shape
    assert abs(float(noisy.astype(float).std()) - 25.0) < 1.0
    assert abs(float(noisy.astype(float).mean()) - 128.0) < 1.0
    assert np.array_equal(noisy, add_frame_noise(gray, 25.0, rng=0))
    assert not np.array_equal(noisy, add_frame_noise(gray, 25.0, rng=1))
    assert add_frame_noise(clip(2, value=255), 50.0, rng=0).max() == 255
    assert np.array_equal(add_frame_noise(gray, 0.0, rng=0), gray)
    # rounded, not truncated: zero-mean noise keeps the mean (truncation would lower it by 0.5)
    big = np.full((50, 64, 64, 3), 128, np.uint8)
    assert abs(float(add_frame_noise(big, 25.0, rng=0).astype(float).mean()) - 128.0) < 0.15


def test_drop_and_shuffle_frames():
    frames = clip(10)
    out, kept = drop_frames(frames, 0.25, rng=0)
    assert len(kept) == 8 and kept == sorted(kept) and np.array_equal(out, frames[kept])
    half, kept_half = drop_frames(frames, 0.5, rng=0)
    assert len(kept_half) == 4 and np.array_equal(half, frames[kept_half])  # 5 -> even count 4
    few, kept_few = drop_frames(clip(3), 0.9, rng=0)
    assert len(kept_few) == 2 and np.array_equal(few, clip(3)[kept_few])   # at least min_frames
    shuffled, order = shuffle_frames(frames, rng=0)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert np.array_equal(shuffled, frames[order])
    for seed in range(30):  # never the identity, even for two frames
        assert shuffle_frames(clip(2), rng=seed)[1] == [1, 0]


def test_torch_frames_come_back_as_torch_and_bad_frames_are_rejected():
    frames = torch.from_numpy(clip(6))
    out, index = harder_frames(frames, rng=5, noise_std=0.0, drop_ratio=0.34, shuffle=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8
    assert torch.equal(out, frames[index]) and len(index) == 4 and index != sorted(index)
    with pytest.raises(ValueError, match=r"expected uint8 \[T, H, W, 3\]"):
        add_frame_noise(np.zeros((4, 6, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected uint8 \[T, H, W, 3\]"):
        drop_frames(np.zeros((6, 8, 3), np.uint8))


def test_harder_frames_are_deterministic_under_a_seed():
    a = harder_frames(clip(12), rng=11, shuffle=True)
    b = harder_frames(clip(12), rng=11, shuffle=True)
    c = harder_frames(clip(12), rng=12, shuffle=True)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert a[1] != c[1] or not np.array_equal(a[0], c[0])


# ----------------------------------------------------------------------------- hints

def test_easier_hints_per_type_never_give_the_answer_away():
    for seed in range(40):
        hint = easier_hint(record(), seed)
        assert hint.startswith("option ") and "C" not in hint.split(" ")[1]
        two = easier_hint(record(), seed, eliminate=5)
        assert two.startswith("options ") and "C" not in two      # one wrong option stays
    assert easier_hint(record(options=["A. x", "B. y"], solution="A"), 0) is None
    for seed in range(40):
        num = parse_record({"problem": "q", "solution": "<answer>12</answer>",
                            "problem_type": "numerical"})
        low, high = [float(x) for x in easier_hint(num, seed)[:-1].split()[-3::2]]
        assert low < 12 < high and high - low == pytest.approx(12, rel=1e-3)
    text = parse_record({"problem": "q", "solution": "the quick fox", "problem_type": "OCR"})
    assert easier_hint(text, 0) == 'the answer begins with "the".'
    span = parse_record({"problem": "q", "solution": [4, 8], "problem_type": "temporal grounding"})
    assert easier_hint(span, 0) == "the segment lies between 2 s and 10 s."
    own = record()
    own.extra["hint"] = "look at the hands"
    assert easier_hint(own, 0) == "look at the hands"


# ----------------------------------------------------------------------------- difficulty

def test_difficulty_decisions_and_moving_reference():
    aug = DifficultyAugmenter(momentum=0.9)
    rewards = torch.tensor([1., 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0])
    ids = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    assert aug.decide(rewards, ids) == {0: "harder", 1: "easier", 2: "keep"}
    assert aug.reference == pytest.approx(0.5)       # first batch: its own mean
    assert aug.decide(torch.ones(4), torch.zeros(4, dtype=torch.long)) == {0: "harder"}
    assert aug.reference == pytest.approx(0.9 * 0.5 + 0.1 * 1.0)
    # rewards on another scale (format + accuracy in [0, 2]) use the same rule
    scaled = DifficultyAugmenter(reference=1.2)
    assert scaled.decide(torch.tensor([1.5, 1.5, 0.5, 0.5]), torch.tensor([3, 3, 9, 9])) == {
        3: "harder", 9: "easier"}
    with pytest.raises(ValueError, match="same length"):
        aug.decide(torch.ones(3), torch.zeros(4))


def test_difficulty_variants():
    aug = DifficultyAugmenter(drop_ratio=0.5, noise_std=10.0)
    video = record(data_type="video", path="v.mp4")
    easy = aug.variant(video, "easier", rng=0)
    assert easy.kind == "easier" and easy.hint.startswith("option ") and easy.media is None
    frames = clip(8) + 50                    # frame t is all 50 + 20 t: noise never clips
    hard = aug.variant(video, "harder", rng=0, frames=frames)
    idx = hard.frame_index
    assert hard.kind == "harder" and hard.media.shape == (4, 6, 8, 3)
    assert len(set(idx)) == 4 and idx == sorted(idx) and set(idx) <= set(range(8))
    # out[j] is frames[idx[j]] plus N(0, 10) noise: per-frame means within 3 (3.6 sigma of a
    # 144-pixel mean) of the source frame's value, residual std ~10
    residual = hard.media.astype(float) - frames[idx].astype(float)
    assert np.abs(residual.reshape(4, -1).mean(1)).max() < 3
    assert abs(residual.std() - 10.0) < 1.5
    assert np.array_equal(hard.media, aug.variant(video, "harder", rng=0, frames=frames).media)
    image = record(data_type="image", path="x.png")
    still = clip(1, value=100)[0]
    noisy = aug.variant(image, "harder", 0, frames=still).media
    assert noisy.shape == still.shape and abs(float(noisy.astype(float).mean()) - 100) < 3
    assert abs(float((noisy.astype(float) - 100).std()) - 10.0) < 2
    assert aug.variant(record(), "harder", 0).kind == "keep"     # text only: nothing to perturb
    with pytest.raises(ValueError, match="needs the decoded frames"):
        aug.variant(video, "harder", 0)
    with pytest.raises(ValueError, match="kind='hard'"):
        aug.variant(record(), "hard", 0)


# ----------------------------------------------------------------------------- T-GRPO

def test_temporal_contrast_bonus_hand_example():
    acc = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.05, 1.0, 1.0])
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    # shuffled: group 0 p~ = 1 (0.5 < 0.8: no bonus), group 1 p~ = 0, group 2 p~ = 0.3
    # (0.275 >= 0.24: bonus for acc > 0.1 only), group 3 is an image (no shuffled rollouts)
    s_acc = torch.tensor([1.0, 1.0, 0.0, 0.3])
    s_ids = torch.tensor([0, 0, 1, 2])
    bonus, applied = temporal_contrast_bonus(acc, ids, s_acc, s_ids)
    assert applied == {0: False, 1: True, 2: True, 3: False}
    assert bonus.tolist() == pytest.approx([0, 0, 0.3, 0, 0.3, 0, 0, 0])
    bonus, _ = temporal_contrast_bonus(acc, ids, s_acc, s_ids, alpha=0.5, mu=0.4)
    assert bonus.tolist() == pytest.approx([0.5, 0, 0.5, 0, 0.5, 0, 0, 0])
    with pytest.raises(ValueError, match="equal"):
        temporal_contrast_bonus(acc, ids[:3], s_acc, s_ids)
