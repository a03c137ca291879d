"""Rollout / training mismatch correction (mmrl.algo.offpolicy): hand-worked weights and
gradients, every mode against the slow oracle (tests/reference/offpolicy_ref.py), the off-policy
sequence mask, what the weights must not touch (KL, normalizers), and the errors."""
import math

import pytest
import torch

from mmrl.algo.losses import PolicyLoss
from mmrl.algo.offpolicy import ROLLOUT_CORRECTIONS, off_policy_mask, rollout_weights
from mmrl.algo.presets import algo_problems, resolve_algo
from tests.reference import offpolicy_ref as ref

F64 = torch.float64
LN = math.log
# one row: d = old − rollout = [ln 2, ln 4, −ln 2] -> token ratios 2, 4, 0.5; sequence 4.
# second row: [ln 1.5, (padding)] -> 1.5
OLD = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
ROLL = -torch.tensor([[LN(2), LN(4), -LN(2)], [LN(1.5), 7.0, 7.0]], dtype=F64)
MASK = torch.tensor([[True, True, True], [True, False, False]])


@pytest.mark.parametrize("mode, low, high, want", [
    ("token_truncate", None, 3.0, [[2, 3, 0.5], [1.5, 1, 1]]),
    ("token_truncate", 0.6, 3.0, [[2, 3, 0.6], [1.5, 1, 1]]),
    ("token_mask", None, 3.0, [[2, 0, 0.5], [1.5, 1, 1]]),
    ("token_mask", 0.6, 3.0, [[2, 0, 0], [1.5, 1, 1]]),
    ("token_mask", 0.5, 4.0, [[2, 4, 0.5], [1.5, 1, 1]]),  # bounds are inclusive
    ("sequence_truncate", None, 3.0, [[3], [1.5]]),
    ("sequence_truncate", 2.0, None, [[4], [2.0]]),
    ("sequence_mask", None, 3.0, [[0], [1.5]]),
    ("sequence_mask", 1.6, None, [[4], [0]]),
    ("none", 0.6, 3.0, [[1], [1]]),
])
def test_hand_worked_weights(mode, low, high, want):
    w, out = rollout_weights(OLD, ROLL, MASK, mode=mode, low=low, high=high)
    torch.testing.assert_close(w, torch.tensor(want, dtype=F64))
    m = [[bool(x) for x in row] for row in MASK]
    oracle = ref.weights(mode, OLD.tolist(), ROLL.tolist(), m, low, high)
    torch.testing.assert_close(w, torch.tensor(oracle, dtype=F64))  # padding: 1 in both
    # out_of_range marks exactly the entries changed by the bounds
    raw, _ = rollout_weights(OLD, ROLL, MASK, mode=mode, low=None, high=None)
    assert torch.equal(out, w != raw)


