"""Issue 17's advantage estimators (REINFORCE++, REINFORCE++-baseline, OPO, ReMax, pass@k, GPG)
and GDPO: hand-worked values, properties, edge cases and errors. Oracle parity and gradients
over every entry: tests/algo/test_conformance.py and test_advantages.py (oracles in
tests/reference/advantages_ref.py)."""
import math

import pytest
import torch

from mmrl.algo.advantages import ADVANTAGES, MULTI_REWARD, group_advantages
from mmrl.algo.losses import PolicyLoss
from mmrl.algo.presets import PRESETS, algo_problems, resolve_algo
from mmrl.train.batch import compute_advantages
from mmrl.train.reward_fn import RewardBatch

F64 = torch.float64


def _t(values):
    return torch.tensor(values, dtype=F64)


def _ids(values):
    return torch.tensor(values, dtype=torch.long)


def _close(got, want, **kw):
    torch.testing.assert_close(got, _t(want), rtol=1e-9, atol=1e-12, **kw)


# ---------------------------------------------------------------- hand-worked values
def test_reinforce_pp_whitens_over_tokens():
    # tokens [1, 1, 1, 0]: mean 0.75, unbiased var (3·0.0625 + 0.5625)/3 = 0.25 -> std 0.5
    adv = group_advantages(_t([1.0, 0.0]), _ids([0, 1]), "reinforce_pp", lengths=_ids([3, 1]))
    s = math.sqrt(0.25 + 1e-8)
    _close(adv, [0.25 / s, -0.75 / s])


def test_reinforce_pp_baseline_centers_in_the_group_then_whitens_over_tokens():
    # v = [0.5, -0.5, 0, 0] (group 1 constant); tokens [0.5, 0.5, -0.5, 0, 0]: mean 0.1,
    # var (2·0.16 + 0.36 + 2·0.01)/4 = 0.175; the constant group is shifted to −0.1/σ
    adv = group_advantages(_t([1.0, 0.0, 3.0, 3.0]), _ids([0, 0, 1, 1]),
                           "reinforce_pp_baseline", lengths=_ids([2, 1, 1, 1]))
    s = math.sqrt(0.175 + 1e-8)
    _close(adv, [0.4 / s, -0.6 / s, -0.1 / s, -0.1 / s])


def test_opo_baseline_is_length_weighted():
    # b = (1·1 + 3·0 + 0·0)/4 = 0.25; the empty row adds nothing to the baseline
    adv = group_advantages(_t([1.0, 0.0, 0.0]), _ids([0, 0, 0]), "opo", lengths=_ids([1, 3, 0]))
    _close(adv, [0.75, -0.25, -0.25])


def test_remax_subtracts_the_greedy_reward_even_in_singleton_and_constant_groups():
    adv = group_advantages(_t([1.0, 0.0, 0.5, 0.5]), _ids([0, 0, 1, 2]), "remax",
                           baseline=_t([0.5, 0.5, 0.25, 1.0]))
    _close(adv, [0.5, -0.5, 0.25, -0.5])


def test_passk_rewards_only_the_best_row_by_its_margin():
    r = [0.0, 1.0, 0.5, 0.0]
    mean = sum(r) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)
    adv = group_advantages(_t(r), _ids([7, 7, 7, 7]), "passk")
    _close(adv, [0.0, (1.0 - 0.5) / (std + 1e-4), 0.0, 0.0])


def test_passk_tied_maximum_gives_zero():
    adv = group_advantages(_t([1.0, 0.0, 1.0, 0.0, 0.0]), _ids([0, 0, 0, 1, 1]), "passk")
    assert adv.tolist() == [0.0] * 5


def test_gpg_scales_the_centered_reward_by_batch_over_nonzero_rewards():
    # α = 4 / #{r ≠ 0} = 4; group 0 centered: ±0.5; group 1 constant -> 0
    adv = group_advantages(_t([1.0, 0.0, 0.0, 0.0]), _ids([0, 0, 1, 1]), "gpg")
    _close(adv, [2.0, -2.0, 0.0, 0.0])
    zeros = group_advantages(_t([0.0, 0.0, 0.0]), _ids([0, 0, 1]), "gpg")  # α = 3 / max(0, 1)
    assert zeros.tolist() == [0.0] * 3


