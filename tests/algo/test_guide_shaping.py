"""Guide's off-policy ratio shaping (mmrl.algo.offpolicy.shape_off_policy, algo.off_policy_shaping):
hand-worked values and gradients, and the loss against a slow per-token reference of the
authors' compute_policy_loss (guide_rl core_algos.py) written here."""
import math

import pytest
import torch

from mmrl.algo.losses import policy_loss
from mmrl.algo.offpolicy import OFF_POLICY_SHAPINGS
from mmrl.algo.presets import algo_problems
from mmrl.train.rollout import Rollout, concat_rollouts

EPS = 0.2


def _quantile(xs, q):
    """torch.quantile's linear interpolation, by hand."""
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def slow_guide_loss(logp, old, rollout, adv, mask, off, gamma=0.9):
    """Token mean over valid tokens of the authors' per-token loss: on-policy rows
    max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(logp - old); off-policy rows
    -A r/(r + g), r = exp(logp - rollout), g = max(Q_gamma(row's r), 1e-4) detached, unclipped."""
    terms = []
    for i in range(logp.shape[0]):
        valid = [t for t in range(logp.shape[1]) if mask[i, t]]
        if off[i]:
            rs = [torch.exp(logp[i, t] - rollout[i, t]) for t in valid]
            g = max(_quantile([float(r.detach()) for r in rs], gamma), 1e-4)
            terms += [-adv[i] * r / (r + g) for r in rs]
        else:
            for t in valid:
                r = torch.exp(logp[i, t] - old[i, t])
                terms.append(torch.maximum(-adv[i] * r, -adv[i] * r.clamp(1 - EPS, 1 + EPS)))
    return sum(terms) / len(terms)


def test_percentile_shaping_hand_values():
    r = torch.tensor([[0.5, 1.0, 2.0, 4.0]])
    shaped = OFF_POLICY_SHAPINGS.get("percentile")(r, torch.ones_like(r, dtype=torch.bool), 0.9)
    # gamma = Q_0.9 = 2 + 0.7 * (4 - 2) = 3.4 (position 0.9 * 3 = 2.7)
    want = [0.5 / 3.9, 1 / 4.4, 2 / 5.4, 4 / 7.4]
    torch.testing.assert_close(shaped[0], torch.tensor(want))
    # padding does not enter the quantile: masking the 4.0 gives Q_0.9 of (0.5, 1, 2) = 1.8
    m = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(OFF_POLICY_SHAPINGS.get("percentile")(r, m, 0.9)[0, :3],
                               torch.tensor([0.5 / 2.3, 1 / 2.8, 2 / 3.8]))
    torch.testing.assert_close(OFF_POLICY_SHAPINGS.get("constant")(r, m, 1.0)[0, 1],
                               torch.tensor(0.5))
    torch.testing.assert_close(OFF_POLICY_SHAPINGS.get("power")(r, m, 0.5)[0, 3],
                               torch.tensor(2.0))


def test_hinted_row_value_and_gradient_by_hand():
    # one hinted row, r = 1 on both tokens: gamma = 1, r~ = 1/2, d r~/d logp = g r/(r+g)^2 = 1/4
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_()
    rollout = logp.detach().clone()
    old = torch.zeros(1, 2)  # the plain prompt's pi_old: unused by the shaped row
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = policy_loss(logp, old, torch.tensor([2.0]), mask, algo="grpo", beta=0.0,
                              aggregation="token_mean", rollout_logp=rollout,
                              off_policy=torch.tensor([True]), off_policy_shaping="percentile")
    loss.backward()
    assert loss.item() == pytest.approx(-2.0 * 0.5)
    torch.testing.assert_close(logp.grad, torch.full((1, 2), -2.0 * 0.25 / 2))
    assert stats["off_policy_rows"].item() == 1.0
    assert stats["off_policy_ratio"].item() == pytest.approx(0.5)


