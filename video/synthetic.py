"""Synthetic test videos: static scenes with hard cuts, slow pans, noise — written with PyAV.

Used by the tests and benchmarks (and handy for trying ``mmrl video inspect``). Scenes are blobs
of one saturated colour on black, a new layout per scene, because high-contrast structure is what
Keye's HSV-patch cosine responds to (independent noise keeps the cosine of non-negative HSV
vectors above 0.7, so a noise video reads as static).
"""
from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import numpy as np

__all__ = ["write_mp4", "texture", "scene_cuts", "slow_pan", "noise"]


def write_mp4(path, frames, fps: float = 10.0, *, grain: int = 0, preset: str = "medium",
              seed: int = 0) -> str:
    """Encode RGB uint8 ``[T, H, W, 3]`` frames (an array or an iterable of ``[H, W, 3]``) as
    H.264, yuv420p (H and W even), crf 18.

    Args:
        grain: add independent uniform noise in ``[-grain, grain]`` to every frame, like camera
            sensor noise; it raises the bitrate and decode cost to those of real footage.
        preset: x264 speed preset ("veryfast" writes long benchmark videos faster).
    """
    import av
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as out:
        stream = None
        for f in frames:
            if stream is None:
                stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
                stream.width, stream.height = f.shape[1], f.shape[0]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": "18", "preset": preset}
            if grain:
                f = (f + rng.integers(-grain, grain + 1, f.shape, dtype=np.int16)).clip(0, 255)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f, dtype=np.uint8),
                                               format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        if stream is None:
            raise ValueError(f"write_mp4({path!r}) got no frames; pass at least one")
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def texture(h: int, w: int, hue: int, seed: int) -> np.ndarray:
    """Blobs of one saturated colour (OpenCV hue ``hue``) on black, a new layout per ``seed``.

    High-contrast structure is what the HSV-patch cosine sees: independent noise or a pure hue
    change keeps the cosine of non-negative HSV vectors above 0.7, a new blob layout does not.
    """
    import cv2
    rng = np.random.default_rng(seed)
    low = rng.random((max(2, h // 24), max(2, w // 24)))
    val = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    on = val > 0.5
    hsv = np.zeros((h, w, 3), np.uint8)
    hsv[..., 0] = hue % 180
    hsv[..., 1] = np.where(on, 200, 0)
    hsv[..., 2] = np.where(on, 230, 0)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def scene_cuts(lengths: Sequence[int], h: int = 224, w: int = 320, seed: int = 0) -> np.ndarray:
    """Static scenes of the given frame counts joined by hard cuts (new layout and hue each)."""
    hues = [0, 60, 120, 30, 90, 150]
    return np.concatenate([np.repeat(texture(h, w, hues[i % 6], seed + i)[None], n, 0)
                           for i, n in enumerate(lengths)])


def slow_pan(n: int, h: int = 224, w: int = 320, px_per_frame: int = 2, seed: int = 0) -> np.ndarray:
    """A window sliding right over a wider texture, ``px_per_frame`` pixels per frame."""
    big = texture(h, w + n * px_per_frame, 20, seed)
    return np.stack([big[:, i * px_per_frame: i * px_per_frame + w] for i in range(n)])


def noise(n: int, h: int = 224, w: int = 320, seed: int = 0) -> np.ndarray:
    """Independent uniform noise in every frame."""
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


