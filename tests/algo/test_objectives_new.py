"""Issue 17's objectives: CISPO (verl and TRL conventions), GPG, VESPO, Clip-Cov, KL-Cov and TRL's
two-sided ``delta``: hand-worked values and gradients, randomized comparisons against the slow
oracles of tests/reference/objectives_ref.py, and the combinations the config check refuses."""
import math

import pytest
import torch

from mmrl.algo.losses import OBJECTIVES, PolicyLoss, policy_loss
from mmrl.algo.presets import algo_problems, resolve_algo
from tests.reference import core_math as ref

F64 = torch.float64


def one_token(log_ratio, adv, algo, logp=-0.5, **kw):
    """Loss, d loss / d logp and stats of a single token with ``logp − old_logp = log_ratio``."""
    lp = torch.full((1, 1), logp, dtype=F64, requires_grad=True)
    old = torch.full((1, 1), logp - log_ratio, dtype=F64)
    loss, stats = policy_loss(lp, old, torch.tensor([adv], dtype=F64),
                              torch.ones(1, 1, dtype=torch.bool), algo=algo, **kw)
    grad, = torch.autograd.grad(loss, lp)
    return loss.item(), grad.item(), stats


# ---------------------------------------------------------------- CISPO
def test_cispo_verl_clips_the_weight_on_both_sides_and_keeps_the_gradient():
    # ratio 1.5, A = 1: w = 1.2; ℓ = −1.2·1·(−0.5) = 0.6; ∂ℓ/∂logp = −1.2
    loss, grad, stats = one_token(math.log(1.5), 1.0, "cispo")
    assert loss == pytest.approx(0.6) and grad == pytest.approx(-1.2)
    assert stats["clipfrac_high"].item() == 1.0 and stats["clipfrac_low"].item() == 0.0
    # ratio 0.5, A = −1: w = 0.8; ℓ = −0.8·(−1)·(−0.5) = −0.4; ∂ℓ/∂logp = 0.8
    loss, grad, stats = one_token(math.log(0.5), -1.0, "cispo")
    assert loss == pytest.approx(-0.4) and grad == pytest.approx(0.8)
    assert stats["clipfrac_low"].item() == 1.0
    # inside the range the weight is ρ itself: ρ = 1.1, A = 2 -> ∂ℓ/∂logp = −2.2
    assert one_token(math.log(1.1), 2.0, "cispo")[1] == pytest.approx(-2.2)


def test_cispo_trl_caps_the_weight_absolutely_with_no_lower_bound():
    loss, grad, stats = one_token(math.log(7.0), 1.0, "cispo_trl")  # w = min(7, 5) = 5
    assert loss == pytest.approx(2.5) and grad == pytest.approx(-5.0)
    assert stats["clipfrac_high"].item() == 1.0
    loss, grad, stats = one_token(math.log(0.1), -1.0, "cispo_trl")  # w = 0.1, no floor
    assert grad == pytest.approx(0.1) and stats["clipfrac_low"].item() == 0.0
    # TRL's silent fallback (epsilon_high unset -> 0.2) is an absolute cap of 0.2: at ratio 1
    # the gradient is a fifth of REINFORCE's
    assert one_token(0.0, 1.0, "cispo_trl", cispo_cap=0.2)[1] == pytest.approx(-0.2)


