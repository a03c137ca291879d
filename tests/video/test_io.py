"""read_video: qwen-vl-utils sampling on synthetic mp4s, and one clear error per kind of bad input."""
import av
import numpy as np
import pytest
import torch
from PIL import Image

from mmrl.video import SkipCounter, VideoError, read_video, smart_nframes, smart_resize, try_load_video


def test_sampling_matches_qwen_vl_utils_rule(make_video, synth):
    # 40 frames at 10 fps = 4 s -> 2 fps gives 8 frames at linspace(0, 39, 8).round()
    frames = synth.scene_cuts([20, 20], 64, 96)
    clip = read_video(make_video(frames, fps=10))
    idx = torch.linspace(0, 39, 8).round().long().tolist()
    assert clip.frame_indices == idx == [0, 6, 11, 17, 22, 28, 33, 39]
    assert clip.frames.dtype == torch.uint8 and tuple(clip.frames.shape) == (8, 64, 96, 3)
    np.testing.assert_allclose(clip.timestamps, np.array(idx) / 10.0, atol=1e-6)
    assert clip.fps == pytest.approx(10.0) and clip.sample_fps == pytest.approx(2.0)
    # the frames are the ones written (H.264 at crf 18: small error)
    err = (clip.frames.float() - torch.from_numpy(frames[idx]).float()).abs().mean()
    assert err < 4.0


def test_smart_nframes_reference_values():
    # qwen-vl-utils: clamp(total/fps*2, 4, min(768, total)) floored to even
    assert smart_nframes(300, 30.0) == 20
    assert smart_nframes(31, 30.0) == 4      # 2.07 -> raised to the minimum 4
    assert smart_nframes(5, 1.0) == 4        # 10 -> capped at 5 frames -> even 4
    assert smart_nframes(100000, 30.0) == 768
    assert smart_nframes(300, 30.0, max_frames=9) == 8
    with pytest.raises(ValueError, match="even number of frames"):
        smart_nframes(1, 30.0)


def test_smart_resize_reference_values():
    assert smart_resize(224, 320, 28, 4 * 784, 16384 * 784) == (224, 308)
    # beta = sqrt(1080·1920 / (768·784)) = 1.8558: 581.97 -> 560, 1034.6 -> 1008 (20 x 36 = 720 tok)
    assert smart_resize(1080, 1920, 28, 128 * 784, 768 * 784) == (560, 1008)
    assert smart_resize(10, 10, 28, 4 * 784, 16384 * 784) == (56, 56)
    with pytest.raises(ValueError, match="aspect ratio 250.0 is over 200"):
        smart_resize(2, 500)


def test_smart_resize_and_nframes_equal_qwen_vl_utils():
    from qwen_vl_utils import vision_process as q
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(x) for x in rng.integers(20, 2000, 2))
        lo = int(rng.integers(4, 300)) * 784
        hi = lo + int(rng.integers(0, 800)) * 784
        assert smart_resize(h, w, 28, lo, hi) == q.smart_resize(h, w, 28, lo, hi)
        total, fps = int(rng.integers(4, 5000)), float(rng.uniform(5, 60))
        assert smart_nframes(total, fps) == q.smart_nframes({}, total, fps)


def test_max_frames_start_end(make_video, synth):
    path = make_video(synth.scene_cuts([30, 30], 64, 96), fps=10)
    assert read_video(path, max_frames=5).num_frames == 4       # rounded down to even
    clip = read_video(path, start=2.0, end=4.0)                 # frames 20..40 -> 21 frames
    assert clip.frame_indices[0] == 20 and clip.frame_indices[-1] == 40
    assert clip.num_frames == 4 and clip.timestamps[0] == pytest.approx(2.0)


