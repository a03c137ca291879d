"""slow_fast_plan on synthetic videos: slow frames on cuts, static = one slow frame, budgets."""
import math

import cv2
import numpy as np
import pytest
import torch

from mmrl.video import SLOW, FAST, choose_resolutions, read_video, slow_fast_plan, smart_resize
from mmrl.video.slow_fast import hsv_frames, patch_similarity


def test_slow_frames_land_on_the_cuts(make_video, synth):
    clip = read_video(make_video(synth.scene_cuts([6, 5, 7], 224, 320), fps=2.0))
    plan = slow_fast_plan(clip.frames, timestamps=clip.timestamps)
    slow = (plan.frame_types == SLOW).nonzero().flatten().tolist()
    assert slow == [0, 6, 11]
    assert plan.similarity[[6, 11]].max() < 0.5                   # a new layout: most patches differ
    assert plan.similarity[plan.frame_types == FAST].min() > 0.95  # compression noise is similar
    np.testing.assert_allclose(plan.timestamps, np.arange(18) / 2.0, atol=1e-6)
    assert plan.runs() == [(0, 0, 1), (1, 1, 6), (0, 6, 7), (1, 7, 11), (0, 11, 12), (1, 12, 18)]


def test_static_video_is_one_slow_frame_then_fast(make_video, synth):
    clip = read_video(make_video(synth.scene_cuts([40], 224, 320), fps=10.0))  # 4 s -> 8 frames
    plan = slow_fast_plan(clip.frames, timestamps=clip.timestamps, max_tokens=128)
    assert plan.frame_types.tolist() == [SLOW] + [FAST] * 7
    # 224x320 rounds to 8 x 11 = 88 tokens (under 128, never upscaled); fast gets
    # max(floor(0.3·88), 48) = 48 tokens -> smart_resize to 140x224 = 5 x 8 = 40 tokens
    assert plan.slow_hw == (224, 308) and plan.slow_tokens == 88
    assert plan.fast_hw == (140, 224) and plan.fast_tokens == 40
    assert plan.total_tokens == 88 + 7 * 40
    np.testing.assert_allclose(plan.timestamps, clip.timestamps)


def test_slow_pan_similarity_decays_until_a_new_slow_frame(synth):
    frames = synth.slow_pan(16, 224, 320, px_per_frame=3)
    plan = slow_fast_plan(frames, threshold=0.9)
    kinds, sims = plan.frame_types.tolist(), plan.similarity.tolist()
    assert 2 <= plan.num_slow <= 12                       # neither static nor all cuts
    for i in range(1, 16):                                # within a fast stretch the drift grows
        if kinds[i] == FAST and kinds[i - 1] == FAST:
            assert sims[i] <= sims[i - 1] + 1e-6
        assert (sims[i] < 0.9) == (kinds[i] == SLOW)


def test_noise_reads_as_similar(synth):
    # cosine of non-negative HSV vectors of independent noise stays above 0.7: the test sees
    # structure (layouts, edges), not pixel noise, so a noise video is one slow frame
    plan = slow_fast_plan(synth.noise(6, 112, 168))
    assert plan.num_slow == 1 and plan.similarity[1:].min() > 0.9


def test_float_tchw_input_equals_uint8_thwc(synth):
    frames = synth.scene_cuts([3, 3], 112, 168)
    a = slow_fast_plan(frames)
    b = slow_fast_plan(torch.from_numpy(frames).permute(0, 3, 1, 2).float())  # qwen-vl-utils layout
    assert torch.equal(a.frame_types, b.frame_types) and torch.equal(a.similarity, b.similarity)
    assert (a.slow_hw, a.fast_hw, a.total_tokens) == (b.slow_hw, b.fast_hw, b.total_tokens)


def test_patch_similarity_hand_worked():
    # four 28x28 patches of raw HSV values (grey pixels: H = S = 0, V = the grey level)
    a = np.zeros((28, 112, 3), np.uint8)
    b = np.zeros((28, 112, 3), np.uint8)
    a[:, :28, 2], b[:, :28, 2] = 10, 20          # same direction: cos 1 -> similar
    a[:14, 28:56, 2], b[14:, 28:56, 2] = 50, 50  # disjoint pixels: cos 0 -> different
    #                                              patch 3 black in both: left out
    a[0, 84:86, 2], b[0, 85:87, 2] = 100, 100    # one pixel shared of two: cos 0.5 < 0.7 -> different
    assert patch_similarity(a, b) == pytest.approx(1 / 3)
    assert patch_similarity(a[:, 56:84], b[:, 56:84]) == 1.0  # nothing left to compare
    # V = 1 in one pixel is not "dark": keye-vl-utils leaves out only all-zero patches (raw 0-255
    # norm < 0.01); on [0, 1]-scaled HSV a 0.01 threshold would drop it and report 1.0
    c = np.zeros((28, 28, 3), np.uint8)
    c[5, 5, 2] = 1
    assert patch_similarity(np.zeros_like(c), c) == 0.0


