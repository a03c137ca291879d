"""Moved to :mod:`mmrl.video.models.qwen_vl.inputs` (and the positions to
:mod:`mmrl.video.models.qwen_vl.positions`); the names are re-exported here."""
from mmrl.video.models.qwen_vl.inputs import *  # noqa: F401,F403
from mmrl.video.models.qwen_vl.inputs import (MODES, QwenVideoBatch, VideoEntry,  # noqa: F401
                                              build_qwen_video_inputs, plan_entries,
                                              uniform_entries, uniform_size)
from mmrl.video.models.qwen_vl.positions import (MROPE_MODEL_TYPES,  # noqa: F401
                                                 check_model_type, mrope_position_ids,
                                                 qwen2_position_ids, qwen25_position_ids)
