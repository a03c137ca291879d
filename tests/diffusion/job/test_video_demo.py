"""The tiny text-to-video demo (configs/demo/diffusion_video_tiny.yaml): its pipeline comes from
``mmrl diffusion tiny-pipeline --family wan`` and every prompt names the direction its reward
reads. (A training step of the demo costs ~10 s here; the Wan job itself is trained by
tests/diffusion/models/test_wan.py, the config validated by the recipe test.)"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "configs" / "demo" / "diffusion_video_tiny.yaml"


def test_video_demo_tiny_wan_from_the_cli_and_prompts_naming_directions(tmp_path, capsys):
    from mmrl.cli.app import main
    from mmrl.rewards.video_rules import prompt_direction

    cfg = yaml.safe_load(DEMO.read_text())
    d = cfg["diffusion"]
    # every prompt names the direction the reward reads, each of the four in the eval set
    assert [prompt_direction(p) for p in d["eval_prompts"]] == ["left", "right", "up", "down"]
    assert all(prompt_direction(p) is not None for p in d["prompts"])
    assert main(["diffusion", "tiny-pipeline", str(tmp_path / "x"), "--family", "wn"]) == 2
    assert "did you mean 'wan'?" in capsys.readouterr().err
    model = tmp_path / "wan"
    assert main(["diffusion", "tiny-pipeline", str(model), "--family", "wan", "--size",
                 str(d["height"])]) == 0
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "WanPipeline"
