"""Keye-VL 1.5 slow-fast frame plan: full resolution only where the picture changes.

Keye-VL 1.5 (arXiv 2509.01563, §2.2; reference code keye-vl-utils 1.5.2) splits the sampled
frames into *slow* frames, kept at a high resolution, and *fast* frames, which look like the
latest slow frame and get 30 % of its tokens. The test is cheap — HSV patches of a small copy of
each frame — so static stretches cost a fraction of uniform sampling while cuts and motion keep
full detail. The labels are keye-vl-utils' own, exactly (exact integer patch statistics; its
float32 steps only for cosines within float32 error of the 0.7 cut). See
``../shared/ALGORITHMS.md`` ("Keye-VL 1.5 slow-fast video encoding").

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


def _layout(frames) -> torch.Tensor:
    """``frames`` as a tensor, checked to be uint8 ``[T, H, W, 3]`` or float ``[T, 3, H, W]``."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch.Tensor or numpy array, got {type(frames).__name__}"
                        "; pass clip.frames from mmrl.video.read_video")
    if frames.ndim != 4:
        raise ValueError(f"frames must be 4-D, got shape {tuple(frames.shape)}; expected uint8 "
                         "[T, H, W, 3] or float [T, 3, H, W] in [0, 255]")
    if (frames.dtype == torch.uint8 and frames.shape[-1] == 3) or \
            (frames.dtype.is_floating_point and frames.shape[1] == 3):
        return frames
    raise ValueError(f"frames of shape {tuple(frames.shape)} and dtype {frames.dtype} are neither "
                     "uint8 [T, H, W, 3] (decord) nor float [T, 3, H, W] in [0, 255] "
                     "(qwen-vl-utils); convert them to one of these layouts")


