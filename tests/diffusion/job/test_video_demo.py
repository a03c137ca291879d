"""The tiny text-to-video demo (configs/demo/diffusion_video_tiny.yaml): its pipeline comes from
``mmrl diffusion tiny-pipeline --family wan --demo`` (a smooth VAE: a latent blob decodes to a
pixel blob at its place) and every prompt names the direction its reward reads. (A training step of the demo costs ~10 s here; the Wan job itself is trained by
tests/diffusion/models/test_wan.py, the config validated by the recipe test.)"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "configs" / "demo" / "diffusion_video_tiny.yaml"


def test_video_demo_tiny_wan_from_the_cli_and_prompts_naming_directions(tmp_path, capsys):
    from mmrl.cli.app import main
    from mmrl.rewards.video_rules import prompt_direction

    cfg = yaml.safe_load(DEMO.read_text())
    d = cfg["diffusion"]
    # every prompt names the direction the reward reads: left and right, both trained each step
    # (up/down not yet; see the config's header)
    assert [prompt_direction(p) for p in d["prompts"]] == ["left", "right"]
    assert [prompt_direction(p) for p in d["eval_prompts"]] == ["left", "right"] * 2
    assert cfg["train"]["prompts_per_step"] == 2 and d["shared_noise"] is True
    assert main(["diffusion", "tiny-pipeline", str(tmp_path / "x"), "--family", "wn"]) == 2
    assert "did you mean 'wan'?" in capsys.readouterr().err
    assert main(["diffusion", "tiny-pipeline", str(tmp_path / "x"), "--family", "z_image",
                 "--demo"]) == 2
    assert "the demos' pipelines are sd3 and wan" in capsys.readouterr().err
    model = tmp_path / "wan"
    assert main(["diffusion", "tiny-pipeline", str(model), "--family", "wan", "--size",
                 str(d["height"]), "--demo"]) == 0
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    transformer = json.loads((model / "transformer" / "config.json").read_text())
    assert transformer["patch_size"] == [3, d["height"] // 8, d["width"] // 8]  # one token
    from mmrl.diffusion.models.wan import build_tiny_wan

    gain = build_tiny_wan(16, vae="smooth", text_gain=10.0).transformer.blocks[0].attn2.to_out[0]
    plain = build_tiny_wan(16, vae="smooth").transformer.blocks[0].attn2.to_out[0]
    assert torch.allclose(gain.weight, 10.0 * plain.weight) and torch.equal(gain.bias, plain.bias)
    assert d["frames"] == 9  # 3 latent frames: the temporal patch


def test_the_smooth_tiny_wan_vae_decodes_a_latent_blob_to_a_pixel_blob_at_its_place():
    import pytest
    import torch

    from mmrl.diffusion.models.wan import WanAdapter, build_tiny_wan
    from mmrl.rewards.video_rules import MotionDirection

    flow = WanAdapter(build_tiny_wan(16, seed=0, vae="smooth"), guidance_scale=1.0,
                      frames=5)
    z = torch.zeros(1, 4, 2, 2, 2)  # normalised latents [B, C, F'=2, 2, 2]: 5 frames of 16x16
    z[0, 0, 0, 0, 0] = 2.0  # latent frame 0: top-left; frame 1: bottom-right
    z[0, 0, 1, 1, 1] = 2.0
    z[0, 1:] = 3.0  # channels 1-3 do not reach the pixels
    video = flow.decode(z)  # [1, 5, 3, 16, 16]
    assert torch.equal(video[..., 0, :, :], video[..., 2, :, :])  # grey
    luma = video[0, :, 0]  # [5, 16, 16]
    tl, br = luma[:, :8, :8].mean((1, 2)), luma[:, 8:, 8:].mean((1, 2))  # [5] quadrant means
    assert tl[0] > 0.5 and br[0] < 0.05 and (tl[1:] < 0.05).all() and (br[1:] > 0.5).all()
    assert luma[0, 3, 3] > luma[0, 7, 7] > luma[0, 9, 9]  # smooth, not blocky: fades outward
    reward = MotionDirection()(video, ["a square moving right", "a square moving left"][:1])
    assert reward.item() == pytest.approx(0.351, abs=0.01)  # the blur keeps it under 0.5 (half)
    assert torch.equal(flow.decode(torch.zeros(1, 4, 2, 2, 2)), torch.zeros(1, 5, 3, 16, 16))
    with pytest.raises(ValueError, match="vae='blur'.*random, smooth"):
        build_tiny_wan(16, vae="blur")
