"""Rule rewards that need no weights: JPEG compressibility, brightness, color targets and the
colour a prompt names.

All but ``prompt_color`` read pixels only (prompts are ignored; ``prompts=None`` is accepted).
Brightness, color and prompt_color are differentiable for tensor inputs; JPEG size is not (it
round-trips through the encoder).
"""
from __future__ import annotations

import io
import math
import re
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from mmrl.rewards.base import Scorer, as_rgb

# ITU-R BT.601 luma weights (what PIL's convert("L") uses).
LUMA = (0.299, 0.587, 0.114)


def _as_tensor(images) -> torch.Tensor:
    """PIL list -> float ``[b, 3, H, W]`` in [0, 1] (tensors pass through)."""
    if isinstance(images, torch.Tensor):
        return images.float()
    return torch.stack([torch.from_numpy(np.asarray(as_rgb(im), dtype=np.float32))
                        .permute(2, 0, 1) / 255.0 for im in images])


def _as_pil(images):
    if not isinstance(images, torch.Tensor):
        return [as_rgb(im) for im in images]
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


class JpegCompressibility(Scorer):
    """``−(JPEG size in KB at quality q) / divisor`` (DDPO, arXiv 2305.13301; flow_grpo /500).

    Output scale: ≤ 0; with the defaults (q = 95, divisor = 500) a 512² photo-like image scores
    ≈ −0.1 to −0.3 and a flat image ≈ −0.01. KB = 1000 bytes. Tensor inputs are rounded to uint8.

    Args:
        quality: JPEG quality passed to PIL (1–95).
        divisor: the size in KB is divided by this (DDPO used 1, flow_grpo 500).
    """

    name = "jpeg_compressibility"
    uses_prompts = False

    def __init__(self, quality: int = 95, divisor: float = 500.0, batch_size: int = 64):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"jpeg quality={quality!r}; expected an int in [1, 100]")
        if float(divisor) <= 0:
            raise ValueError(f"jpeg divisor={divisor!r}; expected a positive number")
        super().__init__(batch_size, grad=False)
        self.quality, self.divisor = int(quality), float(divisor)
        self.scale = f"-(JPEG KB at quality {self.quality}) / {self.divisor:g}, <= 0"

    def _score(self, images, prompts):
        sizes = []
        for im in _as_pil(images):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return -torch.tensor(sizes, dtype=torch.float32) / self.divisor


class Brightness(Scorer):
    """Mean BT.601 luma ``L`` in [0, 1]; with ``target``: ``−|L − target|``.

    Output scale: ``L`` in [0, 1] (brighter is better) or ``−|L − target|`` in [−1, 0].
    """

    name = "brightness"
    uses_prompts = False

    def __init__(self, target: Optional[float] = None, batch_size: int = 64, grad: bool = False):
        if target is not None and not 0.0 <= float(target) <= 1.0:
            raise ValueError(f"brightness target={target!r}; expected a number in [0, 1] "
                             f"(or None to reward brightness itself)")
        super().__init__(batch_size, grad)
        self.target = None if target is None else float(target)
        self.scale = ("mean luma in [0, 1]" if self.target is None
                      else f"-|mean luma - {self.target:g}| in [-1, 0]")

    def _score(self, images, prompts):
        x = _as_tensor(images)
        w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        lum = (x * w).sum(1).mean(dim=(1, 2))  # [b, 3, H, W] -> [b]
        return lum if self.target is None else -(lum - self.target).abs()


