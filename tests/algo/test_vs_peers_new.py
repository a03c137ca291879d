"""mmrl's issue-17 entries against the peers' own code (verl 0.9.1, TRL 1.16.0, tests/peers_rl.py).

Objectives (cispo, cispo_cap, gpg, vespo, clip_cov, kl_cov, TRL's delta), KL options (kl_cap,
kl_bias_correction), entropy (bonus, top-entropy mask, chunked entropy), empty_rows, the advantage
estimators (reinforce_pp, reinforce_pp_baseline, opo, remax, passk, gpg, gdpo) and the rollout
correction (rollout_is modes, off_policy_mask). Same conventions as tests/algo/test_vs_peers.py:
float64, padding with garbage, values and gradients, every deviation asserted exactly.
"""
import importlib
import math

import numpy as np
import pytest
import torch

from mmrl.algo.advantages import group_advantages
from mmrl.algo.aggregations import AGGREGATIONS
from mmrl.algo.losses import PolicyLoss
from tests import peers_rl as peers
from tests.algo.peer_cases import (B, F64, GIDS, LENGTHS, LENGTHS_EMPTY, T, TOL, TRL_ADV_TOL,
                                   VERL_AGG, VERL_TOL, assert_same, batch, columns, loss_matrix,
                                   mmrl_loss, rewards, trl, value_and_grad, verl_adv, verl_loss)


def cov_batch(seed, lengths=LENGTHS):
    """A batch whose token covariances (A − Ā)(logp − mean logp) reach the 1..5 window:
    log-probs spread over [−6, 0] and advantages of scale 3."""
    d = batch(seed, lengths=lengths, scale=0.3, adv_scale=3.0)
    g = torch.Generator().manual_seed(seed + 100)
    d["logp"] = -6 * torch.rand(B, T, generator=g, dtype=F64)
    d["old"] = torch.where(d["mask"], d["logp"] + 0.3 * torch.randn(B, T, generator=g,
                                                                    dtype=F64), d["old"])
    return d


def token_cov(d):
    """Cov_t over the valid tokens, as verl's clip_cov / kl_cov compute it (detached)."""
    m = d["mask"]
    a = d["adv"][:, None].expand(B, T)
    return (a - a[m].mean()) * (d["logp"] - d["logp"][m].mean())


# ---------------------------------------------------------------- CISPO, GPG, VESPO, delta
def test_cispo_matches_verl_cispo():
    d = batch(20, lengths=LENGTHS_EMPTY, scale=0.5)
    want = verl_loss(d, "cispo", "token-mean", clip_ratio_low=0.2, clip_ratio_high=0.28)
    assert_same(mmrl_loss(d, "cispo", eps_high=0.28), want, VERL_TOL)


@pytest.mark.parametrize("lengths", [LENGTHS, LENGTHS_EMPTY], ids=["full", "empty_row"])
def test_cispo_cap_matches_trl_cispo(lengths):
    d = batch(21, lengths=lengths, scale=1.2)
    assert (torch.exp(d["logp"] - d["old"])[d["mask"]] > 5).any()  # the cap binds somewhere
    want = trl(d, loss_type="cispo", epsilon_high=5.0, num_items=70)
    assert_same(mmrl_loss(d, "cispo_trl", num_tokens=70), want)


def test_cispo_cap_default_differs_from_trls_silent_fallback():
    # Differs from TRL: without epsilon_high TRL's CISPO cap falls back to epsilon = 0.2, an
    # absolute cap of 0.2 on ρ (every weight ≤ 0.2); mmrl's cispo_cap has its own default 5.0.
    # cispo_cap=0.2 reproduces TRL's fallback exactly; the default gives a different loss.
    d = batch(22, scale=0.5)
    want = trl(d, loss_type="cispo")
    assert_same(mmrl_loss(d, "cispo_trl", cispo_cap=0.2), want)
    assert not torch.allclose(mmrl_loss(d, "cispo_trl")[1], want[1])


def test_cispo_cap_with_sequence_token_ratio_matches_trl_sequence_level():
    d = batch(23, lengths=LENGTHS_EMPTY, scale=0.5)
    want = trl(d, loss_type="cispo", epsilon_high=1.1, importance_sampling_level="sequence")
    assert_same(mmrl_loss(d, "cispo_trl", cispo_cap=1.1, ratio_level="sequence_token"), want)


