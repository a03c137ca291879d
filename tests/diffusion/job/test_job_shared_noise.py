"""A diffusion group that shares one initial noise (DanceGRPO) is never split over ranks."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import tiny_config  # noqa: E402


def test_shared_noise_keeps_groups_whole_on_each_rank(tiny_sd3_path, tmp_path):
    from mmrl.diffusion.job import build_policy
    from mmrl.train.runner import Run
    for shared in (False, True):
        cfg = tiny_config(str(tiny_sd3_path), str(tmp_path), shared_noise=shared,
                          train={"prompts_per_step": 3, "group_size": 4})
        policy = build_policy(cfg.task, "cpu", cfg.algo.resolve())
        assert policy.capabilities.whole_groups is shared
        run = Run(cfg, policy, lambda *a: [0.0], cfg.task.prompts, None)
        run.dist = type("D", (), {"world": 2, "rank": 0, "active": True})()
        mine = run.shard([4, 4, 4], [0, 1, 2])
        assert mine == ([(0, 4, 0), (2, 4, 2)] if shared else [(0, 4, 0), (1, 2, 1)])
