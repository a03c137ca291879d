"""Group advantages: hand-worked values, oracle parity, properties, edge cases, errors."""
import math

import pytest
import torch

from mmrl.algo.advantages import ADVANTAGES, MULTI_REWARD, group_advantages, group_stats
from tests.reference import advantages_ref, core_math as ref

F64 = torch.float64


def _t(values):
    return torch.tensor(values, dtype=F64)


def _ids(values):
    return torch.tensor(values, dtype=torch.long)


ORACLES = advantages_ref.ALL
MULTI_ORACLES = {**ref.MULTI_REWARD, **advantages_ref.MULTI_REWARD}
# batch-level or baseline estimators: a zero-std group is not necessarily 0 after them
NOT_ZEROED = ("reinforce_pp", "reinforce_pp_baseline", "remax",
              "unlikeliness",  # its rank shaping splits an all-correct group
              "reward")  # A = r for objectives that read rewards (DRPO skips such groups itself)


def _extras(method, n, seed=0):
    """Token counts and baseline rewards for the estimators whose flags ask for them."""
    fn = ADVANTAGES.get(method)
    g = torch.Generator().manual_seed(seed)
    out = {}
    if fn.needs_lengths:
        out["lengths"] = torch.randint(0, 7, (n,), generator=g)
    if fn.needs_baseline:
        out["baseline"] = torch.rand(n, generator=g, dtype=F64)
    if getattr(fn, "needs_seq_logp", False):
        out["seq_logp"] = -torch.rand(n, generator=g, dtype=F64)
    return out


