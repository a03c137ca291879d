"""preference_step: one optimizer step of a preference loss on P pairs. Its gradient equals the
unsplit loss's for any micro-batch size and on 2 gloo ranks (one torchrun for all cases); the
clip and the skipped non-finite step are the loop's; the held-out accuracy counts ties as one
half; the file-pair slice of a step is a function of the step. The loss here is a stand-in with
PreferenceLoss's contract (tests/train/distributed/pref_step.py), so these tests need no other
lane's code."""
import json
import math
import sys

import pytest
import torch

from mmrl.train.distributed import Dist
from mmrl.train.loop import LoopSettings
from mmrl.train.pref_stage import step_records
from mmrl.train.preference import PrefScores, pair_accuracy, pair_chunks
from tests.train.distributed.pref_step import LinearPairPolicy, StandInDPO, step
from tests.train.test_distributed import HERE, TORCHRUN, _run


def _unsplit(n_pairs=5, max_grad_norm=0.0):
    """W after plain SGD (lr 0.5) on the autograd gradient of the whole batch's loss."""
    pol = LinearPairPolicy()
    rollout, c, r = pol.pair_rollout([{"pair": k} for k in range(n_pairs)])
    s = pol.pair_scores(rollout, c, r, None, True)
    loss, stats = StandInDPO()(s.chosen_logp, s.rejected_logp, s.chosen_mask, s.rejected_mask,
                               chosen_ref=s.chosen_ref, rejected_ref=s.rejected_ref)
    (grad,) = torch.autograd.grad(loss, [pol.W])
    scale = 1.0 if max_grad_norm == 0 else min(1.0, max_grad_norm / float(grad.norm()))
    return pol.W.detach() - 0.5 * scale * grad, float(loss.detach()), stats, float(grad.norm())


@pytest.mark.parametrize("micro", [0, 2, 4, 6, 100])
def test_micro_batches_give_the_unsplit_step(micro):
    W_ref, loss, stats, gnorm = _unsplit()
    W, m = step(Dist(), 5, micro, max_grad_norm=0.0)
    torch.testing.assert_close(W, W_ref, rtol=1e-6, atol=1e-7)
    assert m["loss"] == pytest.approx(loss, rel=1e-6)
    assert m["grad_norm"] == pytest.approx(gnorm, rel=1e-5)
    assert (m["pairs"], m["skipped_updates"]) == (5.0, 0.0)
    for k in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
        assert m[f"pref_{k}"] == pytest.approx(float(stats[k]), rel=1e-6, abs=1e-7), k
    assert 0 < m["pref_reward_accuracy"] < 1  # some pairs each way: the mean is a real mean


def test_pair_chunks_count_samples_two_per_pair():
    assert pair_chunks(5, 0) == [(0, 5)]
    assert pair_chunks(5, 4) == [(0, 2), (2, 4), (4, 5)]
    assert pair_chunks(5, 1) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]  # one pair at least


def test_the_gradient_is_clipped_and_the_norm_before_clipping_reported():
    W_ref, _, _, gnorm = _unsplit(max_grad_norm=0.01)
    W, m = step(Dist(), 5, 2, max_grad_norm=0.01)
    assert gnorm > 0.05  # the clip is active
    torch.testing.assert_close(W, W_ref, rtol=1e-6, atol=1e-7)
    moved = float((W - LinearPairPolicy().W.detach()).norm())
    assert moved == pytest.approx(0.5 * 0.01, rel=1e-4)  # torch clips by max / (norm + 1e-6)
    assert m["grad_norm"] == pytest.approx(gnorm, rel=1e-5)


def test_a_non_finite_step_is_skipped_and_changes_nothing():
    W, m = step(Dist(), 5, 2, poison=True)
    assert torch.equal(W, LinearPairPolicy().W.detach())
    assert m["skipped_updates"] == 1.0 and math.isnan(m["grad_norm"])