def test_cispo_with_the_sequence_token_level_weights_every_token_by_the_sequence_ratio():
    # TRL's importance_sampling_level="sequence": w = min(s_i, cap), s_i = exp(mean_t x)
    logp = torch.tensor([[-0.3, -1.0, -2.0]], dtype=F64, requires_grad=True)
    x = torch.tensor([[0.9, 0.3, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    loss, _ = policy_loss(logp, logp.detach() - x, torch.tensor([1.0], dtype=F64), mask,
                          algo="cispo_trl", ratio_level="sequence_token", cispo_cap=1.3)
    grad, = torch.autograd.grad(loss, logp)
    # mean of the valid tokens is (0.9 + 0.3) / 2 = 0.6: s = e^0.6 = 1.82 > 1.3 -> w = 1.3
    assert loss.item() == pytest.approx(-1.3 * (-0.3 - 1.0) / 2)
    torch.testing.assert_close(grad, torch.tensor([[-0.65, -0.65, 0.0]], dtype=F64))


# ---------------------------------------------------------------- GPG
def test_gpg_is_reinforce_whatever_the_ratio():
    for log_ratio in (-3.0, 0.0, 2.0):
        loss, grad, stats = one_token(log_ratio, 1.5, "grpo", objective="gpg",
                                      aggregation="token_mean")
        assert loss == pytest.approx(0.75) and grad == pytest.approx(-1.5)
        assert stats["clipfrac_high"].item() == 0.0
        assert stats["ratio_mean"].item() == pytest.approx(math.exp(log_ratio))


# ---------------------------------------------------------------- VESPO
@pytest.mark.parametrize("adv, phi", [(1.0, 4 * math.exp(-3.0)),   # k 2, λ 3: 2²·e^(3(1−2))
                                      (-1.0, 8 * math.exp(-2.0)),  # k 3, λ 2: 2³·e^(2(1−2))
                                      (0.0, 4 * math.exp(-3.0))])  # A ≥ 0 takes the pos pair
def test_vespo_weight_of_a_sequence_ratio_2(adv, phi):
    # two tokens with x = ln 2 and 0: W = 2 (a product over tokens, not a mean)
    logp = torch.tensor([[-0.5, -1.5, 7.0]], dtype=F64, requires_grad=True)
    x = torch.tensor([[math.log(2.0), 0.0, 5.0]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    loss, _ = policy_loss(logp, logp.detach() - x, torch.tensor([adv], dtype=F64), mask,
                          algo="vespo")
    grad, = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx(-phi * adv * (-0.5 - 1.5) / 2, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[-phi * adv / 2] * 2 + [0.0]], dtype=F64))


def test_vespo_weight_is_1_at_ratio_1_and_vanishes_far_off_policy():
    assert one_token(0.0, 2.0, "vespo")[1] == pytest.approx(-2.0)  # φ(1) = e^(λ − λ) = 1
    # log W clamped at log 1e-8: φ = e^3·(1e-8)²·e^(−3e-8) ≈ 2e-15; at log W = 20, φ = 0
    assert one_token(-50.0, 1.0, "vespo")[1] == pytest.approx(-math.exp(3) * 1e-16, rel=1e-6)
    loss, grad, _ = one_token(50.0, 1.0, "vespo")
    assert grad == 0.0 and math.isfinite(loss)


def test_vespo_with_the_sequence_token_level_sums_to_the_same_weight():
    logp, old, adv, mask = random_batch(seed=12)
    a, _ = policy_loss(logp, old, adv, mask, algo="vespo")
    b, _ = policy_loss(logp, old, adv, mask, algo="vespo", ratio_level="sequence_token")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(a, logp)[0], torch.autograd.grad(b, logp)[0])


# ---------------------------------------------------------------- Clip-Cov
def cov_batch(log_ratio_00=0.0):
    # A = [2, −2] (mean 0), logp rows −1 and −3 (mean −2): Cov = A·(logp + 2) = 2 everywhere
    logp = torch.tensor([[-1.0, -1.0], [-3.0, -3.0]], dtype=F64, requires_grad=True)
    x = torch.zeros(2, 2, dtype=F64)
    x[0, 0] = log_ratio_00
    adv = torch.tensor([2.0, -2.0], dtype=F64)
    return logp, logp.detach() - x, adv, torch.ones(2, 2, dtype=torch.bool)


def clip_cov(logp, old, adv, mask, seed=0, **kw):
    loss, stats = policy_loss(logp, old, adv, mask, algo="clip_cov",
                              generator=torch.Generator().manual_seed(seed), **kw)
    return loss, torch.autograd.grad(loss, logp)[0], stats


def test_clip_cov_detaches_n_random_candidates_keeping_them_in_the_normalizer():
    logp, old, adv, mask = cov_batch()
    loss, grad, stats = clip_cov(logp, old, adv, mask, cov_ratio=0.5)  # n = ⌊0.5·4⌋ = 2
    picked = grad == 0
    assert picked.sum() == 2 and stats["clipfrac_high"].item() == 0.5
    # unpicked: ℓ = −A·ρ = −A, ∂ℓ/∂logp = −A / 4 (token_mean over all 4 tokens)
    a = adv[:, None].expand(2, 2)
    torch.testing.assert_close(grad[~picked], (-a / 4)[~picked])
    assert loss.item() == pytest.approx((-a)[~picked].sum().item() / 4)


def test_clip_cov_skips_ppo_clipped_tokens_and_respects_strict_bounds():
    logp, old, adv, mask = cov_batch(log_ratio_00=math.log(1.5))  # A = 2 > 0, ρ 1.5: clipped
    loss, grad, stats = clip_cov(logp, old, adv, mask, cov_ratio=1.0)  # n = 4 > 3 candidates
    assert grad.eq(0).all()  # 3 picked + 1 clipped by PPO
    assert loss.item() == pytest.approx(-2 * 1.2 / 4)  # only the PPO-clipped token counts
    assert stats["clipfrac_high"].item() == 1.0
    _, grad, stats = clip_cov(logp, old, adv, mask, cov_ratio=1.0, clip_cov_ub=2.0)  # 2 < 2: no
    assert (grad == 0).sum() == 1 and stats["clipfrac_high"].item() == 0.25


def test_clip_cov_pick_is_uniform_and_follows_the_generator():
    logp, old, adv, mask = cov_batch()
    spec = resolve_algo("clip_cov", cov_ratio=0.25)  # one token of four
    fn = OBJECTIVES.get("clip_cov")
    lr = (logp - old).detach()
    counts = torch.zeros(2, 2)
    for seed in range(800):
        _, _, _, high = fn(lr, adv[:, None], spec=spec, valid=mask, logp=logp.detach(),
                           generator=torch.Generator().manual_seed(seed))
        assert high.sum() == 1
        counts += high
    # each token picked with probability 1/4: 200 expected, std √(800·3/16) ≈ 12.2
    assert (counts - 200).abs().max() < 50, counts
    a = fn(lr, adv[:, None], spec=spec, valid=mask, logp=logp.detach(),
           generator=torch.Generator().manual_seed(3))[3]
    b = fn(lr, adv[:, None], spec=spec, valid=mask, logp=logp.detach(),
           generator=torch.Generator().manual_seed(3))[3]
    assert torch.equal(a, b)


# ---------------------------------------------------------------- KL-Cov
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_kl_cov_penalizes_the_top_covariance_token(beta):
    # rows A = [1, 0, −1], logp [−1, −2, −3]: Cov = [1, 0, 1]; k = max(⌊3·2e-3⌋, 1) = 1 and the
    # tie goes to the earlier token (row 0)
    logp = torch.tensor([[-1.0], [-2.0], [-3.0]], dtype=F64, requires_grad=True)
    x = torch.tensor([[0.5], [0.2], [-0.3]], dtype=F64)
    adv = torch.tensor([1.0, 0.0, -1.0], dtype=F64)
    loss, _ = policy_loss(logp, logp.detach() - x, adv, torch.ones(3, 1, dtype=torch.bool),
                          algo="kl_cov", kl_cov_coef=beta)
    grad, = torch.autograd.grad(loss, logp)
    want = (-math.exp(0.5) + beta * 0.5 + math.exp(-0.3)) / 3
    assert loss.item() == pytest.approx(want)
    torch.testing.assert_close(grad, torch.tensor([[-math.exp(0.5) + beta], [0.0],
                                                   [math.exp(-0.3)]], dtype=F64) / 3)


def test_kl_cov_has_no_ppo_clip_and_selects_nothing_without_valid_tokens():
    loss, grad, stats = one_token(math.log(3.0), 1.0, "kl_cov", kl_cov_coef=0.0)
    assert loss == pytest.approx(-3.0) and grad == pytest.approx(-3.0)
    lp = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    loss, _ = policy_loss(lp, lp.detach() - 1, torch.ones(2, dtype=F64),
                          torch.zeros(2, 3, dtype=torch.bool), algo="kl_cov")
    assert loss.item() == 0.0


# ---------------------------------------------------------------- randomized vs the oracles
def random_batch(seed, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    logp = (-3 * torch.rand(B, T, generator=g, dtype=F64)).requires_grad_()
    old = logp.detach() + 0.4 * torch.randn(B, T, generator=g, dtype=F64)
    adv = 2 * torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.arange(T)[None] < torch.tensor([7, 3, 0, 5, 6, 1])[:, None]
    return logp, old, adv, mask


@pytest.mark.parametrize("name, kw", [
    ("clip_cov", dict(cov_ratio=0.2, clip_cov_lb=-1.0, clip_cov_ub=2.0)),
    ("clip_cov", dict(cov_ratio=0.6, clip_cov_lb=0.0, eps_low=0.1, eps_high=0.1)),
    ("kl_cov", dict(cov_ratio=0.15, kl_cov_coef=0.7)),
    ("cispo", dict(eps_low=0.1, eps_high=0.3)),
    ("cispo_trl", dict(cispo_cap=1.2)),
    ("vespo", dict(vespo_k_pos=1.5, vespo_lambda_neg=0.5)),
    ("dapo", dict(delta=1.25)),
    ("dapo", dict(delta=4.0, eps_high=0.6))])
def test_randomized_values_and_gradients_equal_the_oracle(name, kw):
    logp, old, adv, mask = random_batch(seed=sum(map(ord, name)))
    fn = PolicyLoss(name, **kw)
    loss, stats = fn(logp, old, adv, mask, generator=torch.Generator().manual_seed(4))
    want = ref.policy_loss(fn.spec, logp, old, adv, mask,
                           generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    g1, = torch.autograd.grad(loss, logp)
    g2, = torch.autograd.grad(want, logp)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    if name == "clip_cov":  # the case picks tokens: more zero-gradient tokens than PPO's
        ppo = policy_loss(logp, old, adv, mask, algo="dapo", eps_low=fn.spec.eps_low,
                          eps_high=fn.spec.eps_high)[1]
        assert stats["clipfrac_high"] > ppo["clipfrac_high"]


def test_cov_selection_is_per_call():
    """Documented: the covariance and the pick count are over the call's tokens (verl's
    micro-batch), so a split run equals the sum of per-call losses, each with its own pick."""
    logp, old, adv, mask = random_batch(seed=9)
    n_tok = mask.sum()
    for name, kw in [("kl_cov", dict(cov_ratio=0.1)), ("clip_cov", dict(cov_ratio=0.1,
                                                                        clip_cov_lb=-1.0))]:
        fn = PolicyLoss(name, **kw)
        total, want = 0.0, 0.0
        for a, b in [(0, 2), (2, 6)]:
            args = (logp[a:b], old[a:b], adv[a:b], mask[a:b])
            total = total + fn(*args, num_tokens=n_tok,
                               generator=torch.Generator().manual_seed(1))[0]
            want = want + ref.policy_loss(fn.spec, *args, num_tokens=n_tok,
                                          generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(total, want, rtol=1e-10, atol=1e-12)
        whole = fn(logp, old, adv, mask, generator=torch.Generator().manual_seed(1))[0]
        assert not torch.isclose(whole, total), name  # a different selection


# ---------------------------------------------------------------- TRL's delta
def test_delta_caps_negative_advantage_losses_and_small_delta_caps_positive_ones():
    loss, grad, stats = one_token(2.0, -1.0, "grpo", delta=4.0)  # ρ = 7.39 > δ = 4
    assert loss == pytest.approx(4.0) and grad == 0.0 and stats["clipfrac_high"].item() == 1.0
    loss, grad, stats = one_token(math.log(1.15), 1.0, "grpo", delta=1.1)  # δ < 1 + ε_high
    assert loss == pytest.approx(-1.1) and grad == 0.0 and stats["clipfrac_high"].item() == 1.0
    loss, grad, stats = one_token(math.log(1.05), 1.0, "grpo", delta=1.1)
    assert loss == pytest.approx(-1.05) and grad == pytest.approx(-1.05)
    # A < 0 with δ < 1 + ε_high: between δ and 1.2 the unclipped ratio still has a gradient
    loss, grad, stats = one_token(math.log(1.15), -1.0, "grpo", delta=1.1)
    assert loss == pytest.approx(1.15) and grad == pytest.approx(1.15)
    assert stats["clipfrac_high"].item() == 0.0


def test_delta_equals_dual_clip_when_delta_is_c_above_the_clip_range():
    logp, old, adv, mask = random_batch(seed=5)
    old = logp.detach() + 1.5 * torch.randn(logp.shape, dtype=F64)  # many ratios beyond 3
    a, sa = policy_loss(logp, old, adv, mask, algo="dapo", delta=3.0)
    b, sb = policy_loss(logp, old, adv, mask, algo="dapo", dual_clip_c=3.0)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, logp)[0], torch.autograd.grad(b, logp)[0])
    torch.testing.assert_close(sa["clipfrac_high"], sb["clipfrac_high"])


# ---------------------------------------------------------------- refused combinations
@pytest.mark.parametrize("preset, kw, words", [
    ("grpo", dict(delta=3.0, dual_clip_c=3.0), "both cap the A < 0 loss"),
    ("sapo", dict(delta=3.0), "delta only applies to objective 'clip'"),
    ("grpo", dict(delta=1.0), "delta=1.0 is out of range; expected delta > 1"),
    ("cispo", dict(ratio_level="sequence", aggregation="seq_mean"), "needs a token ratio level"),
    ("vespo", dict(ratio_level="sequence_sum", aggregation="seq_mean"), "'sequence_token'"),
    ("clip_cov", dict(clip_cov_lb=5.0), "clip_cov_lb=5.0 must be below clip_cov_ub=5.0"),
    ("kl_cov", dict(cov_ratio=0.0), "cov_ratio=0.0 is out of range"),
    ("vespo", dict(vespo_lambda_neg=0.0), "vespo_lambda_neg=0.0 is out of range"),
])
def test_invalid_combinations_are_refused_with_a_fix(preset, kw, words):
    problems = algo_problems(preset, **kw)
    assert any(words in p for p in problems), problems
    with pytest.raises(ValueError, match="problem"):
        resolve_algo(preset, **kw)


def test_objectives_that_read_whole_rows_forbid_t_chunking():
    for name in ("vespo", "clip_cov", "kl_cov"):
        assert resolve_algo(name).sequence_level and not resolve_algo(name).per_sequence_loss
    assert not resolve_algo("cispo").sequence_level
    assert resolve_algo("cispo", ratio_level="sequence_token").sequence_level
