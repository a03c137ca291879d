"""The reward server's media encoding: images, videos and pairs as JSON entries, decoded with
every size limit checked before any pixel is decoded (see :mod:`mmrl.rewards.server` for the
routes and the security model).

- image: ``{"format": "png", "data": base64 PNG}`` (PIL inputs; lossless for 8-bit images) or
  ``{"format": "f32", "shape": [C, H, W], "data": base64 little-endian float32}`` (tensor inputs,
  sent exactly); one request holds all ``png`` or all ``f32`` entries of one shape.
- video: ``{"format": "png", "frames": [F base64 PNG]}`` (8-bit frames, RGB after decoding) or
  ``{"format": "f32", "shape": [F, C, H, W], "data": base64 float32}``; the videos of a request
  share one ``[F, C, H, W]`` (a video scorer takes one ``[B, F, C, H, W]`` tensor).

Only PNG is decoded from a ``png`` entry (``Image.open(formats=["PNG"])``); pixel counts are read
from the PNG headers or the f32 shapes and capped per image or frame (``max_image_pixels``) and
per request (``max_request_pixels``, all images, frames and both sides of a pair together).
"""
from __future__ import annotations

import base64
import io
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# 16.8 Mpx (4096^2) per image and 64 Mpx per request (64 images of 1024^2): decoded RGB that is
# 50 MB per image and 200 MB per request, where a 9000^2 PNG of 97 KiB would otherwise cost 243 MB.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_REQUEST_PIXELS = 64 * 2**20
MAX_VIDEO_FRAMES = 256  # frames per video


