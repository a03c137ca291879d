"""Video scorers: the input contract, the slot a video reward model plugs into, and the frame-wise
lift of any image scorer.

A video scorer is called as ``scorer(videos, prompts, metadata=None)`` and returns ``Tensor[B]``
(float32) or named columns ``{column: Tensor[B]}`` (the core reward interface turns columns
into ``name.column``). ``videos`` is a float tensor ``[B, F, C, H, W]`` in [0, 1] (C = 1, 3 or 4;
gray repeated, alpha dropped) or a list of B ``[F, C, H, W]`` tensors of one shape: what a video
family's ``decode`` returns and what the diffusion job's reward receives. Its class attribute
``media = "video"`` tells :func:`mmrl.rewards.compose` and ``mmrl config validate`` (through
:data:`mmrl.rewards.specs.VIDEO_SCORERS`) that it scores videos.

``FrameScorer`` (registered as ``frames``) scores sampled frames with any registered image
scorer in one batched call and reduces them per video::

    frames:scorer=pickscore:num=8:reduce=mean      8 frames uniformly spaced, first and last incl.
    frames:scorer=prompt_color:reduce=frame:frame=-1   the last frame only
    frames:scorer=hps_v2.1:every=4:reduce=min:path=/ckpt/HPS_v2.1.pt   other options: the scorer's
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from mmrl.rewards.base import Scorer, check_prompts
from mmrl.rewards.specs import sample_frames

Tensor = torch.Tensor
Videos = Union[Tensor, Sequence[Tensor]]
REDUCES = ("mean", "min", "max", "frame")


def check_videos(videos: Any, name: str = "scorer") -> Tensor:
    """Validate a batch of videos; return it as one float tensor ``[B, F, 3, H, W]``.

    Raises:
        TypeError: not a tensor or a list of tensors; an integer dtype.
        ValueError: empty batch or no frames; a rank other than 5; channels-first
            ``[B, C, F, H, W]``; list items of different shapes; values outside [0, 1].
    """
    if isinstance(videos, (list, tuple)):
        if not videos:
            raise ValueError(f"{name}: got an empty video list; pass at least one video")
        bad = [i for i, v in enumerate(videos) if not isinstance(v, Tensor) or v.dim() != 4]
        if bad:
            v = videos[bad[0]]
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise TypeError(f"{name}: videos[{bad[0]}] is {got}; expected a float tensor "
                            f"[F, 3, H, W] in [0, 1] per video")
        shapes = sorted({tuple(v.shape) for v in videos})
        if len(shapes) > 1:
            raise ValueError(f"{name}: the videos have different shapes {shapes[:3]}; expected "
                             f"one [F, 3, H, W] for all; trim them to a common frame count "
                             f"(v[:F]) or score them in separate calls")
        videos = torch.stack(list(videos))
    if not isinstance(videos, Tensor):
        raise TypeError(f"{name}: videos is {type(videos).__name__}; expected a float tensor "
                        f"[B, F, 3, H, W] in [0, 1] or a list of [F, 3, H, W] tensors")
    shape = tuple(videos.shape)
    if videos.dim() == 4:
        raise ValueError(f"{name} scores videos [B, F, 3, H, W] but got {shape}, an image batch "
                         f"[B, C, H, W]; add the frame axis with x[:, None] (one-frame videos) "
                         f"or the batch axis with x[None] (one video), or use an image scorer")
    if videos.dim() != 5 or videos.shape[2] not in (1, 3, 4):
        hint = (" (channels before frames, diffusers' layout); permute it with "
                "x.permute(0, 2, 1, 3, 4)" if videos.dim() == 5 and videos.shape[1] in (1, 3, 4)
                else "")
        raise ValueError(f"{name}: videos has shape {shape}; expected [B, F, C, H, W] with C in "
                         f"(1, 3, 4){hint}")
    if not videos.dtype.is_floating_point:
        raise TypeError(f"{name}: videos have dtype {videos.dtype}; expected float in [0, 1]; "
                        f"convert uint8 frames with x.float() / 255")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{name}: got videos of shape {shape}; expected at least one video "
                         f"(B >= 1) of at least one frame (F >= 1)")
    lo, hi = float(videos.detach().min()), float(videos.detach().max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{name}: video values span [{lo:.3g}, {hi:.3g}]; expected [0, 1]; map "
                         f"[-1, 1] decoder outputs with (x + 1) / 2 (and clamp)")
    if videos.shape[2] == 1:
        return videos.expand(-1, -1, 3, -1, -1)
    return videos[:, :, :3]


def _cat(parts: List[Union[Tensor, Dict[str, Tensor]]]) -> Union[Tensor, Dict[str, Tensor]]:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k].float() for p in parts]) for k in parts[0]}
    return torch.cat([p.float() for p in parts])


class VideoScorer(Scorer):
    """Base class of video scorers (``media = "video"``), and the slot a video reward model
    (e.g. a VLM judge such as VideoAlign) plugs into.

    A subclass implements ``_score_videos(videos, prompts, fps) -> Tensor[b]`` (or
    ``{column: Tensor[b]}`` with the same keys on every call) for one chunk of at most
    ``batch_size`` videos:

    - ``videos``: float ``[b, F, 3, H, W]`` in [0, 1] (checked and converted to RGB here);
    - ``prompts``: b strings (``[""] * b`` for a prompt-free scorer called with None);
    - ``fps``: b frame rates, each ``metadata[i]["fps"]`` when the caller's metadata has one,
      else the scorer's ``fps`` option (None: unknown; a model needing it should raise).

    Args:
        batch_size: videos per ``_score_videos`` call.
        grad: score with autograd enabled (reward back-propagation), else under no_grad.
        fps: the frame rate when the metadata does not carry one (None = unknown).
    """

    media = "video"

    def __init__(self, batch_size: int = 8, grad: bool = False, fps: Optional[float] = None):
        if fps is not None and not float(fps) > 0:
            raise ValueError(f"{self.name}: fps={fps!r}; expected a positive frame rate or None")
        super().__init__(batch_size, grad)
        self.fps = None if fps is None else float(fps)

    def __call__(self, videos: Videos, prompts: Optional[Sequence[str]] = None,
                 metadata: Optional[Sequence[Any]] = None):
        x = check_videos(videos, self.name)  # [B, F, 3, H, W]
        n = x.shape[0]
        if prompts is None and not self.uses_prompts:
            prompts = [""] * n
        prompts = check_prompts(prompts, n)
        fps = [m.get("fps", self.fps) if isinstance(m, dict) else self.fps
               for m in (metadata if metadata is not None else [None] * n)]
        out = []
        with torch.set_grad_enabled(self.grad):
            for i in range(0, n, self.batch_size):
                out.append(self._score_videos(x[i:i + self.batch_size],
                                              prompts[i:i + self.batch_size],
                                              fps[i:i + self.batch_size]))
        return _cat(out)

    def _score_videos(self, videos: Tensor, prompts: List[str],
                      fps: List[Optional[float]]) -> Union[Tensor, Dict[str, Tensor]]:
        raise NotImplementedError

    def _score(self, images, prompts):
        raise TypeError(f"{self.name} is a video scorer; call it with videos [B, F, 3, H, W]")


class FrameScorer(VideoScorer):
    """An image scorer lifted to video: score sampled frames, reduce per video.

    ``r(video) = reduce_{k in K} s(frame_k)`` with ``s`` the image scorer named by ``scorer``
    and ``K`` the sampled frames (:func:`sample_frames`); every sampled frame of a chunk of
    ``batch_size`` videos goes to ``s`` in one call (``s`` splits it by its own batch size).

    Output scale: the image scorer's (every reduce keeps it).

    Args:
        scorer: a registered image scorer (``pickscore``, ``prompt_color``, ...).
        num, indices, every: the frame sampling (at most one; none = every frame).
        reduce: mean | min | max over the sampled frames, or frame: the one frame ``frame``.
        frame: the frame index (negative counts from the end) with ``reduce=frame``.
        device, dtype: passed to the image scorer when it takes them.
        **options: the image scorer's own options (``path=``, ``normalize=``, ``grad=`` ...).
    """

    name = "frames"

    def __init__(self, scorer: str, num: Optional[int] = None,
                 indices: Optional[Sequence[int]] = None, every: Optional[int] = None,
                 reduce: str = "mean", frame: Optional[int] = None, batch_size: int = 64,
                 device=None, dtype=None, **options):
        from mmrl.rewards.scorers import accepted_options, load
        from mmrl.rewards.specs import frames_problems
        problems = frames_problems(dict(scorer=scorer, num=num, indices=indices, every=every,
                                        reduce=reduce, frame=frame))
        if problems:
            raise ValueError("; ".join(problems))
        ok = accepted_options(scorer)
        extra = {k: v for k, v in (("device", device), ("dtype", dtype))
                 if v is not None and k in ok}
        self.inner = load(scorer, **extra, **options)
        super().__init__(batch_size, grad=self.inner.grad)
        self.sampling = dict(num=num, indices=None if indices is None else list(indices),
                             every=every)
        self.reduce, self.frame = reduce, frame
        self.uses_prompts = self.inner.uses_prompts
        picked = ", ".join(f"{k}={v}" for k, v in self.sampling.items() if v is not None)
        how = f"frame {frame}" if reduce == "frame" else f"{reduce} over frames ({picked or 'all'})"
        self.scale = f"{how} of {self.inner.name}: {self.inner.scale}".rstrip(": ")

    def frames_of(self, num_frames: int) -> List[int]:
        """The frame indices scored in videos of ``num_frames`` frames."""
        if self.reduce == "frame":
            return sample_frames(num_frames, indices=[self.frame])
        return sample_frames(num_frames, **self.sampling)

    def _score_videos(self, videos, prompts, fps):
        b, F = videos.shape[:2]
        idx = self.frames_of(F)
        K = len(idx)
        frames = videos[:, idx].reshape(b * K, *videos.shape[2:])  # [b, K, 3, H, W] -> [b*K, ...]
        scores = self.inner(frames, [p for p in prompts for _ in range(K)]).float()
        scores = scores.reshape(b, K)  # [b*K] -> [b, K]
        if self.reduce == "min":
            return scores.min(dim=1).values
        if self.reduce == "max":
            return scores.max(dim=1).values
        return scores.mean(dim=1)  # mean, or the single frame of reduce=frame
