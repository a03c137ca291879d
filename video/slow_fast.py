"""Keye-VL 1.5 slow-fast frame plan: full resolution only where the picture changes.

Keye-VL 1.5 (arXiv 2509.01563, §2.2; reference code keye-vl-utils 1.5.2) splits the sampled
frames into *slow* frames, kept at a high resolution, and *fast* frames, which look like the
latest slow frame and get 30 % of its tokens. The test is cheap — HSV patches of a small copy of
each frame — so static stretches cost a fraction of uniform sampling while cuts and motion keep
full detail. See ``../shared/ALGORITHMS.md`` ("Keye-VL 1.5 slow-fast video encoding").

Token accounting here is per frame at 28x28 pixels per token (the Keye convention). Qwen2.5-VL
merges pairs of frames (temporal patch 2), so the language model sees about half of
``total_tokens``; :mod:`mmrl.video.qwen_inputs` reports the exact count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .io import FACTOR, smart_resize

SLOW, FAST = 0, 1
SIM_MAX_TOKENS = 256  # the similarity test runs on frames of at most 256 tokens
NORM_EPS = 0.01  # patches this dark (L2 norm on [0,1] HSV) in both frames are left out


@dataclass
class SlowFastPlan:
    """Which frames are slow (full resolution) and which are fast (reduced).

    Attributes:
        frame_types: LongTensor ``[T]``, 0 = slow, 1 = fast. Frame 0 is always slow.
        similarity: float32 ``[T]``, patch similarity of each frame to the latest slow frame
            before it (1.0 for a slow frame compared with itself at frame 0).
        slow_hw, fast_hw: ``(height, width)`` in pixels, multiples of ``factor``.
        slow_tokens, fast_tokens: tokens per slow / fast frame, ``(h/factor)·(w/factor)``.
        total_tokens: ``S·slow_tokens + F·fast_tokens`` (≤ ``token_budget``).
        token_budget: the budget the plan was made for.
        timestamps: float64 ``[T]`` seconds of each frame.
        factor: pixels per token side.
    """

    frame_types: torch.Tensor
    similarity: torch.Tensor
    slow_hw: Tuple[int, int]
    fast_hw: Tuple[int, int]
    slow_tokens: int
    fast_tokens: int
    total_tokens: int
    token_budget: int
    timestamps: np.ndarray
    factor: int = FACTOR

    @property
    def num_slow(self) -> int:
        return int((self.frame_types == SLOW).sum())

    @property
    def num_fast(self) -> int:
        return int((self.frame_types == FAST).sum())

    @property
    def tokens_per_frame(self) -> torch.Tensor:
        """LongTensor ``[T]``: the tokens each frame costs."""
        return torch.where(self.frame_types == SLOW, self.slow_tokens, self.fast_tokens)

    def runs(self) -> List[Tuple[int, int, int]]:
        """Maximal runs of consecutive same-type frames as ``(type, start, stop)`` (stop exclusive)."""
        types = self.frame_types.tolist()
        out, start = [], 0
        for i in range(1, len(types) + 1):
            if i == len(types) or types[i] != types[start]:
                out.append((types[start], start, i))
                start = i
        return out


def as_uint8_thwc(frames) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` from uint8 ``[T, H, W, 3]`` (decord) or float ``[T, 3, H, W]`` in
    [0, 255] (qwen-vl-utils), numpy or torch.

    Raises:
        TypeError: not an array or tensor.
        ValueError: another rank or layout.
    """
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch.Tensor or numpy array, got {type(frames).__name__}"
                        "; pass clip.frames from mmrl.video.read_video")
    if frames.ndim != 4:
        raise ValueError(f"frames must be 4-D, got shape {tuple(frames.shape)}; expected uint8 "
                         "[T, H, W, 3] or float [T, 3, H, W] in [0, 255]")
    if frames.dtype == torch.uint8 and frames.shape[-1] == 3:
        return frames
    if frames.dtype.is_floating_point and frames.shape[1] == 3:
        return frames.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    raise ValueError(f"frames of shape {tuple(frames.shape)} and dtype {frames.dtype} are neither "
                     "uint8 [T, H, W, 3] (decord) nor float [T, 3, H, W] in [0, 255] "
                     "(qwen-vl-utils); convert them to one of these layouts")


