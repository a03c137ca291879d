"""GRPO-Guard in the core (arXiv 2510.22319): ratio level ``ratio_norm`` and ``step_reweight``.

Hand-worked values, the properties the paper builds RatioNorm for (ρ̃ = 1 at θ = old, no left
shift: E_ξ[log ρ̃] = 0), and values and gradients of preset ``grpo_guard`` against the slow
oracle written on the latents (tests/reference/guard_ref.py).
"""
import math

import pytest
import torch

from mmrl.algo.losses import PolicyLoss
from mmrl.algo.ratios import ratio_norm_log_ratio
from tests.reference import guard_ref

F64 = torch.float64
ONE = torch.ones(1, 1, dtype=torch.bool)


def _gauss(x_next, mean, std):
    """[B, T, D] latents, [B, T] std -> [B, T] per-dim-averaged Gaussian log-densities."""
    s = std[..., None]
    return (-(x_next - mean) ** 2 / (2 * s ** 2) - torch.log(s)
            - 0.5 * math.log(2 * math.pi)).mean(-1)


def _terms(x_next, mean_old, mean, std):
    """(logp, old_logp, mean_shift), each [B, T], as a flow policy computes them."""
    return (_gauss(x_next, mean, std), _gauss(x_next, mean_old, std),
            (mean - mean_old).pow(2).mean(-1))


def test_hand_worked_value_where_the_plain_ratio_says_one():
    # D = 2, s = 1/4, ξ = (1, −1): x′ − μ_old = (1/4, −1/4); μ_θ − μ_old = δ = (0.2, 0.1).
    # Plain: mean (x′ − μ_θ)² = (0.05² + 0.35²)/2 = 0.0625 = mean (x′ − μ_old)²: log-ratio 0.
    # RatioNorm: mean_d ξ·δ = (0.2 − 0.1)/2 = 0.05; s·0 + mean_shift/(2s) = 0.025/0.5 = 0.05.
    mean_old = torch.zeros(1, 1, 2, dtype=F64)
    x_next = torch.tensor([[[0.25, -0.25]]], dtype=F64)
    mean = torch.tensor([[[0.2, 0.1]]], dtype=F64, requires_grad=True)
    std = torch.full((1, 1), 0.25, dtype=F64)
    logp, old, shift = _terms(x_next, mean_old, mean, std)
    assert (logp - old).item() == pytest.approx(0.0, abs=1e-15)
    assert shift.item() == pytest.approx(0.025)
    x = ratio_norm_log_ratio(logp, old, ONE, step_std=std, mean_shift=shift)
    assert x.item() == pytest.approx(0.05, abs=1e-15)
    # d log ρ̃ / dμ_θ = ξ/D = (0.5, −0.5)
    g, = torch.autograd.grad(x.sum(), mean)
    torch.testing.assert_close(g, torch.tensor([[[0.5, -0.5]]], dtype=F64))


def test_ratio_is_one_at_the_old_policy_and_unshifted_in_expectation():
    g = torch.Generator().manual_seed(0)
    B, T, D = 3, 4, 16
    mean_old = torch.randn(B, T, D, generator=g, dtype=F64)
    delta = 0.05 * torch.randn(B, T, D, generator=g, dtype=F64)
    std = 0.1 + torch.rand(B, T, generator=g, dtype=F64)
    xi = torch.randn(B, T, D, generator=g, dtype=F64)
    mask = torch.ones(B, T, dtype=torch.bool)
    # θ = old: ρ̃ = 1 exactly
    logp, old, shift = _terms(mean_old + std[..., None] * xi, mean_old, mean_old, std)
    assert torch.all(ratio_norm_log_ratio(logp, old, mask, step_std=std, mean_shift=shift) == 0)
    # antithetic noise ±ξ: E_ξ[log ρ̃] = 0, while the plain log-ratio has mean −shift/(2s²)
    pair, plain = [], []
    for sign in (1.0, -1.0):
        logp, old, shift = _terms(mean_old + sign * std[..., None] * xi, mean_old,
                                  mean_old + delta, std)
        pair.append(ratio_norm_log_ratio(logp, old, mask, step_std=std, mean_shift=shift))
        plain.append(logp - old)
    torch.testing.assert_close(pair[0] + pair[1], torch.zeros(B, T, dtype=F64), atol=1e-13,
                               rtol=0)
    torch.testing.assert_close((plain[0] + plain[1]) / 2, -shift / (2 * std ** 2))
    assert bool((pair[0] != 0).all())