def test_hand_worked_gradient_is_weighted_reinforce_and_normalizers_ignore_the_weights():
    """At ratio 1 (old = logp) the clip objective's gradient is −A·w_t/N per token with
    token_mean: N counts every valid token, masked (w = 0) ones included."""
    logp = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    loss_fn = PolicyLoss("dapo", rollout_is="token_mask")  # token_mean
    loss, stats = loss_fn(logp, logp.detach(), adv, MASK, rollout_logp=ROLL)
    loss.backward()
    want = torch.tensor([[-1 * 2 / 4, 0.0, -1 * 0.5 / 4], [2 * 1.5 / 4, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(logp.grad, want)
    assert float(loss.detach()) == pytest.approx(-(2 + 0 + 0.5) / 4 + 2 * 1.5 / 4)
    assert float(stats["rollout_clipfrac"]) == pytest.approx(1 / 4)  # 1 of 4 valid tokens
    assert float(stats["rollout_weight_mean"]) == pytest.approx((2 + 0 + 0.5 + 1.5) / 4)
    assert float(stats["rollout_logp_diff"]) == pytest.approx((LN(2) + LN(4) + LN(2)
                                                               + LN(1.5)) / 4)


def test_the_kl_term_is_not_weighted():
    """With A = 0 only beta·KL is left: the same value and gradient with or without weights."""
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(2, 3, generator=g, dtype=F64)).requires_grad_()
    ref_logp = logp.detach() + 0.3 * torch.randn(2, 3, generator=g, dtype=F64)
    adv = torch.zeros(2, dtype=F64)
    out = []
    for mode in ("none", "token_mask", "sequence_truncate"):
        loss, _ = PolicyLoss("dapo", beta=0.1, rollout_is=mode)(
            logp, logp.detach(), adv, MASK, ref_logp=ref_logp, rollout_logp=ROLL)
        out.append((loss.detach(), torch.autograd.grad(loss, logp)[0]))
    for value, grad in out[1:]:
        torch.testing.assert_close(value, out[0][0])
        torch.testing.assert_close(grad, out[0][1])
    assert float(out[0][0]) != 0.0


def _random(seed, B=5, T=4):
    g = torch.Generator().manual_seed(seed)
    logp = (-2 * torch.rand(B, T, generator=g, dtype=F64)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    roll = old + 0.6 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    lengths = torch.tensor([4, 1, 0, 3, 4])[:B]
    mask = torch.arange(T)[None] < lengths[:, None]
    roll = torch.where(mask, roll, torch.nan)  # padding garbage must not matter
    return logp, old, roll, adv, mask


CASES = [(mode, agg) for mode in ROLLOUT_CORRECTIONS.names()
         for agg in ("token_mean", "seq_mean_token_mean")]


@pytest.mark.parametrize("mode, aggregation", CASES)
@pytest.mark.parametrize("opm", [None, 0.05])
def test_every_mode_matches_the_oracle_values_and_gradients(mode, aggregation, opm):
    logp, old, roll, adv, mask = _random(4)
    kw = dict(rollout_is=mode, rollout_is_min=0.7 if mode != "none" else None,
              rollout_is_max=1.6, aggregation=aggregation, off_policy_mask=opm)
    loss_fn = PolicyLoss("grpo", **kw)
    got, stats = loss_fn(logp, old, adv, mask, rollout_logp=roll)
    # the bounds and the mask act on this input (not a vacuous comparison)
    assert mode == "none" or 0 < float(stats["rollout_clipfrac"]) < 1
    assert opm is None or float(stats["off_policy_masked"]) == 0.25
    want = ref.corrected_loss(loss_fn.spec, logp, old, adv, mask, rollout_logp=roll)
    torch.testing.assert_close(got, want)
    g1, = torch.autograd.grad(got, logp)
    g2, = torch.autograd.grad(want, logp)
    torch.testing.assert_close(g1, g2)
    assert torch.isfinite(g1).all()


@pytest.mark.parametrize("mode", ["none", "sequence_truncate", "sequence_mask"])
def test_sequence_modes_compose_with_a_per_sequence_ratio(mode):
    logp, old, roll, adv, mask = _random(2)
    loss_fn = PolicyLoss("gspo", rollout_is=mode, rollout_is_max=1.5, off_policy_mask=0.1)
    assert loss_fn.spec.sequence_level
    got, _ = loss_fn(logp, old, adv, mask, rollout_logp=roll)
    want = ref.corrected_loss(loss_fn.spec, logp, old, adv, mask, rollout_logp=roll)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, logp)[0],
                               torch.autograd.grad(want, logp)[0])


def test_sapo_and_a_token_kl_match_the_oracle():
    logp, old, roll, adv, mask = _random(3)
    ref_logp = logp.detach() - 0.2
    loss_fn = PolicyLoss("sapo", rollout_is="token_truncate", beta=0.05)
    got, _ = loss_fn(logp, old, adv, mask, rollout_logp=roll, ref_logp=ref_logp)
    want = ref.corrected_loss(loss_fn.spec, logp, old, adv, mask, rollout_logp=roll,
                              ref_logp=ref_logp)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, logp)[0],
                               torch.autograd.grad(want, logp)[0])


