"""Evaluation pictures: the captioned grid layout (shared with the image grid of
:func:`mmrl.diffusion.evaluate.save_grid`), and the outputs of a video job: one grid video
(samples tiled, prompt and reward under each) as MP4 (PyAV, H.264) and as an animated GIF (PIL),
and a frame-strip PNG (a row per sample, a few frames per row, captions) that any image viewer
opens.

Files: ``<output_dir>/eval/step_NNNNNN.mp4``, ``.gif`` and ``_strip.png``
(:func:`save_video_outputs`); :class:`mmrl.diffusion.evaluate.Evaluator` writes them when the
policy's ``sample_ode`` returns ``[B, F, 3, H, W]``.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

Tensor = torch.Tensor


def grid_layout(n: int, height: int, width: int, captions: Sequence[str], *, cols: int = 4,
                min_cell: int = 128):
    """A white canvas with a caption under each of ``n`` cells of ``height x width`` pixels
    upscaled (nearest) to at least ``min_cell``; returns ``(canvas, [(x, y)], (cw, ch))``: the
    PIL canvas, each cell's top-left corner and the cell size (paste the pictures there).

    Raises:
        ValueError: a caption count that differs from ``n``.
    """
    from PIL import Image, ImageDraw

    if len(captions) != n:
        raise ValueError(f"got {len(captions)} captions for {n} images; pass one caption per "
                         f"image")
    scale = max(1, -(-min_cell // max(height, width)))  # ceil: the smallest zoom reaching min_cell
    cw, ch = width * scale, height * scale
    line_chars = max(12, cw // 7)
    wrapped = [textwrap.wrap(c, line_chars)[:4] or [""] for c in captions]
    text_h = 12 * max(len(w) for w in wrapped) + 6
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    canvas = Image.new("RGB", (cols * cw, rows * (ch + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    corners = [((i % cols) * cw, (i // cols) * (ch + text_h)) for i in range(n)]
    for (x, y), lines in zip(corners, wrapped):
        for j, line in enumerate(lines):
            draw.text((x + 3, y + ch + 3 + 12 * j), line, fill="black")
    return canvas, corners, (cw, ch)


def to_uint8(images: Tensor) -> Tensor:
    """``[..., 3, H, W]`` float in [0, 1] -> ``[..., H, W, 3]`` uint8 on the CPU."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return pixels.movedim(-3, -1)


def paste_tiles(canvas, tiles: Tensor, corners, cell) -> None:
    """Paste ``tiles`` ``[B, H, W, 3]`` uint8 into ``canvas`` at ``corners``, resized to
    ``cell`` with nearest-neighbour."""
    from PIL import Image
    for tile, corner in zip(tiles, corners):
        canvas.paste(Image.fromarray(tile.numpy()).resize(cell, Image.NEAREST), corner)


def _check(videos: Tensor, captions: Sequence[str]) -> None:
    if not isinstance(videos, Tensor) or videos.dim() != 5 or videos.shape[2] != 3:
        got = tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
        raise ValueError(f"videos has shape {got}; expected a float tensor [B, F, 3, H, W] in "
                         f"[0, 1]")
    if len(captions) != videos.shape[0]:
        raise ValueError(f"got {len(captions)} captions for {videos.shape[0]} videos; pass one "
                         f"caption per video")


def grid_frames(videos: Tensor, captions: Sequence[str], *, cols: int = 4,
                min_cell: int = 128) -> np.ndarray:
    """``videos`` ``[B, F, 3, H, W]`` -> the grid video ``[F, Hc, Wc, 3]`` uint8: frame t tiles
    every sample's frame t, with its caption under it (the layout of
    :func:`~mmrl.diffusion.evaluate.save_grid`). Hc and Wc are rounded up to even sizes
    (H.264's 4:2:0 chroma needs them) with white.
    """
    _check(videos, captions)
    B, F, _, H, W = videos.shape
    base, corners, cell = grid_layout(B, H, W, captions, cols=cols, min_cell=min_cell)
    pixels = to_uint8(videos)  # [B, F, H, W, 3]
    w, h = base.size
    out = np.full((F, h + h % 2, w + w % 2, 3), 255, dtype=np.uint8)
    for t in range(F):
        canvas = base.copy()
        paste_tiles(canvas, pixels[:, t], corners, cell)
        out[t, :h, :w] = np.asarray(canvas)
    return out


def write_mp4(frames: np.ndarray, path, fps: float = 8.0) -> Path:
    """Write ``frames`` ``[F, H, W, 3]`` uint8 (even H, W) as an H.264 MP4 (yuv420p, CRF 18;
    MPEG-4 Part 2 when this PyAV has no libx264) through PyAV."""
    import av
    from fractions import Fraction

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as box:
        stream = box.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18"}
        for frame in frames:
            box.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        box.mux(stream.encode())  # flush the encoder
    return path


def write_gif(frames: np.ndarray, path, fps: float = 8.0) -> Path:
    """Write ``frames`` ``[F, H, W, 3]`` uint8 as an animated GIF that loops (PIL)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], loop=0,
                   duration=max(20, round(1000 / fps)), optimize=False)
    return path


def strip_frames(num_frames: int, num: int) -> List[int]:
    """``num`` frame indices uniformly spaced over ``num_frames``, first and last included."""
    k = max(1, min(num, num_frames))
    return [0] if k == 1 else [round(i * (num_frames - 1) / (k - 1)) for i in range(k)]


def save_strip(videos: Tensor, captions: Sequence[str], path, *, num: int = 6,
               min_cell: int = 64) -> Path:
    """A PNG with one row per sample: ``num`` of its frames (uniformly spaced, first and last
    included, each labelled with its index) and the caption under the row.

    Raises:
        ValueError: videos not ``[B, F, 3, H, W]`` or a caption count that differs from B.
    """
    from PIL import Image, ImageDraw

    _check(videos, captions)
    B, F, _, H, W = videos.shape
    idx = strip_frames(F, num)
    scale = max(1, -(-min_cell // max(H, W)))
    cw, ch, head, foot = W * scale, H * scale, 14, 18
    canvas = Image.new("RGB", (len(idx) * cw, head + B * (ch + foot)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, t in enumerate(idx):
        draw.text((k * cw + 3, 2), f"frame {t}", fill="black")
    pixels = to_uint8(videos[:, idx])  # [B, K, H, W, 3]
    for b in range(B):
        y = head + b * (ch + foot)
        for k in range(len(idx)):
            tile = Image.fromarray(pixels[b, k].numpy()).resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (k * cw, y))
        draw.text((3, y + ch + 3), captions[b][: max(12, len(idx) * cw // 7)], fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def save_video_outputs(videos: Tensor, captions: Sequence[str], folder, step: int, *,
                       fps: float = 8.0) -> Dict[str, str]:
    """Write the MP4, the GIF and the strip PNG of one evaluation; ``{"video", "gif",
    "strip"}`` -> their paths."""
    folder = Path(folder)
    frames = grid_frames(videos, captions)
    return {"video": str(write_mp4(frames, folder / f"step_{step:06d}.mp4", fps)),
            "gif": str(write_gif(frames, folder / f"step_{step:06d}.gif", fps)),
            "strip": str(save_strip(videos, captions, folder / f"step_{step:06d}_strip.png"))}