class ColorTarget(Scorer):
    """``−‖mean RGB − target‖₂ / √3``: how close the image's mean color is to ``target``.

    Output scale: [−1, 0]; 0 when the mean color equals ``target`` (RGB in [0, 1]).
    """

    name = "color"
    uses_prompts = False

    def __init__(self, target: Optional[Sequence[float]] = None, batch_size: int = 64,
                 grad: bool = False):
        if isinstance(target, str):
            target = [float(v) for v in target.replace(",", " ").split()]
        if target is None or len(target) != 3 or not all(0 <= float(v) <= 1 for v in target):
            raise ValueError(f"color target={target!r}; expected 3 numbers in [0, 1] (RGB), e.g. "
                             f"load('color', target=[1, 0, 0]) or --scorer 'color:target=1 0 0'")
        super().__init__(batch_size, grad)
        self.target = tuple(float(v) for v in target)
        self.scale = f"-||mean RGB - {self.target}|| / sqrt(3), in [-1, 0]"

    def _score(self, images, prompts):
        x = _as_tensor(images)
        t = torch.tensor(self.target, dtype=x.dtype, device=x.device)
        return -(x.mean(dim=(2, 3)) - t).norm(dim=-1) / math.sqrt(3.0)


# Named colours (RGB in [0, 1]): the primaries and secondaries, CSS orange / purple / pink / gray.
COLORS = {
    "red": (1.0, 0.0, 0.0), "orange": (1.0, 0.647, 0.0), "yellow": (1.0, 1.0, 0.0),
    "green": (0.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "blue": (0.0, 0.0, 1.0),
    "purple": (0.502, 0.0, 0.502), "magenta": (1.0, 0.0, 1.0), "pink": (1.0, 0.753, 0.796),
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (0.502, 0.502, 0.502),
    "grey": (0.502, 0.502, 0.502),
}
_COLOR_WORD = re.compile(r"\b(" + "|".join(COLORS) + r")\b", re.IGNORECASE)


def prompt_color(prompt: str) -> Optional[str]:
    """The first colour word of ``prompt`` (a key of :data:`COLORS`, whole words, any case),
    or None: ``"a blue car by a Red wall"`` -> ``"blue"``; ``"a reddish fox"`` -> None."""
    m = _COLOR_WORD.search(prompt)
    return None if m is None else m.group(1).lower()


class PromptColor(Scorer):
    """``−‖mean RGB − c(prompt)‖₂ / √3``: does the image come out in the colour its prompt names?

    ``c(prompt)`` is the RGB of the first colour word in the prompt (:func:`prompt_color`,
    :data:`COLORS`): "a red apple" scores 0 for a pure red image and −√(2/3) ≈ −0.816 for a
    white one. A prompt-following task without weights: the same image scores differently under
    different prompts, so a policy must read its prompt to do well (the diffusion benchmark's
    task, ``benchmarks/bench_flow_methods.py``).

    Output scale: [−1, 0]; 0 when the mean colour equals the named one.

    Args:
        missing: the score of a prompt that names no colour; None (default) raises instead.
    """

    name = "prompt_color"
    uses_prompts = True

    def __init__(self, missing: Optional[float] = None, batch_size: int = 64, grad: bool = False):
        if missing is not None and not -1.0 <= float(missing) <= 0.0:
            raise ValueError(f"prompt_color missing={missing!r}; expected a number in [-1, 0] "
                             f"(the score of a prompt naming no colour) or None to raise")
        super().__init__(batch_size, grad)
        self.missing = None if missing is None else float(missing)
        self.scale = "-||mean RGB - colour named in the prompt|| / sqrt(3), in [-1, 0]"

    def _targets(self, prompts: List[str]):
        names = [prompt_color(p) for p in prompts]
        bad = [p for p, n in zip(prompts, names) if n is None]
        if bad and self.missing is None:
            raise ValueError(f"prompt_color: {len(bad)} prompt(s) name no colour, e.g. "
                             f"{bad[0]!r}; expected one of {', '.join(COLORS)} as a word in "
                             f"each prompt, or load('prompt_color', missing=-1.0) to score them")
        return names

    def _score(self, images, prompts):
        names = self._targets(list(prompts))
        x = _as_tensor(images)
        t = torch.tensor([COLORS[n] if n else (0.0, 0.0, 0.0) for n in names], dtype=x.dtype,
                         device=x.device)
        score = -(x.mean(dim=(2, 3)) - t).norm(dim=-1) / math.sqrt(3.0)  # [b, 3] -> [b]
        known = torch.tensor([n is not None for n in names], device=x.device)
        return torch.where(known, score, torch.full_like(score, self.missing or 0.0))
