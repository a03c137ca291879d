"""Video scorers: the input contract, the frame-wise lift, and the rule rewards with values worked
out by hand on tiny synthetic videos."""
from __future__ import annotations

import math

import pytest
import torch

from mmrl.rewards import compose, load
from mmrl.rewards.scorers import scorer_class
from mmrl.rewards.specs import SCORERS, VIDEO_SCORERS, frames_problems
from mmrl.rewards.video import sample_frames


def dot_video(cols, rows=None, H=4, W=4):
    """One video ``[1, F, 3, H, W]``: a white pixel on black at (rows[t], cols[t]) in frame t."""
    rows = rows or [1] * len(cols)
    v = torch.zeros(1, len(cols), 3, H, W)
    for t, (i, j) in enumerate(zip(rows, cols)):
        v[0, t, :, i, j] = 1.0
    return v


def flat(levels, H=2, W=2):
    """One video whose frame t is gray ``levels[t]`` everywhere."""
    return torch.tensor(levels, dtype=torch.float32).view(1, -1, 1, 1, 1).expand(
        1, len(levels), 3, H, W).clone()


def test_media_registry_matches_the_classes():
    for name in SCORERS.names():
        assert scorer_class(name).media == ("video" if name in VIDEO_SCORERS else "image"), name
    from mmrl.rewards.specs import JUDGES, VIDEO_JUDGES
    # bradley_terry: its scorer's media; remote_judge: the served judge's (read from /health)
    for name in set(JUDGES.names()) - {"bradley_terry", "remote_judge"}:
        assert scorer_class(name).media == ("video" if name in VIDEO_JUDGES else "image"), name


def test_video_input_contract_errors():
    m = load("flicker")
    cases = [(torch.rand(2, 3, 4, 4), ValueError, "an image batch [B, C, H, W]; add the frame"),
             (torch.rand(1, 3, 5, 4, 4), ValueError, "permute it with x.permute(0, 2, 1, 3, 4)"),
             ((torch.rand(1, 3, 3, 4, 4) * 255).to(torch.uint8), TypeError, "x.float() / 255"),
             (torch.rand(1, 3, 3, 4, 4) * 2 - 1, ValueError, "(x + 1) / 2"),
             (torch.rand(0, 3, 3, 4, 4), ValueError, "at least one video (B >= 1)"),
             (torch.rand(1, 0, 3, 4, 4), ValueError, "of at least one frame"),
             ([], ValueError, "empty video list"),
             ([torch.rand(3, 3, 4, 4), torch.rand(4, 3, 4, 4)], ValueError, "different shapes"),
             (torch.rand(1, 2, 3, 4, 4), ValueError, "at least 3 (sample more frames)")]
    for x, err, needle in cases:
        with pytest.raises(err) as e:
            m(x)
        assert needle in str(e.value), str(e.value)
    a, b = torch.rand(3, 3, 4, 4), torch.rand(3, 3, 4, 4)
    assert torch.equal(m([a, b]), m(torch.stack([a, b])))  # a list of [F, 3, H, W] is a batch
    gray = torch.rand(1, 3, 1, 4, 4)
    assert torch.allclose(m(gray), m(gray.expand(-1, -1, 3, -1, -1)))  # C = 1 repeated
    with pytest.raises(ValueError, match=r"lift it to video with the frames scorer: spec "
                                         r"'frames:scorer=brightness:reduce=mean'"):
        load("brightness")(torch.rand(1, 3, 3, 4, 4), None)
    with pytest.raises(ValueError, match="lift it"):
        load("brightness")([torch.rand(3, 3, 4, 4)], None)
    with pytest.raises(ValueError, match=r"cannot compose image scorers \(brightness\) with "
                                         r"video scorers \(flicker\).*frames:scorer=brightness"):
        compose("brightness,flicker")
    assert compose("flicker,motion_direction").media == "video"


def test_frame_sampling_and_reductions():
    assert sample_frames(9, num=3) == [0, 4, 8] and sample_frames(9, num=4) == [0, 3, 5, 8]
    assert sample_frames(5, num=1) == [0] and sample_frames(5) == [0, 1, 2, 3, 4]
    assert sample_frames(5, indices=[0, -1]) == [0, 4] and sample_frames(7, every=3) == [0, 3, 6]
    for kwargs, needle in (({"num": 6}, "1 <= num <= 5"), ({"indices": [5]}, "in [-5, 4]"),
                           ({"num": 0}, "1 <= num <= 5"), ({"indices": []}, "non-empty"),
                           ({"every": 0}, "positive step"), ({"num": 2, "every": 2}, "pick one")):
        with pytest.raises(ValueError, match=re_escape(needle)):
            sample_frames(5, **kwargs)
    v = flat([0.0, 0.2, 0.4, 0.6, 1.0])  # brightness of frame t = its gray level
    assert load("frames", scorer="brightness")(v).item() == pytest.approx(0.44)
    assert load("frames", scorer="brightness", num=3, reduce="min")(v).item() == pytest.approx(0.0)
    assert load("frames", scorer="brightness", indices=[1, 3], reduce="max")(v).item() == \
        pytest.approx(0.6)
    assert load("frames", scorer="brightness", every=2)(v).item() == pytest.approx(1.4 / 3)
    assert load("frames", scorer="brightness", reduce="frame", frame=-2)(v).item() == \
        pytest.approx(0.6)
    # a named colour reached by the last frame: prompt_color on frame -1 only
    red_end = torch.zeros(2, 3, 3, 2, 2)
    red_end[:, -1, 0] = 1.0
    last = load("frames", scorer="prompt_color", reduce="frame", frame=-1)
    assert last(red_end, ["a red ball", "a blue ball"]).tolist() == pytest.approx(
        [0.0, -math.sqrt(2 / 3)])
    assert last.uses_prompts and "frame -1 of prompt_color" in last.scale