def test_gdpo_whitens_the_sum_of_group_normalized_columns_over_the_batch():
    cols = _t([[1, 0], [0, 1], [1, 1], [0, 0]])
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # grpo of a two-sample group {1, 0}
    summed = [0.0, 0.0, 2 * a, -2 * a]  # the columns cancel in group 0
    _close(group_advantages(cols, _ids([0, 0, 1, 1]), "normalize_then_sum"), summed)
    std = math.sqrt(sum(x * x for x in summed) / 3)
    _close(group_advantages(cols, _ids([0, 0, 1, 1]), "gdpo"), [x / (std + 1e-4) for x in summed])


def test_gdpo_applies_to_one_column_in_the_training_path():
    r = torch.tensor([[1.0], [0.0], [0.0], [0.0], [0.2], [0.7]])
    ids = _ids([0, 0, 0, 1, 1, 1])
    got = compute_advantages(RewardBatch(r, ["acc"], torch.ones(6, dtype=torch.bool)), ids,
                             PolicyLoss("gdpo"))
    grpo = group_advantages(r[:, 0], ids, "grpo")
    torch.testing.assert_close(got, (grpo - grpo.mean()) / (grpo.std() + 1e-4))
    plain = compute_advantages(RewardBatch(r, ["acc"], torch.ones(6, dtype=torch.bool)), ids,
                               PolicyLoss("grpo"))
    torch.testing.assert_close(plain, grpo)  # sum_then_normalize: one column is the base


# ---------------------------------------------------------------- properties
def _batch(seed, n=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (n,), generator=g)
    r = torch.rand(n, generator=g, dtype=F64)
    lengths = torch.randint(1, 9, (n,), generator=g)
    return r, ids, lengths


