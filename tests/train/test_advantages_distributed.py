"""Batch-global advantage estimators under data parallelism: 2 gloo ranks (a group split across
ranks) give the same update as 1 process on the same global batch, because the rewards, token
counts and greedy baselines are gathered before the estimator runs (REINFORCE++ whitens over
every rank's tokens, GPG's α counts every rank's rewards, GDPO whitens over every sequence,
ReMax's greedy completions are split over ranks and shared). One torchrun for all four."""
import sys

import pytest
import torch

from tests.train.test_distributed import HERE, TORCHRUN, _run

pytestmark = pytest.mark.slow

RUNS = ["reinforce_pp", "grpo:advantage=gpg", "gdpo", "remax"]


def test_two_ranks_equal_one_process(tmp_path):
    script = str(HERE / "distributed" / "ddp_step.py")
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    _run([sys.executable, script, str(single), "-", "0", "+".join(RUNS)])
    _run(TORCHRUN + [script, str(multi), "-", "0", "+".join(RUNS)])
    for i, run in enumerate(RUNS):
        one = torch.load(single / f"rank0-{i}.pt")
        r0, r1 = torch.load(multi / f"rank0-{i}.pt"), torch.load(multi / f"rank1-{i}.pt")
        assert torch.equal(r0["W"], r1["W"]), f"{run}: ranks diverged"
        torch.testing.assert_close(r0["W"], one["W"], rtol=1e-5, atol=1e-6, msg=run)
        assert one["metrics"]["adv_abs_mean"] > 0, run
        for key in ("adv_abs_mean", "reward_mean", "samples", "loss", "grad_norm"):
            assert r0["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5,
                                                       abs=1e-7), (run, key)