def test_the_lift_makes_one_batched_call_and_checks_its_options():
    lift = load("frames", scorer="brightness", num=2, batch_size=64)
    calls = []
    inner = lift.inner._score
    lift.inner._score = lambda x, p: (calls.append(tuple(x.shape)), inner(x, p))[1]
    lift(torch.rand(3, 5, 3, 4, 4))
    assert calls == [(6, 3, 4, 4)]  # 3 videos x 2 frames in one call
    with pytest.raises(TypeError, match="scorer 'brightness' does not take 'bogus'"):
        load("frames", scorer="brightness", bogus=1)
    assert frames_problems({"scorer": "pickscor"})[0].startswith(
        "frames: unknown scorer 'pickscor'")
    assert frames_problems({"scorer": "flicker"}) == [
        "frames: scorer='flicker' already scores videos; use it directly (frames lifts image "
        "scorers)"]
    assert frames_problems({"scorer": "brightness", "reduce": "frame"}) == [
        "frames: reduce=frame needs frame=INDEX (e.g. frame=-1 for the last); got frame=None"]
    with pytest.raises(ValueError, match="frames: frame=2 is read with reduce=frame only"):
        load("frames", scorer="brightness", frame=2)


def test_motion_direction_by_hand():
    # a white dot on black, row 1, columns 0 -> 1 -> 3 of a 4-wide frame: x goes 0 -> 1
    v = dot_video([0, 1, 3])
    m = load("motion_direction")
    assert m(v.expand(4, -1, -1, -1, -1), ["a dot moving right", "a dot moving left",
                                          "going up", "Down it goes"]).tolist() == \
        pytest.approx([1.0, -1.0, 0.0, 0.0], abs=1e-5)
    # rows 0 -> 3 (y: 0 -> 1) and columns 0 -> 2 (x: 0 -> 2/3)
    diag = dot_video([0, 2], rows=[0, 3])
    assert m(diag, ["down"]).item() == pytest.approx(1.0, abs=1e-5)
    assert m(diag, ["right"]).item() == pytest.approx(2 / 3, abs=1e-5)
    assert load("motion_direction", target=0.5)(diag, ["right"]).item() == pytest.approx(
        -(2 / 3 - 0.5), abs=1e-5)
    dark = 1.0 - v  # a black dot on white: the dark mass moves right
    assert load("motion_direction", polarity="dark")(dark, ["right"]).item() == \
        pytest.approx(1.0, abs=1e-5)
    assert load("motion_direction", direction="left")(v, None).item() == pytest.approx(-1.0,
                                                                                       abs=1e-5)
    assert m(flat([0.3, 0.3, 0.3]), ["left"]).item() == pytest.approx(0.0, abs=1e-6)  # still
    with pytest.raises(ValueError, match="1 prompt\\(s\\) name no direction, e.g. 'a dot'"):
        m(v, ["a dot"])
    assert load("motion_direction", missing=-1.0)(v.expand(2, -1, -1, -1, -1),
                                                  ["a dot", "upwards"]).tolist() == [-1.0, -1.0]
    x = v.clone().requires_grad_(True)  # differentiable
    load("motion_direction", grad=True)(x, ["right"]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_flicker_and_brightness_trend_by_hand():
    f = load("flicker")
    # mean luma 0, 1, 0, 1: second differences -2, 2 -> mean |.| = 2 -> -2 / 2 = -1
    assert f(flat([0.0, 1.0, 0.0, 1.0])).item() == pytest.approx(-1.0)
    assert f(flat([0.0, 0.25, 0.5, 0.75])).item() == pytest.approx(0.0)  # a steady fade
    # 0, 0.5, 0.2: |0.2 - 1.0 + 0| / 2 = 0.4
    assert f(flat([0.0, 0.5, 0.2])).item() == pytest.approx(-0.4)
    checker = torch.zeros(1, 3, 3, 2, 2)  # a checkerboard inverting every frame: mean 0.5
    checker[0, 0, :, 0, 0] = checker[0, 0, :, 1, 1] = 1.0
    checker[0, 1, :, 0, 1] = checker[0, 1, :, 1, 0] = 1.0
    checker[0, 2] = checker[0, 0]
    assert f(checker).item() == pytest.approx(0.0)
    assert load("flicker", level="pixel")(checker).item() == pytest.approx(-1.0)
    b = load("brightness_trend")
    up = flat([0.2, 0.5, 0.8])
    assert b(up.expand(3, -1, -1, -1, -1), ["a room getting brighter", "a fading light",
                                            "the sky DARKENING"]).tolist() == pytest.approx(
        [0.6, -0.6, -0.6])
    assert load("brightness_trend", trend="down")(up).item() == pytest.approx(-0.6)
    assert load("brightness_trend", target=0.5)(up, ["brighter"]).item() == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="trend='sideways'; expected one of up, down"):
        load("brightness_trend", trend="sideways")


def re_escape(text):
    import re
    return re.escape(text)