def test_gpg_matches_verl_gpg():
    d = batch(24, lengths=LENGTHS_EMPTY, scale=0.5)
    want = verl_loss(d, "gpg", "token-mean")
    assert_same(mmrl_loss(d, "grpo", objective="gpg", aggregation="token_mean"), want, VERL_TOL)


@pytest.mark.parametrize("lengths", [LENGTHS, LENGTHS_EMPTY], ids=["full", "empty_row"])
def test_vespo_matches_trl_vespo(lengths):
    d = batch(25, lengths=lengths, scale=0.25)  # log W = Σ_t x up to ~±1.5: φ spans (0, 1]
    want = trl(d, loss_type="vespo", num_items=70)
    assert_same(mmrl_loss(d, "vespo", num_tokens=70), want)
    core = trl(d, loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.0,
               vespo_lambda_neg=1.0, num_items=70)
    assert_same(mmrl_loss(d, "vespo", num_tokens=70, vespo_k_pos=1.5, vespo_lambda_pos=2.5,
                          vespo_k_neg=2.0, vespo_lambda_neg=1.0), core)


@pytest.mark.parametrize("delta", [4.0, 1.1])  # 1.1 < 1 + eps_high: also caps A > 0 ratios
@pytest.mark.parametrize("loss_type, agg", [("grpo", "seq_mean_token_mean"),
                                            ("bnpo", "token_mean")])
def test_delta_matches_trl_delta(delta, loss_type, agg):
    d = batch(26, lengths=LENGTHS_EMPTY, scale=1.5)
    assert (torch.exp(d["logp"] - d["old"])[d["mask"]] > 4).sum() >= 3
    want = trl(d, loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, delta=delta)
    assert_same(mmrl_loss(d, "grpo", eps_high=0.28, aggregation=agg, delta=delta), want)


def test_delta_equals_verl_dual_clip_when_delta_is_c():
    d = batch(27, scale=1.5)
    want = verl_loss(d, "vanilla", "token-mean", clip_ratio_low=0.2, clip_ratio_high=0.28,
                     clip_ratio_c=3.0)
    assert_same(mmrl_loss(d, "dapo", delta=3.0), want, VERL_TOL)


# ---------------------------------------------------------------- Clip-Cov, KL-Cov
def _candidates(d, eps=0.2, lb=1.0, ub=5.0):
    ratio = torch.exp(d["logp"] - d["old"])
    a = d["adv"][:, None]
    clipped = -a * ratio.clamp(1 - eps, 1 + eps) > -a * ratio
    cov = token_cov(d)
    return d["mask"] & ~clipped & (cov > lb) & (cov < ub)


def test_clip_cov_matches_verl_when_every_candidate_is_picked():
    d = cov_batch(28, lengths=LENGTHS_EMPTY)
    n = int(_candidates(d).sum())
    assert n >= 3  # max(⌊0.2·N⌋, 1) = 8 ≥ n: both pick every candidate
    want = verl_loss(d, "clip_cov", "token-mean",
                     policy_loss=dict(clip_cov_ratio=0.2, clip_cov_lb=1.0, clip_cov_ub=5.0))
    assert_same(mmrl_loss(d, "clip_cov", cov_ratio=0.2), want, VERL_TOL)


def test_clip_cov_random_pick_is_one_of_verls_picks():
    # verl draws its pick with torch.randperm from the global generator, mmrl from its own
    # generator: mmrl's (value, gradient) must equal verl's for one of the candidates.
    d = cov_batch(29)
    k = int(_candidates(d).sum())
    assert k >= 2  # n = max(⌊2e-4·N⌋, 1) = 1 of k candidates
    verl_outcomes = []
    state = torch.random.get_rng_state()
    try:
        for seed in range(40):
            torch.manual_seed(seed)
            verl_outcomes.append(verl_loss(d, "clip_cov", "token-mean",
                                           policy_loss=dict(clip_cov_ratio=2e-4)))
    finally:
        torch.random.set_rng_state(state)
    distinct = {round(v.item(), 12) for v, _ in verl_outcomes}
    assert len(distinct) == k  # 40 draws saw every candidate
    for seed in range(3):
        got = mmrl_loss(d, "clip_cov", generator=torch.Generator().manual_seed(seed))
        match = [w for w in verl_outcomes if torch.allclose(w[0], got[0], rtol=1e-9)]
        assert match, (got[0].item(), sorted(distinct))
        assert_same(got, match[0], VERL_TOL)


