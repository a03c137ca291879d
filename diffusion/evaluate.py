"""Evaluation for the diffusion job: ODE sampling on held-out prompts, rewards, PNG grids.

The evaluation sampler is the deterministic ODE (Euler) sampler on its own schedule (flow_grpo
evaluates with 40 steps while training with 10), from a fixed noise per prompt, so grids of
different steps show the same seeds and differ only by the weights. Results go to
``<output_dir>/eval.jsonl`` (one line per evaluation) and ``<output_dir>/eval/step_NNNNNN.png``;
a video job (``sample_ode`` returns ``[B, F, 3, H, W]``) writes ``step_NNNNNN.mp4``, ``.gif``
and ``_strip.png`` instead (:mod:`mmrl.diffusion.eval_video`). With a
:class:`mmrl.train.observe.MediaLog` the grid (or the strip and the video) also goes to
TensorBoard / W&B.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from mmrl.diffusion.eval_video import grid_layout, paste_tiles, save_video_outputs, to_uint8

Tensor = torch.Tensor


class ImageReward:
    """Adapts an image scorer ``scorer(images [B,3,H,W], prompts, metadata)`` to the core reward
    interface ``fn(samples, prompts, metadata)`` where samples are B ``[3, H, W]`` tensors.
    A groupwise scorer (``pref_winrate``) stays groupwise: the loop's group ids reach it in
    ``metadata[i]["group_id"]``."""

    def __init__(self, scorer):
        from mmrl.train.reward_fn import is_groupwise
        self.scorer = scorer
        self.name = getattr(scorer, "name", "reward")
        self.weights = dict(getattr(scorer, "weights", {}) or {})
        self.groupwise = is_groupwise(scorer)

    def __call__(self, samples: Sequence[Tensor], prompts, metadata=None):
        images = samples if isinstance(samples, Tensor) else torch.stack(list(samples))
        return self.scorer(images, list(prompts), metadata)


def reward_columns(reward_fn, images: Tensor, prompts: Sequence[str]) -> Dict[str, Tensor]:
    """``{column: [B]}`` float32 CPU rewards of ``images`` (one column for a plain scorer)."""
    out = reward_fn(images, list(prompts), [{} for _ in prompts])
    if isinstance(out, dict):
        return {k: torch.as_tensor(v).float().cpu() for k, v in out.items()}
    return {getattr(reward_fn, "name", "reward"): torch.as_tensor(out).float().cpu()}


def weighted(columns: Dict[str, Tensor], weights: Dict[str, float]) -> Tensor:
    """``Σ_k w_k r_k`` over the columns (missing weights are 1) -> ``[B]``."""
    return sum(float(weights.get(k, 1.0)) * v for k, v in columns.items())


def save_grid(images: Tensor, captions: Sequence[str], path, *, cols: int = 4,
              min_cell: int = 128) -> Path:
    """Write ``images`` ``[B, 3, H, W]`` in [0, 1] as one PNG with a caption under each image.

    Small images (tiny test models) are upscaled with nearest-neighbour to ``min_cell`` pixels so
    the pixels stay visible.

    Raises:
        ValueError: images not ``[B, 3, H, W]`` or a caption count that differs from B.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images has shape {got}; expected a float tensor [B, 3, H, W] in [0, 1]")
    B, _, H, W = images.shape
    canvas, corners, cell = grid_layout(B, H, W, captions, cols=cols, min_cell=min_cell)
    paste_tiles(canvas, to_uint8(images), corners, cell)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