def test_step_reweight_divides_the_objective_by_the_sigma_gap_and_not_the_kl():
    # A = 1, ρ = 1 on both steps: ℓ = −1 each; gaps 0.1 and 0.5 -> −10, −2; row mean −6.
    logp = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    gap = torch.tensor([[0.1, 0.5]], dtype=F64)
    loss, _ = PolicyLoss("grpo", step_reweight=True)(logp, logp.detach(), torch.ones(1, dtype=F64),
                                                     mask, step_gap=gap)
    assert loss.item() == pytest.approx(-6.0)
    # the KL term (beta 0.5, k1 = logp − ref = 0.2 per step) is added after the reweight
    ref = torch.full((1, 2), -0.2, dtype=F64)
    loss, _ = PolicyLoss("grpo", step_reweight=True, beta=0.5, kl="k1")(
        logp, logp.detach(), torch.ones(1, dtype=F64), mask, step_gap=gap, ref_logp=ref)
    assert loss.item() == pytest.approx(-6.0 + 0.5 * 0.2)
    with pytest.raises(ValueError, match=r"step_reweight needs step_gap \[B, T\]=\(1, 2\)"):
        PolicyLoss("grpo", step_reweight=True)(logp, logp.detach(), torch.ones(1, dtype=F64),
                                               mask)


def test_missing_step_terms_are_named():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"ratio_norm' needs step_std \[B, T\]=\(2, 3\), got "
                                         r"NoneType"):
        PolicyLoss("grpo_guard")(logp, logp, torch.zeros(2), torch.ones(2, 3, dtype=torch.bool),
                                 step_gap=torch.ones(2, 3))


def test_grpo_guard_equals_the_latent_oracle_in_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    B, T, D, eps = 4, 3, 5, 0.02
    mean_old = torch.randn(B, T, D, generator=g, dtype=F64)
    std = 0.2 + 0.3 * torch.rand(B, T, generator=g, dtype=F64)
    x_next = mean_old + std[..., None] * torch.randn(B, T, D, generator=g, dtype=F64)
    # some steps inside the clip range, some outside on either side
    mean = (mean_old + 0.03 * torch.randn(B, T, D, generator=g, dtype=F64)).requires_grad_()
    gap = 0.05 + 0.3 * torch.rand(B, T, generator=g, dtype=F64)
    adv = torch.tensor([1.3, -0.7, 0.4, -2.0], dtype=F64)
    logp, old, shift = _terms(x_next, mean_old, mean, std)
    loss, stats = PolicyLoss("grpo_guard", eps_low=eps, eps_high=eps)(
        logp, old, adv, torch.ones(B, T, dtype=torch.bool), step_std=std, mean_shift=shift,
        step_gap=gap)
    want = guard_ref.guard_loss(
        [[list(x_next[i, j]) for j in range(T)] for i in range(B)],
        [[list(mean_old[i, j]) for j in range(T)] for i in range(B)],
        [[list(mean[i, j]) for j in range(T)] for i in range(B)],
        std.tolist(), gap.tolist(), adv.tolist(), eps)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    g1, = torch.autograd.grad(loss, mean)
    g2, = torch.autograd.grad(want, mean)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)
    assert 0 < stats["clipfrac_low"] + stats["clipfrac_high"] < 1  # both regions are exercised
    # the Gaussian oracle's log-density is the one the core's logp-form reads
    torch.testing.assert_close(logp[2, 1], guard_ref.gaussian_logp(
        list(x_next[2, 1]), list(mean[2, 1]), float(std[2, 1])))
