"""The diffusion job with the rollout correction on: the flow policy reports each trained SDE
transition's log-prob at sampling time (``Rollout.rollout_logp``), the density ``logp``
re-scores, so on-policy the weights are 1 (to 1e-6) and the run equals the uncorrected one."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import tiny_config  # noqa: E402


def test_the_diffusion_job_with_sequence_correction_equals_the_plain_run(tiny_sd3_path,
                                                                         tmp_path):
    from mmrl.diffusion.job import run
    plain = run(tiny_config(tiny_sd3_path, str(tmp_path / "a"), train={"steps": 1}))
    corrected = run(tiny_config(
        tiny_sd3_path, str(tmp_path / "b"), train={"steps": 1},
        algo={"rollout_is": "sequence_truncate", "rollout_is_min": 0.999,
              "rollout_is_max": 1.001, "off_policy_mask": 1e-3}))
    for h in corrected["history"]:
        assert h["rollout_weight_mean"] == pytest.approx(1.0, abs=1e-5)
        assert h["rollout_clipfrac"] == 0.0 and h["off_policy_masked"] == 0.0
        assert h["rollout_logp_diff"] < 1e-6
    got = torch.tensor([(h["reward_mean"], h["grad_norm"]) for h in corrected["history"]])
    want = torch.tensor([(h["reward_mean"], h["grad_norm"]) for h in plain["history"]])
    assert float(want[:, 1].min()) > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