class Evaluator:
    """Periodic ODE evaluation on held-out prompts.

    Args:
        policy: the :class:`~mmrl.diffusion.train.DiffusionGroupPolicy` (its ``sample_ode``).
        prompts: held-out prompts (one image each).
        reward_fn: the training reward (called on ``[B, 3, H, W]`` images).
        weights: reward column weights for the reported ``reward_mean``.
        out_dir: the run's output directory.
        seed: the evaluation noise seed (fixed, so every evaluation uses the same noise).
        batch_size: images per sampling call.
        fps: frame rate of the evaluation videos.
        media: where the pictures are logged besides the files (TensorBoard / W&B), or None.
    """

    def __init__(self, policy, prompts: Sequence[str], reward_fn, weights: Dict[str, float],
                 out_dir, *, seed: int = 0, batch_size: int = 8, fps: float = 8.0,
                 media=None):
        if not prompts:
            raise ValueError("no evaluation prompts; set diffusion.eval_prompts, "
                             "diffusion.eval_prompt_file or diffusion.eval_holdout > 0")
        self.policy, self.prompts, self.reward_fn = policy, list(prompts), reward_fn
        self.weights, self.out = dict(weights), Path(out_dir)
        self.seed, self.batch_size = seed, max(1, batch_size)
        self.fps, self.media = fps, media
        self._trimmed = False

    def _trim(self, step: int) -> None:
        """Drop ``eval.jsonl`` lines at or after ``step`` (a fresh run, or a resumed one that
        redoes steps), once per run, so the file never holds two histories."""
        path = self.out / "eval.jsonl"
        self._trimmed = True
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) < step]
        path.write_text("".join(line + "\n" for line in keep))

    @torch.no_grad()
    def __call__(self, step: int) -> Dict[str, Any]:
        """Evaluate now; write the grid and one ``eval.jsonl`` line; return the record."""
        gen = torch.Generator().manual_seed(self.seed)
        noise = self.policy.noise(len(self.prompts), gen)  # the same noise at every evaluation
        images = torch.cat([self.policy.sample_ode(self.prompts[a:a + self.batch_size],
                                                   noise[a:a + self.batch_size])
                            for a in range(0, len(self.prompts), self.batch_size)])
        cols = reward_columns(self.reward_fn, images, self.prompts)
        total = weighted(cols, self.weights)
        captions = [f"{p} | r={float(r):.4f}" for p, r in zip(self.prompts, total)]
        files = self._write(images, captions, step)
        finite = total[torch.isfinite(total)]
        record = {"step": step, "reward_mean": float(finite.mean()) if len(finite) else None,
                  "num_images": len(self.prompts), **files,
                  **{f"reward/{k}": float(v.mean()) for k, v in cols.items()},
                  "rewards": [float(r) if torch.isfinite(r) else None for r in total]}
        if not self._trimmed:
            self._trim(step)
        with open(self.out / "eval.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def _write(self, samples: Tensor, captions: List[str], step: int) -> Dict[str, Any]:
        """The grid PNG (images) or the MP4, GIF and strip PNG (videos ``[B, F, 3, H, W]``:
        ``grid`` is then the strip); logged to the media log when there is one."""
        folder = self.out / "eval"
        if samples.dim() == 5:
            files: Dict[str, Any] = save_video_outputs(samples, captions, folder, step,
                                                       fps=self.fps)
            files = {"grid": files["strip"], "video": files["video"], "gif": files["gif"],
                     "frames": int(samples.shape[1])}
        else:
            files = {"grid": str(save_grid(samples, captions, folder / f"step_{step:06d}.png"))}
        if self.media is not None:
            self.media.log(step, images={"eval/grid": files["grid"]},
                           videos={"eval/video": files["video"]} if "video" in files else {})
        return files


def read_prompts(path: Optional[str], inline: Optional[List[str]], what: str) -> List[str]:
    """Prompts from a file (``.txt``: one per line; ``.jsonl``: ``{"prompt": ...}`` per line)
    and/or an inline list; blank lines are skipped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file (and the inline list) hold no prompt.
    """
    out = [p for p in (inline or []) if str(p).strip()]
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{what}: prompt file {str(p)!r} does not exist; expected a "
                                    f".txt file with one prompt per line (or .jsonl with a "
                                    f"'prompt' field)")
        for n, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            if p.suffix == ".jsonl":
                try:
                    out.append(str(json.loads(line)["prompt"]))
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{what}: {p}:{n} is not a JSON object with a 'prompt' "
                                     f"field: {line[:80]!r}") from None
            else:
                out.append(line.strip())
        if not out:
            raise ValueError(f"{what}: prompt file {str(p)!r} holds no prompt (it is empty or "
                             f"blank); put one prompt per line")
    return out