@pytest.mark.parametrize("ratio", [0.1, 2e-4])
def test_kl_cov_matches_verl_kl_cov(ratio):
    d = cov_batch(30, lengths=LENGTHS_EMPTY)
    want = verl_loss(d, "kl_cov", "token-mean",
                     policy_loss=dict(kl_cov_ratio=ratio, ppo_kl_coef=1.0))
    assert_same(mmrl_loss(d, "kl_cov", cov_ratio=ratio, kl_cov_coef=1.0), want, VERL_TOL)


# ---------------------------------------------------------------- KL options
def test_kl_cap_matches_verl_low_var_kl_loss():
    d = batch(31, scale=0.3)
    g = torch.Generator().manual_seed(131)
    d["ref"] = torch.where(d["mask"], d["logp"] + 3 * torch.randn(B, T, generator=g, dtype=F64),
                           d["ref"])
    x = (d["logp"] - d["ref"])[d["mask"]]
    assert ((torch.exp(-x) + x - 1) > 10).sum() >= 3  # the cap binds
    core = peers.verl_algos()
    pg = verl_loss(d, "vanilla", "token-mean", clip_ratio_c=1e6)
    kl = value_and_grad(lambda lp: core.agg_loss(core.kl_penalty(lp, d["ref"], "low_var_kl"),
                                                 d["mask"].to(F64), "token-mean"), d["logp"])
    want = (pg[0] + 0.05 * kl[0], pg[1] + 0.05 * kl[1])
    got = mmrl_loss(d, "dapo", eps_high=0.2, beta=0.05, kl="k3", kl_cap=10.0, ref_logp=d["ref"])
    assert_same(got, want, VERL_TOL)


@pytest.mark.parametrize("level, algo, eps", [("token", "grpo", (0.2, 0.2)),
                                              ("sequence", "gspo", (3e-4, 4e-4))])
def test_kl_bias_correction_matches_trl_use_bias_correction_kl(level, algo, eps):
    d = batch(32, lengths=LENGTHS_EMPTY, scale=0.3 if level == "token" else 0.02)
    want = trl(d, loss_type="grpo", beta=0.04, use_bias_correction_kl=True, ref_logp=d["ref"],
               importance_sampling_level=level, epsilon=eps[0], epsilon_high=eps[1])
    got = mmrl_loss(d, algo, beta=0.04, kl_bias_correction=True, ref_logp=d["ref"])
    assert_same(got, want)


def test_delta_with_bias_corrected_kl_matches_trl():
    d = batch(52, lengths=LENGTHS_EMPTY, scale=1.5)
    want = trl(d, loss_type="bnpo", epsilon_high=0.28, delta=2.0, beta=0.04,
               use_bias_correction_kl=True, ref_logp=d["ref"])
    got = mmrl_loss(d, "grpo", eps_high=0.28, aggregation="token_mean", delta=2.0, beta=0.04,
                    kl_bias_correction=True, ref_logp=d["ref"])
    assert_same(got, want)


# ---------------------------------------------------------------- entropy
def _entropies(seed):
    """[B, T] entropies in [0, 2) with ties, exactly representable in float32: TRL takes its
    quantile of ``entropies[mask].float()`` and compares the float64 entropies with it."""
    g = torch.Generator().manual_seed(seed)
    h = (2 * torch.rand(B, T, generator=g, dtype=F64)).float().to(F64)
    h[1, :2] = h[3, 0]  # ties
    return h


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 1.0])
def test_top_entropy_mask_matches_trl(q):
    from mmrl.algo.entropy import top_entropy_mask
    mask = torch.arange(T)[None] < torch.tensor(LENGTHS_EMPTY)[:, None]
    h = _entropies(33)
    want = peers.trl_high_entropy_mask(h, mask.long(), 1 - q)
    assert torch.equal(top_entropy_mask(h, mask, q), want)
    none = torch.zeros_like(mask)
    assert torch.equal(top_entropy_mask(h, none, q), peers.trl_high_entropy_mask(h, none, 1 - q))


def _with_entropy_grad(fn, d, h):
    """(value, grad wrt logp, grad wrt entropy) of fn(logp_leaf, entropy_leaf)."""
    lp, hl = d["logp"].clone().requires_grad_(), h.clone().requires_grad_()
    loss = fn(lp, hl)
    grads = torch.autograd.grad(loss, (lp, hl), allow_unused=True)
    return (loss.detach(), *(torch.zeros_like(lp) if g is None else g for g in grads))


