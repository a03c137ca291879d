"""mRoPE position ids for Qwen2-VL, Qwen2.5-VL and Qwen3-VL inputs, per architecture.

Qwen-VL models give every token three rotary positions (time, height, width). Text tokens get
the same consecutive position on all three axes; a vision block of grid ``(t, h, w)`` (after the
spatial merge) gets its grid coordinates offset by the text position before it, and the text
after it resumes at the block's largest position + 1, as the Qwen2-VL (arXiv:2409.12191 §2.1)
and Qwen2.5-VL (report §2.1) releases compute them; Qwen3-VL uses the model's own
``get_rope_index``. :func:`mrope_position_ids` picks the rule from ``config.model_type``.
:mod:`mmrl.video.mrope` and :mod:`mmrl.video.qwen_inputs` re-export the public names.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch

MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def check_model_type(model_type: str) -> None:
    """Raise ``NotImplementedError`` for a model type whose positions this package cannot make.

    Raises:
        NotImplementedError: ``model_type`` is not one of :data:`MROPE_MODEL_TYPES`.
    """
    if model_type not in MROPE_MODEL_TYPES:
        raise NotImplementedError(
            f"model_type={model_type!r} is not supported by the video policy (supported: "
            f"{', '.join(MROPE_MODEL_TYPES)}); load a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint")


def mrope_position_ids(vl_model, inputs: Mapping[str, torch.Tensor]
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """mRoPE positions ``[3, B, L]`` and deltas ``[B, 1]`` of processor ``inputs``, per architecture.

    ``vl_model`` is the inner multimodal model (``model.model`` of a ``*ForConditionalGeneration``);
    its ``config.model_type`` picks the rule:

    - ``qwen2_5_vl``: :func:`qwen25_position_ids` (time scaled by ``second_per_grid_ts``).
    - ``qwen2_vl``: :func:`qwen2_position_ids` (one temporal position per temporal grid).
    - ``qwen3_vl``: the model's own ``get_rope_index``. Its processor splits a video into one
      block per temporal grid (each behind a ``<t seconds>`` timestamp), so every block has
      ``t = 1`` and transformers' rule (text resumes at ``s + max(h, w) / merge``) equals the
      block's largest position + 1: correct here, unlike for Qwen2/2.5-VL videos.

    Args:
        vl_model: the inner model (has ``config`` and, for Qwen3-VL, ``get_rope_index``).
        inputs: ``input_ids [B, L]`` and optional ``attention_mask``, ``image_grid_thw``,
            ``video_grid_thw``, ``second_per_grid_ts`` (as the processor returns them).

    Raises:
        NotImplementedError: another ``model_type`` (see :func:`check_model_type`).
    """
    cfg = vl_model.config
    check_model_type(cfg.model_type)
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    tokens = dict(video_token_id=cfg.video_token_id, image_token_id=cfg.image_token_id,
                  video_grid_thw=inputs.get("video_grid_thw"),
                  image_grid_thw=inputs.get("image_grid_thw"),
                  spatial_merge_size=cfg.vision_config.spatial_merge_size)
    if cfg.model_type == "qwen3_vl":
        # text 0, image 1, video 2: computed from the ids, whatever the processor returned
        types = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
        grid = tokens["video_grid_thw"]
        return vl_model.get_rope_index(
            ids, mm_token_type_ids=types, image_grid_thw=tokens["image_grid_thw"],
            video_grid_thw=None if grid is None else grid.clone(),  # it writes into the grid
            attention_mask=mask)
    if cfg.model_type == "qwen2_vl":
        return qwen2_position_ids(ids, mask, **tokens)
    return qwen25_position_ids(ids, mask, tokens.pop("video_grid_thw"),
                               inputs.get("second_per_grid_ts"),
                               tokens_per_second=getattr(cfg.vision_config, "tokens_per_second",
                                                         2), **tokens)


def qwen25_position_ids(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        video_grid_thw: Optional[torch.Tensor],
                        second_per_grid_ts: Optional[torch.Tensor], *, video_token_id: int,
                        tokens_per_second: float, spatial_merge_size: int = 2,
                        image_grid_thw: Optional[torch.Tensor] = None,
                        image_token_id: Optional[int] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """mRoPE position ids ``[3, B, L]`` and deltas ``[B, 1]`` as the Qwen2.5-VL release computes them.

    A vision block of grid ``(t, h, w)`` starting after text position ``s`` gets
    ``(s + ⌊i·second_per_grid·tokens_per_second⌋, s + j, s + k)``; the text after it resumes at
    **the block's largest position + 1** (temporal included), as in Qwen2.5-VL's own code
    (transformers 4.49–4.5x, Qwen2.5-VL report §2.1). Padding (``attention_mask == 0``) gets 1.

    Differs from transformers 5.24's ``get_rope_index``: that version resumes text at
    ``s + max(h, w) / merge``, ignoring the temporal extent, so text after a video with more than
    one temporal grid re-uses positions of the video. Pass these ids as ``position_ids`` to the
    model to keep the positions the model was trained with.

    Args:
        input_ids: ``[B, L]``; attention_mask: ``[B, L]`` (1 = real token) or None.
        video_grid_thw: ``[V, 3]`` over the batch in order; second_per_grid_ts: ``[V]``.
        video_token_id: the ``<|video_pad|>`` id; image_token_id, image_grid_thw: same for images.
        tokens_per_second: ``config.vision_config.tokens_per_second``.
        spatial_merge_size: ``config.vision_config.spatial_merge_size``.

    Raises:
        ValueError: videos without one ``second_per_grid_ts`` each.
    """
    n_videos = 0 if video_grid_thw is None else video_grid_thw.shape[0]
    secs = [] if second_per_grid_ts is None else second_per_grid_ts.tolist()
    if len(secs) != n_videos:
        raise ValueError(f"{n_videos} videos but {len(secs)} second_per_grid_ts; pass the "
                         f"processor's second_per_grid_ts (a Qwen2.5-VL processor returns one "
                         f"per video), or use qwen2_position_ids for Qwen2-VL")
    steps = {video_token_id: [s * tokens_per_second for s in secs]}
    return _mrope_positions(input_ids, attention_mask, _grids(
        video_token_id, video_grid_thw, image_token_id, image_grid_thw), steps,
        spatial_merge_size)


def qwen2_position_ids(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       video_grid_thw: Optional[torch.Tensor], *, video_token_id: int,
                       spatial_merge_size: int = 2, image_grid_thw: Optional[torch.Tensor] = None,
                       image_token_id: Optional[int] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """mRoPE position ids ``[3, B, L]`` and deltas ``[B, 1]`` as the Qwen2-VL release computes them.

    As :func:`qwen25_position_ids` with the temporal index advancing by 1 per temporal grid
    (Qwen2-VL has no ``second_per_grid_ts`` time scaling, arXiv:2409.12191 §2.1): a block
    ``(t, h, w)`` after text position ``s`` gets ``(s + i, s + j, s + k)`` and the text after it
    resumes at the block's largest position + 1. For a single temporal grid (every image) this
    equals transformers 5.24's ``get_rope_index``; for longer videos that version resumes text
    inside the video's positions (see :func:`qwen25_position_ids`).
    """
    n_videos = 0 if video_grid_thw is None else video_grid_thw.shape[0]
    return _mrope_positions(input_ids, attention_mask, _grids(
        video_token_id, video_grid_thw, image_token_id, image_grid_thw),
        {video_token_id: [1.0] * n_videos}, spatial_merge_size)


def _grids(video_token_id, video_grid_thw, image_token_id, image_grid_thw) -> Dict[int, list]:
    grids = {video_token_id: video_grid_thw.tolist() if video_grid_thw is not None else []}
    if image_token_id is not None:
        grids[image_token_id] = image_grid_thw.tolist() if image_grid_thw is not None else []
    return grids


def _mrope_positions(input_ids, attention_mask, grids: Dict[int, list],
                     steps: Dict[int, List[float]], spatial_merge_size: int):
    """The shared rule: vision block ``(t, h, w)`` after text position ``s`` gets
    ``(s + ⌊i·step⌋, s + j, s + k)`` (``step`` per block from ``steps``, 0 for blocks without),
    text resumes at the block's largest position + 1. -> ``([3, B, L], [B, 1])``."""
    b, length = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    pos = torch.ones(3, b, length, dtype=torch.long)
    grid_iter = {k: iter(v) for k, v in grids.items()}
    step_iter = {k: iter(v) for k, v in steps.items()}
    deltas = []
    for row in range(b):
        keep = mask[row].bool()
        ids = input_ids[row][keep].tolist()
        out, nxt, i = [], 0, 0
        while i < len(ids):
            if ids[i] in grid_iter:
                gt, gh, gw = next(grid_iter[ids[i]])
                gh, gw = gh // spatial_merge_size, gw // spatial_merge_size
                step = next(step_iter[ids[i]]) if ids[i] in step_iter else 0.0
                tt = (torch.arange(gt, dtype=torch.float64) * step).long()  # quantize after scaling
                grid = torch.stack(torch.meshgrid(tt, torch.arange(gh), torch.arange(gw),
                                                  indexing="ij")).reshape(3, -1) + nxt
                out.append(grid)
                i += grid.shape[1]
                nxt = int(grid.max()) + 1
            else:  # a run of text tokens: consecutive positions on all three axes
                j = i
                while j < len(ids) and ids[j] not in grid_iter:
                    j += 1
                out.append((torch.arange(j - i) + nxt).expand(3, -1))
                i, nxt = j, nxt + j - i
        row_pos = torch.cat(out, dim=1)  # [3, real tokens]
        pos[:, row, keep] = row_pos
        deltas.append(int(row_pos.max()) + 1 - len(ids))
    return pos, torch.tensor(deltas).unsqueeze(1)
