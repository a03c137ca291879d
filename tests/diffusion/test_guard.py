"""GRPO-Guard's step terms on real SDE steps, and DanceGRPO's random subset of trained steps."""
import math

import pytest
import torch

from mmrl.algo.ratios import ratio_norm_log_ratio
from mmrl.diffusion import flow_sigmas, sde_step
from mmrl.diffusion.guard import step_terms, timestep_subset
from mmrl.diffusion.samplers import rescore, sample_sde
from tests.reference import guard_ref

F64 = torch.float64


@pytest.mark.parametrize("kind, level", [("flow_grpo", 0.7), ("dance", 0.3)])
def test_ratio_norm_of_sde_steps_is_the_noise_weighted_mean_shift(kind, level):
    """log ρ̃ from sde_step's log-probs = mean_d[ξ·(μ_θ − μ_old)] with ξ the step's own noise."""
    g = torch.Generator().manual_seed(0)
    sig = flow_sigmas(10).double()
    x = torch.randn(3, 2, 3, 3, generator=g, dtype=F64)
    v_old = torch.randn(x.shape, generator=g, dtype=F64)
    v = (v_old + 0.1 * torch.randn(x.shape, generator=g, dtype=F64)).requires_grad_()
    i = torch.tensor([0, 4, 8])
    old = sde_step(x, v_old, sig, i, kind=kind, noise_level=level,
                   generator=torch.Generator().manual_seed(1))
    new = sde_step(x, v, sig, i, kind=kind, noise_level=level, prev_sample=old.prev_sample)
    shift = (new.mean - old.mean).flatten(1).pow(2).mean(1)
    got = ratio_norm_log_ratio(new.logp[:, None], old.logp[:, None], torch.ones(3, 1,
                               dtype=torch.bool), step_std=new.std[:, None],
                               mean_shift=shift[:, None])[:, 0]
    want = torch.stack([guard_ref.ratio_norm_from_noise(
        list(old.prev_sample[b].flatten()), list(old.mean[b].flatten()),
        list(new.mean[b].flatten()), float(new.std[b])) for b in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    g1, = torch.autograd.grad(got.sum(), v, retain_graph=True)
    g2, = torch.autograd.grad(want.sum(), v)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-13)


def _velocity(scale):
    return lambda x, sigma, cond: scale * x - sigma.reshape(-1, 1, 1, 1)


def test_step_terms_of_a_sampled_trajectory():
    sig = flow_sigmas(4)
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    traj = sample_sde(_velocity(0.5), noise, sig, kind="flow_grpo",
                      generator=torch.Generator().manual_seed(1), keep_means=True)
    assert traj.means.shape == (traj.num_transitions, 1, 2, 2)
    idx = torch.arange(traj.num_transitions)
    same = rescore(traj, _velocity(0.5), index=idx)
    std, shift, gap = step_terms(traj, same, idx)
    assert torch.equal(shift, torch.zeros_like(shift))  # the weights that sampled: μ = μ_old
    want_gap = torch.stack([sig[s] - sig[s + 1] for s in traj.step.tolist()])
    torch.testing.assert_close(gap, want_gap)
    # flow_grpo: s_j = 0.7·sqrt(σ/(1 − σ))·sqrt(−dt), σ_1 in the denominator at σ = 1
    sj = torch.stack([sig[s] for s in traj.step.tolist()])
    den = torch.where(sj == 1, sig[1], sj)
    torch.testing.assert_close(std, 0.7 * torch.sqrt(sj / (1 - den)) * torch.sqrt(want_gap))
    moved = rescore(traj, _velocity(0.6), index=idx)
    _, shift, _ = step_terms(traj, moved, idx)
    want = ((moved.mean - traj.means) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(shift, want)
    assert torch.all(shift > 0)
    plain = sample_sde(_velocity(0.5), noise, sig, generator=torch.Generator().manual_seed(1))
    assert plain.means is None and torch.equal(plain.final, traj.final)  # storing changes nothing
    with pytest.raises(ValueError, match="sample with keep_means=True"):
        step_terms(plain, same, idx)


def test_timestep_subset_draws_danceGRPO_permutations_per_sample():
    B, K = 5, 15  # DanceGRPO FLUX: T = 16, fraction 0.6 -> 9 of the 15 transitions
    index = torch.arange(B * K).reshape(B, K)
    mask = torch.ones(B, K, dtype=torch.bool)
    sub, sub_mask = timestep_subset(index, mask, 0.6, torch.Generator().manual_seed(3))
    want = guard_ref.random_subset_rows(B, K, 0.6, torch.Generator().manual_seed(3))
    assert sub.shape == (B, 9) and bool(sub_mask.all())
    assert (sub - torch.arange(B)[:, None] * K).tolist() == want
    assert len({tuple(r) for r in want}) == B  # independent per sample
    again, _ = timestep_subset(index, mask, 0.6, torch.Generator().manual_seed(3))
    assert torch.equal(again, sub)
    full, _ = timestep_subset(index, mask, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(full, index)
    with pytest.raises(ValueError, match=r"keeps floor\(15·0.05\) = 0 of 15 steps"):
        timestep_subset(index, mask, 0.05, torch.Generator())


def test_timestep_subset_is_uniform_over_steps():
    B, K, f = 3000, 9, 0.5  # 4 of 9 per sample: each step kept with probability 4/9
    sub, _ = timestep_subset(torch.arange(K).expand(B, K), torch.ones(B, K, dtype=torch.bool), f,
                             torch.Generator().manual_seed(0))
    freq = torch.bincount(sub.flatten(), minlength=K).double() / B
    sd = math.sqrt(4 / 9 * 5 / 9 / B)
    assert torch.all((freq - 4 / 9).abs() < 4 * sd), freq
