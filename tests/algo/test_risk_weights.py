"""Issue 18, lane R: RiskPO's mixed-VaR advantages and quantile tracking; dynamic reward
weighting (hypervolume, gradient-based) and its round augmenter. Oracles: tests/reference/rules_ref.py."""
import math

import pytest
import torch

from mmrl.algo.advantages import group_advantages
from mmrl.algo.reward_weights import (HypervolumeWeighting, gradient_weight_update,
                                      hv_multiplier, hypervolume, influence)
from mmrl.algo.risk import QuantileTracker
from mmrl.train.reward_fn import RewardBatch
from mmrl.train.reward_weighting import DynamicRewardWeights
from mmrl.train.rollout import Rollout
from tests.reference import rules_ref

F64 = torch.float64


def test_mixed_var_hand_worked_bundle():
    # bundle of groups 0, 1: papers S = [1, 0, 2, 1]; q_0.2 = 0.6, q_0.8 = 1.4; std sqrt(2/3)
    r = torch.tensor([1., 0, 1, 0, 0, 0, 1, 1], dtype=F64)
    adv = group_advantages(r, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), "mixed_var", eps=0.0,
                           hparams={"riskpo_bundle": 2})
    std = math.sqrt(2 / 3)
    a1 = (-0.4 / 0.6) / 2.5 / std  # S = 1: A_R = S − q_hi over 0.6, A_C = 0
    a0 = (1.5 * (-0.6 / 0.2) + (-0.8 / 0.6)) / 2.5 / std  # S = 0: below q_lo
    want = [a1, a0, 0.0, a1] * 2  # S = 2 >= q_hi: 0; every response of a paper shares it
    torch.testing.assert_close(adv, torch.tensor(want, dtype=F64))
    assert (adv <= 0).all()


def test_mixed_var_edges_and_oracle_with_unequal_groups():
    r = torch.tensor([1., 1, 1, 0, 1, 0.5, 0.2], dtype=F64, requires_grad=True)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 3])  # sizes 3, 2, 1, 1: bundle of 2 -> papers 2, 1
    kw = dict(riskpo_bundle=2, riskpo_w_mix=2.0)
    adv = group_advantages(r, ids, "mixed_var", hparams=kw)
    want = rules_ref.adv_mixed_var(list(r.unbind()), ids.tolist(), **kw)
    torch.testing.assert_close(adv, torch.stack([torch.as_tensor(w, dtype=F64) for w in want]))
    assert adv[2] == 0  # the third rollout of group 0 is in no paper
    g1, = torch.autograd.grad(adv.sum(), r)
    g2, = torch.autograd.grad(sum(w for w in want if torch.is_tensor(w)), r)
    torch.testing.assert_close(g1, g2)
    const = group_advantages(torch.ones(6, dtype=F64), torch.tensor([0, 0, 1, 1, 2, 2]),
                             "mixed_var")
    assert (const == 0).all()
    with pytest.raises(ValueError, match="alpha_lo < riskpo_alpha_hi"):
        group_advantages(r, ids, "mixed_var", hparams={"riskpo_alpha_lo": 0.9})


def test_quantile_tracker_starts_at_batch_quantiles_then_steps():
    t = QuantileTracker(lr=0.1)
    s = torch.tensor([0., 1, 2, 3, 4])
    q = t.update(s)
    assert float(t.at(0.5)) == 2.0 and float(t.at(0.2)) == pytest.approx(0.8)
    q = t.update(torch.tensor([10., 10, 10, 10, 10]))  # every S above q̂: q̂ += 0.1·α
    assert float(t.at(0.5)) == pytest.approx(2.0 + 0.05)
    assert float(t.mixed(torch.tensor(1.0), 0.5)) == pytest.approx((2.05 + 1.0) / 2)
    assert q.shape == (19,)


@pytest.mark.parametrize("seed", range(3))
def test_hypervolume_matches_inclusion_exclusion(seed):
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(5, 3, generator=g, dtype=F64).tolist()
    ref = [0.1, 0.2, 0.0]
    assert hypervolume(pts, ref) == pytest.approx(rules_ref.hypervolume_incl_excl(pts, ref))


def test_hypervolume_hand_worked_and_multiplier():
    assert hypervolume([[2, 1], [1, 2]], [0, 0]) == pytest.approx(3.0)  # 2 + 2 − 1
    assert hypervolume([[-1, 5]], [0, 0]) == 0.0
    assert hv_multiplier(-3) == 0.5 and hv_multiplier(0) == 0.5
    assert hv_multiplier(1.0) == pytest.approx(0.5 + 1.5 * math.tanh(1.0))
    hv = HypervolumeWeighting(maximize=[True, False])
    assert hv.update([0.5, 10.0]) == 1.0  # the reference (initial model): m = 1
    # acc 0.7 (+0.2), length 9 (−1): box 0.2 × 1 = 0.2
    assert hv.update([0.7, 9.0]) == pytest.approx(hv_multiplier(0.2))
    assert hv.update([0.6, 9.5]) == 0.5  # dominated: adds nothing, not buffered
    assert len(hv.buffer) == 2


