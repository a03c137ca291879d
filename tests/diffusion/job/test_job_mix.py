"""MixGRPO and G²RPO options through the diffusion job on the tiny SD3 pipeline: the mixed
sampler's cost and resume, G²RPO's member rows, summed-and-clamped advantage and per-k steps."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from mmrl.algo.losses import PolicyLoss
from mmrl.config.core import ConfigError
from mmrl.train.loop import LoopSettings, update
from mmrl.train.reward_fn import RewardBatch

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import PROMPTS, tiny_config  # noqa: E402


def _policy(cfg):
    from mmrl.diffusion.job import build_policy

    return build_policy(cfg.task, "cpu", cfg.algo.resolve())


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradient at every step."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.grads = []

    def step(self, closure=None):
        self.grads.append(torch.cat([p.grad.flatten().clone() for g in self.param_groups
                                     for p in g["params"]]))
        return super().step(closure)


def _one_update(policy, rollout, adv, mini_batches, lr=1e-2):
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = RecordingSGD(params, lr=lr)
    update(policy, opt, PolicyLoss("grpo"), rollout, adv,
           LoopSettings(group_size=2, num_mini_batches=mini_batches, max_grad_norm=0.0),
           torch.Generator().manual_seed(0))
    return opt.grads


def test_g2rpo_member_rows_clamp_the_summed_advantage_and_step_once_per_k(tiny_sd3_path,
                                                                         tmp_path):
    from mmrl.diffusion import g2rpo_advantages

    section = dict(sampler="singular", singular_rows="member", singular_cadence="per_step",
                   singular_end="replace_last")
    with pytest.raises(ConfigError, match="num_mini_batches: got 1; singular_cadence=per_step"):
        tiny_config(tiny_sd3_path, str(tmp_path), **section)
    cfg = tiny_config(tiny_sd3_path, str(tmp_path), train={"num_mini_batches": 2},
                      algo={"adv_clip": 1.0, "adv_eps": 1e-8}, **section)
    policy = _policy(cfg)
    with torch.no_grad():
        rollout = policy.rollout(PROMPTS[:2], [{}, {}], 2, torch.Generator().manual_seed(1))
    traj = rollout.data["trajectory"].traj
    # K = 2 steps x P = 2 prompts x N = 2 members = 8 rows, 16 rewarded images (G = 2)
    assert len(rollout) == 8 and len(rollout.samples) == 16
    assert rollout.mini_batch.tolist() == [0] * 4 + [1] * 4
    assert torch.equal(rollout.sample_group_ids, traj.output_cond)
    # member 0 of each (k, prompt) group wins at both granularities: A_{m,g} = ±1/√2, summed
    # ±√2, clamped to ±adv_clip = 1; member 0 of prompt 1 at k = 1 wins g = 1 only: 0
    r = torch.tensor([1., 1., 0., 0.] * 4)
    r[12:16] = torch.tensor([1., 0., 0., 1.])
    adv = policy.advantages(rollout, RewardBatch(r[:, None], ["r"], torch.ones(16, dtype=bool)))
    assert adv.tolist() == [1., -1., 1., -1., 1., -1., 0., 0.]
    torch.testing.assert_close(adv, g2rpo_advantages(r, traj, eps=1e-8, adv_clip=1.0))
    # per_step: two optimizer steps; the first is the k = 0 rows' own update (taken first
    # with lr 0, which leaves the weights as they are)
    first = rollout.select(torch.arange(4))
    first.mini_batch = None
    alone = _one_update(policy, first, adv[:4], 1, lr=0.0)
    grads = _one_update(policy, rollout, adv, 2)
    assert len(grads) == 2 and len(alone) == 1 and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], alone[0], rtol=1e-4, atol=1e-9)


def _run(cfg):
    from mmrl.diffusion.job import run

    return run(cfg)


def test_mixed_sampler_through_the_job_costs_its_nfe_and_resumes_bit_exactly(tiny_sd3_path,
                                                                            tmp_path):
    section = dict(sampler="sliding", sliding_schedule="random", window=1, ode_solver="dpm2",
                   ode_compression=0.5)
    straight = _run(tiny_config(tiny_sd3_path, str(tmp_path / "a"), train={"steps": 2},
                                **section))
    # T = 4, M = 2: the window is step 0 or 1; n = max(⌊(4 − last)·0.5⌋, 2) = 2 post points,
    # so 4 samples cost 4·(last + 2) evaluations
    nfe = [h["nfe"] for h in straight["history"]]
    assert nfe == [8, 12]  # the windows drawn from the run's generator: step 0, then 1
    _run(tiny_config(tiny_sd3_path, str(tmp_path / "b"), train={"steps": 1, "save_every": 1},
                     **section))
    rest = _run(tiny_config(tiny_sd3_path, str(tmp_path / "b"),
                            train={"steps": 2, "resume": "auto"}, **section))
    assert [h["nfe"] for h in rest["history"]] == nfe[1:]
    assert math.isfinite(rest["history"][0]["loss"])
    a, b = torch.load(tmp_path / "a" / "final.pt"), torch.load(tmp_path / "b" / "final.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_flux_g2rpo_recipe_follows_the_authors_hps_code_and_keeps_the_old_as_options():
    from pathlib import Path

    from mmrl.config.schema import load_config

    repo = Path(__file__).resolve().parents[3]
    g2 = load_config(repo / "configs/diffusion/flux_hps_g2rpo.yaml")
    d, a, t = g2.task, g2.algo, g2.train
    assert (d.kind, d.noise_level, d.singular_steps, d.granularities, d.singular_end,
            d.singular_rows, d.singular_cadence, d.num_steps) == (
        "flow_grpo", 0.7, list(range(8)), [1, 2], "replace_last", "member", "per_step", 16)
    assert (t.num_mini_batches, t.group_size, t.steps, a.adv_clip, a.adv_eps, a.eps_low) == (
        8, 12, 301, 5.0, 1e-8, 1e-4)
    from mmrl.diffusion.config import DiffusionConfig
    old = DiffusionConfig()  # the defaults are mmrl's earlier behaviour
    assert (old.singular_end, old.singular_rows, old.singular_cadence, old.sliding_schedule,
            old.ode_solver, old.ode_compression) == (
        "append_zero", "granularity", "per_iteration", "sliding", "euler", None)


def test_the_mixgrpo_flash_recipe_carries_the_scripts_settings():
    from pathlib import Path

    from mmrl.config.schema import load_config

    repo = Path(__file__).resolve().parents[3]
    mix = load_config(repo / "configs/diffusion/flux_hps_mixgrpo_flash.yaml")
    d = mix.task
    assert (d.sampler, d.sliding_schedule, d.window, d.sliding_shift_every, d.sliding_stride,
            d.ode_solver, d.ode_compression, d.num_steps, d.kind, d.noise_level) == (
        "sliding", "progressive", 4, 20, 1, "dpm2", 0.4, 25, "flow_grpo", 0.7)
    assert (mix.train.group_size, mix.train.num_mini_batches, mix.algo.eps_low) == (12, 4, 1e-4)