def resize_frames(frames: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> uint8 ``[T, h, w, 3]``, bilinear with antialiasing.

    torch's uint8 channels-last kernel (the one torchvision uses; within 1 of PIL's bilinear)
    is about 5x faster than PIL and than float interpolation.
    """
    if tuple(frames.shape[1:3]) == tuple(hw):
        return frames
    x = frames.permute(0, 3, 1, 2)  # [T, H, W, 3] -> [T, 3, H, W] view, channels-last memory
    x = F.interpolate(x, size=tuple(hw), mode="bilinear", antialias=True, align_corners=False)
    return x.permute(0, 2, 3, 1).contiguous()  # [T, 3, h, w] -> [T, h, w, 3]


def hsv_patch_vectors(frames: torch.Tensor, hw: Tuple[int, int], patch: int = FACTOR) -> np.ndarray:
    """float32 ``[T, P, patch·patch·3]``: each frame resized to ``hw``, converted to HSV exactly as
    OpenCV does for uint8 RGB (H in 0–179, S, V in 0–255), scaled by 1/255, cut into patches.

    NumPy rather than torch: these are small single-threaded kernels, and torch's thread pool
    made them 10–30x slower on a busy machine.
    """
    import cv2
    small = resize_frames(frames, hw).numpy()
    hsv = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2HSV) for f in small])  # [T, h, w, 3] uint8
    t, h, w, _ = hsv.shape
    # [T, h, w, 3] -> [T, h/p, p, w/p, p, 3] -> [T, h/p, w/p, p, p, 3] -> [T, P, p·p·3]
    x = hsv.reshape(t, h // patch, patch, w // patch, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    out = x.astype(np.float32)  # one pass: gathers the transposed view into a fresh C array
    np.multiply(out, np.float32(1 / 255), out=out)  # in place: no second [T, P, D] copy
    return out.reshape(t, (h // patch) * (w // patch), patch * patch * 3)


def patch_similarity(a: np.ndarray, b: np.ndarray, patch_cos: float = 0.7,
                     norm_eps: float = NORM_EPS, norms=None) -> float:
    """Fraction of patches with cosine > ``patch_cos``, over patches not dark in both frames.

    Args:
        a, b: float ``[P, D]`` patch vectors of two frames (NumPy, or tensors).
        norms: optional precomputed ``(‖a‖, ‖b‖)``, each ``[P]``.
    Returns:
        similarity in [0, 1]; 1.0 when every patch is dark in both frames.
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if norms is None:
        norms = (np.sqrt(np.einsum("pd,pd->p", a, a)), np.sqrt(np.einsum("pd,pd->p", b, b)))
    na, nb = norms
    keep = (na >= norm_eps) | (nb >= norm_eps)
    if not keep.any():
        return 1.0
    cos = np.einsum("pd,pd->p", a, b) / np.maximum(na * nb, 1e-12)  # [P]
    return float((cos[keep] > patch_cos).mean())


