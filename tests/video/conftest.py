"""Fixtures for the video tests: synthetic mp4s (mmrl.video.synthetic), tiny Qwen2.5-VL."""
from __future__ import annotations

import pytest

from mmrl.video import synthetic


@pytest.fixture
def synth():
    """The synthetic-video module: ``synth.scene_cuts([6, 5])``, ``synth.slow_pan(20)``, ..."""
    return synthetic


@pytest.fixture
def make_video(tmp_path):
    """``make_video(frames, fps=10, name="v.mp4") -> path`` inside the test's tmp dir."""
    def _make(frames, fps: float = 10.0, name: str = "v.mp4") -> str:
        return synthetic.write_mp4(tmp_path / name, frames, fps)
    return _make


def build_tiny_qwen(folder: str):
    """A tiny Qwen2.5-VL processor + model saved to ``folder`` by the library's own builder
    (recipe: ../shared/TINY_MODELS.md), with Qwen's default vision init."""
    from mmrl.video.tiny import build_tiny_qwen_vl
    return build_tiny_qwen_vl(folder, vision_init_std=0.02, overwrite=True)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """Folder of a tiny Qwen2.5-VL processor + model saved with ``save_pretrained``."""
    return build_tiny_qwen(str(tmp_path_factory.mktemp("tiny_qwen")))


@pytest.fixture(scope="session")
def tiny_processor(tiny_qwen_dir):
    """The tiny processor loaded the way a user loads a checkpoint's processor."""
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(tiny_qwen_dir)