def test_entropy_bonus_matches_trl_bnpo():
    d, h = batch(34, lengths=LENGTHS_EMPTY), _entropies(34)
    want = _with_entropy_grad(lambda lp, hl: peers.trl_loss(
        lp, d["old"], d["adv"], d["mask"].long(), entropies=hl, loss_type="bnpo",
        entropy_coef=0.01), d, h)
    loss = PolicyLoss("grpo", aggregation="token_mean", entropy_coef=0.01)
    got = _with_entropy_grad(lambda lp, hl: loss(lp, d["old"], d["adv"], d["mask"],
                                                 entropy=hl)[0], d, h)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_top_entropy_with_bonus_differs_from_trl_only_in_the_bonus_normalizer():
    # The policy term matches TRL's (mask computed over the call's tokens, TRL's per-micro-batch
    # convention). Differs from TRL: TRL's bonus is a mean over the *kept* tokens
    # ΣH·M_e/ΣM_e; mmrl aggregates the bonus like the policy term, over all valid tokens N
    # (verl's convention): mmrl = TRL_policy − c·ΣH·M_e/N.
    from mmrl.algo.entropy import top_entropy_mask
    d, h, c, q = batch(35), _entropies(35), 0.01, 0.3
    policy = _with_entropy_grad(lambda lp, hl: peers.trl_loss(
        lp, d["old"], d["adv"], d["mask"].long(), entropies=hl, loss_type="bnpo",
        top_entropy_quantile=q), d, h)
    loss = PolicyLoss("grpo", aggregation="token_mean", top_entropy_quantile=q)
    got = _with_entropy_grad(lambda lp, hl: loss(lp, d["old"], d["adv"], d["mask"],
                                                 entropy=hl)[0], d, h)
    for a, b in zip(got, policy):
        torch.testing.assert_close(a, b, **TOL)
    keep = top_entropy_mask(h, d["mask"], q)
    n, kept = d["mask"].sum().to(F64), keep.sum().to(F64)
    trl_bonus = _with_entropy_grad(lambda lp, hl: peers.trl_loss(
        lp, d["old"], d["adv"], d["mask"].long(), entropies=hl, loss_type="bnpo",
        top_entropy_quantile=q, entropy_coef=c), d, h)
    torch.testing.assert_close(trl_bonus[0], policy[0] - c * (h * keep).sum() / kept, **TOL)
    loss_c = PolicyLoss("grpo", aggregation="token_mean", top_entropy_quantile=q, entropy_coef=c)
    got_c = _with_entropy_grad(lambda lp, hl: loss_c(lp, d["old"], d["adv"], d["mask"],
                                                     entropy=hl)[0], d, h)
    torch.testing.assert_close(got_c[0], policy[0] - c * (h * keep).sum() / n, **TOL)
    torch.testing.assert_close(got_c[2], -c * keep.to(F64) / n, **TOL)


def test_entropy_bonus_with_seq_mean_token_mean_differs_from_trl_grpo():
    # Differs from TRL: TRL's bonus is always a token mean of the micro-batch, whatever the
    # loss_type; mmrl aggregates it like the policy term (here seq_mean_token_mean, verl's
    # convention). Same policy term, bonus c·mean_i(mean_t H) vs c·Σ H m/Σ m.
    d, h, c = batch(39, lengths=LENGTHS_EMPTY), _entropies(39), 0.01
    m = d["mask"].to(F64)
    trl_c = peers.trl_loss(d["logp"], d["old"], d["adv"], d["mask"].long(), entropies=h,
                           loss_type="grpo", entropy_coef=c)
    trl_0 = peers.trl_loss(d["logp"], d["old"], d["adv"], d["mask"].long(), entropies=h,
                           loss_type="grpo")
    torch.testing.assert_close(trl_c, trl_0 - c * (h * m).sum() / m.sum(), **TOL)
    got = PolicyLoss("grpo", entropy_coef=c)(d["logp"], d["old"], d["adv"], d["mask"],
                                             entropy=h)[0]
    per_row = (h * m).sum(-1) / m.sum(-1).clamp(min=1)
    torch.testing.assert_close(got, trl_0 - c * per_row.sum() / B, **TOL)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_entropy_bonus_matches_verl_entropy_coeff(agg):
    d, h = batch(36), _entropies(36)
    core = peers.verl_algos()
    fn = core.get_policy_loss_fn("vanilla")
    cfg = peers.verl_config(clip_ratio_c=1e6)
    m = d["mask"].to(F64)
    want = _with_entropy_grad(lambda lp, hl: fn(d["old"], lp, d["adv"][:, None] * m, m,
                                                loss_agg_mode=VERL_AGG[agg], config=cfg)[0]
                              - 0.01 * core.agg_loss(hl, m, VERL_AGG[agg]), d, h)
    loss = PolicyLoss("grpo", aggregation=agg, entropy_coef=0.01)
    got = _with_entropy_grad(lambda lp, hl: loss(lp, d["old"], d["adv"], d["mask"],
                                                 entropy=hl)[0], d, h)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **VERL_TOL)


