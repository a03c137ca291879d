"""The video policy reports its sampled tokens' log-probs (the KV-cached sampling forward) under
the distribution its ``logp`` scores; the video job with the rollout correction on trains with
weights 1 up to numerics and nothing masked; a policy that reports none is refused before a run
starts."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from mmrl.cli.app import main

sys.path.insert(0, os.path.dirname(__file__))
from vt_helpers import make_policy, rollout  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
FAST = ["train.steps=1", "train.prompts_per_step=2", "train.group_size=4", "train.log_every=1",
        "train.progress=false", "train.device=cpu", "train.export=false", "video.synthetic_num=4",
        "video.temperature=0.7", "video.top_p=0.9"]


def test_the_video_job_trains_with_sequence_masked_rollout_correction(tiny_vl_dir, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", os.path.join(ROOT, "configs/demo/video_tiny.yaml"), *FAST,
               f"video.model={tiny_vl_dir}",
               f"train.output_dir={out}", "algo.rollout_is=sequence_mask",
               "algo.rollout_is_min=0.999", "algo.rollout_is_max=1.001",
               "algo.off_policy_mask=0.001"])
    assert rc == 0
    (m,) = [json.loads(line) for line in open(out / "metrics.jsonl")]
    # temperature 0.7, top-p 0.9, allowed answers A-D (the demo's): the reported log-probs are
    # of the distribution logp scores (temperature-scaled, restricted, before top-p), so the
    # sequence weights stay within 1 ± 1e-3 (the demo's beta 0.1 KL is on and unweighted)
    assert m["rollout_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert m["rollout_clipfrac"] == 0.0 and m["off_policy_masked"] == 0.0
    assert m["rollout_logp_diff"] < 1e-5
    assert m["grad_norm"] > 0


def test_rollout_logp_is_logps_distribution_under_temperature_top_p_and_stop_strings(
        tiny_vl_dir, vt_batch):
    """Free decoding (no allowed answers), 6 tokens, temperature 0.6, top-p 0.8, a stop string:
    the sampling forward's log-probs equal the training forward's on every kept token (both of
    the temperature-scaled distribution before top-p truncation)."""
    pol = make_policy(tiny_vl_dir, max_new_tokens=6, temperature=0.6, top_p=0.8, stop=["a"])
    ro = rollout(pol, vt_batch, group=2)
    assert ro.rollout_logp.shape == ro.mask.shape and int(ro.mask.sum()) > len(ro)
    with torch.no_grad():
        lp = pol.logp(ro, torch.arange(len(ro)), 0, ro.mask.shape[1])
    assert float((lp - ro.rollout_logp).abs()[ro.mask].max()) < 1e-5
    assert bool((ro.rollout_logp[~ro.mask] == 0).all())  # padding: 0


def test_a_policy_that_reports_no_rollout_logp_is_refused():
    """(The toy policy reports them since the guidance augmenters: a bare GroupPolicy here.)"""
    from mmrl.config.schema import AlgoConfig
    from mmrl.train.policy import GroupPolicy, check_policy
    with pytest.raises(TypeError, match="does not report them"):
        check_policy(GroupPolicy(), AlgoConfig(rollout_is="token_truncate").resolve())
