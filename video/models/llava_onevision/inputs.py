"""LLaVA-OneVision prompt inputs: one conversation -> its processor tensors.

LLaVA-OneVision sees a video as a stack of frames at the vision tower's square size (384×384
for the released checkpoints, the tiny model's ``image_size`` here); each frame gives
``ceil(p/2)²`` tokens after the 2×2 bilinear pooling (``p = image_size / patch_size``) and one
learned newline token closes the video. So the token count depends only on the frame count:
the job's ``fps`` and ``max_frames`` choose the frames (:func:`mmrl.video.io.read_video`, the
same sampling as the Qwen family's ``uniform`` mode) and the slow-fast keys (``mode:
slow_fast``, its token budgets) do not apply: ``mode: slow_fast`` warns once and samples
uniformly. Images go through the processor's anyres tiling (one image per prompt) or its
multi-image path (several).

The released chat template reads each message's ``content`` as a list of typed items (a plain
string content would render nothing), so string contents become one text item before templating,
and media items are reduced to their type (the template places ``<video>`` / ``<image>``).
transformers is imported inside the functions.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from mmrl.video.io import VideoClip, VideoError, read_video

MEDIA = ("video", "image")


def _items(message: Mapping) -> List[Any]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content or [])


def _kind(item: Any) -> Optional[str]:
    if not isinstance(item, Mapping):
        return None
    kind = item.get("type")
    return kind if kind in MEDIA else next((k for k in MEDIA if k in item), None)


def template_messages(messages: Sequence[Mapping]) -> List[Dict[str, Any]]:
    """The conversation as the chat template wants it: list contents, media items as
    ``{"type": "video"}`` / ``{"type": "image"}`` (their sources stay out of the text)."""
    out = []
    for message in messages:
        items = [{"type": _kind(i)} if _kind(i) else i for i in _items(message)]
        out.append({**message, "content": items})
    return out


def media_items(messages: Sequence[Mapping]) -> List[Tuple[str, Mapping]]:
    """``(kind, item)`` for every video/image item, in conversation order."""
    return [(_kind(i), i) for m in messages for i in _items(m) if _kind(i)]


def load_frames(item: Mapping, fps: float, max_frames: Optional[int]) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]`` frames of a video item: a path or image list (sampled with
    :func:`~mmrl.video.io.read_video`), a :class:`~mmrl.video.io.VideoClip`, or frames
    (uint8 ``[T, H, W, 3]``, as the difficulty augmenter passes them).

    Raises:
        VideoError: an unreadable or unusable file (the policy skips the prompt).
        TypeError: an item without a ``video`` source.
    """
    src = item.get("video")
    if isinstance(src, VideoClip):
        frames = src.frames
    elif isinstance(src, (torch.Tensor, np.ndarray)):
        frames = torch.as_tensor(src)
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
            raise TypeError(f"video frames of dtype {frames.dtype} and shape "
                            f"{tuple(frames.shape)}; expected uint8 [T, H, W, 3] RGB")
    elif src is None:
        raise TypeError(f"video item {dict(item)!r} has no 'video' key; expected "
                        "{'type': 'video', 'video': PATH | [image paths] | VideoClip | frames}")
    else:
        frames = read_video(src, fps=float(item.get("fps", fps)),
                            max_frames=item.get("max_frames", max_frames),
                            start=item.get("video_start"), end=item.get("video_end")).frames
    return frames.permute(0, 3, 1, 2).contiguous()  # [T, H, W, 3] -> [T, 3, H, W]


def load_image(item: Mapping):
    """The RGB PIL image of an image item: a path, a PIL image, or uint8 ``[H, W, 3]`` /
    ``[1, H, W, 3]`` pixels (a noised copy from the difficulty augmenter).

    Raises:
        VideoError: an unreadable file (problem ``unreadable_image``).
    """
    from PIL import Image
    src = item.get("image")
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, (torch.Tensor, np.ndarray)):
        pixels = np.asarray(src.cpu() if isinstance(src, torch.Tensor) else src)
        return Image.fromarray(pixels[0] if pixels.ndim == 4 else pixels).convert("RGB")
    try:
        return Image.open(src).convert("RGB")
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise VideoError(str(src), "unreadable_image", str(err)) from None


def encode_conversation(messages: Sequence[Mapping], processor,
                        video_options: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """One prompt's processor tensors: ``input_ids [1, n]``, ``attention_mask [1, n]``, and
    ``pixel_values_videos [videos, T, 3, S, S]`` and/or ``pixel_values``, ``image_sizes``,
    ``batch_num_images`` when the prompt has media.

    Args:
        messages: a conversation in qwen-vl-utils format
            (:func:`mmrl.video.data.build_messages`).
        processor: a ``LlavaOnevisionProcessor``.
        video_options: the job's video keywords; ``fps`` and ``max_frames`` are used
            (``mode`` other than ``uniform`` warns).

    Raises:
        VideoError: unreadable media.
        ValueError: several videos of different frame counts in one prompt (the processor
            stacks a prompt's videos).
    """
    fps = float(video_options.get("fps", 2.0))
    if video_options.get("mode", "uniform") != "uniform":
        warnings.warn(f"video mode={video_options['mode']!r} does not apply to LLaVA-OneVision "
                      f"(a fixed number of tokens per frame); frames are sampled uniformly by "
                      f"fps and max_frames. Set video.video_mode=uniform to silence this.",
                      UserWarning, stacklevel=2)
    max_frames = video_options.get("max_frames")
    videos, images = [], []
    for kind, item in media_items(messages):
        if kind == "video":
            videos.append(load_frames(item, fps, max_frames))
        else:
            images.append(load_image(item))
    if len({v.shape[0] for v in videos}) > 1:
        raise ValueError(f"one prompt has videos of {[v.shape[0] for v in videos]} frames; "
                         f"LLaVA-OneVision stacks a prompt's videos, so give them the same "
                         f"frame count (the item key max_frames)")
    text = processor.apply_chat_template(template_messages(messages), tokenize=False,
                                         add_generation_prompt=True)
    kwargs = {}
    if videos:
        kwargs["videos"] = videos
    if images:  # nested: one list per prompt (one image: anyres tiles; several: one tile each)
        kwargs["images"] = [images]
    return dict(processor(text=[text], return_tensors="pt", **kwargs))
