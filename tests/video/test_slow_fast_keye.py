"""slow_fast_plan's frame types equal keye-vl-utils 1.5.2's ``extract_slow_fast_frames`` (the
reference package itself, from .peers/) on the same frames, including adversarial videos and exact
ties at both thresholds (patch cosine 0.7, frame similarity 0.9)."""
import numpy as np
import pytest
import torch

from mmrl.video import SLOW, FAST, slow_fast_plan
from mmrl.video import slow_fast as sf
from tests.peers import import_peer


@pytest.fixture(scope="module")
def keye():
    return import_peer("keye_vl_utils.vision_process")


def keye_types(keye, frames, threshold=0.9):
    """The reference's labels for mmrl's input: uint8 [T, H, W, 3] goes in as the [T, 3, H, W]
    view decord's frames get in ``_read_video_decord``; float [T, 3, H, W] goes in as is."""
    x = torch.as_tensor(frames)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2)
    return keye.extract_slow_fast_frames(x, threshold).long().tolist()


def dark_with_moving_objects(n, h, w, seed):
    """A night scene: a static lit window (left 40 %), black elsewhere with sparse grey specks of
    level 1 that come and go (a patch holding one has raw HSV norm about 1, under 0.01 on
    [0, 1]-scaled HSV, so mmrl used to drop it as "dark" where keye-vl-utils counts it), and a
    saturated square moving 5 px a frame."""
    r = np.random.default_rng(seed)
    out = np.zeros((n, h, w, 3), np.uint8)
    window = (np.linspace(60, 250, h)[:, None, None] * np.array([1.0, 0.8, 0.3])).astype(np.uint8)
    for t in range(n):
        out[t][r.random((h, w)) < 0.0008] = 1
        out[t, :, : 2 * w // 5] = window
        y, x = (10 + 5 * t) % (h - 30), (2 * w // 5 + 10 + 5 * t) % (w - 30)
        out[t, y:y + 24, x:x + 24] = (255, 40, 200)
    return out


def black_with_sparse_dim_pixels(n, h, w, seed):
    """Mostly exact black; a few pixels of value 1-3 that come and go, and one bright bar."""
    r = np.random.default_rng(seed)
    out = np.zeros((n, h, w, 3), np.uint8)
    for t in range(n):
        mask = r.random((h, w)) < 0.02
        out[t][mask] = r.integers(1, 4, (int(mask.sum()), 3), dtype=np.uint8)
        out[t, :, (7 * t) % (w - 10):(7 * t) % (w - 10) + 10] = 250
    return out


def grainy(frame, n, seed):
    """``n`` copies of ``frame`` with independent grain in [-12, 12] (a static camera shot)."""
    grain = np.random.default_rng(seed).integers(-12, 13, (n, *frame.shape))
    return np.clip(frame[None].astype(int) + grain, 0, 255).astype(np.uint8)


def video(kind, synth, seed=0):
    h, w = (90, 160) if seed % 2 else (224, 320)   # 90x160 is upscaled to 48 tokens, 224x320 not
    return {"dark_moving": lambda: dark_with_moving_objects(12, h, w, seed),
            "dim_pixels": lambda: black_with_sparse_dim_pixels(12, h, w, seed),
            "static": lambda: np.repeat(synth.texture(h, w, 30, seed)[None], 8, axis=0),
            "static_grain": lambda: grainy(synth.texture(h, w, 90, seed), 10, seed),
            "noise": lambda: synth.noise(8, h, w, seed=seed),
            "cuts_and_pan": lambda: np.concatenate([synth.scene_cuts([3, 2], h, w, seed=seed),
                                                    synth.slow_pan(8, h, w, 9, seed=seed)]),
            }[kind]()


KINDS = ["dark_moving", "dim_pixels", "static", "static_grain", "noise", "cuts_and_pan"]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_uint8_frames_get_the_reference_labels(kind, seed, keye, synth):
    frames = video(kind, synth, seed)
    assert slow_fast_plan(frames).frame_types.tolist() == keye_types(keye, frames)


@pytest.mark.parametrize("kind", ["dark_moving", "dim_pixels", "static_grain", "cuts_and_pan"])
def test_float_frames_get_the_reference_labels(kind, keye, synth):
    # qwen-vl-utils' layout with fractional values: the reference resizes in float and truncates,
    # which is not the same as rounding to uint8 first
    frames = torch.from_numpy(video(kind, synth, 1)).permute(0, 3, 1, 2).float()
    frames = (frames + torch.rand(frames.shape, generator=torch.Generator().manual_seed(0))
              * 0.99).clamp(max=255)
    assert slow_fast_plan(frames).frame_types.tolist() == keye_types(keye, frames)


def grey_frames(n, levels_per_patch, hp=8, wp=10):
    """uint8 [n, 28hp, 28wp, 3] grey frames (HSV = (0, 0, grey)); ``levels_per_patch(t, i)`` gives
    the grey levels of the first pixels of patch i in frame t (the rest of the patch black)."""
    out = np.zeros((n, hp * 28, wp * 28, 3), np.uint8)
    for t in range(n):
        for i in range(hp * wp):
            levels = levels_per_patch(t, i)
            y, x = 28 * (i // wp), 28 * (i % wp)
            out[t, y, x:x + len(levels)] = np.asarray(levels, np.uint8)[:, None]
    return out


def test_similarity_exactly_at_the_threshold_is_slow_when_float32_rounds_below(keye):
    # 80 patches; frame t blacks out t·4 more patches (cosine 0 against grey: different). The
    # similarity k/80 is compared as float32, as keye-vl-utils' mean() returns it: 72/80 = 0.9 is
    # float32 0.89999998 < 0.9 -> slow; 60/80 = 0.75 is exact -> not below 0.75 -> fast
    frames = grey_frames(6, lambda t, i: [] if i < 4 * t else [128] * 28)
    plan = slow_fast_plan(frames, threshold=0.9)
    assert plan.similarity[1:3].tolist() == [np.float32(76 / 80), np.float32(72 / 80)]
    assert plan.frame_types.tolist() == [SLOW, FAST, SLOW, FAST, SLOW, FAST]
    assert plan.frame_types.tolist() == keye_types(keye, frames, 0.9)
    frames = grey_frames(2, lambda t, i: [] if t and i < 20 else [128] * 28)
    for threshold, kind in [(0.75, FAST), (np.nextafter(0.75, 1.0), SLOW)]:
        plan = slow_fast_plan(frames, threshold=threshold)
        assert plan.similarity[1] == 0.75 and plan.frame_types.tolist() == [SLOW, kind]
        assert plan.frame_types.tolist() == keye_types(keye, frames, threshold)


@pytest.fixture
def keye_step_calls(monkeypatch):
    """Row counts of every call to the reference-float32 step (_keye_patch_similar)."""
    calls, real = [], sf._keye_patch_similar

    def spy(a, b, rows, patch, patch_cos):
        calls.append(len(rows))
        return real(a, b, rows, patch, patch_cos)

    monkeypatch.setattr(sf, "_keye_patch_similar", spy)
    return calls


def test_patch_cosine_tie_follows_the_reference_float32_not_exact_maths(keye, keye_step_calls):
    # patch a = grey (142, 254), patch b = grey (121, 134, 175): exact cosine
    # 31912 / sqrt(84680 · 63162) = 0.70000006 > 0.7, but keye-vl-utils' float32 steps give
    # 0.69999999 (not > 0.7): not similar. mmrl decides such near-ties with those same steps.
    a, b = [142, 254], [121, 134, 175]
    dot, na2, nb2 = 142 * 121 + 254 * 134, 142 ** 2 + 254 ** 2, 121 ** 2 + 134 ** 2 + 175 ** 2
    assert 100 * dot ** 2 > 49 * na2 * nb2                      # exactly: cosine > 0.7
    frames = grey_frames(3, lambda t, i: b if (t == 1 or (t == 2 and i == 0)) else a)
    plan = slow_fast_plan(frames)
    # frame 1: all 80 patches tie -> similarity 0 -> slow; frame 2 vs frame 1: patch 0 equal,
    # 79 ties -> 1/80 -> slow
    assert plan.similarity.tolist() == [1.0, 0.0, np.float32(1 / 80)]
    assert plan.frame_types.tolist() == [SLOW, SLOW, SLOW] == keye_types(keye, frames)
    assert keye_step_calls == [80, 79]          # exactly the tied patches took the float32 steps
    assert sf._cos_margin(28) == pytest.approx(4 * 2352 * 2 ** -24)   # 5.6e-4


def test_patches_far_from_the_tie_never_take_the_float32_steps(keye_step_calls, synth):
    # on grainy static footage every cosine is more than the proven margin from 0.7: all exact
    plan = slow_fast_plan(video("static_grain", synth, 0))
    assert keye_step_calls == [] and plan.num_slow == 1


def test_gathered_reference_rows_equal_the_whole_frame_computation(synth):
    # _keye_patch_similar on a subset of patches gives each patch the verdict the reference's
    # whole-frame [h, w, D] tensors give it (torch's per-row reductions do not see other rows)
    hsv = sf.hsv_frames(video("static_grain", synth, 0)[:2], (224, 308))
    a, b = hsv[0], hsv[1]

    def whole(x):   # the reference's layout: [3, h, w] -> [h/28, w/28, 3·28·28], channel-major
        t = torch.from_numpy(x).permute(2, 0, 1).float()
        return t.reshape(3, 8, 28, 11, 28).permute(1, 3, 0, 2, 4).reshape(8, 11, -1)

    pa, pb = whole(a), whole(b)
    cos = ((pa / (torch.norm(pa, p=2, dim=-1, keepdim=True) + 1e-8))
           * (pb / (torch.norm(pb, p=2, dim=-1, keepdim=True) + 1e-8))).sum(-1).flatten()
    for rows in (np.arange(88), np.array([5]), np.array([3, 40, 87])):
        np.testing.assert_array_equal(sf._keye_patch_similar(a, b, rows, 28, 0.7),
                                      (cos[rows] > 0.7).numpy())


def test_frame_similarity_is_the_float32_mean_the_reference_compares():
    # k similar of n kept patches -> float32(k / n), which is what torch's mean() of the 0/1
    # float32 verdicts returns for every n up to 256 (the test never has more patches)
    for n in range(1, 257):
        k = np.arange(n + 1)
        means = torch.stack([(torch.arange(n) < kk).float().mean() for kk in k]).numpy()
        np.testing.assert_array_equal(means, k.astype(np.float32) / np.float32(n))


def test_long_video_across_resize_chunks_gets_the_reference_labels(keye, synth):
    # 40 frames: the plan resizes 16 at a time, the reference all at once
    frames = np.concatenate([video("static_grain", synth, 1), video("dark_moving", synth, 1),
                             video("cuts_and_pan", synth, 1), video("noise", synth, 1)[:5]])
    assert len(frames) > 32
    assert slow_fast_plan(frames).frame_types.tolist() == keye_types(keye, frames)


def test_test_frame_size_is_the_references(keye):
    from mmrl.video import smart_resize
    for h, w in [(90, 160), (224, 320), (360, 640), (720, 1280), (1080, 1920), (480, 270),
                 (57, 1000), (2000, 30), (333, 333)]:
        assert smart_resize(h, w, 28, 48 * 784, 256 * 784) == keye.smart_resize(
            h, w, 28, keye.VIDEO_MIN_PIXELS, 256 * 784)