def test_loss_and_gradient_match_the_slow_reference_of_the_authors_loss():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 5
    logp0 = -torch.rand(B, T, generator=g) * 2
    old = logp0 + 0.3 * torch.randn(B, T, generator=g)
    rollout = old.clone()
    rollout[2:] = logp0[2:] + torch.randn(2, T, generator=g)  # rows 2, 3 sampled with a hint
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    mask[3, 4] = False
    adv = torch.tensor([1.0, -0.5, 1.5, -1.0])
    off = torch.tensor([False, False, True, True])
    logp = logp0.clone().requires_grad_()
    loss, _ = policy_loss(logp, old, adv, mask, algo="grpo", beta=0.0, aggregation="token_mean",
                          rollout_logp=rollout, off_policy=off, off_policy_shaping="percentile",
                          off_policy_gamma=0.9)
    loss.backward()
    ref_logp = logp0.clone().requires_grad_()
    ref = slow_guide_loss(ref_logp, old, rollout, adv, mask, off)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(logp.grad, ref_logp.grad)
    assert (logp.grad[2:][mask[2:]] != 0).all()


def test_unflagged_rows_and_shaping_none_leave_the_loss_unchanged():
    g = torch.Generator().manual_seed(1)
    logp, old = -torch.rand(3, 4, generator=g), -torch.rand(3, 4, generator=g)
    mask, adv = torch.ones(3, 4, dtype=torch.bool), torch.tensor([1.0, -1.0, 0.5])
    kw = dict(algo="grpo", beta=0.0, rollout_logp=old - 0.1, rollout_is="token_truncate")
    base, _ = policy_loss(logp, old, adv, mask, **kw)
    none_flagged, _ = policy_loss(logp, old, adv, mask, off_policy=torch.zeros(3, dtype=torch.bool),
                                  off_policy_shaping="percentile", **kw)
    off_ignored, _ = policy_loss(logp, old, adv, mask, off_policy=torch.ones(3, dtype=torch.bool),
                                 **kw)  # off_policy_shaping: none
    torch.testing.assert_close(none_flagged, base)
    torch.testing.assert_close(off_ignored, base)
    with pytest.raises(ValueError, match="one flag per row"):
        policy_loss(logp, old, adv, mask, off_policy=torch.ones(2, dtype=torch.bool),
                    off_policy_shaping="percentile", **kw)


def test_rollout_carries_the_flag_through_select_concat_and_sampler_terms():
    def make(n, flag):
        return Rollout(list(range(n)), [0] * n, [{}] * n, torch.zeros(n, dtype=torch.long),
                       torch.ones(n, 2, dtype=torch.bool), rollout_logp=torch.zeros(n, 2),
                       off_policy=None if flag is None else torch.full((n,), flag))
    both = concat_rollouts([make(2, None), make(3, True)])
    assert both.off_policy.tolist() == [False, False, True, True, True]
    assert both.select(torch.tensor([4, 0])).off_policy.tolist() == [True, False]
    terms = both.sampler_terms(torch.tensor([1, 2]), 0, 1, torch.zeros(1, dtype=torch.float64))
    assert terms["off_policy"].tolist() == [False, True]
    assert terms["rollout_logp"].dtype == torch.float64 and terms["rollout_logp"].shape == (2, 1)
    assert "off_policy" not in make(2, None).sampler_terms(torch.tensor([0]), 0, 2, both.mask)
    assert concat_rollouts([make(1, None), make(1, None)]).off_policy is None


def test_algo_checks_refuse_a_per_sequence_loss_and_a_quantile_above_one():
    assert any("use ratio_level token" in p
               for p in algo_problems("gspo", off_policy_shaping="percentile"))
    assert any("must be in (0, 1]" in p
               for p in algo_problems("grpo", off_policy_shaping="percentile",
                                      off_policy_gamma=1.5))
    assert any("unknown" in p.lower() for p in algo_problems("grpo", off_policy_shaping="pct"))
    assert algo_problems("grpo", off_policy_shaping="constant", off_policy_gamma=1.5) == []
