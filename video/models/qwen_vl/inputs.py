"""Qwen2.5-VL inputs for a batch of video conversations, slow-fast or uniform.

Qwen2.5-VL has no fast pathway, so a :class:`~mmrl.video.slow_fast.SlowFastPlan` becomes a
sequence of video entries: each maximal run of consecutive same-type frames is one video at that
type's resolution, preceded by its start time in text (``<1.5s>``), padded to an even frame count
by repeating its last frame (as qwen-vl-utils pads image lists). The processor gets the fps each
entry was really sampled at, so ``second_per_grid_ts = 2 / fps`` and mRoPE time positions follow
real time inside every entry; the text timestamps carry absolute time across entries (mRoPE
restarts the time axis at every vision block).

``mode="uniform"`` is qwen-vl-utils' own pipeline (one entry per video, every frame at the same
``smart_resize`` size, 128–768 tokens per frame, a 90 % share of 128K tokens in all) for
comparison. transformers and qwen-vl-utils are imported inside the functions that need them.
The mRoPE position ids of these inputs live in :mod:`.positions`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from mmrl.video.io import (FACTOR, FRAME_FACTOR, VIDEO_MAX_TOKENS, VIDEO_MIN_TOKENS,
                           VIDEO_TOTAL_TOKENS, SkipCounter, VideoClip, VideoError,
                           ceil_by_factor, read_video, smart_resize)
from mmrl.video.slow_fast import (SLOW, SlowFastPlan, as_uint8_thwc, resize_frames,
                                  slow_fast_plan)

MODES = ("slow_fast", "uniform")
KIND_NAMES = {SLOW: "slow", 1: "fast"}


@dataclass
class VideoEntry:
    """One video the processor sees: frames of one kind at one size.

    Attributes:
        frames: uint8 ``[n, h, w, 3]``, n even (padded by repeating the last frame).
        timestamps: float64 ``[num_real]``, seconds of the real (unpadded) frames.
        fps: frames per second of video this entry was sampled at (``2 / second_per_grid_ts``).
        kind: "slow", "fast" or "uniform".
        num_real: frames before padding.
    """

    frames: torch.Tensor
    timestamps: np.ndarray
    fps: float
    kind: str
    num_real: int

    @property
    def start(self) -> float:
        return float(self.timestamps[0])

    def grid_thw(self, patch_size: int = 14, temporal_patch_size: int = FRAME_FACTOR):
        """``(t, h, w)`` in patches, as the processor's ``video_grid_thw`` row."""
        n, h, w, _ = self.frames.shape
        return (n // temporal_patch_size, h // patch_size, w // patch_size)

    def num_tokens(self, patch_size: int = 14, merge_size: int = 2,
                   temporal_patch_size: int = FRAME_FACTOR) -> int:
        """``<|video_pad|>`` tokens this entry expands to: ``t·h·w / merge²``."""
        t, h, w = self.grid_thw(patch_size, temporal_patch_size)
        return t * h * w // (merge_size * merge_size)


def _pad_even(frames: torch.Tensor) -> torch.Tensor:
    pad = ceil_by_factor(frames.shape[0], FRAME_FACTOR) - frames.shape[0]
    return torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)]) if pad else frames


def _run_fps(stamps: np.ndarray, default_fps: float) -> float:
    """Sampling rate of a run: ``(n − 1) / (t_last − t_first)``; ``default_fps`` for one frame."""
    span = float(stamps[-1] - stamps[0]) if stamps.size >= 2 else 0.0
    return (stamps.size - 1) / span if span > 0 else float(default_fps)


