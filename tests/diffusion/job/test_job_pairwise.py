"""The diffusion job trains on a groupwise reward: pref_winrate over the bradley_terry judge of
brightness on the tiny SD3 pipeline; the loop's rewards are per-group win rates."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import tiny_config  # noqa: E402

REWARD = "pref_winrate:judge=bradley_terry:scorer=brightness:temperature=0.01:hard=true"


def test_pref_winrate_rewards_are_win_rates_within_each_group(tiny_sd3_path, tmp_path,
                                                             monkeypatch):
    from mmrl.diffusion.job import run
    from mmrl.rewards.pairwise import PrefWinRate

    calls = []
    score = PrefWinRate.__call__

    def spy(self, samples, prompts=None, metadata=None):
        out = score(self, samples, prompts, metadata)
        calls.append((samples.detach().clone(), [m["group_id"] for m in metadata], out))
        return out
    monkeypatch.setattr(PrefWinRate, "__call__", spy)
    cfg = tiny_config(tiny_sd3_path, str(tmp_path), reward=REWARD,
                      train={"steps": 1, "group_size": 3})
    summary = run(cfg)
    assert len(calls) == 1 and summary["steps"] == 1
    for images, gids, w in calls:
        assert sorted(gids) == [gids[0]] * 3 + [gids[-1]] * 3 and gids[0] != gids[-1]
        luma = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).mean((1, 2))
        for g in set(gids):
            rows = [i for i, x in enumerate(gids) if x == g]
            lg = luma[rows]
            # hard win rate: the share of the 2 others a sample is brighter than (ties 0.5)
            want = ((lg[:, None] > lg[None]).float() + 0.5 * (lg[:, None] == lg[None]).float()
                    - 0.5 * torch.eye(3)).sum(1) / 2
            torch.testing.assert_close(w[rows], want)
            assert abs(float(w[rows].mean()) - 0.5) < 1e-6
    assert all(abs(h["reward_mean"] - 0.5) < 1e-6 for h in summary["history"])
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])
