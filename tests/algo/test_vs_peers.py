"""mmrl against the peers' own code (verl 0.9.1, TRL 1.16.0 from .peers/, tests/peers_rl.py):
the entries mmrl had before issue 17 (tests/algo/test_vs_peers_new.py: the ones it adds).

float64, random inputs with right padding (finite garbage in the padding) and, where the peer
defines it the same way, an empty row; values AND gradients with respect to ``logp``. Where mmrl
deliberately differs, the test says so in a "Differs from" comment and asserts the difference
exactly (both values), instead of skipping the case. Where a peer computes part of the math in
float32 even on float64 inputs, the tolerance says so.
"""
import math

import pytest
import torch

from mmrl.algo.advantages import group_advantages
from mmrl.algo.aggregations import AGGREGATIONS
from mmrl.algo.losses import kl_penalty
from tests import peers_rl as peers
from tests.algo.peer_cases import (F64, GIDS, LENGTHS, LENGTHS_EMPTY, T, TOL, TRL_ADV_TOL,
                                   VERL_AGG, VERL_TOL, assert_same, batch, columns, loss_matrix,
                                   mmrl_loss, rewards, trl, value_and_grad, verl_adv, verl_loss)


# ---------------------------------------------------------------- clip objective vs verl
@pytest.mark.parametrize("agg", sorted(VERL_AGG))
@pytest.mark.parametrize("seed", [0, 1])
def test_clip_asymmetric_matches_verl_vanilla(agg, seed):
    d = batch(seed, scale=0.4)
    # verl's vanilla loss always applies its dual clip (clip_ratio_c, asserted > 1): a c far
    # above every ratio here turns it off, as mmrl's dual_clip_c=None does.
    want = verl_loss(d, "vanilla", VERL_AGG[agg], clip_ratio_low=0.2, clip_ratio_high=0.28,
                     clip_ratio_c=1e6)
    got = mmrl_loss(d, "grpo", eps_low=0.2, eps_high=0.28, aggregation=agg)
    assert_same(got, want, VERL_TOL)


def test_dual_clip_matches_verl_clip_ratio_c():
    d = batch(2, scale=1.5)  # ratios up to e^±4: some A < 0 tokens above c = 3
    d["adv"] = d["adv"].abs() * torch.tensor([1.0, -1.0] * 4, dtype=F64)
    ratio = torch.exp(d["logp"] - d["old"])
    assert ((ratio > 3) & d["mask"] & (d["adv"][:, None] < 0)).sum() >= 3
    want = verl_loss(d, "vanilla", "token-mean", clip_ratio_low=0.2, clip_ratio_high=0.28,
                     clip_ratio_c=3.0)
    got = mmrl_loss(d, "dapo", dual_clip_c=3.0)
    assert_same(got, want, VERL_TOL)


def test_token_mean_with_global_token_count_matches_verl_batch_num_tokens():
    d = batch(3)
    n = int(d["mask"].sum()) * 3  # this micro-batch is one third of the mini-batch's tokens
    want = verl_loss(d, "vanilla", "token-mean", clip_ratio_c=1e6,
                     global_batch_info=dict(dp_size=1, batch_num_tokens=n))
    got = mmrl_loss(d, "dapo", eps_high=0.2, num_tokens=n)
    assert_same(got, want, VERL_TOL)


def test_clip_in_empty_row_batch_differs_from_verl_seq_mean_by_the_row_count():
    # Differs from verl: its seq-mean-* modes divide by the non-empty rows (7 here), mmrl's
    # default by all rows (8), so mmrl = verl · 7/8 in value and gradient.
    d = batch(4, lengths=LENGTHS_EMPTY)
    want = verl_loss(d, "vanilla", "seq-mean-token-mean", clip_ratio_c=1e6)
    got = mmrl_loss(d, "grpo")
    assert_same(got, (want[0] * 7 / 8, want[1] * 7 / 8), VERL_TOL)


def test_clip_at_extreme_log_ratio_differs_from_trl_by_the_20_clamp():
    # Differs from TRL: TRL's ratio is exp(x) unclamped; mmrl clamps x to ±20 first (finite in
    # fp32). For A < 0 and x = 25 (unclipped side) TRL's loss is |A|·e^25, mmrl's |A|·e^20, and
    # mmrl's gradient there is 0 (the clamp saturates) where TRL's is |A|·e^25.
    lp = torch.full((1, 1), 25.0, dtype=F64)
    d = dict(logp=lp, old=torch.zeros(1, 1, dtype=F64), adv=torch.tensor([-2.0], dtype=F64),
             mask=torch.ones(1, 1, dtype=torch.bool))
    (tv, tg), (mv, mg) = trl(d, loss_type="bnpo"), mmrl_loss(d, "grpo")
    assert tv.item() == pytest.approx(2 * math.exp(25), rel=1e-12)
    assert tg.item() == pytest.approx(2 * math.exp(25), rel=1e-12)
    assert mv.item() == pytest.approx(2 * math.exp(20), rel=1e-12) and mg.item() == 0.0


