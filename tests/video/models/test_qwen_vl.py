"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL pass the VLM adapter conformance suite
(tests/video/models/vlm_conformance.py) with tiny models built by the adapter."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from vlm_conformance import VIDEO, VLMAdapterConformance  # noqa: E402

from mmrl.video.models.qwen_vl.adapter import QwenVLAdapter  # noqa: E402

# one video entry of 2 frames = one temporal grid: where transformers' own positions for
# Qwen2/2.5-VL are right (longer videos: tests/video/job/test_vl_arches.py)
ONE_GRID = dict(VIDEO, max_frames=2)


class _Qwen(VLMAdapterConformance):
    adapter = QwenVLAdapter()
    library_video_options = ONE_GRID

    def library_kwargs(self, ids, config):
        """mm_token_type_ids as the processor makes them: text 0, image 1, video 2."""
        return {"mm_token_type_ids": (ids == config.image_token_id).int()
                + 2 * (ids == config.video_token_id).int()}


class TestQwen2VL(_Qwen):
    model_type = "qwen2_vl"


class TestQwen25VL(_Qwen):
    model_type = "qwen2_5_vl"


class TestQwen3VL(_Qwen):
    model_type = "qwen3_vl"
    library_video_options = VIDEO  # every Qwen3-VL block is one temporal grid