def plan_entries(frames, plan: SlowFastPlan, *, sample_fps: float = 2.0) -> List[VideoEntry]:
    """Split frames into one :class:`VideoEntry` per run of same-type frames.

    Args:
        frames: the frames the plan was made from (uint8 ``[T, H, W, 3]`` or float ``[T, 3, H, W]``).
        plan: their :class:`SlowFastPlan`.
        sample_fps: the rate for a run of a single frame (no spacing to measure).
    """
    frames = as_uint8_thwc(frames)
    if frames.shape[0] != plan.frame_types.shape[0]:
        raise ValueError(f"plan has {plan.frame_types.shape[0]} frames but {frames.shape[0]} "
                         "frames were given; pass the frames the plan was made from")
    entries = []
    for kind, a, b in plan.runs():
        hw = plan.slow_hw if kind == SLOW else plan.fast_hw
        stamps = plan.timestamps[a:b]
        entries.append(VideoEntry(frames=_pad_even(resize_frames(frames[a:b], hw)),
                                  timestamps=stamps, fps=_run_fps(stamps, sample_fps),
                                  kind=KIND_NAMES[kind], num_real=b - a))
    return entries


def uniform_size(height: int, width: int, num_frames: int, *, min_tokens: int = VIDEO_MIN_TOKENS,
                 max_tokens: int = VIDEO_MAX_TOKENS, total_tokens: int = VIDEO_TOTAL_TOKENS,
                 factor: int = FACTOR) -> Tuple[int, int]:
    """qwen-vl-utils' frame size: ``max_pixels = max(min(768 tok, 0.9·total/n·2), 1.05·min)``."""
    f2 = factor * factor
    min_px = min_tokens * f2
    max_px = max(min(max_tokens * f2, total_tokens * f2 * 0.9 / num_frames * FRAME_FACTOR),
                 int(min_px * 1.05))
    return smart_resize(height, width, factor, min_pixels=min_px, max_pixels=max_px)


def uniform_entries(clip: VideoClip, **size_kwargs) -> List[VideoEntry]:
    """One entry with every frame at qwen-vl-utils' size (see :func:`uniform_size`)."""
    frames = as_uint8_thwc(clip.frames)
    t, h, w, _ = frames.shape
    hw = uniform_size(h, w, t, **size_kwargs)
    return [VideoEntry(frames=_pad_even(_resize_bicubic(frames, hw)),
                       timestamps=np.asarray(clip.timestamps, np.float64), fps=clip.sample_fps,
                       kind="uniform", num_real=t)]


