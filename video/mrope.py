"""Moved to :mod:`mmrl.video.models.qwen_vl.positions`; the names are re-exported here."""
from mmrl.video.models.qwen_vl.positions import (MROPE_MODEL_TYPES,  # noqa: F401
                                                 check_model_type, mrope_position_ids,
                                                 qwen2_position_ids, qwen25_position_ids)
