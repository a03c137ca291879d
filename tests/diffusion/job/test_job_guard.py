"""GRPO-Guard and DanceGRPO's timestep_fraction through the diffusion job on the tiny SD3 pipeline:
the split gradient equals the unsplit one, the random step subsets resume bit for bit, and the
config refuses what cannot run."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from mmrl.algo.losses import PolicyLoss
from mmrl.config.core import ConfigError
from mmrl.train.loop import LoopSettings, update

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import PROMPTS, tiny_config  # noqa: E402

GUARD = {"preset": "grpo_guard", "eps_low": 0.2, "eps_high": 0.2}  # on-policy: inside the clip


def _policy(cfg):
    from mmrl.diffusion.job import build_policy

    return build_policy(cfg.task, "cpu", cfg.algo.resolve())


def _rollout(policy, seed=0):
    with torch.no_grad():
        return policy.rollout(PROMPTS[:2], [{}, {}], 2, torch.Generator().manual_seed(seed))


def _grads(policy, rollout, adv, loss_fn, **settings):
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)  # keeps the weights, leaves .grad
    update(policy, opt, loss_fn, rollout, adv, LoopSettings(group_size=2, max_grad_norm=0.0,
                                                            **settings),
           torch.Generator().manual_seed(0))
    return torch.cat([p.grad.flatten() for p in params])


@pytest.fixture(scope="module")
def guarded(tiny_sd3_path, tmp_path_factory):
    """A GRPO-Guard policy (it stores the step means) with timestep_fraction 0.67 (2 of the 3
    SDE steps of 4), and one rollout of 2 prompts x 2 images."""
    cfg = tiny_config(tiny_sd3_path, str(tmp_path_factory.mktemp("guard")), algo=dict(GUARD),
                      timestep_fraction=0.67)
    policy = _policy(cfg)
    return cfg, policy, _rollout(policy)


@pytest.mark.parametrize("beta, epochs", [(0.0, 1), (0.05, 2)])
def test_grpo_guard_micro_batched_and_t_chunked_gradients_equal_the_unsplit(guarded, beta,
                                                                            epochs):
    """Rows and T split, with the KL from the same forward (beta > 0) and old log-probs scored
    at the update's start (2 epochs)."""
    cfg, policy, rollout = guarded
    assert policy.capabilities.step_terms
    adv = torch.linspace(-1.5, 1.3, len(rollout))
    loss_fn = PolicyLoss(cfg.algo.preset, beta=beta, **cfg.algo.overrides())
    whole = _grads(policy, rollout, adv, loss_fn, inner_epochs=epochs)
    split = _grads(policy, rollout, adv, loss_fn, inner_epochs=epochs, t_chunk=1,
                   micro_batch_size=3)
    assert whole.abs().sum() > 0
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-9)
    if epochs == 1:  # not plain GRPO's: RatioNorm scales by s_j, the reweight by 1/−dt_j
        plain = _grads(policy, rollout, adv, PolicyLoss("grpo", beta=beta))
        assert not torch.allclose(plain, whole, rtol=1e-2)


def test_timestep_fraction_trains_a_random_subset_of_each_samples_steps(guarded):
    cfg, policy, rollout = guarded
    assert cfg.task.trained_steps() == 2  # floor(3 · 0.67)
    traj, index = rollout.data["trajectory"].traj, rollout.data["index"]
    assert index.shape == (4, 2) and bool(rollout.mask.all())
    assert traj.means.shape == (traj.num_transitions, *traj.final.shape[1:])
    steps = traj.step[index]  # [B, 2] each row's trained steps, in time order, of its own
    assert bool((steps[:, 0] < steps[:, 1]).all()) and bool((steps <= 2).all())
    assert bool((traj.owner[index] == torch.arange(4)[:, None]).all())
    assert len({tuple(r) for r in steps.tolist()}) > 1  # drawn per sample
    sampled = traj.logp[index]
    assert torch.equal(rollout.rollout_logp, sampled)
    logp = policy.logp(rollout, torch.arange(4), 0, 2)
    torch.testing.assert_close(logp.detach(), sampled, rtol=0, atol=1e-6)
    # the same seed draws the same subsets (after the same sampling)
    assert torch.equal(_rollout(policy).data["index"], index)


