"""sde_step against float64 oracles, diffusers' Euler step, re-scoring, KL and the σ schedule."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from mmrl.diffusion import (SDE_KINDS, SDE_KL_FORMS, cfg_combine, euler_step, flow_sigmas, sde_kl,
                            sde_step)

# importlib import mode: load the oracle module by path under a name no other test folder uses.
_SPEC = importlib.util.spec_from_file_location("mmrl_tests_diffusion_reference",
                                               Path(__file__).with_name("reference.py"))
ref = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ref)

KINDS = ["flow_grpo", "dance", "cps"]  # the kinds tests/diffusion/reference.py knows
REGISTERED = SDE_KINDS.names()  # property tests run on every registered kind
SHAPES = {"image4d": (3, 4, 6, 5), "video5d": (3, 4, 2, 5, 3), "tokens3d": (3, 7, 8)}


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    nxt = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, v, nxt


def test_every_registered_kind_has_a_reference_oracle():
    assert REGISTERED == sorted(KINDS), "add the new kind to tests/diffusion/reference.py"


def test_schedule_matches_algorithms_test_vector_and_diffusers():
    sig = flow_sigmas(10, shift=3.0)
    expected = [1, .960, .913, .858, .790, .707, .602, .465, .278, .009, 0]
    assert torch.allclose(sig, torch.tensor(expected), atol=6e-4)
    for steps, shift in [(10, 3.0), (40, 3.0), (16, 1.0), (28, 3.0)]:
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(steps)
        assert torch.equal(flow_sigmas(steps, shift), sched.sigmas)


def test_flow_grpo_noise_scale_test_vector():
    # ALGORITHMS.md: step 0 s = 3.506, noise std ≈ 0.700; step 8 s = 0.434, noise std ≈ 0.225.
    sig = flow_sigmas(10, 3.0)
    x, v, _ = _inputs((1, 4, 2, 2))
    for i, s_exp, std_exp in [(0, 3.506, 0.700), (8, 0.434, 0.225)]:
        std = sde_step(x, v, sig, i, noise_level=0.7).std
        s = std / math.sqrt(float(sig[i] - sig[i + 1]))
        assert abs(float(s) - s_exp) < 1e-3 and abs(float(std) - std_exp) < 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_values_and_logp_match_float64_reference(kind, shape):
    sig = flow_sigmas(10, 3.0)
    x, v, nxt = _inputs(SHAPES[shape])
    steps = torch.tensor([0, 4, 9])  # σ = 1 (flow_grpo special case), the middle, the last step
    a = torch.tensor([0.7, 0.3, 0.8])
    out = sde_step(x, v, sig, steps, kind=kind, noise_level=a, prev_sample=nxt)
    mean, std, logp = ref.step_reference(x, v, sig, steps.tolist(), kind, a.tolist(), nxt)
    assert out.mean.dtype == torch.float32
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.std.double(), std, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.logp.double(), logp, rtol=1e-4, atol=1e-4)
    # float64 inputs stay float64 and agree to rounding.
    out64 = sde_step(x.double(), v.double(), sig.double(), steps, kind=kind,
                     noise_level=a.double(), prev_sample=nxt.double())
    torch.testing.assert_close(out64.logp, logp, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_of_logp_matches_reference(kind):
    sig = flow_sigmas(10, 3.0).double()
    x, v, nxt = (t.double() for t in _inputs((2, 3, 4, 4)))
    v1 = v.clone().requires_grad_(True)
    v2 = v.clone().requires_grad_(True)
    out = sde_step(x, v1, sig, torch.tensor([2, 6]), kind=kind, noise_level=0.5, prev_sample=nxt)
    _, _, logp = ref.step_reference(x, v2, sig, [2, 6], kind, [0.5, 0.5], nxt)
    g1, = torch.autograd.grad(out.logp.sum(), v1)
    g2, = torch.autograd.grad(logp.sum(), v2)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", REGISTERED)
def test_noise_level_zero_is_exactly_diffusers_euler(kind):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    x, v, _ = _inputs((2, 4, 8, 8))
    for i, t in enumerate(sched.timesteps):
        expected = sched.step(v, t, x).prev_sample
        out = sde_step(x, v, sched.sigmas, i, kind=kind, noise_level=0.0)
        assert torch.equal(out.prev_sample, expected), f"step {i}"
        assert torch.equal(out.std, torch.zeros(2)) and torch.equal(out.logp, torch.zeros(2))
        assert torch.equal(euler_step(x, v, sched.sigmas, i), expected)
        x = expected


@pytest.mark.parametrize("kind", REGISTERED)
@pytest.mark.parametrize("shape", ["image4d", "video5d"])
def test_rescoring_a_sampled_transition_gives_the_same_logp(kind, shape):
    sig = flow_sigmas(10, 3.0)
    x, v, _ = _inputs(SHAPES[shape])
    steps = torch.tensor([1, 3, 7])
    sampled = sde_step(x, v, sig, steps, kind=kind, noise_level=0.6,
                       generator=torch.Generator().manual_seed(3))
    again = sde_step(x, v, sig, steps, kind=kind, noise_level=0.6, prev_sample=sampled.prev_sample)
    assert torch.equal(again.logp, sampled.logp)
    assert torch.equal(torch.exp(again.logp - sampled.logp), torch.ones(3))  # ratio exactly 1
    # The sample is mean + std·ε with the generator's ε.
    eps = torch.randn(SHAPES[shape], generator=torch.Generator().manual_seed(3))
    std = sampled.std.reshape(-1, *[1] * (x.dim() - 1))
    torch.testing.assert_close(sampled.prev_sample, sampled.mean + std * eps, rtol=0, atol=1e-6)


def test_bf16_inputs_are_computed_in_fp32():
    sig = flow_sigmas(10, 3.0)
    x, v, nxt = _inputs((2, 4, 4, 4), dtype=torch.bfloat16)
    out = sde_step(x, v, sig, 0, prev_sample=nxt)
    ref32 = sde_step(x.float(), v.float(), sig, 0, prev_sample=nxt.float())
    assert out.prev_sample.dtype == out.mean.dtype == out.logp.dtype == torch.float32
    assert torch.equal(out.logp, ref32.logp) and torch.equal(out.mean, ref32.mean)


def test_per_row_generators_reproduce_rows_independently():
    sig = flow_sigmas(10, 3.0)
    x, v, _ = _inputs((3, 2, 4, 4))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    both = sde_step(x, v, sig, 2, generator=gens).prev_sample
    alone = sde_step(x[1:2], v[1:2], sig, 2, generator=torch.Generator().manual_seed(2)).prev_sample
    assert torch.equal(both[1:2], alone)


def test_gaussian_logp_at_the_mean_is_the_normalizer():
    sig = flow_sigmas(10, 3.0)
    x, v, _ = _inputs((2, 2, 3, 3))
    det = sde_step(x, v, sig, 3, noise_level=0.0).prev_sample
    out = sde_step(x, v, sig, 3, noise_level=0.7)
    at_mean = sde_step(x, v, sig, 3, noise_level=0.7, prev_sample=out.mean)
    torch.testing.assert_close(at_mean.logp, -torch.log(out.std) - 0.5 * math.log(2 * math.pi))
    assert not torch.equal(out.mean, det)  # the SDE drift moves the mean off the Euler step


def _kl_case(kind, sigmas, i, level, delta, shape=(2, 1, 2, 2)):
    """Both KL forms of one step whose two velocities differ by ``delta`` everywhere; row 1 takes
    the deterministic step (level 0). Returns (forms, grads w.r.t. the policy velocity)."""
    x = torch.linspace(-1.0, 1.0, math.prod(shape)).reshape(shape)
    v_ref = torch.linspace(0.5, -0.5, math.prod(shape)).reshape(shape)
    a = torch.tensor([level, 0.0])
    ref = sde_step(x, v_ref, sigmas, i, kind=kind, noise_level=a)
    out = {}
    for form in SDE_KL_FORMS.names():
        v = (v_ref + delta).requires_grad_(True)
        kl = sde_kl(sde_step(x, v, sigmas, i, kind=kind, noise_level=a), ref.mean, form)
        out[form] = (kl.detach(), torch.autograd.grad(kl.sum(), v)[0])
    return out


def test_kl_forms_hand_values_and_gradients():
    # σ = [1, 0.5, 0], step 1 (σ 0.5 -> 0, dt = −0.5), flow_grpo kind, a = 0.5:
    # s = 0.5·sqrt(0.5/0.5) = 0.5, std² = s²·0.5 = 0.125, c_v = dt + s²dt/(2σ)·(1 − σ) = −0.5625,
    # Δμ = c_v·0.2 = −0.1125, Δμ² = 0.01265625 -> transition 0.01265625/0.25 = 0.050625,
    # flow_grpo 0.01265625/0.5 = 0.0253125 (= transition·(−dt)).
    # ∂/∂v of the dim-mean: c_v²·δ/(d²·L), L = 4 -> 0.50625/4 and 0.253125/4 per element.
    sig = torch.tensor([1.0, 0.5, 0.0])
    got = _kl_case("flow_grpo", sig, 1, 0.5, 0.2)
    for form, value, grad in [("transition", 0.050625, 0.50625 / 4),
                              ("flow_grpo", 0.0253125, 0.253125 / 4)]:
        kl, g = got[form]
        torch.testing.assert_close(kl, torch.tensor([value, 0.0]))  # deterministic row: 0
        torch.testing.assert_close(g[0], torch.full((1, 2, 2), grad))
        assert torch.equal(g[1], torch.zeros(1, 2, 2))
    # dance, η = 0.5 at the same step: s = 0.5 too, so the same numbers.
    got = _kl_case("dance", sig, 1, 0.5, 0.2)
    torch.testing.assert_close(got["transition"][0], torch.tensor([0.050625, 0.0]))
    torch.testing.assert_close(got["flow_grpo"][0], torch.tensor([0.0253125, 0.0]))
    # cps, step 0 (σ 1 -> 0.5), a = 0.5: std = 0.5·sin(π/4), std² = 0.125; c_v = −σ(1 − σ′) +
    # σ′cos(π/4)(1 − σ) = −0.5; Δμ² = 0.01 -> 0.04 in both forms (flow_grpo's std_dev_t is std).
    got = _kl_case("cps", sig, 0, 0.5, 0.2)
    for form in ("transition", "flow_grpo"):
        torch.testing.assert_close(got[form][0], torch.tensor([0.04, 0.0]))
        torch.testing.assert_close(got[form][1][0], torch.full((1, 2, 2), 0.25 * 0.2 / 0.125 / 4))


def test_transition_kl_is_the_exact_gaussian_kl():
    sig = flow_sigmas(10, 3.0)
    x, v, v_ref = _inputs((3, 4, 6, 5), dtype=torch.float64)
    steps = torch.tensor([0, 4, 8])
    for kind in REGISTERED:
        out = sde_step(x, v, sig, steps, kind=kind, noise_level=0.5)
        ref = sde_step(x, v_ref, sig, steps, kind=kind, noise_level=0.5)
        sb = out.std.view(-1, 1, 1, 1).expand_as(x)
        exact = torch.distributions.kl_divergence(torch.distributions.Normal(out.mean, sb),
                                                  torch.distributions.Normal(ref.mean, sb))
        torch.testing.assert_close(sde_kl(out, ref.mean), exact.flatten(1).mean(1))


@pytest.mark.parametrize("kind, sde_type", [("flow_grpo", "sde"), ("cps", "cps")])
def test_flow_grpo_kl_form_equals_flow_grpo_formula(kind, sde_type):
    # the same tensors through mmrl and through the transcription of flow_grpo's code
    sig = flow_sigmas(10, 3.0)
    x, v, v_ref = _inputs((4, 4, 6, 5), dtype=torch.float64, seed=3)
    steps, a = torch.tensor([0, 3, 6, 8]), torch.tensor([0.7, 0.7, 0.5, 0.9], dtype=torch.float64)
    out = sde_step(x, v, sig, steps, kind=kind, noise_level=a)
    ref_mean = sde_step(x, v_ref, sig, steps, kind=kind, noise_level=a).mean
    expected = ref.flow_grpo_kl_reference(x, v, v_ref, sig, steps, a, sde_type)
    torch.testing.assert_close(sde_kl(out, ref_mean, "flow_grpo"), expected)
    if kind == "flow_grpo":  # and it is the transition KL times −dt, 1/25 .. 1/3.7 of it
        dt = (sig[steps + 1] - sig[steps]).double()
        torch.testing.assert_close(sde_kl(out, ref_mean, "flow_grpo"),
                                   sde_kl(out, ref_mean, "transition") * -dt)
        ratio = sde_kl(out, ref_mean, "transition") / sde_kl(out, ref_mean, "flow_grpo")
        assert [round(float(r), 1) for r in ratio] == [25.1, 14.9, 7.3, 3.7]
    else:
        torch.testing.assert_close(sde_kl(out, ref_mean, "flow_grpo"), sde_kl(out, ref_mean))


def test_kl_errors_teach():
    x, v, _ = _inputs((2, 4, 4, 4))
    out = sde_step(x, v, flow_sigmas(10, 3.0), 0)
    with pytest.raises(ValueError, match="did you mean 'flow_grpo'"):
        sde_kl(out, out.mean, "flow_grpo2")
    with pytest.raises(ValueError, match="same transitions"):
        sde_kl(out, out.mean[:, :2], "transition")


def test_errors_teach():
    sig = flow_sigmas(10, 3.0)
    x, v, _ = _inputs((2, 4, 4, 4))
    with pytest.raises(ValueError, match="did you mean 'dance'"):
        sde_step(x, v, sig, 0, kind="danse")
    with pytest.raises(ValueError, match="looks like a timestep"):
        sde_step(x, v, sig, 999)
    with pytest.raises(TypeError, match="is a float"):
        sde_step(x, v, sig, 0.5)
    with pytest.raises(ValueError, match=r"expected an int or a LongTensor of shape \[2\]"):
        sde_step(x, v, sig, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="same shape"):
        sde_step(x, v[:, :2], sig, 0)
    with pytest.raises(ValueError, match="noise_level"):
        sde_step(x, v, sig, 0, noise_level=-0.1)
    with pytest.raises(ValueError, match="1 for 'cps'"):
        sde_step(x, v, sig, 0, kind="cps", noise_level=1.5)
    with pytest.raises(ValueError, match="flow_sigmas"):
        sde_step(x, v, sig[None], 0)
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(0)


def test_cfg_combine_hand_value():
    v_u, v_c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    assert torch.equal(cfg_combine(v_u, v_c, 2.0), torch.tensor([5.0, 2.0]))  # v_u + 2(v_c − v_u)
    assert torch.equal(cfg_combine(v_u, v_c, 1.0), v_c)
    with pytest.raises(ValueError, match="same CFG batch"):
        cfg_combine(v_u, v_c[:1], 2.0)
