"""The video job's SFT stage end to end: ``video.sft_steps`` SFT steps on the synthetic records'
filler targets (VLMPolicy.target_rollout: a record's prompt encoded once for its targets), then
a GRPO step that logs ``think_frac``."""
from __future__ import annotations

import json
import os

from mmrl.cli.app import main

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def test_sft_steps_then_grpo_in_the_video_job(tiny_vl_dir, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", os.path.join(ROOT, "configs/demo/video_tiny_thinking.yaml"),
               "train.steps=2", "train.prompts_per_step=2", "train.group_size=2",
               "train.progress=false", "train.export=false", "video.synthetic_num=2",
               f"video.model={tiny_vl_dir}", f"train.output_dir={out}", "video.sft_steps=1",
               "video.thought_dropout=0.5", "video.length_reward=none", "algo.beta=0"])
    assert rc == 0
    sft, rl = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert sft["sft_step"] == 1 and sft["sft_targets"] == 4 and sft["sft_skipped"] == 0
    assert sft["sft_tokens"] >= 4 and 0 <= sft["sft_think_frac"] <= 1 and sft["loss"] > 0
    assert "reward_mean" in rl and "think_frac" in rl
