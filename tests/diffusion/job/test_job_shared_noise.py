"""A diffusion group that shares one initial noise (DanceGRPO) declares that its samples must stay
on one rank (``Capabilities.whole_groups``); the runner keeps such groups whole (tested with the
runner in tests/train)."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import PROMPTS, tiny_config  # noqa: E402


def test_shared_noise_is_declared_and_shared_within_each_group(tiny_sd3_path, tmp_path):
    from mmrl.diffusion.job import build_policy
    for shared in (False, True):
        cfg = tiny_config(str(tiny_sd3_path), str(tmp_path), shared_noise=shared)
        policy = build_policy(cfg.task, "cpu", cfg.algo.resolve())
        assert policy.capabilities.whole_groups is shared
        with torch.no_grad():
            rollout = policy.rollout(PROMPTS[:2], [{}, {}], 3, torch.Generator().manual_seed(0))
        traj = rollout.data["trajectory"].traj
        first = traj.step == 0  # one step-0 transition per sample, in sample order
        x0 = traj.states[traj.src[first]].reshape(2, 3, -1)  # [B, *L] -> [P, N, L]
        same = [torch.equal(x0[p, 0], x0[p, n]) for p in range(2) for n in (1, 2)]
        assert all(same) if shared else not any(same)
        assert not torch.equal(x0[0, 0], x0[1, 0])  # groups differ