def test_off_policy_mask_hand_worked():
    """Rows: A<0 and drift 0.6 > δ=0.5: dropped; A<0, drift 0.4: kept; A>0, drift 2: kept;
    A=0 counts as non-negative (TRL: A >= 0 kept)."""
    logp = torch.zeros(4, 2, dtype=F64)
    sample = torch.tensor([[0.6, 0.6], [0.4, 0.4], [2.0, 2.0], [3.0, 3.0]], dtype=F64)
    adv = torch.tensor([-1.0, -1.0, 1.0, 0.0], dtype=F64)
    mask = torch.ones(4, 2, dtype=torch.bool)
    keep = off_policy_mask(adv, logp, sample, mask, 0.5)
    assert keep[:, 0].tolist() == [0.0, 1.0, 1.0, 1.0]
    # the mean is over valid tokens only; a NaN token counts 0
    mask2 = torch.tensor([[True, False]] * 4)
    sample2 = sample.clone()
    sample2[1, 0] = torch.nan
    sample2[0, 1] = 100.0  # padding
    assert off_policy_mask(adv, logp, sample2, mask2, 0.5)[:, 0].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert keep.tolist() == [[v] for v in ref.off_policy_keep(adv.tolist(), logp.tolist(),
                                                              sample.tolist(), mask.tolist(),
                                                              0.5)]


def test_off_policy_mask_reads_the_rollout_logp_else_old_logp_and_zeroes_the_row_gradient():
    logp = torch.zeros(2, 2, dtype=F64, requires_grad=True)
    adv = torch.tensor([-1.0, -1.0], dtype=F64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    drifted = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=F64)
    loss_fn = PolicyLoss("dapo", off_policy_mask=0.5)
    loss, stats = loss_fn(logp, logp.detach(), adv, mask, rollout_logp=drifted)
    grad, = torch.autograd.grad(loss, logp)
    assert grad[0].tolist() == [0.0, 0.0] and grad[1].tolist() == [0.25, 0.25]
    assert float(stats["off_policy_masked"]) == 0.5
    # without rollout_logp the sampling policy is old_logp (TRL's fallback)
    loss, stats = loss_fn(logp, drifted, adv, mask)
    grad, = torch.autograd.grad(loss, logp)
    assert grad[0].tolist() == [0.0, 0.0] and float(stats["off_policy_masked"]) == 0.5


def test_finite_under_extreme_and_missing_rollout_logps():
    logp = torch.zeros(3, 3, dtype=F64, requires_grad=True)
    roll = torch.tensor([[-1e4, 1e4, torch.nan], [-torch.inf, 0.0, 0.0],
                         [torch.inf, torch.nan, -torch.inf]], dtype=F64)
    adv = torch.tensor([1.0, -1.0, 2.0], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    for mode in ROLLOUT_CORRECTIONS.names():
        loss, stats = PolicyLoss("dapo", rollout_is=mode, rollout_is_max=None,
                                 off_policy_mask=0.5)(logp, logp.detach(), adv, mask,
                                                       rollout_logp=roll)
        grad, = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), mode
        assert all(torch.isfinite(v) for v in stats.values()), mode
    w, _ = rollout_weights(logp.detach(), roll, mask, mode="token_mask", high=None)
    assert w[0, 2] == 1.0  # NaN: no correction (TRL)
    assert w[1, 0] == pytest.approx(math.exp(20))  # the ±20 clamp