def test_reinforce_pp_is_invariant_to_affine_rewards_and_ignores_groups():
    r, ids, L = _batch(0)
    base = group_advantages(r, ids, "reinforce_pp", lengths=L)
    torch.testing.assert_close(group_advantages(3 * r + 7, ids, "reinforce_pp", lengths=L), base,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(group_advantages(r, ids * 0, "reinforce_pp", lengths=L), base)
    L2 = L.clone()
    L2[0] = 0  # a row without tokens: advantage 0, left out of the statistics
    adv = group_advantages(r, ids, "reinforce_pp", lengths=L2)
    assert adv[0] == 0
    assert (L2[1:, None] * adv[1:, None]).sum().abs() < 1e-9  # zero token-weighted mean


def test_reinforce_pp_baseline_invariant_to_a_constant_per_group():
    r, ids, L = _batch(1)
    shift = (ids.to(F64) * 0.37) % 5.0
    torch.testing.assert_close(
        group_advantages(r + shift, ids, "reinforce_pp_baseline", lengths=L),
        group_advantages(r, ids, "reinforce_pp_baseline", lengths=L), rtol=1e-8, atol=1e-10)


def test_opo_at_equal_lengths_is_mean_center():
    r, ids, _ = _batch(2)
    torch.testing.assert_close(group_advantages(r, ids, "opo", lengths=torch.full_like(ids, 5)),
                               group_advantages(r, ids, "mean_center"))


def test_gpg_is_alpha_times_mean_center():
    r, ids, _ = _batch(3)
    r[:5] = 0.0  # 7 non-zero rewards of 12
    torch.testing.assert_close(group_advantages(r, ids, "gpg"),
                               12 / 7 * group_advantages(r, ids, "mean_center"))


def test_passk_gives_at_most_one_non_zero_per_group_and_it_is_positive():
    r, ids, _ = _batch(4, n=30)
    adv = group_advantages(r, ids, "passk")
    for g in ids.unique():
        a = adv[ids == g]
        assert (a != 0).sum() <= 1 and (a >= 0).all()
        assert a.argmax() == r[ids == g].argmax()


@pytest.mark.parametrize("name", ["opo", "passk", "gpg"])
def test_singleton_and_zero_std_groups_get_zero(name):
    adv = group_advantages(_t([0.3, 0.3, 0.9, 0.1, 0.4]), _ids([0, 0, 1, 2, 2]), name,
                           lengths=_ids([2, 3, 4, 1, 5]))
    assert adv[:3].tolist() == [0.0, 0.0, 0.0] and adv[3:].abs().sum() > 0


@pytest.mark.parametrize("name", ["reinforce_pp", "reinforce_pp_baseline"])
def test_whitening_edge_cases_are_zero(name):
    one_token = group_advantages(_t([0.3, 0.9]), _ids([0, 1]), name, lengths=_ids([1, 0]))
    assert one_token.tolist() == [0.0, 0.0]
    constant = group_advantages(_t([0.3, 0.3, 0.3]), _ids([0, 0, 1]), name, lengths=_ids([1, 4, 2]))
    assert constant.tolist() == [0.0, 0.0, 0.0]


def test_gdpo_constant_batch_and_single_row_are_zero():
    assert group_advantages(_t([[1.0, 2.0]] * 3), _ids([0, 0, 1]), "gdpo").tolist() == [0.0] * 3
    assert group_advantages(_t([[1.0, 2.0]]), _ids([0]), "gdpo").tolist() == [0.0]


# ---------------------------------------------------------------- flags, errors, presets
def test_flags_declare_the_extra_inputs():
    needs = {n: (ADVANTAGES.get(n).needs_lengths, ADVANTAGES.get(n).needs_baseline)
             for n in ADVANTAGES.names()}
    assert needs["reinforce_pp"] == needs["reinforce_pp_baseline"] == needs["opo"] == (True, False)
    assert needs["remax"] == (False, True) and needs["grpo"] == needs["gpg"] == (False, False)
    assert MULTI_REWARD.get("gdpo").one_column and not MULTI_REWARD.get("normalize_then_sum").one_column
    assert resolve_algo("opo").needs_lengths and resolve_algo("remax").needs_baseline
    assert not resolve_algo("grpo").needs_lengths and not resolve_algo("grpo").needs_baseline


def test_missing_or_misshaped_extras_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"needs lengths .* pass lengths= a tensor of shape \(2,\)"):
        group_advantages(_t([1.0, 0.0]), _ids([0, 0]), "opo")
    with pytest.raises(ValueError, match=r"baseline has shape \(3,\); expected \(2,\)"):
        group_advantages(_t([1.0, 0.0]), _ids([0, 0]), "remax", baseline=_t([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="finite"):
        group_advantages(_t([1.0, 0.0]), _ids([0, 0]), "remax", baseline=_t([1.0, math.nan]))
    with pytest.raises(ValueError, match="needs lengths"):  # as the base of a multi-reward method
        group_advantages(_t([[1.0, 0.0], [0.0, 1.0]]), _ids([0, 0]), "gdpo", base="opo")


def test_multi_reward_is_a_preset_field_and_checked():
    assert PRESETS["gdpo"].multi_reward == "gdpo" and PRESETS["grpo"].multi_reward == \
        "sum_then_normalize"
    assert resolve_algo("grpo", multi_reward="normalize_then_sum").multi_reward == \
        "normalize_then_sum"
    problems = algo_problems("grpo", multi_reward="gdpoo")
    assert len(problems) == 1 and "unknown multi-reward advantage 'gdpoo'" in problems[0] \
        and "did you mean 'gdpo'" in problems[0]


def test_multi_reward_config_key_keeps_working():
    from mmrl.config.schema import config_from_dict
    cfg = config_from_dict({"job": "toy", "algo": {"multi_reward": "normalize_then_sum"}})
    assert cfg.algo.resolve().multi_reward == "normalize_then_sum"
    assert config_from_dict({"job": "toy", "algo": {"preset": "gdpo"}}).algo.resolve() \
        .multi_reward == "gdpo"