def test_gradient_weight_update_hand_worked():
    grads = torch.tensor([[1.0, 1.0], [1.0, -1.0]])  # <g0,g0> 2, <g0,g1> 0, <g1,g1> 2
    assert influence(grads).tolist() == [2.0, 2.0]
    w = gradient_weight_update(torch.tensor([0.5, 0.5]), torch.tensor([2.0, 0.0]),
                               lr=0.5 * math.log(3) * 1e-5)
    torch.testing.assert_close(w, torch.tensor([0.75, 0.25], dtype=F64))


class _Rounds:
    """What the augmenter uses of :class:`mmrl.train.rounds.Rounds`, single process."""

    def __init__(self, policy=None):
        from mmrl.train.distributed import Dist
        self.policy, self.dist, self.metrics = policy, Dist(), {}

    def gathered(self, rollout, values):
        return values, rollout.sample_group_ids

    def add_round_metrics(self, values, means=None):
        self.metrics.update({k: t / n for k, (t, n) in (means or {}).items()})


def _round(values):
    from mmrl.train.rounds import Round
    b = len(values)
    ro = Rollout(["s"] * b, ["p"] * b, [{}] * b, torch.tensor([0, 0, 1, 1][:b]),
                 torch.ones(b, 2, dtype=torch.bool), {"x": torch.arange(b, dtype=torch.float32)})
    rw = RewardBatch(torch.tensor(values), ["acc", "len"], torch.ones(b, dtype=torch.bool))
    return Round(["p"], [{}], [b], [0], ro, rw)


def test_augmenter_hypervolume_scales_the_weighted_sum():
    aug = DynamicRewardWeights("hypervolume", weights={"acc": 3.0}, minimize=["len"])
    rounds = _Rounds()
    out = aug(rounds, _round([[1.0, 4.0], [0.0, 8.0], [1.0, 2.0], [0.0, 2.0]]))
    assert out.rewards.names == ["weighted"]
    torch.testing.assert_close(out.rewards.values[:, 0], torch.tensor([1.75, 2.0, 1.25, 0.5]))
    assert rounds.metrics["reward/len"] == 4.0 and rounds.metrics["reward_multiplier"] == 1.0
    aug(rounds, _round([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]))  # acc +.5, len −3
    assert aug.hv.multiplier == pytest.approx(hv_multiplier(0.5 * 3.0))
    state = aug.state_dict()
    again = DynamicRewardWeights("hypervolume")
    again.load_state_dict(state)
    assert again.hv.buffer == aug.hv.buffer and again.weights.tolist() == [0.75, 0.25]
    assert again.hv.sign == [1.0, -1.0]
    with pytest.raises(ValueError, match="unknown: \\['lenn'\\]"):
        DynamicRewardWeights(minimize=["lenn"])(rounds, _round([[1.0, 1.0]] * 4))


def test_augmenter_gradient_mode_moves_weights_to_the_agreeing_objective():
    class Lin:  # logp of row i = θ·x_i on both tokens
        theta = torch.tensor(0.3, requires_grad=True)

        def parameters(self):
            return [self.theta]

        def logp(self, rollout, rows, t0, t1):
            return (self.theta * rollout.data["x"][rows])[:, None].expand(-1, t1 - t0)
    aug = DynamicRewardWeights("gradient", lr=1e-5)
    # acc rises with x inside each group, len falls: g_acc = −g_len, I = (0, 0) -> unchanged
    aug(_Rounds(Lin()), _round([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(aug.weights, torch.tensor([0.5, 0.5], dtype=F64))
    # len constant (no gradient): I = (g², 0) -> acc gains weight: w ∝ (e^{g²}, 1)
    aug(_Rounds(Lin()), _round([[0.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]]))
    # A_acc = ±a, a = 0.5/(sqrt(0.5) + 1e-4); dθ mean_i A_i·θx_i = (0·(−a) + a − 2a + 3a)/4
    g = 0.5 / (math.sqrt(0.5) + 1e-4) / 2
    w0 = math.exp(g * g) / (math.exp(g * g) + 1)
    torch.testing.assert_close(aug.weights, torch.tensor([w0, 1 - w0], dtype=F64))


def test_video_config_reaches_the_augmenter():
    from mmrl.video.config import VideoConfig
    from mmrl.video.job import build_augmenters
    c = VideoConfig(reward_weighting="hypervolume", reward_minimize=["format"])
    aug, = build_augmenters(c, [], {"accuracy": 2.0})
    assert isinstance(aug, DynamicRewardWeights) and aug.mode == "hypervolume"
    assert aug.given == {"accuracy": 2.0} and aug.minimize == ["format"]
    assert build_augmenters(VideoConfig(), [], None) == []
