"""The diffusion job trains on the VLM-based rewards, loaded by path from tiny random checkpoints
in their released layouts, through the same reward specs as the recipes
(configs/diffusion/flux_hpsv3_dancegrpo.yaml, flux_pref_grpo.yaml,
wan21_1p3b_videoreward_flow_grpo.yaml): HPSv3 on a tiny SD3, Pref-GRPO's win rate from a VLM
pairwise judge next to a CLIP-free rule column, VideoReward on a tiny Wan. One step each; the
rewards the loop saw are the scorers' own values on the samples."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import tiny_config  # noqa: E402


def _spy(monkeypatch, cls):
    """Record (samples, output) of every call of ``cls.__call__``."""
    calls, call = [], cls.__call__

    def spy(self, samples, prompts=None, metadata=None):
        out = call(self, samples, prompts, metadata)
        calls.append((samples.detach().clone(), list(prompts), out))
        return out
    monkeypatch.setattr(cls, "__call__", spy)
    return calls


def test_hpsv3_rewards_the_image_job(tiny_sd3_path, tmp_path, monkeypatch):
    from mmrl.diffusion.job import run
    from mmrl.rewards.hpsv3 import HPSv3
    from mmrl.rewards.qwen2vl_rm import build_tiny_checkpoint

    ck = build_tiny_checkpoint(str(tmp_path / "hpsv3"), hidden_size=32, layers=1,
                               vision_depth=1)
    calls = _spy(monkeypatch, HPSv3)
    spec = f"hpsv3:path={ck['path']}:base={ck['base']}:min_pixels=784:max_pixels=3136"
    summary = run(tiny_config(tiny_sd3_path, str(tmp_path / "run"), reward=spec,
                              train={"steps": 1}))
    assert summary["steps"] == 1 and len(calls) == 1
    images, prompts, mu = calls[0]
    assert images.shape[0] == 4 and torch.isfinite(mu).all() and mu.std() > 0
    fresh = HPSv3(path=ck["path"], base=ck["base"], device="cpu", min_pixels=784,
                  max_pixels=3136)
    torch.testing.assert_close(fresh(images, prompts), mu)
    assert summary["history"][0]["reward_mean"] == pytest.approx(float(mu.mean()), abs=1e-5)


def test_pref_winrate_over_a_vlm_pair_judge_rewards_the_image_job(tiny_sd3_path, tmp_path,
                                                                 monkeypatch):
    from mmrl.diffusion.job import run
    from mmrl.rewards.pairwise import PrefWinRate
    from mmrl.video.models.qwen_vl.tiny import build_tiny

    judge = build_tiny(str(tmp_path / "judge"), "qwen2_vl", hidden_size=32, layers=1)
    calls = _spy(monkeypatch, PrefWinRate)
    spec = (f"pref_winrate:judge=vlm_pair:path={judge}:template=\"Which fits {{prompt}}?\""
            f":answers=[\"1\",\"2\"]:weight=0.4,brightness:weight=0.6")
    cfg = tiny_config(tiny_sd3_path, str(tmp_path / "run"), reward=spec,
                      train={"steps": 1, "group_size": 3},
                      algo={"multi_reward": "gdpo"})
    summary = run(cfg)
    assert summary["steps"] == 1 and len(calls) == 1
    images, prompts, w = calls[0]
    assert images.shape[0] == 6 and ((w >= 0) & (w <= 1)).all()
    for g in (slice(0, 3), slice(3, 6)):  # a group's win rates average 1/2 (both orders)
        assert len(set(prompts[g])) == 1 and float(w[g].mean()) == pytest.approx(0.5, abs=1e-5)
    assert w.std() > 0  # the tiny judge has preferences


def test_videoreward_rewards_the_video_job(tmp_path, monkeypatch):
    from mmrl.diffusion.job import run
    from mmrl.diffusion.models.wan import save_tiny_wan
    from mmrl.rewards.videoreward import VideoReward, build_tiny_videoreward

    wan = str(save_tiny_wan(tmp_path / "wan", size=16))
    root = build_tiny_videoreward(str(tmp_path / "videoreward"), step=3)
    calls = _spy(monkeypatch, VideoReward)
    pix = ":min_pixels=3136:max_pixels=3136"  # the tiny processor's bounds: 56x56 frames
    cfg = tiny_config(wan, str(tmp_path / "run"), reward=f"videoreward:path={root}:fps=16{pix}",
                      train={"steps": 1}, pipeline="wan", frames=5, height=16, width=16,
                      num_steps=3, eval_num_steps=3)
    summary = run(cfg)
    assert summary["steps"] == 1 and len(calls) == 1
    videos, prompts, overall = calls[0]
    assert videos.shape[:2] == (4, 5) and torch.isfinite(overall).all()
    fresh = VideoReward(path=root, fps=16, device="cpu", min_pixels=3136, max_pixels=3136)
    torch.testing.assert_close(fresh(videos, prompts), overall)


def test_videoreward_in_a_video_job_needs_a_frame_rate_before_any_work():
    from mmrl.diffusion.config import reward_media_problems
    (msg,) = reward_media_problems("videoreward:path=/ckpt", 33)
    assert "videoreward:fps=16" in msg and "num_frames=N" in msg
    assert reward_media_problems("videoreward:path=/ckpt:fps=16", 33) == []
    assert reward_media_problems("videoreward:path=/ckpt:num_frames=4", 33) == []