class RequestError(ValueError):
    """A request the server refuses: ``status`` is the HTTP code (4xx/503), the text the reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class PixelBudget:
    """Counts the pixels of a request as headers are read; raises 413 past a limit.

    Args:
        max_image: pixels per image or frame.
        max_request: pixels per request (every image, frame and pair side together).
    """

    def __init__(self, max_image: int = MAX_IMAGE_PIXELS, max_request: int = MAX_REQUEST_PIXELS):
        self.max_image, self.max_request, self.total = int(max_image), int(max_request), 0

    def add(self, what: str, w: int, h: int, held: str):
        """Count a ``w x h`` image; ``what`` names it ("image 3"), ``held`` what holds the total
        so far ("images 0..3 hold")."""
        if w < 1 or h < 1:
            raise RequestError(400, f"{what} is empty ({w}x{h} pixels); send at least 1x1")
        if w * h > self.max_image:
            raise RequestError(413, f"{what} is {w}x{h} = {w * h} pixels, over the server's "
                                    f"max_image_pixels {self.max_image}; resize it (or raise "
                                    f"--max-image-pixels)")
        self.total += w * h
        if self.total > self.max_request:
            raise RequestError(413, f"{held} {self.total} pixels, over the server's "
                                    f"max_request_pixels {self.max_request}; send fewer images "
                                    f"per request (or raise --max-request-pixels)")


def _item(label: str, i: int) -> str:
    """``image 3`` for the ``images`` field, ``images_b[3]`` for a named one."""
    return f"{label} {i}" if label in ("image", "video") else f"{label}[{i}]"


def _held(label: str, i: int) -> str:
    if label in ("image", "video"):
        return f"{label}s 0..{i} hold" if i else f"{label} 0 holds"
    return f"{label}[0..{i}] hold" if i else f"{label}[0] holds"


def _png_entry(buf_im: Image.Image) -> str:
    buf = io.BytesIO()
    buf_im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _f32_entry(a: np.ndarray) -> Dict[str, Any]:
    a = a.astype("<f4", copy=False)
    return {"format": "f32", "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}


def encode_images(images) -> List[Dict[str, Any]]:
    """PIL images -> PNG entries; a float tensor ``[B, C, H, W]`` -> exact float32 entries."""
    if isinstance(images, torch.Tensor):
        return [_f32_entry(a) for a in images.detach().to("cpu", torch.float32).numpy()]
    return [{"format": "png", "data": _png_entry(im)} for im in images]


def encode_videos(videos: torch.Tensor, fmt: str = "f32") -> List[Dict[str, Any]]:
    """``[B, F, C, H, W]`` in [0, 1] -> video entries: ``f32`` exact, or ``png`` frames (8-bit,
    rounded; 4-10x smaller for natural frames)."""
    arr = videos.detach().to("cpu", torch.float32).numpy()  # [B, F, C, H, W]
    if fmt == "f32":
        return [_f32_entry(v) for v in arr]
    if fmt != "png":
        raise ValueError(f"video format {fmt!r}; expected 'f32' (exact) or 'png' (8-bit)")
    u8 = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8).transpose(0, 1, 3, 4, 2)
    out = []
    for v in u8:  # [F, H, W, C]
        frames = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in v]
        out.append({"format": "png", "frames": [_png_entry(f) for f in frames]})
    return out


def _b64(data: Any, what: str) -> bytes:
    if data is None:
        raise RequestError(400, f"{what} has no 'data'; expected base64 bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (TypeError, ValueError) as err:
        raise RequestError(400, f"{what}: 'data' is not valid base64 ({err})") from None


def _open_png(data: bytes, what: str) -> Image.Image:
    try:  # lazy: reads the header only
        return Image.open(io.BytesIO(data), formats=["PNG"])
    except UnidentifiedImageError:
        raise RequestError(400, f"{what} is declared 'png' but is not a PNG (starts with "
                                f"{data[:8]!r}); send PNG bytes, no other format is "
                                f"decoded") from None
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"{what}: {err}") from None


def _load_png(im: Image.Image, what: str) -> Image.Image:
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
        # PIL's decoders raise all of these on corrupt or truncated data
        raise RequestError(400, f"{what}: the PNG could not be decoded ({type(err).__name__}: "
                                f"{err}); send complete PNG files") from None
    return im


def _shape(entry: Dict[str, Any], rank: int, what: str) -> Tuple[int, ...]:
    s = entry.get("shape")
    if (not isinstance(s, list) or len(s) != rank
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in s)):
        dims = "[C, H, W]" if rank == 3 else "[F, C, H, W]"
        raise RequestError(400, f"{what} has shape {s!r}; expected {dims} integers")
    return tuple(s)


def _one_format(entries: Any, key: str, label: str) -> str:
    if not isinstance(entries, list) or not entries:
        fields = ("'data': base64, ..." if label == "image"
                  else "'frames': [base64 PNG] | 'shape', 'data'")
        raise RequestError(400, f"'{key}' is {type(entries).__name__}; expected a non-empty list "
                                f"of {{'format': 'png' | 'f32', {fields}}} entries")
    formats = {e.get("format") if isinstance(e, dict) else None for e in entries}
    if formats in ({"png"}, {"f32"}):
        return formats.pop()
    raise RequestError(400, f"{label} formats {sorted(map(str, formats))}; expected all 'png' or "
                            f"all 'f32'")


def _f32_shape(entries, rank: int, label: str, budget: PixelBudget,
               max_frames: Optional[int] = None) -> Tuple[int, ...]:
    """The one shape of f32 entries, counted against ``budget`` before any data is decoded."""
    shapes = {_shape(e, rank, _item(label, i)) for i, e in enumerate(entries)}
    if len(shapes) != 1:
        raise RequestError(400, f"f32 {label}s have different shapes {sorted(shapes)}; send one "
                                f"shape per request")
    shape = shapes.pop()
    c, h, w = shape[-3:]
    if rank == 4:
        _check_frames(shape[0], max_frames, _item(label, 0))
    if c < 1:
        raise RequestError(400, f"f32 shape {list(shape)} has {c} channels; expected 1, 3 or 4")
    per = shape[0] if rank == 4 else 1
    for i in range(len(entries)):
        for _ in range(per):
            budget.add(_item(label, i), w, h, _held(label, i))
    return shape


def _f32_data(entries, shape: Tuple[int, ...], label: str) -> torch.Tensor:
    n = 4 * int(np.prod(shape))
    arrs = []
    for i, e in enumerate(entries):
        raw = _b64(e.get("data"), _item(label, i))
        if len(raw) != n:
            raise RequestError(400, f"{_item(label, i)} has {len(raw)} bytes of data for shape "
                                    f"{list(shape)}; expected {n} (float32)")
        arrs.append(np.frombuffer(raw, dtype="<f4").reshape(shape))
    return torch.from_numpy(np.stack(arrs))  # np.stack copies: the tensor owns writable memory


def decode_images(entries: List[Dict[str, Any]], max_image_pixels: int = MAX_IMAGE_PIXELS,
                  max_request_pixels: int = MAX_REQUEST_PIXELS, key: str = "images",
                  budget: Optional[PixelBudget] = None):
    """Inverse of :func:`encode_images`: a PIL list or a ``[B, C, H, W]`` float tensor.

    Pixel counts are checked from the PNG headers (or the f32 shapes) before anything is decoded;
    only PNG is decoded from a ``png`` entry, whatever else PIL could read.

    Args:
        key: the body field, named in errors (``images_a`` ...).
        budget: a request's running pixel count (both sides of a pair); default: a new one.

    Raises:
        RequestError: 400 for a malformed entry, an undecodable or empty image; 413 for an image
            over ``max_image_pixels`` or a batch over ``max_request_pixels``.
    """
    budget = budget or PixelBudget(max_image_pixels, max_request_pixels)
    return open_images(entries, budget, key)()


def open_images(entries: Any, budget: PixelBudget, key: str = "images"):
    """Check ``entries``' headers against ``budget``; return a function that decodes them."""
    label = "image" if key == "images" else key
    if _one_format(entries, key, "image") == "f32":
        shape = _f32_shape(entries, 3, label, budget)
        return lambda: _f32_data(entries, shape, label)
    opened = []
    for i, e in enumerate(entries):
        im = _open_png(_b64(e.get("data"), _item(label, i)), _item(label, i))
        w, h = im.size
        budget.add(_item(label, i), w, h, _held(label, i))
        opened.append(im)
    return lambda: [_load_png(im, _item(label, i)) for i, im in enumerate(opened)]


