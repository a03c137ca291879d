"""mmrl.video — GRPO-family RL for vision-language models on video and image questions.

- :class:`VLMPolicy` (:mod:`.policy`): the generic policy; the model family's specifics live in
  an adapter under :mod:`.models` (``models/<family>/``), picked by ``config.model_type``
  (:func:`adapter_for`). Qwen2-VL / Qwen2.5-VL / Qwen3-VL: :mod:`.models.qwen_vl`.
- :func:`read_video` decodes a file (or a list of image paths) with qwen-vl-utils' sampling.
- :func:`slow_fast_plan` labels frames slow/fast (Keye-VL 1.5) and sizes them to a token budget.
- :func:`build_qwen_video_inputs` turns conversations with videos into padded Qwen-VL
  processor inputs, in "slow_fast" or "uniform" mode.
- Bad input raises :class:`VideoError`; training skips it with :func:`try_load_video` /
  :class:`SkipCounter` (or ``build_qwen_video_inputs(on_error="skip")``).
- Training data (Video-R1 JSONL), verifiable rewards and augmentations: :mod:`.data`,
  :mod:`.vl_rewards`, :mod:`.augment` (see docs/video_rl.md); the job: :mod:`.config` (torch-free
  section) and :mod:`.job`. Preference pair files (chosen / rejected completions): :mod:`.pairs`.

Importing this package loads nothing heavy (PEP 562): each name imports its module on first use,
so ``import mmrl.video.config`` loads no torch.
"""
from mmrl._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".augment": ["DifficultyAugmenter", "qa_inversion", "temporal_contrast_bonus"],
    ".data": ["PROMPT_TEMPLATES", "VLDataset", "VLRecord", "build_messages", "load_vl_dataset"],
    ".io": ["SkipCounter", "VideoClip", "VideoError", "read_video", "smart_nframes",
            "smart_resize", "try_load_video"],
    ".models": ["adapter_for", "adapter_for_path", "supported_model_types"],
    ".models.base": ["VLMAdapter"],
    ".models.export": ["export_vlm"],
    ".models.qwen_vl.export": ["export_qwen_vl"],
    ".models.qwen_vl.inputs": ["QwenVideoBatch", "VideoEntry", "build_qwen_video_inputs",
                               "plan_entries", "uniform_entries", "uniform_size"],
    ".models.qwen_vl.positions": ["mrope_position_ids", "qwen2_position_ids",
                                  "qwen25_position_ids"],
    ".models.qwen_vl.tiny": ["build_tiny_qwen_vl", "build_tiny_qwen2_vl", "build_tiny_qwen3_vl"],
    ".pairs": ["PairRecord", "PairRecordError", "PairSet", "load_pairs"],
    ".policy": ["QwenVLPolicy", "VLMPolicy", "load_qwen_vl", "load_vlm"],
    ".rounds": ["DifficultyRounds", "TemporalContrast"],
    ".slow_fast": ["FAST", "SLOW", "SlowFastPlan", "choose_resolutions", "slow_fast_plan"],
    ".vl_rewards": ["VL_REWARDS", "build_vl_reward"],
})
