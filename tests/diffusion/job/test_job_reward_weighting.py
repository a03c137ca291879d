"""``algo.reward_weighting`` in the diffusion job (tiny SD3, two rule reward columns): the
gradient rule's weights after each step are softmax(log w + eta*I/1e-5) of the influence I the
run computed (mmrl.train.reward_weighting); the updated weights go into the checkpoint."""
from __future__ import annotations

import os
import sys

import torch

from mmrl.train import checkpoint as ckpt

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import tiny_config  # noqa: E402


def test_diffusion_job_trains_with_gradient_reward_weighting(tmp_path, tiny_sd3_path, monkeypatch):
    import mmrl.train.reward_weighting as rw
    from mmrl.diffusion.job import run

    seen, real = [], rw.influence

    def spy(grads):  # the influence I_k = sum_j <g_k, g_j> the run computes
        seen.append(real(grads))
        return seen[-1]
    monkeypatch.setattr(rw, "influence", spy)
    cfg = tiny_config(tiny_sd3_path, str(tmp_path / "run"), reward="brightness,color:target=1 0 0",
                      algo={"reward_weighting": "gradient", "reward_weighting_lr": 1e-2,
                            "reward_weights": {"brightness": 3.0, "color": 1.0}},
                      train={"steps": 1})
    (h,) = run(cfg)["history"]
    (infl,) = seen
    assert [h["reward_weight/brightness"], h["reward_weight/color"]] == [0.75, 0.25]  # 3 : 1
    assert {"reward/brightness", "reward/color", "reward/weighted"} <= set(h)
    w = torch.softmax(torch.tensor([0.75, 0.25], dtype=torch.float64).log() + 1e-2 * infl / 1e-5,
                      0)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints"))
    saved = state["state"]["augmenters"][-1]  # last: the weighting, after this step's update
    assert saved["weights"] == w.tolist() and abs(float(w[0]) - 0.75) > 1e-6  # it moved