def test_a_mode_without_rollout_logp_is_a_clear_error():
    logp = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"rollout_is='token_mask' needs rollout_logp"):
        PolicyLoss("grpo", rollout_is="token_mask")(logp, logp, torch.ones(2, dtype=F64), MASK)
    with pytest.raises(ValueError, match=r"same \[B, T\]"):
        PolicyLoss("grpo", rollout_is="token_mask")(logp, logp, torch.ones(2, dtype=F64), MASK,
                                                    rollout_logp=torch.zeros(2, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"one advantage per sequence"):
        PolicyLoss("grpo", off_policy_mask=0.5)(logp, logp, torch.ones(2, 3, dtype=F64), MASK)
    # none: rollout_logp is optional and, given, only reported
    loss, stats = PolicyLoss("grpo")(logp, logp, torch.ones(2, dtype=F64), MASK,
                                     rollout_logp=ROLL)
    assert float(stats["rollout_weight_mean"]) == 1.0 and float(stats["rollout_clipfrac"]) == 0


def test_config_problems_are_named():
    problems = algo_problems("grpo", rollout_is="token_mask", rollout_is_min=2.0,
                             rollout_is_max=2.0)
    assert any("rollout_is_min=2.0 must be below rollout_is_max=2.0" in p for p in problems)
    problems = algo_problems("gspo", rollout_is="token_truncate")
    assert problems == ["rollout_is 'token_truncate' weights tokens but ratio_level 'sequence' "
                        "gives one loss per sequence; use sequence_truncate or sequence_mask"]
    (problem,) = algo_problems("grpo", rollout_is="sequence_masks")
    assert "unknown rollout correction 'sequence_masks'" in problem
    assert "did you mean 'sequence_mask'" in problem
    assert algo_problems("grpo", off_policy_mask=0.0) == [
        "off_policy_mask=0.0 is out of range; expected off_policy_mask > 0"]
    # both bounds null: plain importance sampling (TRL refuses truncation without a bound)
    assert algo_problems("grpo", rollout_is="token_truncate", rollout_is_max=None) == []


def test_sequence_modes_and_the_mask_need_whole_rows():
    assert not resolve_algo("grpo", rollout_is="token_truncate").sequence_level
    assert resolve_algo("grpo", rollout_is="sequence_mask").sequence_level
    assert resolve_algo("grpo", off_policy_mask=0.5).sequence_level
    assert resolve_algo("grpo", rollout_is="token_mask").needs_rollout_logp
    assert not resolve_algo("grpo", off_policy_mask=0.5).needs_rollout_logp


@pytest.mark.parametrize("name", ROLLOUT_CORRECTIONS.names())
def test_every_entry_is_documented_and_equal_logps_give_weight_one(name):
    fn = ROLLOUT_CORRECTIONS.get(name)
    assert fn.__doc__ and len(fn.__doc__.strip()) > 10
    assert isinstance(fn.per_sequence, bool) and isinstance(fn.needs_rollout_logp, bool)
    logp, old, _, _, mask = _random(4)
    w, out = rollout_weights(old, old.clone(), mask, mode=name, low=0.5, high=2.0)
    assert w.shape == ((5, 1) if fn.per_sequence or name == "none" else (5, 4))
    assert torch.all(w == 1.0) and not out.any()


def test_mmrl_algos_names_the_corrections(capsys):
    from mmrl.cli.app import main
    assert main(["algos"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "rollout_is=" in l)
    assert all(name in line for name in ROLLOUT_CORRECTIONS.names())
    assert "off_policy_mask" in line


def test_a_config_that_chunks_t_under_a_whole_row_correction_is_refused_with_the_reason():
    from mmrl.config.core import ConfigError
    from mmrl.config.schema import config_from_dict
    with pytest.raises(ConfigError) as info:
        config_from_dict({"job": "toy", "algo": {"rollout_is": "sequence_mask"},
                          "train": {"t_chunk": 2}})
    assert any("rollout_is='sequence_mask'" in p and "whole rows" in p
               for p in info.value.problems)
    config_from_dict({"job": "toy", "algo": {"rollout_is": "token_mask"}, "train": {"t_chunk": 2}})