def test_hsv_frames_are_opencv_hsv_of_the_resized_frames():
    rgb = np.zeros((1, 56, 56, 3), np.uint8)
    rgb[0, :28, :28] = (255, 0, 0)   # red  -> H 0,   S 255, V 255
    rgb[0, :28, 28:] = (0, 0, 255)   # blue -> H 120, S 255, V 255
    hsv = hsv_frames(torch.from_numpy(rgb), (56, 56))
    assert hsv.dtype == np.uint8 and hsv.shape == (1, 56, 56, 3)
    assert hsv[0, 0, 0].tolist() == [0, 255, 255] and hsv[0, 0, 28].tolist() == [120, 255, 255]
    assert hsv[0, 28:].max() == 0    # black stays black
    np.testing.assert_array_equal(hsv[0], cv2.cvtColor(rgb[0], cv2.COLOR_RGB2HSV))
    # float input: resized in float, then truncated (not rounded) to uint8, as keye-vl-utils does
    grey = torch.full((1, 3, 56, 56), 100.75)
    assert hsv_frames(grey, (28, 28))[0, :, :, 2].tolist() == [[100] * 28] * 28


@pytest.mark.parametrize("budget", [1100, 2500, 65536])
@pytest.mark.parametrize("kind", ["cuts", "pan", "noise"])
def test_budget_never_exceeded_and_sizes_are_multiples(kind, budget, synth):
    frames = {"cuts": synth.scene_cuts([5, 9, 6], 336, 448),
              "pan": synth.slow_pan(20, 336, 448, px_per_frame=6),
              "noise": synth.noise(20, 336, 448)}[kind]
    plan = slow_fast_plan(frames, token_budget=budget)
    f = plan.factor
    for h, w in (plan.slow_hw, plan.fast_hw):
        assert h % f == 0 and w % f == 0
    assert plan.slow_tokens == (plan.slow_hw[0] // f) * (plan.slow_hw[1] // f)
    assert plan.total_tokens == int(plan.tokens_per_frame.sum()) <= budget
    assert plan.fast_tokens <= plan.slow_tokens <= 768
    # brute force: the most slow-frame tokens any T in [48, 768] achieves within the budget
    best = 0
    for t in range(48, 769):
        sh = smart_resize(336, 448, 28, 48 * 784, t * 784)
        st = (sh[0] // 28) * (sh[1] // 28)
        fh = smart_resize(336, 448, 28, 48 * 784, max(int(0.3 * st), 48) * 784)
        if plan.num_slow * st + plan.num_fast * (fh[0] // 28) * (fh[1] // 28) <= budget:
            best = max(best, st)
    assert plan.slow_tokens == best
    if budget == 1100:  # too tight for native 12 x 16 = 192-token frames
        assert plan.slow_tokens < 192


def test_choose_resolutions_takes_the_largest_that_fits():
    # 1080p, 2 slow + 98 fast frames, budget 8000: scan T down from 768; the first T whose real
    # sizes fit is the answer, and T + 1 would not fit
    slow, fast, st, ft, total = choose_resolutions(1080, 1920, 2, 98, token_budget=8000)
    assert total <= 8000 and total == 2 * st + 98 * ft
    assert ft == max(math.floor(0.3 * st), 48) or ft <= max(math.floor(0.3 * st), 48)
    bigger = choose_resolutions(1080, 1920, 2, 98, token_budget=100000)
    # slow 20x36 = 720 tokens; fast: smart_resize to ≤ floor(0.3·720) = 216 tokens -> 11x19 = 209
    assert bigger[:4] == ((560, 1008), (308, 532), 720, 209)
    with pytest.raises(ValueError, match="need at least .* over token_budget=100; raise"):
        choose_resolutions(1080, 1920, 2, 98, token_budget=100)


def test_bad_arguments_are_reported_together():
    frames = np.zeros((2, 56, 56, 3), np.uint8)
    with pytest.raises(ValueError) as info:
        slow_fast_plan(frames, threshold=1.5, fast_ratio=0.0)
    assert "threshold must be in [0, 1]" in str(info.value) and "fast_ratio" in str(info.value)
    with pytest.raises(ValueError, match="neither uint8"):
        slow_fast_plan(np.zeros((2, 3, 56, 56), np.uint8))
    with pytest.raises(ValueError, match="timestamps has 3 entries for 2 frames"):
        slow_fast_plan(frames, timestamps=[0, 1, 2])