def _check_frames(n: Any, max_frames: Optional[int], what: str):
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise RequestError(400, f"{what} has {n!r} frames; expected at least 1")
    if max_frames is not None and n > max_frames:
        raise RequestError(413, f"{what} has {n} frames, over the server's max_video_frames "
                                f"{max_frames}; sample fewer frames (or raise "
                                f"--max-video-frames)")


def open_videos(entries: Any, budget: PixelBudget, max_frames: int = MAX_VIDEO_FRAMES,
                key: str = "videos"):
    """Check video entries (frame counts, shapes, pixels from headers) against the limits; return
    a function that decodes them to ``[B, F, C, H, W]`` float32 (PNG frames: RGB in [0, 1])."""
    label = "video" if key == "videos" else key
    if _one_format(entries, key, "video") == "f32":
        shape = _f32_shape(entries, 4, label, budget, max_frames)
        return lambda: _f32_data(entries, shape, label)
    opened, sizes = [], set()
    for i, e in enumerate(entries):
        frames = e.get("frames")
        _check_frames(len(frames) if isinstance(frames, list) else frames, max_frames,
                      _item(label, i))
        video = []
        for t, data in enumerate(frames):
            what = f"{_item(label, i)} frame {t}"
            im = _open_png(_b64(data, what), what)
            budget.add(what, *im.size, _held(label, i))
            sizes.add((len(frames), *im.size))
            video.append(im)
        opened.append(video)
    if len(sizes) != 1:
        raise RequestError(400, f"png {label}s have different (frames, width, height) "
                                f"{sorted(sizes)[:3]}; send one frame count and size per request")

    def decode() -> torch.Tensor:
        out = np.stack([np.stack([np.asarray(_load_png(im, f"{_item(label, i)} frame {t}")
                                             .convert("RGB"))
                                  for t, im in enumerate(v)]) for i, v in enumerate(opened)])
        # [B, F, H, W, 3] uint8 -> [B, F, 3, H, W] float in [0, 1]
        return torch.from_numpy(out).permute(0, 1, 4, 2, 3).float().div_(255.0)
    return decode


def decode_videos(entries: List[Dict[str, Any]], max_frames: int = MAX_VIDEO_FRAMES,
                  max_image_pixels: int = MAX_IMAGE_PIXELS,
                  max_request_pixels: int = MAX_REQUEST_PIXELS) -> torch.Tensor:
    """Inverse of :func:`encode_videos`: ``[B, F, C, H, W]`` float32 (limits as
    :func:`open_videos`)."""
    return open_videos(entries, PixelBudget(max_image_pixels, max_request_pixels), max_frames)()


def entry_bytes(entry: Dict[str, Any]) -> int:
    """About how many bytes ``entry`` takes in a JSON body."""
    if "frames" in entry:
        return sum(len(f) + 3 for f in entry["frames"]) + 48
    return len(entry["data"]) + 16 * len(entry.get("shape", ())) + 48