# ---------------------------------------------------------------- clip objective vs TRL
TRL_TYPES = {  # TRL loss_type -> (mmrl aggregation, extra call keywords)
    "grpo": ("seq_mean_token_mean", {}),
    "bnpo": ("token_mean", {}),
    "dapo": ("token_mean", {"num_tokens": 60}),  # num_items_in_batch: the generation batch's
    "dr_grpo": ("fixed_norm", {}),
}


@pytest.mark.parametrize("loss_type", sorted(TRL_TYPES))
@pytest.mark.parametrize("lengths", [LENGTHS, LENGTHS_EMPTY], ids=["full", "empty_row"])
def test_clip_matches_trl_loss_types(loss_type, lengths):
    d = batch(5, lengths=lengths, scale=0.4)
    agg, call = TRL_TYPES[loss_type]
    want = trl(d, loss_type=loss_type, epsilon=0.2, epsilon_high=0.28,
               max_completion_length=T + 3, num_items=call.get("num_tokens"))
    got = mmrl_loss(d, "grpo", eps_low=0.2, eps_high=0.28, aggregation=agg, max_len=T + 3,
                    **call)
    assert_same(got, want)


def test_clip_with_k3_kl_matches_trl_without_bias_correction():
    d = batch(6)
    want = trl(d, loss_type="grpo", beta=0.04, use_bias_correction_kl=False, ref_logp=d["ref"])
    got = mmrl_loss(d, "grpo", beta=0.04, kl="k3", ref_logp=d["ref"])
    assert_same(got, want)


# ---------------------------------------------------------------- GSPO
@pytest.mark.parametrize("lengths", [LENGTHS, LENGTHS_EMPTY], ids=["full", "empty_row"])
def test_gspo_matches_trl_sequence_level(lengths):
    d = batch(7, lengths=lengths, scale=0.02)  # mean log-ratios around the 3e-4 / 4e-4 range
    want = trl(d, loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4,
               epsilon_high=4e-4)
    assert_same(mmrl_loss(d, "gspo"), want)


def test_gspo_with_kl_matches_trl_sequence_level():
    d = batch(8, scale=0.02)
    want = trl(d, loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4,
               epsilon_high=4e-4, beta=0.1, use_bias_correction_kl=False, ref_logp=d["ref"])
    assert_same(mmrl_loss(d, "gspo", beta=0.1, ref_logp=d["ref"]), want)


