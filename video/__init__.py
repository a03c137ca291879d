"""mmrl.video — video inputs for Video-LLM RL: decoding, Keye-VL 1.5 slow-fast, Qwen2.5-VL inputs.

- :func:`read_video` decodes a file (or a list of image paths) with qwen-vl-utils' sampling.
- :func:`slow_fast_plan` labels frames slow/fast (Keye-VL 1.5) and sizes them to a token budget.
- :func:`build_qwen_video_inputs` turns conversations with videos into padded Qwen2.5-VL
  processor inputs, in "slow_fast" or "uniform" mode.
- Bad input raises :class:`VideoError`; training skips it with :func:`try_load_video` /
  :class:`SkipCounter` (or ``build_qwen_video_inputs(on_error="skip")``).

- Training data (Video-R1 JSONL), verifiable rewards and augmentations: :mod:`.data`,
  :mod:`.vl_rewards`, :mod:`.augment` (see docs/video_rl.md).

Importing this package loads only numpy and torch; decord, OpenCV and transformers are imported
when first used.
"""
from .augment import DifficultyAugmenter, qa_inversion, temporal_contrast_bonus
from .data import PROMPT_TEMPLATES, VLDataset, VLRecord, build_messages, load_vl_dataset
from .io import (SkipCounter, VideoClip, VideoError, read_video, smart_nframes, smart_resize,
                 try_load_video)
from .qwen_inputs import (QwenVideoBatch, VideoEntry, build_qwen_video_inputs,
                          mrope_position_ids, plan_entries, qwen2_position_ids,
                          qwen25_position_ids, uniform_entries, uniform_size)
from .rounds import DifficultyRounds, TemporalContrast
from .slow_fast import FAST, SLOW, SlowFastPlan, choose_resolutions, slow_fast_plan
from .vl_rewards import VL_REWARDS, build_vl_reward


def __getattr__(name):  # the policy pulls in transformers: import it only when asked for
    if name in ("QwenVLPolicy", "load_qwen_vl"):
        from . import policy
        return getattr(policy, name)
    if name in ("build_tiny_qwen_vl", "build_tiny_qwen2_vl", "build_tiny_qwen3_vl"):
        from . import tiny
        return getattr(tiny, name)
    if name == "export_qwen_vl":
        from .export import export_qwen_vl
        return export_qwen_vl
    raise AttributeError(f"module 'mmrl.video' has no attribute {name!r}")

__all__ = [
    "FAST", "SLOW", "QwenVideoBatch", "SkipCounter", "SlowFastPlan", "VideoClip", "VideoEntry",
    "VideoError", "build_qwen_video_inputs", "choose_resolutions", "plan_entries", "read_video",
    "qwen25_position_ids", "slow_fast_plan", "smart_nframes", "smart_resize", "try_load_video", "uniform_entries",
    "uniform_size", "VL_REWARDS", "build_vl_reward", "PROMPT_TEMPLATES", "VLDataset", "VLRecord",
    "build_messages", "load_vl_dataset", "DifficultyAugmenter", "qa_inversion",
    "temporal_contrast_bonus", "mrope_position_ids", "qwen2_position_ids", "DifficultyRounds",
    "TemporalContrast",
]
