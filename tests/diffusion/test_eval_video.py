"""The evaluation's video outputs (MP4 through PyAV, GIF, frame strip) and the media log, on
synthetic video tensors (no video model needed)."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

from mmrl.diffusion.eval_video import (grid_frames, save_strip, save_video_outputs,
                                       strip_frames, write_mp4)
from mmrl.diffusion.evaluate import Evaluator, ImageReward
from mmrl.rewards import compose
from mmrl.train.observe import MediaLog

RED, BLUE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)


def colour_videos(F=4, H=8, W=8):
    """Two videos ``[2, F, 3, H, W]``: a red one and one that fades black -> blue."""
    v = torch.zeros(2, F, 3, H, W)
    v[0, :] = torch.tensor(RED).view(3, 1, 1)
    for t in range(F):
        v[1, t] = torch.tensor(BLUE).view(3, 1, 1) * t / (F - 1)
    return v


def decode_mp4(path):
    import av
    with av.open(str(path)) as box:
        return np.stack([f.to_ndarray(format="rgb24") for f in box.decode(video=0)])


def test_mp4_gif_and_strip_of_a_video_batch(tmp_path):
    from PIL import Image

    v, captions = colour_videos(), ["a red square | r=0.1", "a blue square | r=0.2"]
    files = save_video_outputs(v, captions, tmp_path / "eval", 3, fps=4)
    assert sorted(files) == ["gif", "strip", "video"]
    frames = decode_mp4(files["video"])
    grid = grid_frames(v, captions)
    assert frames.shape == grid.shape and frames.shape[0] == 4  # F frames of the grid's size
    assert frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0  # even for 4:2:0 chroma
    # cells are 8 px zoomed to 128: the centre of sample 0 is red in every frame, sample 1's
    # black until its last frame, which is blue
    assert np.abs(frames[:, 64, 64].astype(int) - [255, 0, 0]).max() <= 24
    assert np.abs(frames[0, 64, 192].astype(int)).max() <= 24
    assert np.abs(frames[-1, 64, 192].astype(int) - [0, 0, 255]).max() <= 24
    gif = Image.open(files["gif"])  # PIL would merge equal consecutive frames: these differ
    assert gif.n_frames == 4 and gif.info["duration"] == 250
    assert gif.size == (frames.shape[2], frames.shape[1])
    gif.seek(3)
    assert gif.convert("RGB").getpixel((192, 64)) == (0, 0, 255)
    strip = Image.open(files["strip"]).convert("RGB")
    assert strip.size == (4 * 64, 14 + 2 * (64 + 18))  # 4 frames x 2 rows of 64-px cells
    assert strip.getpixel((3 * 64 + 32, 14 + 82 + 32)) == (0, 0, 255)  # row 1, frame 3
    assert strip.getpixel((32, 14 + 82 + 32)) == (0, 0, 0)  # row 1, frame 0
    assert strip_frames(33, 6) == [0, 6, 13, 19, 26, 32] and strip_frames(2, 6) == [0, 1]
    with pytest.raises(ValueError, match=r"expected a float tensor \[B, F, 3, H, W\]"):
        save_strip(v[:, 0], ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="got 1 captions for 2 videos"):
        write_mp4(grid_frames(v, ["a"]), tmp_path / "x.mp4")


class VideoPolicy:
    """``sample_ode``: a dot moving right (prompts naming right) or left, ``[b, 3, 3, 4, 4]``."""

    def noise(self, n, generator):
        return torch.randn(n, 1, generator=generator)

    def sample_ode(self, prompts, noise):
        out = torch.zeros(len(prompts), 3, 3, 4, 4)
        for b, p in enumerate(prompts):
            cols = [0, 1, 3] if "right" in p else [3, 2, 0]
            for t, j in enumerate(cols):
                out[b, t, :, 1, j] = 1.0
        return out


class FakeWandb(types.ModuleType):
    """Records what the media log sends; ``run`` is None after ``finish``."""

    def __init__(self):
        super().__init__("wandb")
        self.logged, self.inits, self.run = [], [], None
        self.Image = lambda p: ("image", p)
        self.Video = lambda p: ("video", p)

    def init(self, **kwargs):
        self.inits.append(kwargs)
        self.run = types.SimpleNamespace(id=kwargs.get("id", "run1"), finish=self.finish,
                                         log=lambda d, step: self.logged.append((step, d)))
        return self.run

    def finish(self):
        self.run = None


def test_evaluator_writes_video_outputs_and_logs_them(tmp_path, monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    media = MediaLog(tmp_path, wandb_project="p")
    ev = Evaluator(VideoPolicy(), ["a dot moving right", "a dot moving left"],
                   ImageReward(compose("motion_direction")), {}, tmp_path, media=media)
    ev(0)  # before the metrics log opened a W&B run: files and TensorBoard only
    wandb.init(project="p")  # what MetricsLog does when the run starts
    rec = ev(2)
    wandb.finish()  # the run has ended; the evaluation after the last step resumes it
    ev(4)
    media.close()
    lines = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 2, 4]
    assert rec["reward_mean"] == pytest.approx(1.0, abs=1e-5)  # both dots move as named
    assert rec["rewards"] == pytest.approx([1.0, 1.0], abs=1e-5)  # per prompt, in order
    assert rec["frames"] == 3 and rec["grid"].endswith("step_000002_strip.png")
    assert rec["video"].endswith("step_000002.mp4") and rec["gif"].endswith("step_000002.gif")
    assert decode_mp4(rec["video"]).shape[0] == 3
    assert [s for s, _ in wandb.logged] == [2, 4]
    assert wandb.logged[1][1] == {"eval/grid": ("image", lines[2]["grid"]),
                                  "eval/video": ("video", lines[2]["video"])}
    assert wandb.inits[1] == {"project": "p", "id": "run1", "resume": "must",
                              "dir": str(tmp_path)} and wandb.run is None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Images("eval/grid")] == [0, 2, 4]