def test_no_pair_trains_nothing():
    W, m = step(Dist(), 0, 2)
    assert m == {"pairs": 0.0, "skipped_updates": 0.0}
    assert torch.equal(W, LinearPairPolicy().W.detach())


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    """5 pairs split 3 / 2 with one pair per micro-batch, and 1 pair (rank 1 holds none)."""
    script = str(HERE / "distributed" / "pref_step.py")
    runs = [[5, 2], [1, 0]]
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    _run([sys.executable, script, str(single), json.dumps(runs)])
    _run(TORCHRUN + [script, str(multi), json.dumps(runs)])
    for i, run in enumerate(runs):
        one = torch.load(single / f"rank0-{i}.pt")
        r0, r1 = torch.load(multi / f"rank0-{i}.pt"), torch.load(multi / f"rank1-{i}.pt")
        assert torch.equal(r0["W"], r1["W"]), f"{run}: ranks diverged"
        torch.testing.assert_close(r0["W"], one["W"], rtol=1e-6, atol=1e-7, msg=str(run))
        assert not torch.equal(one["W"], LinearPairPolicy().W.detach())
        for key in ("loss", "grad_norm", "pairs", "pref_reward_margin",
                    "pref_reward_accuracy"):
            assert r0["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-6,
                                                       abs=1e-7), (run, key)


class _FixedScores:
    """pair_scores returning given per-pair log-ratio sums (T = 2, one token masked out)."""

    def __init__(self, chosen, rejected):
        self.c, self.r = torch.tensor(chosen), torch.tensor(rejected)

    def pair_scores(self, rollout, chosen_rows, rejected_rows, generator, with_ref):
        def two(x):  # [p] log-ratio sums -> [p, 2] logp, ref = 0, second token masked out
            return torch.stack([x, torch.full_like(x, 7.0)], -1)
        mask = torch.tensor([[True, False]]).expand(len(chosen_rows), 2)
        zeros = torch.zeros(len(chosen_rows), 2)
        return PrefScores(two(self.c[chosen_rows]), two(self.r[rejected_rows]), mask, mask,
                          zeros, zeros)


def test_pair_accuracy_hand_values():
    pol = _FixedScores([1.0, 0.0, -2.0, 0.5], [0.0, 0.0, 1.0, 0.25])
    rows = torch.arange(4)
    out = pair_accuracy(pol, None, rows, rows, 2, torch.Generator())
    # margins 1, 0 (a tie: one half), -3, 0.25 -> (1 + 0.5 + 0 + 1) / 4
    assert out == {"accuracy": 2.5 / 4, "margin": pytest.approx((1 + 0 - 3 + 0.25) / 4),
                   "pairs": 4.0}


def test_step_records_are_shuffled_epochs_fixed_by_the_step():
    first = [step_records(7, 3, i, seed=5) for i in range(7)]  # 21 = 3 epochs of 7
    flat = [j for part in first for j in part]
    for e in range(3):
        assert sorted(flat[7 * e:7 * (e + 1)]) == list(range(7))
    assert flat[:7] != flat[7:14]  # each epoch its own order
    assert step_records(7, 3, 4, seed=5) == first[4]  # a resumed run reads the same slice
    assert step_records(7, 3, 0, seed=6) != first[0]


def test_read_pair_records_reports_every_bad_line_at_once(tmp_path):
    from mmrl.config.core import UserError
    from mmrl.train.pref_stage import read_pair_records
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": [1], "chosen": [2], "rejected": [3]}\nnot json\n\n'
                    '{"prompt": [1], "chosen": [2]}\n[1, 2]\n')
    with pytest.raises(UserError) as err:
        read_pair_records(path)
    msg = str(err.value)
    assert msg.startswith("3 bad line(s)")
    assert f"{path}:2: not JSON" in msg and f"{path}:4:" in msg and f"{path}:5:" in msg
    path.write_text('{"prompt": [1], "chosen": [2], "rejected": [3]}\n\n')
    assert read_pair_records(path) == [{"prompt": [1], "chosen": [2], "rejected": [3]}]