def frame_similarities(vectors: Iterable[np.ndarray], threshold: float, patch_cos: float
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy slow/fast labels: ``(frame_types [T], similarity [T])``.

    Frame 0 is slow; frame t is compared with the latest slow frame and becomes slow when its
    similarity is below ``threshold``.

    Args:
        vectors: per frame, float ``[P, D]`` patch vectors — a ``[T, P, D]`` array or any
            iterable (a generator keeps one frame in memory at a time).
    """
    types, sims = [], []
    ref = ref_norm = None
    for vec in vectors:
        vec = np.asarray(vec, np.float32)
        norm = np.sqrt(np.einsum("pd,pd->p", vec, vec))  # [P]
        if ref is None:
            s = 1.0
        else:
            s = patch_similarity(vec, ref, patch_cos, norms=(norm, ref_norm))
        sims.append(s)
        types.append(FAST if ref is not None and s >= threshold else SLOW)
        if types[-1] == SLOW:
            ref, ref_norm = vec, norm
    return torch.tensor(types, dtype=torch.long), torch.tensor(sims, dtype=torch.float32)


def _vectors_per_frame(frames: torch.Tensor, hw: Tuple[int, int], patch: int, chunk: int = 16):
    """Yield each frame's ``[P, D]`` HSV patch vectors, converting ``chunk`` frames at a time
    (a 2-minute video would otherwise hold ~0.6 GB of float vectors)."""
    for start in range(0, frames.shape[0], chunk):
        yield from hsv_patch_vectors(frames[start:start + chunk], hw, patch)


def _hw_for_tokens(h: int, w: int, tokens: int, min_tokens: int, factor: int) -> Tuple[int, int]:
    f2 = factor * factor
    return smart_resize(h, w, factor, min_pixels=min_tokens * f2, max_pixels=max(tokens, min_tokens) * f2)


def choose_resolutions(height: int, width: int, num_slow: int, num_fast: int, *,
                       token_budget: int = 65536, fast_ratio: float = 0.3, min_tokens: int = 48,
                       max_tokens: int = 768, factor: int = FACTOR):
    """The largest slow-frame token count T in [min_tokens, max_tokens] whose frames fit the budget.

    T is the slow frame's real token count after ``smart_resize`` (a small video is not upscaled
    to ``max_tokens``); fast frames get ``max(⌊fast_ratio·T⌋, min_tokens)`` tokens. All counts are
    the real tokens of the resized sizes, so the total never exceeds the budget.
    Differs from keye-vl-utils: its binary search can return one step over the budget.

    Returns:
        ``(slow_hw, fast_hw, slow_tokens, fast_tokens, total_tokens)``.

    Raises:
        ValueError: even ``min_tokens`` per frame does not fit; the message says how many frames fit.
    """
    def tok(hw):
        return (hw[0] // factor) * (hw[1] // factor)

    for t in range(max_tokens, min_tokens - 1, -1):  # ≤ 721 tries of integer maths: microseconds
        slow = _hw_for_tokens(height, width, t, min_tokens, factor)
        fast = _hw_for_tokens(height, width, int(fast_ratio * tok(slow)), min_tokens, factor)
        total = num_slow * tok(slow) + num_fast * tok(fast)
        if total <= token_budget:
            return slow, fast, tok(slow), tok(fast), total
    smallest = tok(_hw_for_tokens(height, width, min_tokens, min_tokens, factor))
    raise ValueError(f"{num_slow} slow + {num_fast} fast frames need at least "
                     f"{(num_slow + num_fast) * smallest} tokens at the smallest size "
                     f"({smallest} tokens each), over token_budget={token_budget}; raise "
                     f"token_budget or sample fewer frames (lower fps or max_frames)")


def _check_args(threshold, patch_cos, fast_ratio, token_budget, min_tokens, max_tokens, factor):
    errors = []
    if not 0.0 <= threshold <= 1.0:
        errors.append(f"threshold must be in [0, 1] (code 0.9, paper 0.95), got {threshold}")
    if not -1.0 <= patch_cos <= 1.0:
        errors.append(f"patch_cos must be a cosine in [-1, 1] (Keye: 0.7), got {patch_cos}")
    if not 0.0 < fast_ratio <= 1.0:
        errors.append(f"fast_ratio must be in (0, 1] (Keye: 0.3), got {fast_ratio}")
    if not 1 <= min_tokens <= max_tokens:
        errors.append(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    if token_budget < 1:
        errors.append(f"token_budget must be positive (Keye code: 65536), got {token_budget}")
    if factor < 1:
        errors.append(f"factor must be positive (Qwen2.5-VL: 28), got {factor}")
    if errors:
        raise ValueError("slow_fast_plan: " + "; ".join(errors))


def slow_fast_plan(frames, *, threshold: float = 0.9, patch_cos: float = 0.7,
                   fast_ratio: float = 0.3, token_budget: int = 65536, min_tokens: int = 48,
                   max_tokens: int = 768, factor: int = FACTOR,
                   timestamps: Optional[Sequence[float]] = None) -> SlowFastPlan:
    """Label frames slow/fast by HSV patch similarity and size both kinds to fit ``token_budget``.

    Keye-VL 1.5 slow-fast encoding (arXiv 2509.01563, §2.2): frame 0 is slow; frame t is slow when
    its patch similarity to the latest slow frame is below ``threshold``; slow frames get the
    largest T ∈ [min_tokens, max_tokens] with S·T + F·max(⌊fast_ratio·T⌋, min_tokens) ≤ budget.
    Differs from paper: threshold default 0.9 (the released code), paper 0.95; budget 65,536 (code)
    vs 75K (paper); the budget search never returns a size over the budget.

    Args:
        frames: uint8 ``[T, H, W, 3]`` (decord) or float ``[T, 3, H, W]`` in [0, 255]
            (qwen-vl-utils), sampled at the rate the model will see (2 fps).
        threshold: frame similarity below which a frame starts a new slow frame.
        patch_cos: cosine above which two patches count as similar.
        fast_ratio: a fast frame's token share of a slow frame (at least ``min_tokens``).
        token_budget: the most visual tokens (per frame, 28x28 px each) for the whole video.
        min_tokens, max_tokens: tokens per frame bounds.
        factor: pixels per token side (Qwen2.5-VL: 28).
        timestamps: seconds of each frame; default ``arange(T) / 2`` (2 fps).

    Returns:
        :class:`SlowFastPlan`.

    Raises:
        ValueError: bad arguments, a frame layout that is neither of the two, mismatched
            timestamps, or a budget too small for the frames at ``min_tokens`` each.
    """
    _check_args(threshold, patch_cos, fast_ratio, token_budget, min_tokens, max_tokens, factor)
    frames = as_uint8_thwc(frames)
    t, h, w, _ = frames.shape
    if t == 0:
        raise ValueError("slow_fast_plan got zero frames; read the video with read_video first")
    stamps = np.arange(t, dtype=np.float64) / 2.0 if timestamps is None else \
        np.asarray(timestamps, dtype=np.float64)
    if stamps.shape != (t,):
        raise ValueError(f"timestamps has {stamps.size} entries for {t} frames; pass one per frame")
    sim_hw = smart_resize(h, w, factor, min_pixels=min_tokens * factor * factor,
                          max_pixels=SIM_MAX_TOKENS * factor * factor)
    types, sims = frame_similarities(_vectors_per_frame(frames, sim_hw, factor), threshold,
                                     patch_cos)
    num_slow = int((types == SLOW).sum())
    slow_hw, fast_hw, slow_tok, fast_tok, total = choose_resolutions(
        h, w, num_slow, t - num_slow, token_budget=token_budget, fast_ratio=fast_ratio,
        min_tokens=min_tokens, max_tokens=max_tokens, factor=factor)
    return SlowFastPlan(frame_types=types, similarity=sims, slow_hw=slow_hw, fast_hw=fast_hw,
                        slow_tokens=slow_tok, fast_tokens=fast_tok, total_tokens=total,
                        token_budget=token_budget, timestamps=stamps, factor=factor)