def test_empty_rows_skip_matches_verl_agg_loss():
    loss, mask = loss_matrix(37, LENGTHS_EMPTY)
    core = peers.verl_algos()
    for agg, mode in [("seq_mean_token_mean", "seq-mean-token-mean"),
                      ("seq_mean_token_sum", "seq-mean-token-sum"),
                      ("fixed_norm", "seq-mean-token-sum-norm")]:
        want = value_and_grad(lambda x: core.agg_loss(x, mask.to(F64), mode,
                                                      loss_scale_factor=11), loss)
        got = value_and_grad(lambda x: AGGREGATIONS.get(agg)(x, mask, empty_rows="skip",
                                                             max_len=11), loss)
        assert_same(got, want, VERL_TOL)
    d = batch(38, lengths=LENGTHS_EMPTY)
    want = verl_loss(d, "vanilla", "seq-mean-token-mean", clip_ratio_c=1e6)
    assert_same(mmrl_loss(d, "grpo", empty_rows="skip"), want, VERL_TOL)


# ---------------------------------------------------------------- per-token entropy from logits
def test_token_entropy_and_chunked_logp_match_verl_and_trl():
    from mmrl.algo.entropy import logp_and_entropy, token_entropy
    g = torch.Generator().manual_seed(53)
    logits = 3 * torch.randn(B, T, 11, generator=g, dtype=F64)
    tokens = torch.randint(0, 11, (B, T), generator=g)
    verl_f = peers.verl_algos().verl_F
    trl_utils = importlib.import_module("trl.trainer.utils")

    def both(fn):
        z = logits.clone().requires_grad_()
        lp, h = fn(z)
        return (lp.detach(), h.detach(), *torch.autograd.grad((lp * 0.7 + h).sum(), z))

    want = both(lambda z: (verl_f.logprobs_from_logits(z, tokens), verl_f.entropy_from_logits(z)))
    for got in (both(lambda z: (verl_f.logprobs_from_logits(z, tokens), token_entropy(z))),
                both(lambda z: logp_and_entropy(z, tokens, chunk_size=3)),
                both(lambda z: logp_and_entropy(lambda t0, t1: z[:, t0:t1], tokens,
                                                chunk_size=3))):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(token_entropy(logits), trl_utils.entropy_from_logits(logits),
                               **TOL)


# ---------------------------------------------------------------- advantage estimators
ADV_LENGTHS = [4, 2, 7, 3, 5, 5, 1, 6, 2, 3, 7, 4]


@pytest.mark.parametrize("verl_name, mmrl_name", [
    ("reinforce_plus_plus", "reinforce_pp"),
    ("reinforce_plus_plus_baseline", "reinforce_pp_baseline"),
    ("opo", "opo"),
])
@pytest.mark.parametrize("ties", [False, True])
def test_length_weighted_advantages_match_verl(verl_name, mmrl_name, ties):
    r, lengths = rewards(40, ties=ties), torch.tensor(ADV_LENGTHS)
    want = verl_adv(verl_name, r, GIDS, lengths=lengths,
                    config=peers.verl_algo_config(gamma=1.0))
    got = group_advantages(r, torch.tensor(GIDS), mmrl_name, lengths=lengths)
    torch.testing.assert_close(got, want, **VERL_TOL)


def test_reinforce_pp_of_equal_rewards_is_zero_where_verl_keeps_its_mean_bias():
    # Differs from verl: verl's masked mean divides by Σm + 1e-8, so with all returns equal
    # (σ² = 0) whiten gives (r − r·N/(N + 1e-8))/sqrt(1e-8) = r·1e-8/(N + 1e-8)·1e4 instead of 0;
    # mmrl gives exactly 0 (no signal). Here r = 1 on N = 6 tokens: verl 1.6667e-5 per token.
    r, lengths = torch.ones(3, dtype=F64), torch.tensor([2, 3, 1])
    want = verl_adv("reinforce_plus_plus", r, [0, 0, 1], lengths=lengths,
                    config=peers.verl_algo_config(gamma=1.0))
    torch.testing.assert_close(want, torch.full((3,), 1e-8 / (6 + 1e-8) * 1e4, dtype=F64),
                               rtol=1e-6, atol=0.0)
    got = group_advantages(r, torch.tensor([0, 0, 1]), "reinforce_pp", lengths=lengths)
    assert got.tolist() == [0.0, 0.0, 0.0]


