"""MixGRPO's DPM-Solver++ 2M, post grid and window schedules, and G²RPO's completion end, against
the slow oracles of tests/reference/flow_mix_ref.py (values, NFE counts, schedules by hand)."""
import math

import pytest
import torch

from mmrl.diffusion import (completion_sigmas, flow_sigmas, rescore, sample_sde,
                            sample_singular, sliding_window)
from mmrl.diffusion.config import ODE_SOLVER_NAMES, WINDOW_SCHEDULE_NAMES
from mmrl.diffusion.dpm import ODE_SOLVERS, dpm2_step, post_sigmas, sample_mixed
from mmrl.diffusion.schedule import WINDOW_SCHEDULES, mix_window, window_start
from tests.reference import flow_mix_ref as ref


def _shift_grid(T, s=3.0):
    """MixGRPO's / FLUX's schedule σ_j = shift_s(1 − j/T), j = 0 … T."""
    u = torch.linspace(1, 0, T + 1, dtype=torch.float64)
    return (s * u / (1 + (s - 1) * u)).float()


class Velocity:
    """A small conv net v(x, σ) that counts the rows it evaluates."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.net = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.rows = 0

    def __call__(self, x, sigma, cond):
        self.rows += x.shape[0]
        with torch.no_grad():
            return torch.tanh(self.net(x.float())) * sigma.reshape(-1, 1, 1, 1) + 0.3 * x


def _noise(n=3, seed=1):
    return torch.randn((n, 4, 6, 6), generator=torch.Generator().manual_seed(seed))


def test_names_match_the_torch_free_config():
    assert ODE_SOLVERS == ODE_SOLVER_NAMES and WINDOW_SCHEDULES == WINDOW_SCHEDULE_NAMES


def test_dpm2_step_hand_worked_and_first_order_cases():
    x, v = torch.ones(1, 1), torch.full((1, 1), 0.5)
    # λ_s0 = 0, λ_t = log 3, λ_s1 = −log 3: h = log 3, r0 = 1; D0 = 1 − .5·.5 = .75,
    # D1 = (.75 − .2)/1 = .55; x_t = .5·1 − .75·(1/3 − 1)·(.75 + .275) = 1.0125
    got = dpm2_step(x, v, 0.5, 0.25, (0.75, torch.full((1, 1), 0.2)))
    torch.testing.assert_close(got, torch.full((1, 1), 1.0125))
    euler = x + (0.25 - 0.5) * v
    assert torch.equal(dpm2_step(x, v, 0.5, 0.25, None), euler)  # first step: Euler
    assert torch.equal(dpm2_step(x, v, 0.5, 0.0, (0.75, x)), x - 0.5 * v)  # final: x̂0
    assert torch.equal(dpm2_step(x, v, 0.5, 0.25, (1.0, x)), euler)  # history at σ = 1: D1 = 0
    with pytest.raises(ValueError, match="reverse-time step"):
        dpm2_step(x, v, 0.25, 0.5)
    with pytest.raises(ValueError, match="previous step's"):
        dpm2_step(x, v, 0.5, 0.25, (0.4, x))


@pytest.mark.parametrize("sigmas", [flow_sigmas(10, 3.0), _shift_grid(8)])
def test_dpm2_ode_equals_the_oracle_and_spends_one_evaluation_per_step(sigmas):
    vf, noise = Velocity(), _noise()
    traj = sample_mixed(vf, noise, sigmas, None, solver="dpm2")
    want, evals = ref.dpm2_ode(Velocity(), noise, sigmas)
    torch.testing.assert_close(traj.final.double(), want, rtol=1e-5, atol=1e-5)
    T = sigmas.shape[0] - 1
    assert traj.nfe == vf.rows == 3 * T and evals == T and traj.num_transitions == 0
    # euler through the same entry point is the plain ODE sampler, bit for bit
    assert torch.equal(sample_mixed(Velocity(), noise, sigmas, solver="euler").final,
                       sample_sde(Velocity(), noise, sigmas, None, sde_steps=[]).final)


def test_dpm2_is_second_order_on_an_exact_gaussian_flow():
    # data x0 ~ N(0, c²): v(x, σ) = (σ − (1−σ)c²)/((1−σ)²c² + σ²)·x, and x(0) = c·x(1) exactly
    c = 0.5

    def gaussian(x, sigma, cond):
        s = sigma.double().reshape(-1, 1)
        return (s - (1 - s) * c * c) / ((1 - s) ** 2 * c * c + s * s) * x.double()

    x1 = torch.ones(1, 1, dtype=torch.float64)
    err = {(solver, T): float((sample_mixed(gaussian, x1, _shift_grid(T).double(),
                                            solver=solver).final - c).abs())
           for solver in ODE_SOLVERS for T in (20, 40)}
    assert 1.8 < err["euler", 20] / err["euler", 40] < 2.2  # Euler: first order
    assert err["dpm2", 20] < 0.25 * err["euler", 20] and err["dpm2", 40] < 0.15 * err["euler", 40]


def test_post_grid_is_mixgrpo_flashs_formula_and_counts_steps():
    sig = _shift_grid(25)
    for c, n in ((0.4, 8), (0.2, 4)):  # T = 25, window 0–3: 7 resp. 3 ODE steps
        got = post_sigmas(sig, 3, c)
        want = torch.cat([sig[:4], torch.tensor(ref.mixgrpo_post_grid(25, 3, c, 3.0))])
        torch.testing.assert_close(got, want.float(), rtol=0, atol=2e-7)
        assert got.shape[0] - 1 == 4 + n - 1  # 11 resp. 7 steps in all
        assert got[4] == sig[4] and got[-1] == 0
    assert post_sigmas(sig, 20, 0.1).shape[0] == 21 + 2  # n >= 2 (MixGRPO's n = 1 stops early)
    with pytest.raises(ValueError, match="0 < c <= 1"):
        post_sigmas(sig, 3, 1.5)
    with pytest.raises(ValueError, match="last SDE step"):
        post_sigmas(sig, 24, 0.4)


@pytest.mark.parametrize("solver,compression", [("dpm2", 0.4), ("dpm2", None), ("euler", 0.4)])
def test_mixed_sampler_window_then_post_equals_the_oracle(solver, compression):
    sig, noise, window = _shift_grid(12), _noise(2), [1, 2, 3]
    vf = Velocity()
    traj = sample_mixed(vf, noise, sig, None, sde_steps=window, solver=solver,
                        compression=compression, generator=torch.Generator().manual_seed(4))
    head = sample_sde(Velocity(), noise, sig[:5], None, sde_steps=window,
                      generator=torch.Generator().manual_seed(4))
    sched = sig if compression is None else post_sigmas(sig, 3, compression)
    assert torch.equal(traj.sigmas, sched) and torch.equal(traj.logp, head.logp)
    last = traj.states[traj.src[traj.step == 3]]  # the window's last state, at σ_3
    history = [(float(sig[3]), last.double() - float(sig[3]) * Velocity()(
        last, sig[3].expand(2), None).double())]
    if solver == "dpm2":
        want, post = ref.dpm2_ode(Velocity(), head.final, sched, start=4, history=history)
    else:
        want, x = head.final.double(), head.final
        for j in range(4, sched.shape[0] - 1):
            x = x + (sched[j + 1] - sched[j]) * Velocity()(x, sched[j].expand(2), None)
        want, post = x.double(), sched.shape[0] - 5
    torch.testing.assert_close(traj.final.double(), want, rtol=1e-5, atol=1e-5)
    n = 12 - 3 if compression is None else math.floor((12 - 3) * 0.4)
    assert post == n - 1 and traj.nfe == vf.rows == 2 * (4 + n - 1)
    # the window's transitions re-score to their sampling log-probs (ratio 1)
    torch.testing.assert_close(rescore(traj, Velocity(), None).logp, traj.logp, rtol=0, atol=0)


def test_mixed_sampler_refuses_bad_options():
    with pytest.raises(ValueError, match="unknown ODE solver 'rk4'"):
        sample_mixed(Velocity(), _noise(), _shift_grid(6), solver="rk4")
    with pytest.raises(ValueError, match="needs SDE steps"):
        sample_mixed(Velocity(), _noise(), _shift_grid(6), compression=0.4)


CASES = [  # (strategy, T, W, iters_per_group, overlap step, roll_back, extra)
    ("progressive", 25, 4, 3, 1, True, {}),
    ("progressive", 12, 4, 2, 4, True, {}),  # prog_overlap off: moves by W
    ("progressive", 12, 4, 2, 3, False, {}),  # no roll back: stays at M
    ("progressive", 25, 4, 20, 0, True, {}),  # MixGRPO-Flash*: frozen at 0–3
    ("decay", 12, 3, 1, 1, True, {"n_max": 10, "n_min": 1}),
    ("decay", 12, 3, 1, 2, False, {"n_max": 4, "n_min": 2}),
    ("exp_decay", 25, 4, 5, 1, True, {"tau": 4, "k": 0.3}),
]


@pytest.mark.parametrize("strategy,T,W,every,step,roll_back,extra", CASES)
def test_window_schedules_follow_mixgrpos_state_machine(strategy, T, W, every, step, roll_back,
                                                        extra):
    states = ref.WindowStates(strategy, T, W, every, step, roll_back, **extra)
    for i in range(300):
        want = states.window() or [T - 3]  # an empty window trains step M − 1 (documented)
        got = mix_window(strategy, i, T, W, every=every, stride=step, roll_back=roll_back,
                         **extra)
        assert got == want, (i, got, want)
        states.update()


def test_window_schedules_hand_worked_and_random_draws_from_the_run_generator():
    # T = 10: M = 8; decay dwell n(cur) = max(1, ⌊10·(1 − cur/8) + cur/8⌋) = 10, 8, 7, 6, ...
    starts = [window_start("decay", i, 10, 2, stride=1) for i in range(40)]
    assert starts == [0] * 10 + [1] * 8 + [2] * 7 + [3] * 6 + [4] * 5 + [5] * 4
    # roll back: past M = 8 the start returns to 0; the window stops at M (steps < T − 2)
    assert [mix_window("progressive", i, 10, 4, every=1, stride=3) for i in range(4)] == [
        [0, 1, 2, 3], [3, 4, 5, 6], [6, 7], [0, 1, 2, 3]]
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    states = ref.WindowStates("random", 25, 4, 1, 1, rng=b)
    for i in range(50):
        assert mix_window("random", i, 25, 4, generator=a) == states.window()
    # sliding (the default) is mmrl's original schedule, unchanged
    assert [mix_window("sliding", i, 10, 4, every=2, stride=1) for i in range(14)] == [
        sliding_window(10, 4, i, shift_every=2, stride=1) for i in range(14)]
    with pytest.raises(ValueError, match="unknown window schedule 'linear'"):
        mix_window("linear", 0, 10, 4)
    with pytest.raises(ValueError, match="1 <= window <= 8"):
        mix_window("decay", 0, 10, 9)


def test_g2rpo_authors_end_replaces_the_last_sigma_and_takes_x0_from_the_last_evaluation():
    sig = _shift_grid(16)  # G²RPO's T = 16, shift 3 grid
    ends = {k: completion_sigmas(sig, k, 2, "replace_last") for k in range(8)}
    assert torch.equal(ends[1][-3:], torch.stack([sig[11], sig[13], sig[16]]))  # x̂0 from σ_13
    assert torch.equal(ends[2], completion_sigmas(sig, 2, 2))  # even k reaches σ_16 itself
    assert torch.equal(completion_sigmas(sig, 1, 2)[-3:], sig[[13, 15, 16]])  # append_zero
    noise = _noise(1)
    for end, per_k in (("replace_last", (15, 8, 14, 7)), ("append_zero", (15, 8, 14, 8))):
        vf = Velocity()
        traj = sample_singular(vf, noise, sig, None, group_size=2, steps=[0, 1],
                               granularities=[1, 2], end=end,
                               generator=torch.Generator().manual_seed(0))
        # anchor 2 steps + per (k, g) and member the completion's evaluations
        assert traj.nfe == vf.rows == 2 + 2 * sum(per_k)
        if end != "replace_last":
            continue
        for m, k in ((0, 0), (3, 1)):  # member 0 at k = 0, member 3 (second of k = 1)
            x_k1 = traj.states[traj.dst[m]][None]
            for gi, g in enumerate((1, 2)):
                want, evals = ref.g2rpo_image(Velocity(), x_k1, sig, k, g)
                torch.testing.assert_close(traj.final[m * 2 + gi][None].double(), want,
                                           rtol=1e-5, atol=1e-5)
                assert evals == per_k[2 * k + gi]
    with pytest.raises(ValueError, match="end='last'"):
        completion_sigmas(sig, 1, 2, "last")


def test_matching_rollouts_take_the_configured_ode_solver():
    """DiffusionNFT / AWM rollouts (``diffusion.ode_solver``): dpm2 is DPM-Solver++ 2M over the
    whole schedule (the oracle), euler the plain ODE sampler; both spend one evaluation per row
    and step."""
    from mmrl.diffusion.matching import ode_rollout
    sigmas, noise = _shift_grid(6), _noise()
    x0, nfe = ode_rollout(Velocity(), noise, sigmas, None, "dpm2")
    want, _ = ref.dpm2_ode(Velocity(), noise, sigmas)
    torch.testing.assert_close(x0.double(), want, rtol=1e-5, atol=1e-5)
    e0, e_nfe = ode_rollout(Velocity(), noise, sigmas, None, "euler")
    assert nfe == e_nfe == 3 * 6
    assert torch.equal(e0, sample_sde(Velocity(), noise, sigmas, None, sde_steps=[]).final)
    assert float((e0 - x0).abs().max()) > 1e-4  # the two solvers differ