# (reward_mean, grad_norm) per step of the uninterrupted run, pinned on CPU (torch 2.14.1,
# diffusers 0.42.1, seed 0). The first rollout is plain Flow-GRPO's (test_job_training's "full"):
# the step subsets are drawn after the sampling.
PINNED = [(0.5083159804344177, 0.002932742703706026), (0.5104963779449463, 0.002780570648610592)]


def test_grpo_guard_with_timestep_fraction_resumes_bit_exactly(tiny_sd3_path, tmp_path):
    from mmrl.diffusion.job import run

    def config(out, **train):
        return tiny_config(tiny_sd3_path, str(tmp_path / out), algo=dict(GUARD),
                           timestep_fraction=0.67, train=train)

    straight = run(config("a", steps=2))
    run(config("b", steps=1, save_every=1))
    rest = run(config("b", steps=2, resume="auto"))
    assert rest["steps"] == 2 and len(rest["history"]) == 1
    a, b = torch.load(tmp_path / "a" / "final.pt"), torch.load(tmp_path / "b" / "final.pt")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    got = [(h["reward_mean"], h["grad_norm"]) for h in straight["history"]]
    assert rest["history"][0]["grad_norm"] == got[-1][1]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(PINNED), rtol=1e-4, atol=1e-7)


def test_config_refuses_what_grpo_guard_and_timestep_fraction_cannot_run(tiny_sd3_path,
                                                                         tmp_path):
    with pytest.raises(ConfigError, match="timestep_fraction: got 0.5 with sampler=window; a "
                                          "random subset of steps per sample"):
        tiny_config(tiny_sd3_path, str(tmp_path), sampler="window", timestep_fraction=0.5)
    with pytest.raises(ConfigError, match=r"trains floor\(3 \* 0.2\) = 0 of the 3 SDE steps"):
        tiny_config(tiny_sd3_path, str(tmp_path), timestep_fraction=0.2)
    with pytest.raises(ConfigError, match=r"window_range: got \[0, 4\] for window=2, "
                                          r"num_steps=4; expected \[r0, r1\]"):
        tiny_config(tiny_sd3_path, str(tmp_path), sampler="window", window_range=[0, 4])
    with pytest.raises(ConfigError, match="window_range: got .* with sampler=full"):
        tiny_config(tiny_sd3_path, str(tmp_path), window_range=[0, 3])
    assert tiny_config(tiny_sd3_path, str(tmp_path), sampler="window",
                       window_range=[1, 3]).task.window_range == [1, 3]
    for section in ({"kind": "cps", "noise_level": 0.8}, {"sampler": "singular"}):
        with pytest.raises(ConfigError, match=r"algo: ratio_level='ratio_norm', step_reweight="
                                              r"True \(GRPO-Guard\) read the Gaussian step"):
            tiny_config(tiny_sd3_path, str(tmp_path), algo=dict(GUARD), **section)
    with pytest.raises(ConfigError, match=r"\(GRPO-Guard\) read the step means stored at "
                                          r"sampling, which the MixGRPO sampler"):
        tiny_config(tiny_sd3_path, str(tmp_path), algo=dict(GUARD), ode_solver="dpm2")


def test_a_policy_without_step_terms_is_refused_by_name():
    from mmrl.train.policy import GroupPolicy, check_policy

    class Tokens(GroupPolicy):
        def logp(self, rollout, rows, t0, t1):
            return torch.zeros(len(rows), t1 - t0)

    with pytest.raises(TypeError, match=r"algo.ratio_level=ratio_norm / algo.step_reweight "
                                        r"needs Capabilities\(step_terms=True\), which Tokens "
                                        r"does not declare"):
        check_policy(Tokens(), PolicyLoss("grpo_guard").spec)