def test_remax_matches_verl_remax():
    r, b = rewards(41), rewards(42)
    want = verl_adv("remax", r, GIDS, reward_baselines=b)
    got = group_advantages(r, torch.tensor(GIDS), "remax", baseline=b)
    torch.testing.assert_close(got, want, **TOL)


def test_passk_matches_verl_grpo_passk():
    r = rewards(43)
    want = verl_adv("grpo_passk", r, GIDS, config=peers.verl_algo_config())
    got = group_advantages(r, torch.tensor(GIDS), "passk", eps=1e-6)
    torch.testing.assert_close(got, want, **TOL)


def test_gpg_advantages_match_verl_gpg():
    r = rewards(44)
    r[[1, 5, 6, 9]] = 0.0  # α = B / #non-zero = 12 / 8
    want = verl_adv("gpg", r, GIDS)
    got = group_advantages(r, torch.tensor(GIDS), "gpg")
    torch.testing.assert_close(got, want, **TOL)


def test_gdpo_matches_trl_normalize_then_sum():
    cols, w = columns(45), [1.0, 0.5, 2.0]
    want = peers.trl_advantages(cols, 4, weights=w,
                                multi_objective_aggregation="normalize_then_sum")["advantages"]
    got = group_advantages(cols, torch.tensor(GIDS), "gdpo", weights=w, eps=1e-4)
    torch.testing.assert_close(got, want, **TRL_ADV_TOL)


def test_gdpo_differs_from_verl_gdpo_by_its_token_weighted_whitening():
    # Differs from verl: verl's gdpo whitens Σ_k w_k grpo_k (ε = 1e-6) over the batch's valid
    # tokens (a row counts |o_i| times, 1e-8 under the square root), mmrl's gdpo (TRL's) over the
    # sequences with +1e-4 on the std. verl's = mmrl's token_whiten of that sum; verl reads the
    # per-key scores as float32 (rewards here are float32 numbers; compared at rtol 1e-5).
    from mmrl.algo.groups import token_whiten
    cols, w = columns(55).float().to(F64), [1.0, 0.5, 2.0]
    lengths = torch.tensor([4, 2, 7, 3, 5, 5, 1, 6, 2, 3, 7, 4])
    mask = (torch.arange(7)[None] < lengths[:, None]).to(F64)
    batch_in = {"prompts": torch.zeros(12, 2, dtype=torch.long),
                "attention_mask": torch.cat([torch.ones(12, 2), mask], 1).long()}
    scores = {f"r{k}": cols[:, k].numpy() for k in range(3)}
    cfg = peers.verl_algo_config(gdpo_reward_keys=list(scores), gdpo_reward_weights=w)
    adv, _ = peers.verl_algos().compute_gdpo_outcome_advantage(
        token_level_rewards=torch.zeros_like(mask), response_mask=mask, index=np.array(GIDS),
        config=cfg, non_tensor_batch=scores, batch=batch_in)
    want = adv[torch.arange(12), lengths - 1].to(F64)
    summed = group_advantages(cols, torch.tensor(GIDS), "normalize_then_sum", weights=w, eps=1e-6)
    torch.testing.assert_close(token_whiten(summed, lengths), want, rtol=1e-5, atol=1e-6)
    ours = group_advantages(cols, torch.tensor(GIDS), "gdpo", weights=w, eps=1e-4)
    assert (ours - want).abs().max() > 1e-2


