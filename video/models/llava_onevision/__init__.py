"""LLaVA-OneVision (transformers ``llava_onevision``): SigLIP vision tower, Qwen2 language model,
1-D positions, videos as pooled frame stacks.

- :mod:`.adapter`: :class:`~mmrl.video.models.llava_onevision.adapter.LlavaOnevisionAdapter`,
  the family's :class:`~mmrl.video.models.base.VLMAdapter` (registered in
  :mod:`mmrl.video.models` for ``model_type: llava_onevision``).
- :mod:`.inputs`: a conversation -> the processor's tensors (frames sampled by ``fps`` /
  ``max_frames``).
- :mod:`.tiny`: a ≈150k-parameter model + processor built offline (the job's
  ``model: tiny_llava_onevision``).

Nothing heavy is imported here.
"""
