"""Reading videos the way qwen-vl-utils does, with errors that name the file and the problem.

``read_video`` decodes with decord and samples frames with qwen-vl-utils' conventions
(``smart_nframes``: ``fps`` frames per second, an even count, at least 4 and at most 768, never
more than the clip has; indices ``linspace(first, last, n).round()``). A list of image paths is
read as a video whose frames were sampled at ``fps``. Every failure a user's data can cause
(missing, empty, corrupt or truncated file, a file that is not a video, no decodable frame, an
aspect ratio over 200 or a side under 28 px, read from the header before decoding, a clip shorter
than the minimum frame count) raises :class:`VideoError`,
a ``ValueError`` whose message names the file and the problem.

Training never crashes on one bad sample: :func:`try_load_video` returns ``(clip, None)`` or
``(None, reason)`` and :class:`SkipCounter` counts the skipped samples by reason.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

# qwen-vl-utils 0.0.14 constants (vision_process.py)
FACTOR = 28  # pixels per visual token side: patch 14 x spatial merge 2
FRAME_FACTOR = 2  # temporal patch size: frame counts are even
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
MAX_RATIO = 200
MIN_SIDE = FACTOR  # smallest frame side of a video file mmrl decodes (checked from the header)
VIDEO_MIN_TOKENS = 128
VIDEO_MAX_TOKENS = 768
VIDEO_TOTAL_TOKENS = 128000  # MODEL_SEQ_LEN; qwen-vl-utils uses 90 % of it for all frames

_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VideoSource = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


class VideoError(ValueError):
    """A video that cannot be used: the message names the file, the problem and the fix.

    Attributes:
        path: the file (or the first file of an image list).
        problem: short machine-friendly reason ("missing", "corrupt", "not_a_video",
            "no_frames", "aspect_ratio", "too_small", "unsupported_size", "too_short",
            "bad_range"), used to count skips.
    """

    def __init__(self, path, problem: str, detail: str, fix: str = ""):
        self.path = str(path)
        self.problem = problem
        msg = f"video {self.path!r}: {detail}"
        super().__init__(msg + (f"; {fix}" if fix else ""))


@dataclass
class VideoClip:
    """Sampled frames of one video.

    Attributes:
        frames: uint8 ``[T, H, W, 3]`` RGB (T even).
        timestamps: float64 ``[T]``, seconds from the start of the file for each frame.
        fps: the file's native frame rate.
        sample_fps: frames kept per second of video, ``T / total_frames * fps`` as qwen-vl-utils
            reports it (the value Qwen2.5-VL's processor needs).
        frame_indices: ``[T]`` indices of the kept frames in the file.
        total_frames: frames in the decoded range.
        path: the source.
    """

    frames: torch.Tensor
    timestamps: np.ndarray
    fps: float
    sample_fps: float
    frame_indices: List[int]
    total_frames: int
    path: str = ""

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def round_by_factor(x: float, factor: int) -> int:
    return round(x / factor) * factor


def ceil_by_factor(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def floor_by_factor(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 16384 * 28 * 28) -> Tuple[int, int]:
    """``(h', w')``: multiples of ``factor`` with ``min_pixels ≤ h'·w'`` (≤ ``max_pixels`` unless the
    minimum forces more), aspect ratio kept as closely as possible — qwen-vl-utils' rule.

    Raises:
        ValueError: aspect ratio over 200, non-positive sizes, or ``max_pixels < min_pixels``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels ({max_pixels}) is smaller than min_pixels ({min_pixels}); "
                         "raise max_pixels or lower min_pixels")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise ValueError(f"aspect ratio {ratio:.1f} is over {MAX_RATIO} ({height}x{width}); "
                         "crop the frames before using them")
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, floor_by_factor(height / beta, factor))
        w_bar = max(factor, floor_by_factor(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


def smart_nframes(total_frames: int, video_fps: float, fps: float = FPS,
                  min_frames: int = FPS_MIN_FRAMES, max_frames: Optional[int] = None) -> int:
    """Frames to sample: ``clamp(total/video_fps·fps, min_frames, max_frames)`` floored to even.

    qwen-vl-utils' ``smart_nframes`` with ``fps``: ``min_frames`` is rounded up and ``max_frames``
    (default ``min(768, total_frames)``) down to even, and the count never exceeds ``total_frames``.

    Raises:
        ValueError: fewer than 2 frames would be sampled.
    """
    lo = ceil_by_factor(min_frames, FRAME_FACTOR)
    hi = floor_by_factor(min(FPS_MAX_FRAMES, total_frames) if max_frames is None else max_frames,
                         FRAME_FACTOR)
    n = total_frames / video_fps * fps
    n = floor_by_factor(min(max(n, lo), hi, total_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"cannot sample an even number of frames in [{FRAME_FACTOR}, "
                         f"{total_frames}] (got {n})")
    return n


def _frame_range(path, total: int, video_fps: float, start: Optional[float],
                 end: Optional[float]) -> Tuple[int, int]:
    """First and last frame index of ``[start, end]`` seconds (qwen-vl-utils' rounding)."""
    if start is None and end is None:
        return 0, total - 1
    duration = total / video_fps
    first = 0 if start is None else math.ceil(max(0.0, min(start, duration)) * video_fps)
    last = total - 1 if end is None else min(
        math.floor(max(0.0, min(end, duration)) * video_fps), total - 1)
    if first >= last:
        raise VideoError(path, "bad_range", f"the range start={start}, end={end} s holds "
                         f"no frames (video is {duration:.2f} s, {total} frames at "
                         f"{video_fps:.2f} fps)", "pass start < end inside the video")
    return first, last


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoError(path, "missing", "file not found", "check the path (relative paths "
                         f"are resolved from {os.getcwd()!r})")
    if os.path.isdir(path):
        raise VideoError(path, "not_a_video", "is a directory, not a video file",
                         "pass a video file or a list of image paths")
    if os.path.getsize(path) == 0:
        raise VideoError(path, "corrupt", "file is empty (0 bytes)", "re-export the video")
    if os.path.splitext(path)[1].lower() in _IMAGE_EXTS:
        raise VideoError(path, "not_a_video", "is an image, not a video",
                         "pass a list of image paths to read frames as a video")


def _check_aspect(path, h: int, w: int) -> None:
    ratio = max(h, w) / max(1, min(h, w))
    if ratio > MAX_RATIO:
        raise VideoError(path, "aspect_ratio", f"aspect ratio {ratio:.1f} ({w}x{h}) is over "
                         f"{MAX_RATIO}, which Qwen2.5-VL cannot patchify",
                         "crop or pad the video to a ratio of at most 200")


def _probe_size(path: str) -> Optional[Tuple[int, int]]:
    """``(height, width)`` of the first video stream from the container header (PyAV, no
    decoding), or None when PyAV is missing or cannot tell (decord then reports the problem)."""
    try:
        import av
        with av.open(path) as container:
            streams = container.streams.video
            if not streams:
                return None
            cc = streams[0].codec_context
            return (int(cc.height), int(cc.width)) if cc.height and cc.width else None
    except Exception:  # noqa: BLE001 - any failure: leave the diagnosis to decord
        return None


def _check_frame_size(path, h: int, w: int) -> None:
    """Aspect ratio, then the smallest side, checked from the header before decord decodes:
    decord fails on (and for some sizes corrupts memory with) frames a few pixels wide."""
    _check_aspect(path, h, w)
    if min(h, w) < MIN_SIDE:
        raise VideoError(path, "too_small", f"frame size {w}x{h} is below the minimum side "
                         f"{MIN_SIDE} px (one Qwen-VL visual token covers {FACTOR}x{FACTOR} px)",
                         f"re-encode it larger, e.g. ffmpeg -i IN -vf scale={MIN_SIDE * 4}:-2 "
                         f"OUT.mp4")


def _decord_message(err: Exception) -> str:
    """decord's first error line without its "[hh:mm:ss] /src/file.cc:NN:" prefix."""
    line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", line)[:200]


def _open_decord(path: str):
    import decord
    try:
        vr = decord.VideoReader(path, num_threads=1)
    except Exception as err:  # decord raises bare RuntimeError/DECORDError for every failure
        detail = _decord_message(err)
        if "video stream" in detail:
            raise VideoError(path, "no_frames", "has no video stream (zero decodable frames)",
                             "pass a file with a video track") from None
        raise VideoError(path, "corrupt", "cannot be opened as a video (corrupt, truncated or "
                         f"not a video file): {detail}",
                         "re-encode it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4") from None
    total = len(vr)
    if total == 0:
        raise VideoError(path, "no_frames", "contains zero decodable frames",
                         "check that the file has a video stream")
    fps = float(vr.get_avg_fps())
    if not fps > 0:
        raise VideoError(path, "corrupt", f"reports an invalid frame rate {fps}",
                         "re-encode it with a constant frame rate")
    return vr, total, fps


def read_video(path: VideoSource, *, fps: float = FPS, max_frames: Optional[int] = None,
               start: Optional[float] = None, end: Optional[float] = None,
               min_frames: int = FPS_MIN_FRAMES) -> VideoClip:
    """Decode ``path`` and sample ``fps`` frames per second (qwen-vl-utils ``smart_nframes``).

    Args:
        path: a video file, or a list of image paths read as frames sampled at ``fps``
            (padded to an even count by repeating the last one, as qwen-vl-utils does; no
            minimum count; ``max_frames`` keeps an evenly spread subset).
        fps: frames to keep per second of video (qwen-vl-utils default 2.0).
        max_frames: at most this many frames (rounded down to even; default 768).
        start, end: the time range in seconds (default: the whole video).
        min_frames: the fewest frames a clip may give (qwen-vl-utils: 4). A clip with fewer
            decodable frames in the range is an error, not silently repeated frames.

    Returns:
        :class:`VideoClip` with uint8 ``[T, H, W, 3]`` frames, ``T`` even.

    Raises:
        VideoError: missing, empty, corrupt, truncated or non-video file; zero frames; aspect
            ratio over 200 or a frame side under ``MIN_SIDE`` (28) px; a frame width decord
            cannot convert; fewer than ``min_frames`` frames; an empty ``[start, end]`` range.
        ValueError: ``fps``/``max_frames`` out of range.
    """
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}; qwen-vl-utils samples at 2.0")
    if max_frames is not None and max_frames < FRAME_FACTOR:
        raise ValueError(f"max_frames must be >= {FRAME_FACTOR}, got {max_frames}")
    if isinstance(path, (list, tuple)):
        if start is not None or end is not None:
            raise ValueError("start/end select a time range of a video file; for a list of "
                             "images, pass only the images you want")
        return _read_image_list(list(path), fps, max_frames)
    path = os.fspath(path)
    if path.startswith("file://"):
        path = path[7:]
    _check_file(path)
    size = _probe_size(path)
    if size is not None:
        _check_frame_size(path, *size)
    vr, total, native_fps = _open_decord(path)
    first, last = _frame_range(path, total, native_fps, start, end)
    n_range = last - first + 1
    if n_range < max(min_frames, FRAME_FACTOR):
        raise VideoError(path, "too_short", f"has {n_range} frame(s) in the requested range, "
                         f"fewer than the minimum {max(min_frames, FRAME_FACTOR)}",
                         "use a longer clip or lower min_frames")
    n = smart_nframes(n_range, native_fps, fps, min_frames, max_frames)
    idx = torch.linspace(first, last, n).round().long().tolist()
    try:
        frames = vr.get_batch(idx).asnumpy()
        stamps = vr.get_frame_timestamp(idx)[:, 0].astype(np.float64)
    except Exception as err:
        if size is not None and "DECORDArrayCopyFromTo" in str(err):
            # decord's converter cannot copy frames of some widths (its buffer size differs)
            raise VideoError(path, "unsupported_size", f"decord cannot decode frames of size "
                             f"{size[1]}x{size[0]} (a decord limitation with some widths under "
                             f"64 px; the file itself may be fine)",
                             "re-encode it at a width of 64 px or more, e.g. ffmpeg -i IN -vf "
                             "scale=64:-2 OUT.mp4") from None
        raise VideoError(path, "corrupt", f"decoding failed part-way (truncated or corrupt "
                         f"stream): {_decord_message(err)}",
                         "re-encode the file") from None
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise VideoError(path, "no_frames", "decoded zero frames", "re-encode the file")
    _check_aspect(path, frames.shape[1], frames.shape[2])
    return VideoClip(frames=torch.from_numpy(np.ascontiguousarray(frames)), timestamps=stamps,
                     fps=native_fps, sample_fps=n / n_range * native_fps, frame_indices=idx,
                     total_frames=n_range, path=path)


def _read_image_list(paths: List, fps: float, max_frames: Optional[int]) -> VideoClip:
    from PIL import Image, UnidentifiedImageError
    if not paths:
        raise VideoError("<image list>", "no_frames", "the image list is empty",
                         "pass at least one image path")
    if max_frames is not None and len(paths) > max_frames:  # keep an even, evenly spread subset
        keep = torch.linspace(0, len(paths) - 1, floor_by_factor(max_frames, FRAME_FACTOR))
        paths = [paths[i] for i in keep.round().long().tolist()]
    frames = []
    for p in paths:
        p = os.fspath(p)
        if not os.path.exists(p):
            raise VideoError(p, "missing", "frame image not found", "check the path")
        try:
            with Image.open(p) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except (UnidentifiedImageError, OSError) as err:
            raise VideoError(p, "corrupt", f"cannot be read as an image ({err})",
                             "re-save the frame as PNG or JPEG") from None
        if frames[-1].shape != frames[0].shape:
            raise VideoError(p, "bad_size", f"frame size {frames[-1].shape[1]}x"
                             f"{frames[-1].shape[0]} differs from the first frame's "
                             f"{frames[0].shape[1]}x{frames[0].shape[0]}",
                             "resize all frames of one video to the same size")
    _check_aspect(paths[0], frames[0].shape[0], frames[0].shape[1])
    n = len(frames)
    pad = ceil_by_factor(n, FRAME_FACTOR) - n  # qwen-vl-utils repeats the last image
    frames += [frames[-1]] * pad
    return VideoClip(frames=torch.from_numpy(np.stack(frames)),
                     timestamps=np.arange(n + pad, dtype=np.float64) / fps, fps=fps,
                     sample_fps=fps, frame_indices=list(range(n)) + [n - 1] * pad,
                     total_frames=n, path=os.fspath(paths[0]))


class SkipCounter:
    """Counts samples skipped for bad input, by reason, for the training log.

    ``counter.add(err)`` records a :class:`VideoError`; ``counter.total``, ``counter.by_reason``
    and ``counter.summary()`` ("3 skipped: corrupt 2, too_short 1") report them; the last few
    messages are kept in ``counter.examples`` so a log can show which files failed.
    """

    def __init__(self, keep_examples: int = 5):
        self.by_reason: Counter = Counter()
        self.examples: List[str] = []
        self._keep = keep_examples

    def add(self, err: Exception) -> str:
        reason = getattr(err, "problem", type(err).__name__)
        self.by_reason[reason] += 1
        if len(self.examples) < self._keep and str(err) not in self.examples:
            self.examples.append(str(err))
        return reason

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def summary(self) -> str:
        if not self.total:
            return "0 skipped"
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.by_reason.items()))
        return f"{self.total} skipped: {parts}"

    def as_dict(self) -> Dict[str, int]:
        """``{"skipped/total": n, "skipped/<reason>": n, ...}`` for a metrics logger."""
        out = {"skipped/total": self.total}
        out.update({f"skipped/{k}": v for k, v in self.by_reason.items()})
        return out


def try_load_video(source: Any, *, counter: Optional[SkipCounter] = None,
                   loader: Callable[..., VideoClip] = read_video,
                   **kwargs) -> Tuple[Optional[VideoClip], Optional[str]]:
    """``(clip, None)`` on success, ``(None, reason)`` for bad input — never raises for data.

    The trainer's way to skip a sample: a :class:`VideoError` is counted in ``counter`` (when
    given) and its ``problem`` returned as the reason. Programming errors (``TypeError``, bad
    arguments) still raise.
    """
    try:
        return loader(source, **kwargs), None
    except VideoError as err:
        if counter is not None:
            counter.add(err)
        return None, err.problem
