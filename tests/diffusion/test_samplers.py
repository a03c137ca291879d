"""Samplers: structure, NFE counts, equality with hand-written loops, re-scoring (ratio 1)."""
import importlib.util
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from mmrl.diffusion import (completion_sigmas, euler_step, flow_sigmas, initial_noise,
                            random_window, rescore, sample_sde, sample_singular, sample_tree,
                            sde_step, sliding_window)

_SPEC = importlib.util.spec_from_file_location("mmrl_tests_diffusion_reference",
                                               Path(__file__).with_name("reference.py"))
ref = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ref)

SIG = flow_sigmas(10, 3.0)


class CountingVelocity:
    """A small conv net v(x, σ, cond) that records the batch size of every call."""

    def __init__(self, channels=4, seed=0, dims=2):
        torch.manual_seed(seed)
        conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
        self.net = conv(channels, channels, 3, padding=1)
        self.calls = []

    def __call__(self, x, sigma, cond):
        self.calls.append(x.shape[0])
        shape = (-1,) + (1,) * (x.dim() - 1)
        c = 0.0 if cond is None else (cond if torch.is_tensor(cond) else cond["c"]).reshape(shape)
        return torch.tanh(self.net(x)) * sigma.reshape(shape) + c


def _noise(n, shape=(4, 6, 6), seed=1):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def test_ode_sampler_equals_a_diffusers_scheduler_loop():
    vf, x = CountingVelocity(), _noise(3)
    traj = sample_sde(vf, x, SIG, None, sde_steps=[])
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(vf(x, (t / 1000).expand(3), None), t, x).prev_sample
    assert torch.equal(traj.final, x)
    assert traj.num_transitions == 0 and traj.nfe == 30


def test_full_sde_equals_a_hand_loop_and_lays_out_by_row():
    vf, noise, cond = CountingVelocity(), _noise(3), torch.tensor([0.1, -0.2, 0.3])
    traj = sample_sde(vf, noise, SIG, cond, generator=torch.Generator().manual_seed(5))
    g, x, logps = torch.Generator().manual_seed(5), noise.clone(), []
    with torch.no_grad():
        for t in range(10):
            v = vf(x, SIG[t].expand(3), cond)
            if t < 9:  # default: every step but the last is SDE
                out = sde_step(x, v, SIG, t, generator=g)
                x = out.prev_sample
                logps.append(out.logp)
            else:
                x = euler_step(x, v, SIG, t)
    assert torch.equal(traj.final, x)
    assert traj.nfe == 30 and traj.num_transitions == 27
    index, logp, mask = traj.per_owner()
    assert logp.shape == (3, 9) and bool(mask.all())
    assert torch.equal(logp, torch.stack(logps, 1))  # [T', B] -> [B, T']
    assert torch.equal(traj.step[index], torch.arange(9).expand(3, 9))
    # Consecutive transitions share their state: dst of step t is src of step t+1.
    assert torch.equal(traj.dst[index[:, :-1]], traj.src[index[:, 1:]])


def test_window_sampler_is_sde_only_inside_the_window():
    vf, noise = CountingVelocity(), _noise(2)
    window = random_window(10, 3, generator=torch.Generator().manual_seed(0))
    traj = sample_sde(vf, noise, SIG, None, sde_steps=window)
    assert sorted(set(traj.step.tolist())) == window and traj.num_transitions == 6
    ode = sample_sde(vf, noise, SIG, None, sde_steps=[])
    first = traj.src[traj.step == window[0]]
    # Before the window the path is the ODE's: re-run the ODE up to the window's first state.
    x = noise.clone()
    with torch.no_grad():
        for t in range(window[0]):
            x = euler_step(x, vf(x, SIG[t].expand(2), None), SIG, t)
    assert torch.equal(traj.states[first], x) and not torch.equal(traj.final, ode.final)


def test_windows():
    assert sliding_window(10, 4, 0) == [0, 1, 2, 3]
    assert sliding_window(10, 4, 24) == [0, 1, 2, 3]
    assert sliding_window(10, 4, 25) == [1, 2, 3, 4]
    assert sliding_window(10, 4, 25 * 5) == [5, 6, 7, 8]  # last start that keeps step 9 out
    assert sliding_window(10, 4, 25 * 6) == [0, 1, 2, 3]  # wraps
    starts = {random_window(10, 2, generator=torch.Generator().manual_seed(s))[0]
              for s in range(60)}
    assert starts == set(range(8))
    with pytest.raises(ValueError, match="window"):
        random_window(10, 10)
    # Flow-GRPO-Fast's recommended SD3 range (0, T//2) with W = 3: starts 0, 1, 2; the default
    # range draws exactly what it drew before the option existed
    starts = {random_window(10, 3, generator=torch.Generator().manual_seed(s),
                            start_range=(0, 5))[0] for s in range(60)}
    assert starts == {0, 1, 2}
    assert random_window(10, 2, generator=torch.Generator().manual_seed(4), start_range=(0, 9)) \
        == random_window(10, 2, generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"start_range \(0, 10\) for window=2 and 10 steps"):
        random_window(10, 2, start_range=(0, 10))  # Fast's base range reaches the last step


