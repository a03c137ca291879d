"""Moved: the generic exporter is :mod:`mmrl.video.models.export` (``export_vlm``), Qwen-VL's is
:mod:`mmrl.video.models.qwen_vl.export` (``export_qwen_vl``). Re-exported here."""
from mmrl.video.models.export import (MANIFEST, check_target, export_vlm,  # noqa: F401
                                      merged_state_dict, write_atomically)
from mmrl.video.models.qwen_vl.export import export_qwen_vl  # noqa: F401
