"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the adapter (:mod:`.adapter`), processor inputs
(:mod:`.inputs`), mRoPE positions (:mod:`.positions`), tiny builders (:mod:`.tiny`) and export
(:mod:`.export`). Importing this package loads nothing heavy; the names load on first use."""
from mmrl._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".adapter": ["QwenVLAdapter"],
    ".export": ["export_qwen_vl"],
    ".inputs": ["QwenVideoBatch", "VideoEntry", "build_qwen_video_inputs", "plan_entries",
                "uniform_entries", "uniform_size"],
    ".positions": ["MROPE_MODEL_TYPES", "check_model_type", "mrope_position_ids",
                   "qwen2_position_ids", "qwen25_position_ids"],
    ".tiny": ["build_tiny", "build_tiny_qwen_vl", "build_tiny_qwen2_vl", "build_tiny_qwen3_vl"],
})