def test_shared_initial_noise():
    z = initial_noise(2, 3, (4, 2, 2), shared=True, generator=torch.Generator().manual_seed(0))
    assert z.shape == (6, 4, 2, 2) and torch.equal(z[0], z[2]) and not torch.equal(z[0], z[3])
    # rows are prompt-major: prompt p's 3 members are rows 3p..3p+2, all the p-th draw
    draws = torch.randn((2, 4, 2, 2), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, draws.repeat_interleave(3, dim=0), rtol=0, atol=0)
    assert all(torch.equal(z[i], draws[i // 3]) for i in range(6))
    z = initial_noise(2, 3, (4, 2, 2), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(z[0], z[1])


@pytest.mark.parametrize("splits,num_roots", [
    ({2: 2, 4: 2, 6: 2, 8: 2}, 1), ({2: 4, 5: 4}, 2), ({0: 2, 3: 2, 6: 2, 9: 2}, 1), ({7: 3}, 3)])
def test_tree_nfe_and_prefixes_computed_once(splits, num_roots):
    vf = CountingVelocity()
    traj = sample_tree(vf, _noise(num_roots), SIG, None, split_steps=list(splits),
                       branching=list(splits.values()), generator=torch.Generator().manual_seed(0))
    leaves = num_roots
    for b in splits.values():
        leaves *= b
    assert traj.nfe == ref.tree_nfe(num_roots, 10, splits) == sum(vf.calls)
    expected_calls, alive = [], num_roots
    for t in range(10):
        expected_calls.append(alive)
        alive *= splits.get(t, 1)
    assert vf.calls == expected_calls  # one evaluation per alive node per step
    assert traj.final.shape[0] == leaves == traj.leaves.shape[0]
    assert traj.nfe < leaves * 10


def test_tree_structure_levels_and_rescoring():
    vf = CountingVelocity()
    levels = [0.9, 0.6, 0.3]
    traj = sample_tree(vf, _noise(2), SIG, torch.tensor([0.5, -0.5]), split_steps=[3, 6],
                       branching=2, noise_levels=levels, sde_steps=[7],
                       generator=torch.Generator().manual_seed(1))
    # 2 roots -> 4 -> 8 nodes: 14 nodes; edges 4 + 8 split edges + 8 SDE steps at step 7.
    assert traj.num_nodes == 14 and traj.num_transitions == 20
    assert torch.equal(traj.depth, torch.tensor([0] * 2 + [1] * 4 + [2] * 8))
    assert torch.equal(traj.parent, torch.tensor([-1, -1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]))
    assert torch.equal(traj.node_cond, torch.tensor([0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]))
    split1 = traj.step == 3
    assert torch.equal(traj.owner[split1], torch.arange(2, 6))
    # Siblings start from their parent's single stored state (their values and noises: below).
    assert torch.equal(traj.src[split1], torch.tensor([0, 0, 1, 1]))
    # Each step uses the level of the depth of the node taking it.
    for step, level in [(3, 0.9), (6, 0.6), (7, 0.3)]:
        assert torch.equal(traj.noise_level[traj.step == step], torch.full((8 if step > 3 else 4,),
                                                                           level))
    assert torch.equal(traj.owner[traj.step == 7], traj.leaves)
    vf.calls.clear()
    again = rescore(traj, vf, torch.tensor([0.5, -0.5]))
    assert torch.equal(again.logp, traj.logp)
    # Siblings share their parent's evaluation: 2 + 4 split parents + 8 nodes at step 7.
    assert vf.calls == [14] and len(set(traj.src.tolist())) == 14


def _realized_noise(traj, vf, cond):
    """``[M, *L]`` ε = (x′ − μ)/std of every stored transition, μ and std re-computed."""
    out = rescore(traj, vf, cond)
    with torch.no_grad():
        diff = traj.states[traj.dst] - out.mean
        return diff / out.std.reshape(-1, *[1] * (diff.dim() - 1))


def _assert_distinct_states_and_independent_noise(states, eps):
    """Every pair of rows: states apart, noises uncorrelated (|corr| < 0.4: ~5 standard errors
    at these sizes; one noise shared by two rows gives corr 1)."""
    n = states.shape[0]
    gap = (states[:, None] - states[None]).flatten(2).abs().amax(-1)  # [n, n]
    assert float(gap[~torch.eye(n, dtype=torch.bool)].min()) > 1e-2
    e = eps.flatten(1)
    e = (e - e.mean(1, keepdim=True)) / e.std(1, keepdim=True)
    corr = e @ e.T / (e.shape[1] - 1)  # [n, n]
    assert float(corr[~torch.eye(n, dtype=torch.bool)].abs().max()) < 0.4
    torch.testing.assert_close(eps.std(), torch.tensor(1.0), rtol=0, atol=0.1)


def test_tree_siblings_get_their_own_noise_and_share_their_prefix():
    """Values, not indices: after a split the siblings' noises and states differ; before it,
    and between splits, every node's path is its parent's (the ODE on the shared prefix)."""
    vf, noise, cond = CountingVelocity(), _noise(2), torch.tensor([0.5, -0.5])
    traj = sample_tree(vf, noise, SIG, cond, split_steps=[3, 6], branching=2,
                       noise_levels=[0.9, 0.6, 0.3], sde_steps=[7],
                       generator=torch.Generator().manual_seed(1))
    eps = _realized_noise(traj, vf, cond)
    _assert_distinct_states_and_independent_noise(traj.states[traj.dst], eps)
    x = noise.clone()  # the shared prefix of each tree: the ODE from its root up to step 3
    with torch.no_grad():
        for t in range(3):
            x = euler_step(x, vf(x, SIG[t].expand(2), cond), SIG, t)
    split1, split2 = traj.step == 3, traj.step == 6
    assert torch.equal(traj.states[traj.src[split1]], x.repeat_interleave(2, 0))
    # between the splits each depth-1 node follows the ODE from its own state, and both of its
    # children start from exactly that state
    x = traj.states[traj.dst[split1]]  # [4] depth-1 nodes, in node order
    with torch.no_grad():
        for t in (4, 5):
            x = euler_step(x, vf(x, SIG[t].expand(4), cond.repeat_interleave(2)), SIG, t)
    torch.testing.assert_close(traj.states[traj.src[split2]], x.repeat_interleave(2, 0),
                               rtol=0, atol=1e-6)
    for sel in (split1, split2):  # siblings: same start, their own noise, different landings
        starts, lands, e = traj.states[traj.src[sel]], traj.states[traj.dst[sel]], eps[sel]
        assert torch.equal(starts[0::2], starts[1::2])
        assert bool(((lands[0::2] - lands[1::2]).flatten(1).abs().amax(1) > 1e-2).all())
        assert bool(((e[0::2] - e[1::2]).flatten(1).abs().amax(1) > 1.0).all())


def test_tree_5d_latents_and_dict_cond():
    vf = CountingVelocity(channels=2, dims=3)
    cond = {"c": torch.tensor([0.2])}
    traj = sample_tree(vf, _noise(1, (2, 3, 4, 4)), SIG, cond, split_steps=[1, 5], branching=[2, 3],
                       generator=torch.Generator().manual_seed(0))
    assert traj.final.shape == (6, 2, 3, 4, 4) and traj.nfe == 1 + 1 + 2 * 4 + 6 * 4
    torch.testing.assert_close(rescore(traj, vf, cond).logp, traj.logp, rtol=0, atol=1e-6)


def test_completion_sigmas():
    torch.testing.assert_close(completion_sigmas(SIG, 2, 2), SIG[[0, 1, 2, 3, 4, 6, 8, 10]])
    torch.testing.assert_close(completion_sigmas(SIG, 1, 2), SIG[[0, 1, 2, 3, 5, 7, 9, 10]])
    assert torch.equal(completion_sigmas(SIG, 4, 1), SIG)


def test_singular_sampling_structure_and_nfe():
    vf, noise = CountingVelocity(), _noise(2)
    cond = torch.tensor([0.3, -0.1])
    ks, N, grans = [0, 3, 5], 3, [1, 2]
    traj = sample_singular(vf, noise, SIG, cond, group_size=N, steps=ks, granularities=grans,
                           generator=torch.Generator().manual_seed(0))
    spent = sum(vf.calls)
    eps = _realized_noise(traj, vf, cond)
    M = len(ks) * 2 * N
    assert traj.num_transitions == M and traj.final.shape[0] == M * 2
    # Anchor: the ODE from the shared noise; members at k all start from the anchor's x_k.
    x = noise.clone()
    with torch.no_grad():
        anchor = []
        for t in range(6):
            anchor.append(x)
            x = euler_step(x, vf(x, SIG[t].expand(2), cond), SIG, t)
    for kp, k in enumerate(ks):
        rows = slice(kp * 2 * N, (kp + 1) * 2 * N)
        starts = traj.states[traj.src[rows]]
        assert torch.equal(starts, anchor[k].repeat_interleave(N, 0))
        # N different SDE steps per prompt: different states, independent noises
        _assert_distinct_states_and_independent_noise(traj.states[traj.dst[rows]],
                                                      eps[rows])
        assert torch.equal(traj.step[rows], torch.full((2 * N,), k))
    assert torch.equal(traj.group_ids, torch.arange(6).repeat_interleave(N))
    assert torch.equal(traj.output_granularity[:4], torch.tensor([1, 2, 1, 2]))
    # A g = 1 completion is the plain ODE continued from the member's x_{k+1}.
    m = 4
    x = traj.states[traj.dst[m]][None]
    k = int(traj.step[m])
    with torch.no_grad():
        for t in range(k + 1, 10):
            x = euler_step(x, vf(x, SIG[t].expand(1), cond[traj.cond_index[m]][None]), SIG, t)
    torch.testing.assert_close(traj.final[m * 2][None], x, rtol=0, atol=1e-6)
    # NFE: anchor 2·(k_max+1); per k, g: 2·N·(steps after σ_{k+1} on the completion schedule).
    completion = sum(2 * N * (len(completion_sigmas(SIG, k, g)) - k - 2) for k in ks for g in grans)
    assert traj.nfe == 2 * 6 + completion == spent
    assert traj.nfe / traj.final.shape[0] < 10  # fewer evaluations per image than one ODE run
    torch.testing.assert_close(rescore(traj, vf, cond).logp, traj.logp, rtol=0, atol=1e-6)


def test_ratio_is_one_before_the_first_update_with_a_tiny_sd3_transformer():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1,
                                  attention_head_dim=8, num_attention_heads=4,
                                  caption_projection_dim=32, joint_attention_dim=64,
                                  pooled_projection_dim=64, out_channels=4).eval()
    emb, pooled = torch.randn(2, 5, 64), torch.randn(2, 64)

    def velocity(x, sigma, cond):
        return model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond[0],
                     pooled_projections=cond[1]).sample

    noise = initial_noise(1, 2, (4, 8, 8), shared=True, generator=torch.Generator().manual_seed(0))
    sig = flow_sigmas(4, 3.0)
    traj = sample_sde(velocity, noise, sig, (emb, pooled),
                      generator=torch.Generator().manual_seed(1))
    for t in range(3):  # re-score each step as the trainer does, with gradients on
        idx = (traj.step == t).nonzero().flatten()
        out = rescore(traj, velocity, (emb, pooled), index=idx)
        assert out.logp.requires_grad
        ratio = torch.exp(out.logp - traj.logp[idx])
        assert torch.equal(ratio.detach(), torch.ones(2))
    assert not torch.equal(traj.final[0], traj.final[1])  # shared noise, different SDE noise


def test_sampler_errors():
    vf = CountingVelocity()
    with pytest.raises(ValueError, match="one cond row per noise row"):
        sample_sde(vf, _noise(2), SIG, torch.zeros(3))
    with pytest.raises(ValueError, match="repeats"):
        sample_tree(vf, _noise(1), SIG, split_steps=[2, 2])
    with pytest.raises(ValueError, match="branching"):
        sample_tree(vf, _noise(1), SIG, split_steps=[2], branching=1)
    with pytest.raises(ValueError, match="noise levels for 3 depths"):
        sample_tree(vf, _noise(1), SIG, split_steps=[2, 4], noise_levels=[0.5, 0.5])
    with pytest.raises(ValueError, match="out of range"):
        sample_sde(vf, _noise(1), SIG, sde_steps=[10])
    with pytest.raises(ValueError, match=r"\[0, 8\]"):
        sample_singular(vf, _noise(1), SIG, group_size=2, steps=[9])
    with pytest.raises(ValueError, match="same shape"):
        sample_sde(lambda x, s, c: x[:, :2], _noise(1), SIG)


def test_samplers_import_without_diffusers():
    import subprocess
    import sys

    code = ("import sys, mmrl.diffusion as d; d.sample_tree; d.SD3Policy; "
            "print(sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