def as_uint8_thwc(frames) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` from uint8 ``[T, H, W, 3]`` (decord) or float ``[T, 3, H, W]`` in
    [0, 255] (qwen-vl-utils), numpy or torch; float values are clamped and rounded.

    Raises:
        TypeError: not an array or tensor.
        ValueError: another rank or layout.
    """
    frames = _layout(frames)
    if frames.dtype == torch.uint8:
        return frames
    return frames.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


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


def hsv_frames(frames, hw: Tuple[int, int]) -> np.ndarray:
    """uint8 ``[T, h, w, 3]``: the frames the similarity test compares — resized to ``hw`` and
    converted to HSV exactly as keye-vl-utils 1.5.2 does (H in 0–179, S and V in 0–255).

    The reference resizes whatever tensor it is given with torch's antialiased bilinear kernel, then
    casts to uint8 by truncation: uint8 ``[T, H, W, 3]`` frames (decord's) go through torch's uint8
    kernel on their ``[T, 3, H, W]`` view (rounded, exactly what the reference computes on decord's
    frames); float ``[T, 3, H, W]`` frames go through the float kernel in their own dtype and memory
    layout, then ``.float()`` and truncation.
    Differs from keye-vl-utils: float results are clamped to [0, 255] before the cast (the
    reference's cast of out-of-range floats is undefined; in-range input never produces them).

    Args:
        frames: uint8 ``[T, H, W, 3]`` or float ``[T, 3, H, W]`` in [0, 255], numpy or torch.
        hw: ``(h, w)`` of the compared frames, multiples of the patch size.
    """
    import cv2
    frames = _layout(frames)
    if frames.dtype == torch.uint8:  # [T, H, W, 3] -> [T, 3, H, W] view, channels-last memory
        small = F.interpolate(frames.permute(0, 3, 1, 2), size=tuple(hw), mode="bilinear",
                              antialias=True).permute(0, 2, 3, 1).numpy()   # [T, h, w, 3] view
    else:
        small = F.interpolate(frames, size=tuple(hw), mode="bilinear", antialias=True).float()
        small = small.clamp_(0, 255).permute(0, 2, 3, 1).numpy().astype(np.uint8)  # truncates
    t, h, w, _ = small.shape
    # HSV is per pixel: one OpenCV call on the frames stacked as one [T·h, w, 3] image
    return cv2.cvtColor(np.ascontiguousarray(small).reshape(t * h, w, 3),
                        cv2.COLOR_RGB2HSV).reshape(t, h, w, 3)


def _patch_sums(a: np.ndarray, b: np.ndarray, patch: int) -> np.ndarray:
    """int64 ``[..., P]``: ``Σ a·b`` over each ``patch x patch x 3`` block of uint8
    ``[..., h, w, 3]`` frames, patches in row-major order.

    Exact integers: a product is at most 255² = 65,025 (fits uint16), a patch sum at most
    3·patch²·65,025 (fits uint32 up to patch 148, uint64 above). Summing the patch's rows first
    adds whole contiguous rows, faster than reducing both patch axes at once.
    """
    *lead, h, w, _ = a.shape
    acc = np.uint32 if 3 * patch * patch * 65025 < 2 ** 32 else np.uint64
    prod = np.multiply(a, b, dtype=np.uint16)                        # [..., h, w, 3]
    # [..., h, w, 3] -> [..., h/p, p, 3w] -> sum the p rows -> [..., h/p, 3w]
    rows = prod.reshape(*lead, h // patch, patch, 3 * w).sum(axis=-2, dtype=acc)
    # [..., h/p, 3w] -> [..., h/p, w/p, 3p] -> sum each patch's 3p columns -> [..., P]
    sums = rows.reshape(*lead, h // patch, w // patch, 3 * patch).sum(axis=-1, dtype=acc)
    return sums.reshape(*lead, -1).astype(np.int64)


def _cos_margin(patch: int) -> float:
    """How far from ``patch_cos`` an exact cosine must be for keye-vl-utils' float32 cosine to fall
    on the same side: ``4·D·u`` with ``D = 3·patch²`` values per patch and ``u = 2⁻²⁴``.

    The reference sums D non-negative float32 terms for each norm and for the dot product of the
    normalised vectors; any summation order of n non-negative terms has relative error at most
    γ_{n-1} ≈ (n-1)·u, the square roots, divisions and products add a few u, and adding 1e-8 to a
    norm ≥ 1 rounds away. Its cosine (in [0, 1]) is therefore within 2·γ_{D-1} + 5u of the exact one
    (2.8·10⁻⁴ at D = 2,352); the margin is twice that, and our exact-integer cosine is off by
    ~10⁻¹⁵. Outside the margin both sides agree with exact maths; inside it the reference's own
    float32 steps decide.
    """
    return 4.0 * 3 * patch * patch * 2.0 ** -24


def _keye_patch_similar(a: np.ndarray, b: np.ndarray, rows: np.ndarray, patch: int,
                        patch_cos: float) -> np.ndarray:
    """bool ``[k]``: patches ``rows`` similar in keye-vl-utils' own float32 arithmetic.

    The same torch operations on the same element order (channel-major, as its
    ``rearrange("c (h p1) (w p2) -> h w (c p1 p2)")``): norm + 1e-8, divide, multiply, sum, ``>``.
    Used only for patches whose exact cosine is within :func:`_cos_margin` of ``patch_cos``.
    """
    def vectors(x):  # uint8 [h, w, 3] -> float32 [k, 3·p·p], (c, p1, p2) order
        h, w, _ = x.shape
        blocks = x.reshape(h // patch, patch, w // patch, patch, 3)[rows // (w // patch), :,
                                                                    rows % (w // patch)]
        # [k, p1, p2, c] -> [k, c, p1, p2] -> [k, c·p1·p2]
        return torch.from_numpy(np.ascontiguousarray(blocks.transpose(0, 3, 1, 2))
                                .reshape(len(rows), -1)).float()

    va, vb = vectors(a), vectors(b)
    na = torch.norm(va, p=2, dim=-1, keepdim=True) + 1e-8
    nb = torch.norm(vb, p=2, dim=-1, keepdim=True) + 1e-8
    cos = ((va / na) * (vb / nb)).sum(dim=-1)
    return (cos > patch_cos).numpy()


def patch_similarity(a: np.ndarray, b: np.ndarray, patch_cos: float = 0.7, patch: int = FACTOR,
                     sq_norms: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> float:
    """Fraction of patches with cosine > ``patch_cos`` among patches not black in both frames,
    as the float32 keye-vl-utils 1.5.2 compares with the threshold.

    Two uint8 HSV frames ``[h, w, 3]`` (from :func:`hsv_frames`) are cut into ``patch x patch``
    blocks; each block is a vector of 3·patch² raw HSV values. A patch is left out when it is zero
    in both frames (the reference's ``norm < 0.01`` on raw 0–255 values: integer vectors have norm
    0 or ≥ 1). Dot products and norms are exact integers; a cosine within :func:`_cos_margin` of
    ``patch_cos`` is decided by :func:`_keye_patch_similar` (the reference's own float32 steps),
    so every patch gets the reference's verdict. The result is float32(k / n), the value the
    reference's ``mean()`` returns.
    Differs from keye-vl-utils: 1.0 when no patch is left (the reference gets NaN); both make the
    frame fast.

    Args:
        a, b: uint8 ``[h, w, 3]`` HSV frames, ``h`` and ``w`` multiples of ``patch``.
        sq_norms: optional precomputed ``(Σa², Σb²)`` per patch, int64 ``[P]``.
    Returns:
        similarity in [0, 1] (a float32 value as a Python float).
    """
    na2, nb2 = sq_norms if sq_norms is not None else (_patch_sums(a, a, patch),
                                                       _patch_sums(b, b, patch))
    keep = (na2 > 0) | (nb2 > 0)
    n = int(keep.sum())
    if n == 0:
        return 1.0
    dot = _patch_sums(a, b, patch).astype(np.float64)
    denom = np.sqrt(na2.astype(np.float64)) * np.sqrt(nb2.astype(np.float64))
    cos = np.divide(dot, denom, out=np.zeros_like(dot), where=denom > 0)  # one side black: 0
    similar = cos > patch_cos
    near = np.flatnonzero(keep & (np.abs(cos - patch_cos) <= _cos_margin(patch)))
    if near.size:
        similar[near] = _keye_patch_similar(a, b, near, patch, patch_cos)
    return float(np.float32(int((similar & keep).sum())) / np.float32(n))


def frame_similarities(hsv: Iterable[np.ndarray], threshold: float, patch_cos: float,
                       patch: int = FACTOR) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy slow/fast labels: ``(frame_types [T], similarity [T])``.

    Frame 0 is slow; frame t is compared with the latest slow frame and becomes slow when its
    similarity is below ``threshold`` (``sim < threshold`` on the float32 similarity, as
    keye-vl-utils compares: at 0.9 a similarity of exactly 9/10 is float32 0.89999998, so slow).

    Args:
        hsv: uint8 HSV frames (from :func:`hsv_frames`): one ``[T, h, w, 3]`` array, or an
            iterable of ``[c, h, w, 3]`` chunks (a generator keeps one chunk in memory at a time).
    """
    types, sims = [], []
    ref = ref_sq = None
    for chunk in ([hsv] if isinstance(hsv, np.ndarray) else hsv):
        for frame in chunk:  # one frame at a time: its uint16 products stay in cache
            sq = _patch_sums(frame, frame, patch)  # [P] Σx² of this frame's patches
            s = 1.0 if ref is None else patch_similarity(frame, ref, patch_cos, patch,
                                                         (sq, ref_sq))
            sims.append(s)
            types.append(FAST if ref is not None and not s < threshold else SLOW)
            if types[-1] == SLOW:
                ref, ref_sq = frame, sq
    return torch.tensor(types, dtype=torch.long), torch.tensor(sims, dtype=torch.float32)


def _hsv_chunks(frames: torch.Tensor, hw: Tuple[int, int], chunk: int = 16):
    """Yield uint8 ``[c, h, w, 3]`` HSV frames, ``chunk`` frames at a time."""
    for start in range(0, frames.shape[0], chunk):
        yield hsv_frames(frames[start:start + chunk], hw)


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
    Frame types equal keye-vl-utils 1.5.2's ``extract_slow_fast_frames`` on the same frames (its
    resize and uint8 cast in :func:`hsv_frames`; its patch verdicts, all-zero rule and float32
    similarity in :func:`patch_similarity`), at the default ``factor`` and ``min_tokens``, which
    set the test frames' size (the reference fixes 28 and 48).
    Differs from paper: threshold default 0.9 (the released code), paper 0.95; budget 65,536 (code)
    vs 75K (paper); the budget search never returns a size over the budget.
    Differs from keye-vl-utils: ``similarity`` is 1.0 where every patch is black in both frames
    (NaN there; both label the frame fast).

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
    frames = _layout(frames)
    t = frames.shape[0]
    h, w = frames.shape[1:3] if frames.dtype == torch.uint8 else frames.shape[2:4]
    if t == 0:
        raise ValueError("slow_fast_plan got zero frames; read the video with read_video first")
    stamps = np.arange(t, dtype=np.float64) / 2.0 if timestamps is None else \
        np.asarray(timestamps, dtype=np.float64)
    if stamps.shape != (t,):
        raise ValueError(f"timestamps has {stamps.size} entries for {t} frames; pass one per frame")
    sim_hw = smart_resize(h, w, factor, min_pixels=min_tokens * factor * factor,
                          max_pixels=SIM_MAX_TOKENS * factor * factor)
    types, sims = frame_similarities(_hsv_chunks(frames, sim_hw), threshold, patch_cos,
                                     factor)
    num_slow = int((types == SLOW).sum())
    slow_hw, fast_hw, slow_tok, fast_tok, total = choose_resolutions(
        h, w, num_slow, t - num_slow, token_budget=token_budget, fast_ratio=fast_ratio,
        min_tokens=min_tokens, max_tokens=max_tokens, factor=factor)
    return SlowFastPlan(frame_types=types, similarity=sims, slow_hw=slow_hw, fast_hw=fast_hw,
                        slow_tokens=slow_tok, fast_tokens=fast_tok, total_tokens=total,
                        token_budget=token_budget, timestamps=stamps, factor=factor)
