"""`video.model: tiny_qwen2` / `tiny_qwen3`: the job builds a tiny Qwen2-VL / Qwen3-VL in its own
folder of output_dir and trains on it, as `tiny` does for Qwen2.5-VL."""
from __future__ import annotations

import json
import math
import os

import pytest

from mmrl.cli.app import main

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


@pytest.mark.parametrize("name, folder, model_type", [("tiny_qwen2", "tiny_qwen2_vl", "qwen2_vl"),
                                                      ("tiny_qwen3", "tiny_qwen3_vl", "qwen3_vl")])
def test_tiny_choice_builds_its_architecture_and_trains(name, folder, model_type, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", os.path.join(ROOT, "configs/demo/video_tiny.yaml"), "train.steps=1",
               "train.prompts_per_step=2", "train.group_size=2", "train.progress=false",
               f"train.output_dir={out}", f"video.model={name}", "video.synthetic_num=4"])
    assert rc == 0
    for config in (out / folder / "config.json", out / "hf" / "config.json"):  # built, exported
        with open(config) as f:
            assert json.load(f)["model_type"] == model_type
    assert not (out / "tiny_qwen_vl").exists()  # not the Qwen2.5-VL demo model
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(metrics) == 1 and metrics[0]["samples"] == 4
    assert math.isfinite(metrics[0]["loss"]) and math.isfinite(metrics[0]["grad_norm"])