@pytest.mark.parametrize("name, verl_name, verl_singleton", [
    ("reinforce_pp_baseline", "reinforce_plus_plus_baseline", None),
    ("opo", "opo", 2.0),
    ("gpg", "gpg", None),
])
def test_singleton_group_new_advantages_differ_from_verl(name, verl_name, verl_singleton):
    # Differs from verl: a group of one sample gets no baseline information in mmrl (v = 0 /
    # A = 0); verl uses baseline 0 there (v = r). For opo and gpg this is visible in the
    # singleton's own advantage; for reinforce_pp_baseline the token whitening spreads it over
    # the whole batch, so there only the non-singleton rows of verl equal mmrl's on
    # rewards where the singleton's reward is 0 (then v = 0 in both).
    r = torch.tensor([0.3, 0.9, 1.7, 2.0], dtype=F64)
    gids, lengths = [1, 1, 1, 7], torch.tensor([3, 2, 4, 5])
    cfg = peers.verl_algo_config(gamma=1.0)
    got = group_advantages(r, torch.tensor(gids), name, lengths=lengths)
    want = verl_adv(verl_name, r, gids, lengths=lengths, config=cfg)
    if name == "opo":
        torch.testing.assert_close(got[:3], want[:3], **TOL)
        assert want[3].item() == verl_singleton and got[3].item() == 0.0
    elif name == "gpg":  # α = 4/4 = 1: verl's singleton A = α·r = 2
        torch.testing.assert_close(got[:3], want[:3], **TOL)
        assert want[3].item() == 2.0 and got[3].item() == 0.0
    else:
        assert not torch.allclose(got, want)
        r0 = torch.tensor([0.3, 0.9, 1.7, 0.0], dtype=F64)
        torch.testing.assert_close(group_advantages(r0, torch.tensor(gids), name, lengths=lengths),
                                   verl_adv(verl_name, r0, gids, lengths=lengths, config=cfg),
                                   **VERL_TOL)


def test_passk_singleton_group_is_refused_by_verl_and_zero_in_mmrl():
    r, gids = torch.tensor([0.3, 0.9, 2.0], dtype=F64), [1, 1, 7]
    with pytest.raises(ValueError, match="at least 2 samples"):
        verl_adv("grpo_passk", r, gids, config=peers.verl_algo_config())
    assert group_advantages(r, torch.tensor(gids), "passk", eps=1e-6)[2].item() == 0.0


# ---------------------------------------------------------------- rollout correction
def rollout_batch(seed, lengths=LENGTHS_EMPTY):
    d = batch(seed, lengths=lengths, scale=0.3)
    g = torch.Generator().manual_seed(seed + 200)
    d["rollout"] = torch.where(d["mask"], d["old"] + 0.4 * torch.randn(B, T, generator=g,
                                                                      dtype=F64), d["old"])
    return d


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate",
                                  "sequence_mask"])
@pytest.mark.parametrize("low, high", [(None, 3.0), (0.5, 2.0)])
def test_rollout_weights_match_trl_vllm_importance_sampling(mode, low, high):
    from mmrl.algo.offpolicy import rollout_weights
    d = rollout_batch(46)
    d["rollout"][0, 2] = math.nan  # a token the sampler could not score: ratio 1 in both
    want = peers.trl_vllm_is_ratio(d["old"], d["rollout"], d["mask"].long(), mode=mode,
                                   clip_max=high, clip_min=low)
    got, _ = rollout_weights(d["old"], d["rollout"], d["mask"], mode=mode, low=low, high=high)
    where = d["mask"] if mode.startswith("token") else d["mask"].any(-1, keepdim=True)
    torch.testing.assert_close(got[where], want[where], **TOL)


@pytest.mark.parametrize("verl_level, threshold, mode, low, high", [
    ("token", 2.0, "token_truncate", None, 2.0),
    ("sequence", 2.0, "sequence_truncate", None, 2.0),
    ("token", "0.5_2.0", "token_mask", 0.5, 2.0),
    ("sequence", "0.5_2.0", "sequence_mask", 0.5, 2.0),
])
def test_rollout_weights_match_verl_rollout_correction(verl_level, threshold, mode, low, high):
    from mmrl.algo.offpolicy import rollout_weights
    d = rollout_batch(47)
    corr = peers.verl_rollout_corr()
    want, _ = corr.compute_rollout_correction_weights(d["old"] - d["rollout"], d["mask"].to(F64),
                                                      rollout_is=verl_level,
                                                      rollout_is_threshold=threshold)
    got, _ = rollout_weights(d["old"], d["rollout"], d["mask"], mode=mode, low=low, high=high)
    torch.testing.assert_close(got.expand(B, T) * d["mask"], want, **VERL_TOL)