def test_image_list_is_a_video(tmp_path, synth):
    frames = synth.scene_cuts([2, 1], 56, 84)
    paths = []
    for i, f in enumerate(frames):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(f).save(paths[-1])
    clip = read_video(paths, fps=1.0)
    assert clip.num_frames == 4                                   # 3 padded to even
    assert torch.equal(clip.frames[3], clip.frames[2])            # by repeating the last
    assert torch.equal(clip.frames[:3], torch.from_numpy(frames))  # PNG is lossless
    np.testing.assert_allclose(clip.timestamps, [0, 1, 2, 3])
    assert read_video(paths, max_frames=2).frame_indices == [0, 1]  # images 0 and 2, re-indexed
    assert torch.equal(read_video(paths, max_frames=2).frames[1], torch.from_numpy(frames[2]))
    with pytest.raises(ValueError, match="start/end select a time range"):
        read_video(paths, start=1.0)


def _truncated(make_video, synth, tmp_path):
    data = open(make_video(synth.scene_cuts([10, 10], 64, 96)), "rb").read()
    out = tmp_path / "truncated.mp4"
    out.write_bytes(data[: len(data) * 2 // 3])
    return str(out)


def _audio_only(tmp_path):
    path = str(tmp_path / "audio.mp4")
    with av.open(path, "w") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = 16000
        for _ in range(5):
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.mark.parametrize("case,problem,words", [
    ("missing", "missing", "file not found"),
    ("empty", "corrupt", "empty (0 bytes)"),
    ("text", "corrupt", "cannot be opened as a video"),
    ("truncated", "corrupt", "corrupt, truncated"),
    ("png", "not_a_video", "is an image, not a video"),
    ("audio", "no_frames", "zero decodable frames"),
    ("thin", "aspect_ratio", "aspect ratio 210.0"),
    ("short", "too_short", "3 frame(s) in the requested range, fewer than the minimum 4"),
])
def test_bad_input_names_file_and_problem(case, problem, words, tmp_path, make_video, synth):
    path = str(tmp_path / f"{case}.mp4")
    if case == "empty":
        open(path, "wb").close()
    elif case == "text":
        open(path, "w").write("this is not a video")
    elif case == "truncated":
        path = _truncated(make_video, synth, tmp_path)
    elif case == "png":
        path = str(tmp_path / "frame.png")
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    elif case == "audio":
        path = _audio_only(tmp_path)
    elif case == "thin":
        path = make_video(np.zeros((6, 2, 420, 3), np.uint8), name="thin.mp4")
    elif case == "short":
        path = make_video(np.zeros((3, 64, 64, 3), np.uint8), name="short.mp4")
    with pytest.raises(VideoError) as info:
        read_video(path)
    assert isinstance(info.value, ValueError) and info.value.problem == problem
    assert path in str(info.value) and words in str(info.value)


def test_bad_range_and_arguments(make_video, synth):
    path = make_video(synth.scene_cuts([10, 10], 64, 96))
    with pytest.raises(VideoError, match=r"start=5, end=1 s holds no frames \(video is 2.00 s"):
        read_video(path, start=5, end=1)
    with pytest.raises(ValueError, match="fps must be > 0"):
        read_video(path, fps=0)


def test_try_load_video_skips_and_counts(tmp_path, make_video, synth):
    good = make_video(synth.scene_cuts([10, 10], 64, 96))
    bad = str(tmp_path / "bad.mp4")
    open(bad, "w").write("nope")
    counter = SkipCounter()
    results = [try_load_video(p, counter=counter) for p in (good, bad, str(tmp_path / "x.mp4"), bad)]
    assert results[0][0].num_frames == 4 and results[0][1] is None
    assert [r[1] for r in results[1:]] == ["corrupt", "missing", "corrupt"]
    assert all(r[0] is None for r in results[1:])
    assert counter.total == 3 and counter.summary() == "3 skipped: corrupt 2, missing 1"
    assert counter.as_dict() == {"skipped/total": 3, "skipped/corrupt": 2, "skipped/missing": 1}
    assert "bad.mp4" in counter.examples[0]
    with pytest.raises(ValueError, match="fps must be > 0"):  # a bad argument is not skipped
        try_load_video(good, counter=counter, fps=-1)