def test_gspo_token_matches_verl_gspo():
    # verl's gspo loss is GSPO-token (eq. 13) with log s clamped at +10 (never reached here).
    d = batch(9, scale=0.02)
    want = verl_loss(d, "gspo", "seq-mean-token-mean", clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    assert_same(mmrl_loss(d, "gspo_token"), want, VERL_TOL)


# ---------------------------------------------------------------- SAPO
def test_sapo_matches_verl_sapo():
    d = batch(15, lengths=LENGTHS_EMPTY, scale=0.6)  # verl sapo: seq-mean-token-mean, forced
    d["adv"][0] = 0.0  # A = 0 takes τ_neg in both
    want = verl_loss(d, "sapo", "seq-mean-token-mean", tau_pos=1.0, tau_neg=1.05)
    # Differs from verl in the empty row only: verl skips it in the row mean (7 rows), mmrl
    # counts it (8 rows): mmrl = verl · 7/8 here.
    assert_same(mmrl_loss(d, "sapo"), (want[0] * 7 / 8, want[1] * 7 / 8), VERL_TOL)


@pytest.mark.parametrize("lengths", [LENGTHS, LENGTHS_EMPTY], ids=["full", "empty_row"])
def test_sapo_matches_trl_sapo(lengths):
    d = batch(16, lengths=lengths, scale=0.6)
    want = trl(d, loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    # TRL builds τ with torch.where on Python floats: a float32 tensor, τ_neg = 1.05 rounded to
    # 1.0499999523 (relative 3e-7 on this loss in float64); mmrl with that τ_neg is exact.
    tau_neg32 = torch.tensor(1.05, dtype=torch.float32).item()
    assert_same(mmrl_loss(d, "sapo", tau_neg=tau_neg32), want)
    assert_same(mmrl_loss(d, "sapo"), want, dict(rtol=1e-6, atol=1e-9))


# ---------------------------------------------------------------- TRL's LUSPO as a composition
@pytest.mark.parametrize("lengths", [LENGTHS, LENGTHS_EMPTY], ids=["full", "empty_row"])
def test_trl_luspo_at_sequence_level_is_gspo_token_with_seq_mean_token_sum(lengths):
    # TRL luspo (arXiv 2602.05261): GSPO's clipped sequence objective, each row's loss scaled
    # by its length (mean_i Σ_t m ℓ_i). mmrl composes it from existing axes: the GSPO-token
    # ratio (value s_i on every token, gradient per token) with seq_mean_token_sum.
    d = batch(17, lengths=lengths, scale=0.02)
    want = trl(d, loss_type="luspo", importance_sampling_level="sequence", epsilon=3e-4,
               epsilon_high=4e-4)
    got = mmrl_loss(d, "gspo_token", aggregation="seq_mean_token_sum")
    assert_same(got, want)


# ---------------------------------------------------------------- KL estimators vs verl
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_match_verl_kl_penalty(kind):
    d = batch(10, scale=1.0)
    core = peers.verl_algos()
    want = value_and_grad(lambda lp: (core.kl_penalty(lp, d["ref"], kind) * d["mask"]).sum(),
                          d["logp"])
    got = value_and_grad(lambda lp: (kl_penalty(lp, d["ref"], kind) * d["mask"]).sum(), d["logp"])
    assert_same(got, want)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_at_extreme_log_ratios_differ_from_verl_as_documented(kind):
    # Differs from verl: mmrl clamps x = logp − ref to ±20 for every estimator; verl clamps only
    # inside k3 and then caps k3 at 10 (mmrl: the kl_cap option). At x = −25 and x = +3:
    x = torch.tensor([-25.0, 3.0], dtype=F64)
    lp = x.clone().requires_grad_()
    core = peers.verl_algos()
    verl_v = core.kl_penalty(lp, torch.zeros(2, dtype=F64), kind)
    mmrl_v = kl_penalty(lp[None], torch.zeros(1, 2, dtype=F64), kind)[0]
    expect_verl = {"k1": [-25.0, 3.0], "k2": [312.5, 4.5],
                   "k3": [10.0, math.exp(-3) + 2]}[kind]
    expect_mmrl = {"k1": [-20.0, 3.0], "k2": [200.0, 4.5],
                   "k3": [math.exp(20) - 21, math.exp(-3) + 2]}[kind]
    torch.testing.assert_close(verl_v.detach(), torch.tensor(expect_verl, dtype=F64))
    torch.testing.assert_close(mmrl_v.detach(), torch.tensor(expect_mmrl, dtype=F64))


# ---------------------------------------------------------------- aggregations vs verl agg_loss
@pytest.mark.parametrize("agg, verl_mode, kw", [
    ("token_mean", "token-mean", {}),
    ("seq_mean_token_mean", "seq-mean-token-mean", {}),
    ("seq_mean_token_sum", "seq-mean-token-sum", {}),
    ("fixed_norm", "seq-mean-token-sum-norm", {"max_len": 11}),
])
def test_aggregations_match_verl_agg_loss(agg, verl_mode, kw):
    loss, mask = loss_matrix(11, LENGTHS)
    core = peers.verl_algos()
    want = value_and_grad(lambda x: core.agg_loss(x, mask.to(F64), verl_mode,
                                                  loss_scale_factor=kw.get("max_len")), loss)
    got = value_and_grad(lambda x: AGGREGATIONS.get(agg)(x, mask, **kw), loss)
    assert_same(got, want, VERL_TOL)


@pytest.mark.parametrize("agg, verl_mode, kw", [
    ("seq_mean_token_mean", "seq-mean-token-mean", {}),
    ("seq_mean_token_sum", "seq-mean-token-sum", {}),
    ("fixed_norm", "seq-mean-token-sum-norm", {"max_len": 11}),
])
def test_sequence_aggregations_with_an_empty_row_differ_from_verl_by_the_row_count(agg, verl_mode,
                                                                                   kw):
    # Differs from verl: verl divides by the 7 non-empty rows, mmrl (empty_rows='count', the
    # default) by all 8 rows: mmrl = verl · 7/8 (values and gradients).
    loss, mask = loss_matrix(12, LENGTHS_EMPTY)
    core = peers.verl_algos()
    wv, wg = value_and_grad(lambda x: core.agg_loss(x, mask.to(F64), verl_mode,
                                                    loss_scale_factor=kw.get("max_len")), loss)
    got = value_and_grad(lambda x: AGGREGATIONS.get(agg)(x, mask, **kw), loss)
    assert_same(got, (wv * 7 / 8, wg * 7 / 8), VERL_TOL)


# ---------------------------------------------------------------- advantages vs verl
F32_TOL = dict(rtol=1e-6, atol=1e-7)  # verl's grpo_vectorized: group statistics in float32


@pytest.mark.parametrize("verl_name, mmrl_name, kw, tol", [
    ("grpo", "grpo", {}, TOL),
    ("grpo_vectorized", "grpo", {}, F32_TOL),
    ("grpo", "mean_center", {"norm_adv_by_std_in_grpo": False}, TOL),
    ("rloo", "rloo", {}, TOL),
    ("rloo_vectorized", "rloo", {}, TOL),
])
@pytest.mark.parametrize("ties", [False, True])
def test_advantages_match_verl(verl_name, mmrl_name, kw, tol, ties):
    r = rewards(13, ties=ties)
    want = verl_adv(verl_name, r, GIDS, config=peers.verl_algo_config(), **kw)
    got = group_advantages(r, torch.tensor(GIDS), mmrl_name, eps=1e-6)
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=max(tol["atol"], 1e-9))


def test_singleton_group_advantages_differ_from_verl():
    # Differs from verl: a group of one sample gets A = 0 in mmrl (nothing to compare with);
    # verl's grpo uses mean 0, std 1 there (A = r/(1 + ε)), its rloo leaves A = r, and its
    # rloo_vectorized gives 0 (as mmrl). (verl's singleton std is a float32 1.0, so its
    # 1 + ε is rounded to float32: rel 1e-7.)
    r = torch.tensor([0.3, 0.9, 2.0], dtype=F64)
    gids = [1, 1, 7]
    cfg = peers.verl_algo_config()
    cases = [("grpo", "grpo", 2.0 / (1 + 1e-6)), ("rloo", "rloo", 2.0),
             ("rloo_vectorized", "rloo", 0.0)]
    for verl_name, mmrl_name, singleton in cases:
        want = verl_adv(verl_name, r, gids, config=cfg)
        got = group_advantages(r, torch.tensor(gids), mmrl_name, eps=1e-6)
        torch.testing.assert_close(got[:2], want[:2], rtol=1e-9, atol=1e-12)
        assert want[2].item() == pytest.approx(singleton, rel=1e-7) and got[2].item() == 0.0


# ---------------------------------------------------------------- advantages vs TRL
@pytest.mark.parametrize("scale, mmrl_name", [("group", "grpo"), ("batch", "batch_std"),
                                              ("none", "mean_center")])
@pytest.mark.parametrize("ties", [False, True])
def test_single_reward_advantages_match_trl_scale_rewards(scale, mmrl_name, ties):
    r = rewards(14, ties=ties)
    want = peers.trl_advantages(r[:, None], 4, scale_rewards=scale)["advantages"]
    got = group_advantages(r, torch.tensor(GIDS), mmrl_name, eps=1e-4)
    torch.testing.assert_close(got, want, **TRL_ADV_TOL)


def test_sum_then_normalize_matches_trl():
    cols, w = columns(15), [1.0, 0.5, 2.0]
    want = peers.trl_advantages(cols, 4, weights=w)["advantages"]
    got = group_advantages(cols, torch.tensor(GIDS), "sum_then_normalize", weights=w, eps=1e-4)
    torch.testing.assert_close(got, want, **TRL_ADV_TOL)


def test_normalize_then_sum_is_trls_before_its_batch_whitening():
    # Differs from TRL: TRL's normalize_then_sum (GDPO) whitens the weighted sum over the batch
    # ((R − mean)/(std + 1e-4)); mmrl's normalize_then_sum stops at the weighted sum R (the
    # GDPO variant is the separate entry 'gdpo'). Both steps asserted here.
    cols, w = columns(16), [1.0, 0.5, 2.0]
    ns = peers.trl_advantages(cols, 4, weights=w, multi_objective_aggregation="normalize_then_sum")
    got = group_advantages(cols, torch.tensor(GIDS), "normalize_then_sum", weights=w, eps=1e-4)
    torch.testing.assert_close(got, ns["rewards"], **TRL_ADV_TOL)
    whitened = (got - got.mean()) / (got.std() + 1e-4)
    torch.testing.assert_close(whitened, ns["advantages"], **TRL_ADV_TOL)