def test_off_policy_mask_matches_trl():
    from mmrl.algo.offpolicy import off_policy_mask
    d = rollout_batch(48)
    want = peers.trl_off_policy_mask(d["adv"][:, None], d["logp"], d["rollout"],
                                     d["mask"].to(F64), 0.05)
    got = off_policy_mask(d["adv"], d["logp"], d["rollout"], d["mask"], 0.05)
    assert 0 < want.sum() < B  # some rows dropped, some kept
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_rollout_correction_and_off_policy_mask_in_the_loss_match_trl(mode):
    d = rollout_batch(49)
    is_ratio = peers.trl_vllm_is_ratio(d["old"], d["rollout"], d["mask"].long(), mode=mode,
                                       clip_max=3.0)
    want = trl(d, loss_type="dapo", epsilon_high=0.28, use_vllm=True,
               vllm_importance_sampling_mode=mode,
               off_policy_mask_threshold=0.05, sampling_logp=d["rollout"], is_ratio=is_ratio,
               num_items=70)
    got = mmrl_loss(d, "dapo", eps_high=0.28, rollout_is=mode, rollout_is_max=3.0,
                    off_policy_mask=0.05, rollout_logp=d["rollout"], num_tokens=70)
    assert_same(got, want)


def test_sequence_level_rollout_correction_and_off_policy_mask_match_trl_gspo():
    d = rollout_batch(54)
    d["old"] = torch.where(d["mask"], d["logp"] + 0.01 * torch.randn(B, T, dtype=F64,
                           generator=torch.Generator().manual_seed(154)), d["old"])
    is_ratio = peers.trl_vllm_is_ratio(d["old"], d["rollout"], d["mask"].long(),
                                       mode="sequence_truncate", clip_max=3.0)
    want = trl(d, loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4,
               epsilon_high=4e-4, use_vllm=True, vllm_importance_sampling_mode="sequence_truncate",
               off_policy_mask_threshold=0.05, sampling_logp=d["rollout"], is_ratio=is_ratio)
    got = mmrl_loss(d, "gspo", rollout_is="sequence_truncate", rollout_is_max=3.0,
                    off_policy_mask=0.05, rollout_logp=d["rollout"])
    assert_same(got, want)


def test_rollout_correction_in_the_loss_matches_verl_rollout_is_weights():
    d = rollout_batch(50)
    corr = peers.verl_rollout_corr()
    w, _ = corr.compute_rollout_correction_weights(d["old"] - d["rollout"], d["mask"].to(F64),
                                                   rollout_is="token", rollout_is_threshold=2.0)
    core = peers.verl_algos()
    fn, cfg = core.get_policy_loss_fn("vanilla"), peers.verl_config(clip_ratio_c=1e6)
    m = d["mask"].to(F64)
    want = value_and_grad(lambda lp: fn(d["old"], lp, d["adv"][:, None] * m, m,
                                        loss_agg_mode="token-mean", config=cfg,
                                        rollout_is_weights=w)[0], d["logp"])
    got = mmrl_loss(d, "dapo", eps_high=0.2, rollout_is="token_truncate", rollout_is_max=2.0,
                    rollout_logp=d["rollout"])
    assert_same(got, want, VERL_TOL)


def test_vespo_with_rollout_correction_differs_from_trl():
    # Differs from TRL: with vLLM correction on, TRL folds the token weights into VESPO's log W
    # (log W += Σ_t clamp(log w_t, log 1e-8, 20), then φ(W)) and does not multiply by w again;
    # mmrl's rollout correction is its own axis: φ(W) from θ/θ_old only, then × w_t per token.
    d = rollout_batch(51, lengths=LENGTHS)
    d["old"], d["rollout"] = d["old"] * 0 + d["logp"] + 0.05, d["rollout"] * 0 + d["logp"]
    w = peers.trl_vllm_is_ratio(d["old"], d["rollout"], d["mask"].long(), mode="token_truncate")
    m, n = d["mask"].to(F64), 70
    want = trl(d, loss_type="vespo", use_vllm=True, vllm_importance_sampling_mode="token_truncate",
               sampling_logp=d["rollout"], is_ratio=w, num_items=n)
    phi_trl = peers.trl_gamma_weights(d["adv"][:, None], d["logp"] - d["old"], m, w)
    phi_mmrl = peers.trl_gamma_weights(d["adv"][:, None], d["logp"] - d["old"], m, None)
    a = d["adv"][:, None]
    torch.testing.assert_close(want[0], (-phi_trl * a * d["logp"] * m).sum() / n, **TOL)
    got = mmrl_loss(d, "vespo", rollout_is="token_truncate", rollout_logp=d["rollout"],
                    num_tokens=n)
    torch.testing.assert_close(got[0], (-phi_mmrl * a * d["logp"] * w * m).sum() / n, **TOL)
    torch.testing.assert_close(got[1], -phi_mmrl * a * w * m / n, **TOL)
    assert abs(got[0] - want[0]) > 1e-3
