"""Export of a trained Qwen-VL policy: the generic transformers exporter
(:func:`mmrl.video.models.export.export_vlm`) with ``kind: qwen_vl`` in its manifest."""
from __future__ import annotations

from typing import Any, Dict, Optional


def export_qwen_vl(policy, path: str, *, merge_lora: bool = False,
                   state_dict: Optional[Dict[str, Any]] = None) -> str:
    """Write ``policy``'s model and processor to the folder ``path`` -> ``path`` (absolute).

    See :func:`mmrl.video.models.export.export_vlm` for the layouts, arguments and errors.
    """
    from mmrl.video.models.export import export_vlm
    return export_vlm(policy, path, kind="qwen_vl", merge_lora=merge_lora, state_dict=state_dict)
