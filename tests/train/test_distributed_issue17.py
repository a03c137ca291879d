"""The batch-global entries of issue 17 under data parallelism: 2 gloo ranks (a group split
across ranks) give the same update as 1 process on the same global batch. Rewards, token counts
and greedy baselines are gathered before the estimator runs (REINFORCE++ whitens over every
rank's tokens, GPG's α counts every rank's rewards, GDPO whitens over every sequence, ReMax's
greedy completions are split over ranks and shared); the top-entropy threshold is the quantile
over both ranks' tokens and skipped empty rows are counted over both ranks. One torchrun for all
of them (a launch costs more than the steps)."""
import json
import sys

import pytest
import torch

from tests.train.test_distributed import HERE, TORCHRUN, _run

pytestmark = pytest.mark.slow

RUNS = [["reinforce_pp", 0, {}], ["grpo", 0, {"advantage": "gpg"}], ["gdpo", 0, {}],
        ["remax", 0, {}],
        ["grpo", 2, {"entropy_coef": 0.2, "top_entropy_quantile": 0.3, "empty_rows": "skip"}]]


def test_two_ranks_equal_one_process(tmp_path):
    script = str(HERE / "distributed" / "ddp_step.py")
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    _run([sys.executable, script, str(single), "-", "0", json.dumps(RUNS)])
    _run(TORCHRUN + [script, str(multi), "-", "0", json.dumps(RUNS)])
    for i, run in enumerate(RUNS):
        one = torch.load(single / f"rank0-{i}.pt")
        r0, r1 = torch.load(multi / f"rank0-{i}.pt"), torch.load(multi / f"rank1-{i}.pt")
        assert torch.equal(r0["W"], r1["W"]), f"{run}: ranks diverged"
        torch.testing.assert_close(r0["W"], one["W"], rtol=1e-5, atol=1e-6, msg=str(run))
        assert one["metrics"]["adv_abs_mean"] > 0, run
        for key in ("adv_abs_mean", "reward_mean", "samples", "loss", "grad_norm"):
            assert r0["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5,
                                                       abs=1e-7), (run, key)
    assert 0.2 < torch.load(single / "rank0-4.pt")["metrics"]["entropy_kept"] < 0.45
