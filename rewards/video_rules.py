"""Rule rewards for videos that need no weights: motion direction named in the prompt, flicker,
and a brightness trend named in the prompt. A demo can learn each; all are differentiable.

Every rule reads the BT.601 luma ``L = 0.299 R + 0.587 G + 0.114 B`` of each frame
(:data:`mmrl.rewards.rules.LUMA`). Coordinates are normalised to the frame: ``x = j / (W - 1)``
for column j and ``y = i / (H - 1)`` for row i (0 for a one-pixel side), so a displacement
across the whole frame is 1. Image rows grow downwards: "down" is +y.

A named colour reached by the last frame needs no rule of its own: lift ``prompt_color`` with
``frames:scorer=prompt_color:reduce=frame:frame=-1``.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch

from mmrl.rewards.rules import LUMA
from mmrl.rewards.video import VideoScorer

Tensor = torch.Tensor

DIRECTIONS: Dict[str, Tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
"""Unit vectors ``(x, y)`` of the directions a prompt may name."""
TRENDS: Dict[str, float] = {
    "brighter": 1.0, "brightening": 1.0, "lighter": 1.0, "lightening": 1.0,
    "darker": -1.0, "darkening": -1.0, "dimming": -1.0, "fading": -1.0}
"""Words naming a brightness trend: +1 brighter over time, -1 darker."""


def _first_word(words, prompt: str) -> Optional[str]:
    m = re.search(r"\b(" + "|".join(words) + r")\b", prompt, re.IGNORECASE)
    return None if m is None else m.group(1).lower()


def prompt_direction(prompt: str) -> Optional[str]:
    """The first of left / right / up / down in ``prompt`` as a whole word (any case), or None:
    ``"a red square moving left"`` -> ``"left"``; ``"upwards"`` -> None."""
    return _first_word(DIRECTIONS, prompt)


def luma(videos: Tensor) -> Tensor:
    """``[b, F, 3, H, W]`` -> ``[b, F, H, W]`` BT.601 luma."""
    w = torch.tensor(LUMA, dtype=videos.dtype, device=videos.device).view(1, 1, 3, 1, 1)
    return (videos * w).sum(dim=2)


def centroids(weights: Tensor) -> Tensor:
    """``[b, F, H, W]`` non-negative weights -> ``[b, F, 2]`` their centroid ``(x, y)`` in [0, 1].

    An all-zero frame has the centre ``(0.5, 0.5)``: ``c = (Σ w·p + ε/2) / (Σ w + ε)`` with
    ``ε = 1e-6``, which moves any other frame's centroid by less than ``ε / Σ w`` (1e-6 for
    one white pixel) and keeps the gradient finite.
    """
    H, W = weights.shape[-2:]
    xs = torch.linspace(0, 1, W, dtype=weights.dtype, device=weights.device) if W > 1 else \
        torch.zeros(1, dtype=weights.dtype, device=weights.device)
    ys = torch.linspace(0, 1, H, dtype=weights.dtype, device=weights.device) if H > 1 else \
        torch.zeros(1, dtype=weights.dtype, device=weights.device)
    eps = 1e-6
    total = weights.sum(dim=(-2, -1)) + eps  # [b, F]
    cx = ((weights.sum(dim=-2) * xs).sum(dim=-1) + eps / 2) / total  # column sums [b, F, W]
    cy = ((weights.sum(dim=-1) * ys).sum(dim=-1) + eps / 2) / total  # row sums [b, F, H]
    return torch.stack([cx, cy], dim=-1)


class _PromptSign(VideoScorer):
    """Shared parts of the rules that read one word from the prompt and score a signed change
    ``d`` in [-1, 1]: the fixed-word option, ``target`` and ``missing``."""

    words: Dict[str, object] = {}  # the prompt words read
    option = "direction"  # the option fixing the word for every prompt
    choices: Tuple[str, ...] = ()  # its values

    def __init__(self, fixed: Optional[str], target: Optional[float], missing: Optional[float],
                 batch_size: int, grad: bool):
        if fixed is not None and fixed not in self.choices:
            raise ValueError(f"{self.name}: {self.option}={fixed!r}; expected one of "
                             f"{', '.join(self.choices)} or None to read it from the prompt")
        if target is not None and not 0.0 < float(target) <= 1.0:
            raise ValueError(f"{self.name}: target={target!r}; expected a displacement in "
                             f"(0, 1] or None to reward the signed change itself")
        lowest = -1.0 if target is None else -1.0 - float(target)
        if missing is not None and not lowest <= float(missing) <= 0.0:
            raise ValueError(f"{self.name}: missing={missing!r}; expected a number in "
                             f"[{lowest:g}, 0] (the score of a prompt naming none) or None")
        super().__init__(batch_size, grad)
        self.fixed = fixed
        self.target = None if target is None else float(target)
        self.missing = None if missing is None else float(missing)
        self.uses_prompts = fixed is None

    def _names(self, prompts: List[str]) -> List[Optional[str]]:
        if self.fixed is not None:
            return [self.fixed] * len(prompts)
        names = [_first_word(self.words, p) for p in prompts]
        bad = [p for p, n in zip(prompts, names) if n is None]
        if bad and self.missing is None:
            raise ValueError(f"{self.name}: {len(bad)} prompt(s) name no {self.option}, e.g. "
                             f"{bad[0]!r}; expected one of {', '.join(self.words)} as a word "
                             f"in each prompt, or load({self.name!r}, missing=-1.0) to score "
                             f"them, or {self.option}=... to fix it for every prompt")
        return names

    def _finish(self, d: Tensor, names: List[Optional[str]]) -> Tensor:
        """``d`` (or ``-|d - target|``), ``missing`` where the prompt named nothing."""
        score = d if self.target is None else -(d - self.target).abs()
        known = torch.tensor([n is not None for n in names], device=d.device)
        return torch.where(known, score, torch.full_like(score, self.missing or 0.0))


class MotionDirection(_PromptSign):
    """``d = (c_F − c_1) · u(prompt)``: how far the luma centroid moves in the named direction.

    ``c_t`` is the intensity-weighted centroid of frame t (:func:`centroids`, weights ``L``, or
    ``1 − L`` with ``polarity="dark"``), ``u`` the unit vector of the first direction word of
    the prompt (:func:`prompt_direction`). A bright object on a dark background moving across
    the whole frame to the right scores 1 under "moving right" and −1 under "moving left"; a
    still video scores 0.

    Why the centroid of the frame and not of the frame difference: it is defined on every
    frame (the difference of a still video is 0 and has no centroid), it is smooth in the
    pixels (a gradient everywhere, so a policy can learn it), and for an object on a flat
    background it moves exactly with the object. It reads where the bright (or dark) mass
    is: a dark object on a bright background moves it the other way, hence ``polarity``.

    Output scale: ``d`` in [−1, 1]; with ``target`` t: ``−|d − t|`` in [−1 − t, 0] (0 when the
    centroid moves exactly t of the frame: a magnitude, not only a direction).

    Args:
        direction: left | right | up | down for every prompt; None reads the prompt.
        target: the wanted displacement in (0, 1], or None.
        polarity: bright (weights L) or dark (weights 1 − L).
        missing: the score of a prompt naming no direction; None raises.
    """

    name = "motion_direction"
    words = DIRECTIONS
    choices = tuple(DIRECTIONS)

    def __init__(self, direction: Optional[str] = None, target: Optional[float] = None,
                 polarity: str = "bright", missing: Optional[float] = None,
                 batch_size: int = 64, grad: bool = False):
        if polarity not in ("bright", "dark"):
            raise ValueError(f"motion_direction: polarity={polarity!r}; expected bright (the "
                             f"centroid of the light) or dark (of the shadow)")
        super().__init__(direction, target, missing, batch_size, grad)
        self.polarity = polarity
        self.scale = ("(luma centroid at the last frame - at the first) . named direction, "
                      "in [-1, 1]" if self.target is None else
                      f"-|displacement - {self.target:g}| in [{-1 - self.target:g}, 0]")

    def _score_videos(self, videos, prompts, fps):
        names = self._names(prompts)
        L = luma(videos.float())
        c = centroids(L if self.polarity == "bright" else 1.0 - L)  # [b, F, 2]
        u = torch.tensor([DIRECTIONS[n] if n else (0.0, 0.0) for n in names], dtype=c.dtype,
                         device=c.device)  # [b, 2]
        d = ((c[:, -1] - c[:, 0]) * u).sum(dim=-1)  # [b]
        return self._finish(d, names)


class BrightnessTrend(_PromptSign):
    """``d = s(prompt) · (L̄_F − L̄_1)``: the change of mean luma from the first to the last
    frame, signed by the trend the prompt names (:data:`TRENDS`: +1 for "brighter",
    "brightening", "lighter", "lightening"; −1 for "darker", "darkening", "dimming",
    "fading"). "a room getting brighter" scores 1 for black to white, −1 for white to black.

    Output scale: ``d`` in [−1, 1]; with ``target`` t: ``−|d − t|`` in [−1 − t, 0].

    Args:
        trend: up | down for every prompt; None reads the prompt.
        target: the wanted change of mean luma in (0, 1], or None.
        missing: the score of a prompt naming no trend; None raises.
    """

    name = "brightness_trend"
    option = "trend"
    words = TRENDS
    choices = ("up", "down")

    def __init__(self, trend: Optional[str] = None, target: Optional[float] = None,
                 missing: Optional[float] = None, batch_size: int = 64, grad: bool = False):
        super().__init__(trend, target, missing, batch_size, grad)
        self.scale = ("(mean luma of the last frame - of the first) x named trend, in [-1, 1]"
                      if self.target is None else
                      f"-|change - {self.target:g}| in [{-1 - self.target:g}, 0]")

    def _score_videos(self, videos, prompts, fps):
        names = self._names(prompts)
        m = luma(videos.float()).mean(dim=(-2, -1))  # [b, F]
        sign = {**TRENDS, "up": 1.0, "down": -1.0}
        s = torch.tensor([sign[n] if n else 0.0 for n in names],
                         dtype=m.dtype, device=m.device)
        return self._finish(s * (m[:, -1] - m[:, 0]), names)


class Flicker(VideoScorer):
    """``−mean_t |m_{t+1} − 2 m_t + m_{t−1}| / 2``: penalise flicker, not steady change.

    ``m_t`` is frame t's mean luma (``level="frame"``) or each pixel's luma (``level="pixel"``,
    averaged over pixels too). The second difference is 0 for a still video and for a steady
    fade (a linear ramp), and largest for brightness alternating every frame: frames black,
    white, black, ... score −1. ``level="pixel"`` also catches local flicker that keeps the
    frame mean (a checkerboard inverting every frame), but penalises moving edges as well (a
    moving object's edge pixels go 0, 1, 1 ...), so pair it carefully with motion rewards.

    Output scale: [−1, 0]; 0 = no flicker. Needs at least 3 frames.

    Args:
        level: frame (mean luma per frame) or pixel (per-pixel luma).
    """

    name = "flicker"
    uses_prompts = False

    def __init__(self, level: str = "frame", batch_size: int = 64, grad: bool = False):
        if level not in ("frame", "pixel"):
            raise ValueError(f"flicker: level={level!r}; expected frame (mean luma per frame) "
                             f"or pixel (per-pixel luma)")
        super().__init__(batch_size, grad)
        self.level = level
        self.scale = f"-mean |second difference of {level} luma over time| / 2, in [-1, 0]"

    def _score_videos(self, videos, prompts, fps):
        F = videos.shape[1]
        if F < 3:
            raise ValueError(f"flicker: videos have {F} frame(s); the second difference needs "
                             f"at least 3 (sample more frames)")
        L = luma(videos.float())  # [b, F, H, W]
        if self.level == "frame":
            L = L.mean(dim=(-2, -1))  # [b, F]
        d2 = L[:, 2:] - 2 * L[:, 1:-1] + L[:, :-2]  # [b, F-2, ...]
        return -d2.abs().flatten(1).mean(dim=1) / 2