def _resize_bicubic(frames: torch.Tensor, hw) -> torch.Tensor:
    """qwen-vl-utils resizes videos bicubic with antialiasing."""
    import torch.nn.functional as F
    x = frames.permute(0, 3, 1, 2).float()  # [T, H, W, 3] -> [T, 3, H, W]
    x = F.interpolate(x, size=hw, mode="bicubic", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@dataclass
class QwenVideoBatch:
    """Processor inputs for the kept samples, and what happened to the others.

    Attributes:
        inputs: the processor's ``BatchFeature`` (``input_ids``, ``attention_mask``,
            ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``, and
            ``mm_token_type_ids``), or ``None`` when every sample was skipped.
        kept: indices (into the given conversations) of the rows of ``inputs``.
        skipped: ``{index: reason}`` for samples dropped for bad video input.
        entries: per kept sample, its :class:`VideoEntry` list (all its videos, in order).
        plans: per kept sample, one :class:`SlowFastPlan` per video (empty in uniform mode).
        texts: the chat-templated prompts given to the processor.
    """

    inputs: Optional[Any]
    kept: List[int]
    skipped: Dict[int, str]
    entries: List[List[VideoEntry]] = field(default_factory=list)
    plans: List[List[SlowFastPlan]] = field(default_factory=list)
    texts: List[str] = field(default_factory=list)


def _video_items(conversation) -> List[Tuple[int, int, Mapping]]:
    out = []
    for mi, msg in enumerate(conversation):
        content = msg.get("content")
        if isinstance(content, list):
            for ci, item in enumerate(content):
                if isinstance(item, Mapping) and (item.get("type") == "video" or "video" in item):
                    out.append((mi, ci, item))
    return out


def _load_clip(item: Mapping, fps: float, max_frames: Optional[int]) -> VideoClip:
    """A :class:`VideoClip` from a message item: a path, a list of image paths, a clip or frames."""
    src = item.get("video")
    if isinstance(src, VideoClip):
        return src
    if isinstance(src, (torch.Tensor, np.ndarray)):
        frames = as_uint8_thwc(src)
        rate = float(item.get("sample_fps", fps))
        stamps = np.asarray(item.get("timestamps", np.arange(frames.shape[0]) / rate), np.float64)
        return VideoClip(frames=frames, timestamps=stamps, fps=rate, sample_fps=rate,
                         frame_indices=list(range(frames.shape[0])),
                         total_frames=frames.shape[0], path="<frames>")
    if src is None:
        raise TypeError(f"video item {dict(item)!r} has no 'video' key; expected "
                        "{'type': 'video', 'video': PATH | [image paths] | VideoClip | frames}")
    return read_video(src, fps=float(item.get("fps", fps)),
                      max_frames=item.get("max_frames", max_frames),
                      start=item.get("video_start"), end=item.get("video_end"))


def _expand(conversation, videos: List[List[VideoEntry]], timestamp_format: Optional[str]):
    """The conversation with every video item replaced by its entries (and their timestamps)."""
    conv = copy.copy(list(conversation))
    slots = _video_items(conversation)
    for (mi, ci, _), entries in reversed(list(zip(slots, videos))):
        items = []
        for e in entries:
            if timestamp_format:
                items.append({"type": "text", "text": timestamp_format.format(e.start)})
            items.append({"type": "video"})
        msg = dict(conv[mi])
        msg["content"] = list(msg["content"][:ci]) + items + list(msg["content"][ci + 1:])
        conv[mi] = msg
    return conv


def _processor_geometry(processor) -> Tuple[int, int, int]:
    vp = getattr(processor, "video_processor", None)
    if vp is None:
        raise TypeError(f"{type(processor).__name__} has no video_processor; pass a Qwen2.5-VL "
                        "processor (AutoProcessor.from_pretrained('Qwen/Qwen2.5-VL-7B-Instruct'))")
    return int(vp.patch_size), int(vp.merge_size), int(vp.temporal_patch_size)


def build_qwen_video_inputs(conversations: Sequence[Sequence[Mapping]], processor, *,
                            mode: str = "slow_fast", fps: float = 2.0,
                            max_frames: Optional[int] = None, token_budget: int = 65536,
                            threshold: float = 0.9, patch_cos: float = 0.7,
                            fast_ratio: float = 0.3, min_tokens: int = 48,
                            max_tokens: int = 768, timestamp_format: Optional[str] = "<{:.1f}s>",
                            add_generation_prompt: bool = True, padding_side: str = "left",
                            on_error: str = "skip", counter: Optional[SkipCounter] = None
                            ) -> QwenVideoBatch:
    """Tokenized, padded Qwen2.5-VL inputs for a batch of conversations with videos.

    Each conversation is a list of chat messages in qwen-vl-utils format; a content item
    ``{"type": "video", "video": SRC}`` takes a file path, a list of image paths, a
    :class:`VideoClip` or frames (uint8 ``[T, H, W, 3]`` / float ``[T, 3, H, W]``, with optional
    ``"timestamps"`` or ``"sample_fps"``), and the per-item keys ``fps``, ``max_frames``,
    ``video_start``, ``video_end``.

    Args:
        conversations: B conversations.
        processor: a Qwen2.5-VL processor (``AutoProcessor.from_pretrained``); its patch, merge
            and temporal patch sizes set the token factor.
        mode: "slow_fast" (Keye-VL 1.5 plan, one entry per run, timestamps in text) or "uniform"
            (qwen-vl-utils' defaults, one entry per video, no timestamp text).
        fps, max_frames: frame sampling (qwen-vl-utils ``smart_nframes``).
        token_budget, threshold, patch_cos, fast_ratio, min_tokens, max_tokens: the
            :func:`~mmrl.video.slow_fast.slow_fast_plan` parameters (per video).
        timestamp_format: text placed before each slow-fast entry, formatted with its start
            time in seconds; ``None`` for none.
        add_generation_prompt: end each prompt with the assistant turn header.
        padding_side: "left" (generation) or "right".
        on_error: "skip" (drop the sample, count it in ``counter``) or "raise".
        counter: a :class:`SkipCounter` that accumulates skips across batches.

    Returns:
        :class:`QwenVideoBatch`.

    Raises:
        ValueError: unknown ``mode``/``on_error``/``padding_side``; with ``on_error="raise"``, the
            :class:`VideoError` of the first bad video.
    """
    for name, value, allowed in (("mode", mode, MODES), ("on_error", on_error, ("skip", "raise")),
                                 ("padding_side", padding_side, ("left", "right"))):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")
    patch, merge, temporal = _processor_geometry(processor)
    factor = patch * merge
    counter = counter if counter is not None else SkipCounter()
    batch = QwenVideoBatch(inputs=None, kept=[], skipped={})
    videos, metadata = [], []
    for i, conv in enumerate(conversations):
        try:
            entries, plans = _sample_entries(conv, mode, fps, max_frames, factor, dict(
                token_budget=token_budget, threshold=threshold, patch_cos=patch_cos,
                fast_ratio=fast_ratio, min_tokens=min_tokens, max_tokens=max_tokens))
        except VideoError as err:
            if on_error == "raise":
                raise
            batch.skipped[i] = counter.add(err)
            continue
        fmt = timestamp_format if mode == "slow_fast" else None
        batch.texts.append(processor.apply_chat_template(
            _expand(conv, entries, fmt), tokenize=False,
            add_generation_prompt=add_generation_prompt))
        batch.kept.append(i)
        batch.entries.append([e for es in entries for e in es])
        batch.plans.append(plans)
        for e in batch.entries[-1]:
            videos.append(e.frames.permute(0, 3, 1, 2))  # [n, h, w, 3] -> [n, 3, h, w]
            metadata.append(_metadata(e))
    if batch.kept:
        batch.inputs = _call_processor(processor, batch.texts, videos, metadata, padding_side,
                                       factor)
    return batch


def _sample_entries(conv, mode, fps, max_frames, factor, plan_kwargs):
    entries, plans = [], []
    for _, _, item in _video_items(conv):
        clip = _load_clip(item, fps, max_frames)
        if mode == "uniform":
            entries.append(uniform_entries(clip, factor=factor))
            continue
        try:
            plan = slow_fast_plan(clip.frames, timestamps=clip.timestamps, factor=factor,
                                  **plan_kwargs)
        except ValueError as err:  # a clip too long for the budget is a data problem: skip it
            raise VideoError(clip.path, "over_budget", str(err)) from None
        plans.append(plan)
        entries.append(plan_entries(clip.frames, plan, sample_fps=clip.sample_fps))
    return entries, plans


def _metadata(entry: VideoEntry):
    """VideoMetadata whose ``sampled_fps`` is the entry's real sampling rate."""
    from transformers.video_utils import VideoMetadata
    n = int(entry.frames.shape[0])
    return VideoMetadata(total_num_frames=n, fps=float(entry.fps), frames_indices=list(range(n)),
                         height=int(entry.frames.shape[1]), width=int(entry.frames.shape[2]))


def _call_processor(processor, texts, videos, metadata, padding_side, factor):
    if not videos:  # text-only conversations
        return processor(text=texts, padding=True, padding_side=padding_side, return_tensors="pt")
    # Frames are already at their final multiple-of-factor size: let the processor's own resize
    # keep every size (bounds from one token to the largest entry) and not sample frames again.
    # (t·h·w: Qwen3-VL's video processor bounds a whole video's pixels, Qwen2/2.5-VL's a frame's)
    largest = max(v.shape[0] * v.shape[-2] * v.shape[-1] for v in videos)
    return processor(text=texts, videos=videos, video_metadata=metadata, do_sample_frames=False,
                     size={"shortest_edge": factor * factor, "longest_edge": largest},
                     cap_pixels_per_frame=False, padding=True, padding_side=padding_side,
                     return_tensors="pt")
