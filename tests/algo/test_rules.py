"""Issue 18, lane R: hand-worked values and properties of the likelihood-reading advantages
(unlikeliness, novelty_sharpen), Posterior-GRPO's gate, and how the training code feeds them.
Oracle parity and reward gradients for every entry: test_conformance.py / test_advantages.py
(oracles in tests/reference/rules_ref.py)."""
import math

import pytest
import torch

from mmrl.algo.advantages import group_advantages
from mmrl.algo.losses import PolicyLoss
from mmrl.algo.presets import resolve_algo
from mmrl.algo.rank_bonus import likelihood_rank
from mmrl.train.batch import compute_advantages, row_mean_logp
from mmrl.train.reward_fn import RewardBatch
from mmrl.train.rollout import Rollout
from tests.reference import rules_ref

F64 = torch.float64


def _t(v):
    return torch.tensor(v, dtype=F64)


def _grpo(v, eps=1e-4):
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return [(x - m) / (s + eps) for x in v]


def test_unlikeliness_discounts_likely_correct_samples_by_rank():
    # ranks by ℓ̄: -3 -> 0, -2 -> 1, -1 -> 2, -0.5 -> 3; r̃ = [1 - .25·2/4, 0, 1 - .25·3/4, 1]
    adv = group_advantages(_t([1, 0, 1, 1]), torch.zeros(4, dtype=torch.long), "unlikeliness",
                           seq_logp=_t([-1, -2, -0.5, -3]))
    torch.testing.assert_close(adv, _t(_grpo([0.875, 0.0, 0.8125, 1.0])))


def test_unlikeliness_splits_an_all_correct_group_and_beta_comes_from_the_spec():
    seq = _t([-0.1, -0.9])  # row 0 more likely: rank 1 -> r̃ 1 - β/2
    rewards = RewardBatch(_t([[1.0], [1.0]]), ["acc"], torch.ones(2, dtype=torch.bool))
    for beta in (0.25, 0.5):
        loss = PolicyLoss("unlikeliness", unlikely_beta=beta)
        adv = compute_advantages(rewards, torch.zeros(2, dtype=torch.long), loss, seq_logp=seq)
        torch.testing.assert_close(adv, _t(_grpo([1 - beta / 2, 1.0], eps=1e-4)))


def test_likelihood_rank_ties_and_groups():
    rank = likelihood_rank(_t([-1, -1, -2, 5]), torch.tensor([0, 0, 0, 1]))
    assert rank.tolist() == [1, 2, 0, 0]


def test_novelty_sharpen_amplifies_only_unlikely_positive_rows():
    # rewards [1, 1, 0, 0]: GRPO ±0.866; ℓ̄ [-2, -1, -1, -1]: mean -1.25, std 0.5 -> ν_0 = 1.5
    adv = group_advantages(_t([1, 1, 0, 0]), torch.zeros(4, dtype=torch.long), "novelty_sharpen",
                           seq_logp=_t([-2, -1, -1, -1]), eps=0.0)
    a = 1 / math.sqrt(4 / 3)
    torch.testing.assert_close(adv, _t([a * (1 + 1.5), a, -a, -a]))


def test_posterior_gate_gives_process_reward_only_on_success():
    cols = _t([[1, 0.2], [0, 0.9], [1, 0.8], [0, 0.1]])  # outcome, reasoning
    adv = group_advantages(cols, torch.zeros(4, dtype=torch.long), "posterior_gate",
                           weights=[1.0, 0.5])
    torch.testing.assert_close(adv, _t(_grpo([1.1, 0.0, 1.4, 0.0])))
    with pytest.raises(ValueError, match="outcome column"):
        group_advantages(cols[:, :1], torch.zeros(4, dtype=torch.long), "posterior_gate")


@pytest.mark.parametrize("method", ["unlikeliness", "novelty_sharpen"])
def test_size_one_groups_zero_and_permutation_invariance(method):
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 2, (9,), generator=g).to(F64)
    ids = torch.tensor([4, 4, 4, 9, 9, 9, 9, 2, 7])
    seq = -torch.rand(9, generator=g, dtype=F64)
    adv = group_advantages(r, ids, method, seq_logp=seq)
    assert adv[7] == 0 and adv[8] == 0  # singletons
    perm = torch.randperm(9, generator=g)
    torch.testing.assert_close(group_advantages(r[perm], ids[perm], method, seq_logp=seq[perm]),
                               adv[perm])
    want = getattr(rules_ref, f"adv_{method}")(r.tolist(), ids.tolist(), seq_logp=seq.tolist())
    torch.testing.assert_close(adv, _t(want))


def test_missing_seq_logp_is_a_clear_error():
    with pytest.raises(ValueError, match="needs seq_logp"):
        group_advantages(_t([1, 0]), torch.zeros(2, dtype=torch.long), "unlikeliness")


def test_row_mean_logp_reads_the_rollout_or_scores_once():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    ro = Rollout(["a", "b"], ["p", "p"], [{}, {}], torch.zeros(2, dtype=torch.long), mask,
                 rollout_logp=torch.tensor([[-1.0, -3.0, -50.0], [-9.0, -9.0, -9.0]]))
    assert row_mean_logp(None, ro).tolist() == [-2.0, 0.0]  # padding ignored; empty row 0

    class Scorer:
        def logp(self, rollout, rows, t0, t1):
            assert rows.tolist() == [0, 1] and (t0, t1) == (0, 3)
            return torch.full((2, 3), -0.5)
    ro.rollout_logp = None
    assert row_mean_logp(Scorer(), ro).tolist() == [-0.5, 0.0]
    assert resolve_algo("unlikeliness").needs_seq_logp and not resolve_algo("grpo").needs_seq_logp


def test_posterior_gate_gradients_match_the_oracle():
    cols = _t([[1, 0.2], [0, 0.9], [1, 0.8], [0.5, 0.1], [1, 0.3]]).requires_grad_()
    ids = torch.tensor([0, 0, 0, 1, 1])
    adv = group_advantages(cols, ids, "posterior_gate", weights=[1.0, 0.5], base="rloo")
    want = rules_ref.adv_posterior_gate([list(r.unbind()) for r in cols.unbind()], ids.tolist(),
                                        [1.0, 0.5], base="rloo")
    w = torch.linspace(-1, 1, 5, dtype=F64)
    g1, = torch.autograd.grad((adv * w).sum(), cols)
    g2, = torch.autograd.grad(sum(wi * a for wi, a in zip(w, want)), cols)
    torch.testing.assert_close(g1, g2)
    assert g1[1, 1] == 0 and g1[3, 1] == 0  # failed outcomes: the process reward has no say
