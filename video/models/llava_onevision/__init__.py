"""LLaVA-OneVision (transformers ``llava_onevision``): SigLIP vision tower, Qwen2 language model,
1-D positions, videos as pooled frame stacks.

- :mod:`.adapter`: :class:`LlavaOneVisionAdapter`, the family's
  :class:`~mmrl.video.models.base.VLMAdapter` (registered in :mod:`mmrl.video.models` for
  ``model_type: llava_onevision``).
- :mod:`.inputs`: a conversation -> the processor's tensors (frames sampled by ``fps`` /
  ``max_frames``).
- :mod:`.tiny`: a ≈150k-parameter model + processor built offline (the job's
  ``model: tiny_llava_ov``).

Importing this package loads nothing heavy; the names load on first use.
"""
from mmrl._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".adapter": ["LlavaOneVisionAdapter"],
    ".inputs": ["encode_conversation", "load_frames", "load_image", "media_items",
                "template_messages"],
    ".tiny": ["build_tiny_llava_onevision"],
})
