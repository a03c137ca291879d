"""Moved: the Qwen-VL tiny builders are :mod:`mmrl.video.models.qwen_vl.tiny`, the job's tiny
model names :data:`mmrl.video.models.TINY_MODELS`; the names are re-exported here."""
from mmrl.video.models import TINY_MODELS, build_default_tiny, default_tiny_dir  # noqa: F401
from mmrl.video.models.qwen_vl.tiny import (ARCHS, CHAT_TEMPLATE, SPECIALS,  # noqa: F401
                                            build_tiny_qwen2_vl, build_tiny_qwen3_vl,
                                            build_tiny_qwen_vl)