def _random_batch(seed, n_groups=5, max_size=6):
    """Non-contiguous ids, shuffled order, singletons, ties and constant groups."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_size + 1, (n_groups,), generator=g).tolist()
    ids = torch.cat([torch.full((n,), 1000 - 7 * k, dtype=torch.long) for k, n in enumerate(sizes)])
    rewards = torch.randint(0, 3, (len(ids),), generator=g).to(F64) / 2  # ties are common
    rewards[ids == ids[0]] = 0.5  # one constant group
    perm = torch.randperm(len(ids), generator=g)
    return rewards[perm], ids[perm]


# ---------------------------------------------------------------- hand-worked values
def test_grpo_hand_values():
    adv = group_advantages(_t([1, 0, 0, 1]), _ids([3, 3, 3, 3]))
    assert adv.tolist() == pytest.approx([0.8660, -0.8660, -0.8660, 0.8660], abs=2e-4)
    exact = group_advantages(_t([1, 0, 0, 1]), _ids([3, 3, 3, 3]), eps=0.0)
    assert exact.tolist() == pytest.approx([math.sqrt(3) / 2 * s for s in (1, -1, -1, 1)])


def test_ngrpo_all_zero_group_of_8():
    adv = group_advantages(torch.zeros(8, dtype=F64), _ids([0] * 8), "ngrpo")
    assert adv.tolist() == pytest.approx([-1 / 3] * 8, abs=1e-3)  # mean 1/9, std 1/3
    exact = group_advantages(torch.zeros(8, dtype=F64), _ids([0] * 8), "ngrpo", eps=0.0)
    assert exact.tolist() == pytest.approx([-1 / 3] * 8, rel=1e-12)


def test_other_methods_hand_values():
    r, ids = _t([1, 0, 0, 1]), _ids([3, 3, 3, 3])
    assert group_advantages(r, ids, "mean_center").tolist() == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages(r, ids, "rloo").tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    # batch std over [1, 0, 0, 1, 2, 2]: group means 0.5 and 2.
    r2, ids2 = _t([1, 0, 0, 1, 2, 2]), _ids([0, 0, 0, 0, 9, 9])
    std = torch.std(r2).item()
    adv = group_advantages(r2, ids2, "batch_std", eps=0.0)
    assert adv.tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std, 0, 0])


@pytest.mark.parametrize("method", ["grpo", "mean_center", "batch_std", "rloo"])
def test_singletons_and_constant_groups_are_exactly_zero(method):
    r = _t([0.1, 0.1, 0.1, 7.0, 0.3, 0.9])
    ids = _ids([4, 4, 4, 8, 2, 2])  # constant group, singleton, normal group
    adv = group_advantages(r, ids, method)
    assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert adv[4] < 0 < adv[5]


def test_ngrpo_singleton_defined_and_all_max_is_zero():
    adv = group_advantages(_t([0.0, 1.0, 1.0]), _ids([5, 6, 6]), "ngrpo", eps=0.0)
    # singleton {0, r_max=1}: mean 0.5, std sqrt(0.5) -> -0.5/0.7071
    assert adv[0].item() == pytest.approx(-0.5 / math.sqrt(0.5))
    assert adv[1:].tolist() == [0.0, 0.0]  # {1, 1, r_max=1}: zero std


# ---------------------------------------------------------------- oracle parity
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("method", ADVANTAGES.names())
def test_matches_oracle(method, seed):
    r, ids = _random_batch(seed)
    r = r + torch.randn(len(r), generator=torch.Generator().manual_seed(seed), dtype=F64) * (
        ids % 2).to(F64)  # some groups continuous, some tied
    extra = _extras(method, len(r), seed)
    got = group_advantages(r, ids, method, r_max=1.5, **extra)
    want = ORACLES[method](r.tolist(), ids.tolist(), eps=1e-4, r_max=1.5,
                           **{k: v.tolist() for k, v in extra.items()})
    torch.testing.assert_close(got, _t(want), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("base", ["grpo", "rloo"])
@pytest.mark.parametrize("method", MULTI_REWARD.names())
def test_multi_reward_matches_oracle(method, base):
    r, ids = _random_batch(7)
    cols = torch.stack([r, torch.randn(len(r), dtype=F64, generator=torch.Generator().manual_seed(1))], 1)
    got = group_advantages(cols, ids, method, weights=[0.7, 2.0], base=base)
    want = MULTI_ORACLES[method](cols.tolist(), ids.tolist(), [0.7, 2.0], base=base)
    torch.testing.assert_close(got, _t(want), rtol=1e-10, atol=1e-12)


def test_multi_reward_default_weights_are_ones():
    r, ids = _random_batch(3)
    cols = torch.stack([r, 2 * r], 1)
    torch.testing.assert_close(group_advantages(cols, ids, "sum_then_normalize"),
                               group_advantages(3 * r, ids, "grpo"))


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("method", ["grpo", "mean_center", "batch_std", "rloo"])
def test_zero_mean_per_group(method):
    r, ids = _random_batch(11)
    r = r + torch.rand(len(r), dtype=F64)
    adv = group_advantages(r, ids, method)
    for g in ids.unique():
        assert adv[ids == g].mean().item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", ["grpo", "mean_center", "rloo"])
def test_invariant_to_constant_within_group(method):
    r, ids = _random_batch(12)
    r = r + torch.rand(len(r), dtype=F64)
    shift = (ids.to(F64) * 0.37) % 5.0  # a different constant for every group
    torch.testing.assert_close(group_advantages(r + shift, ids, method),
                               group_advantages(r, ids, method), rtol=1e-8, atol=1e-10)


def test_batch_std_invariant_to_global_constant():
    r, ids = _random_batch(13)
    torch.testing.assert_close(group_advantages(r + 3.25, ids, "batch_std"),
                               group_advantages(r, ids, "batch_std"), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ADVANTAGES.names())
def test_permutation_invariance(method):
    r, ids = _random_batch(14)
    r = r + torch.rand(len(r), dtype=F64)
    perm = torch.randperm(len(r), generator=torch.Generator().manual_seed(0))
    extra = _extras(method, len(r))
    torch.testing.assert_close(
        group_advantages(r[perm], ids[perm], method, **{k: v[perm] for k, v in extra.items()}),
        group_advantages(r, ids, method, **extra)[perm])


@pytest.mark.parametrize("method", ADVANTAGES.names())
def test_no_nan_gradients_through_constant_groups_and_batches(method):
    for r in (_t([1.0, 1.0, 1.0, 0.2, 0.7]), _t([1.0] * 5)):  # r_max = 1: ngrpo's std 0 too
        r.requires_grad_()
        adv = group_advantages(r, _ids([0, 0, 0, 1, 2]), method, **_extras(method, 5))
        grad, = torch.autograd.grad(adv.sum() + adv[3], r)
        assert torch.isfinite(grad).all()
        assert method in NOT_ZEROED or torch.all(adv[:3] == 0)


def test_reward_advantage_is_the_reward_with_unit_gradient_on_constant_groups():
    for r in (_t([1.0, 1.0, 1.0, 0.0, 1.0]), _t([0.0] * 5)):  # constant groups and singletons
        r.requires_grad_()
        adv = group_advantages(r, _ids([0, 0, 0, 1, 2]), "reward")
        assert torch.equal(adv, r.detach())
        assert torch.equal(torch.autograd.grad(adv.sum(), r)[0], torch.ones(5, dtype=F64))


def test_ids_need_not_be_contiguous():
    r = _t([1, 0, 0, 1])
    torch.testing.assert_close(group_advantages(r, _ids([-5, 10**12, -5, 10**12])),
                               group_advantages(r, _ids([0, 1, 0, 1])))


def test_adv_clip_and_dtypes():
    r = _t([0, 0, 0, 0, 0, 0, 0, 1])
    adv = group_advantages(r, _ids([0] * 8), adv_clip=1.5)
    assert adv.max().item() == 1.5 and adv.min().item() > -1.5
    low = group_advantages(1 - r, _ids([0] * 8), adv_clip=1.5)  # the clip is two-sided
    assert low.min().item() == -1.5 and low.max().item() == pytest.approx(-adv.min().item())
    half = group_advantages(r.to(torch.bfloat16), _ids([0] * 8))
    assert half.dtype == torch.float32


def test_group_stats_values():
    r, ids = _t([1, 0, 0.25, 0.25, 2]), _ids([7, 7, 3, 3, 9])
    s = group_stats(r, ids)
    assert s["num_groups"].item() == 3
    assert s["zero_std_frac"].item() == pytest.approx(2 / 3)  # {0.25, 0.25} and the singleton
    assert s["singleton_frac"].item() == pytest.approx(1 / 3)
    assert s["reward_mean"].item() == pytest.approx(0.7)
    assert s["reward_std"].item() == pytest.approx(torch.std(r).item())
    assert s["group_std_mean"].item() == pytest.approx(math.sqrt(0.5) / 3)
    assert all(not v.requires_grad for v in s.values())


# ---------------------------------------------------------------- errors that teach
@pytest.mark.parametrize("rewards, ids, err, words", [
    (torch.ones(3), torch.zeros(4, dtype=torch.long), ValueError, "shape mismatch"),
    (torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), TypeError, "rewards.float()"),
    (torch.ones(3), torch.zeros(3), TypeError, "group_ids.long()"),
    (torch.tensor([1.0, float("nan"), 0.0]), torch.zeros(3, dtype=torch.long), ValueError,
     "drop the invalid samples"),
    ([1.0, 0.0], torch.zeros(2, dtype=torch.long), TypeError, "torch.as_tensor"),
])
def test_validation_errors(rewards, ids, err, words):
    with pytest.raises(err, match=words):
        group_advantages(rewards, ids)


def test_unknown_method_and_bad_weights():
    with pytest.raises(ValueError, match="did you mean 'rloo'"):
        group_advantages(torch.ones(2), _ids([0, 0]), "rlo")
    with pytest.raises(ValueError, match="one weight per column"):
        group_advantages(torch.ones(2, 3), _ids([0, 0]), "normalize_then_sum", weights=[1, 2])
    with pytest.raises(ValueError, match="only used by"):
        group_advantages(torch.ones(2), _ids([0, 0]), weights=[1.0])
    with pytest.raises(ValueError, match="rewards \\[B, K\\]"):
        group_advantages(torch.ones(2), _ids([0, 0]), "sum_then_normalize")
