"""The diffusion job's GroupPolicy on a tiny SD3 pipeline: log-probs, gradients, advantages."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from mmrl.config.core import ConfigError
from mmrl.train.loop import LoopSettings, update
from mmrl.algo.losses import PolicyLoss
from mmrl.train.reward_fn import RewardBatch

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import PROMPTS, tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def _policy(cfg):
    from mmrl.diffusion.job import build_policy

    spec = cfg.algo.resolve()
    return build_policy(cfg.task, "cpu", spec)


def test_over_long_prompts_are_truncated_with_a_counted_warning(tiny_sd3_path, tmp_path):
    cfg = tiny_config(tiny_sd3_path, str(tmp_path))
    policy = _policy(cfg)
    with pytest.warns(UserWarning, match="1 of 2 prompts are longer than CLIP's 77 tokens"):
        policy.rollout(["x" * 120, "short"], [{}, {}], 2, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sampler", ["full", "window", "singular", "tree"])
def test_logp_before_the_first_update_equals_the_sampling_logp(tiny_sd3_path, tmp_path, sampler):
    """ratio = exp(logp − logp_sampled) is exactly 1 before any update, through the job path."""
    cfg = tiny_config(tiny_sd3_path, str(tmp_path), sampler=sampler)
    policy = _policy(cfg)
    with torch.no_grad():
        rollout = policy.rollout(PROMPTS[:2], [{}, {}], 2, torch.Generator().manual_seed(0))
    traj, index, mask = rollout.data["trajectory"].traj, rollout.data["index"], rollout.mask
    # every sampled transition is trained (singular: once per granularity row)
    assert sorted(set(index[mask].tolist())) == list(range(traj.num_transitions))
    sampled = torch.where(mask, traj.logp[index], torch.zeros(()))
    assert torch.equal(rollout.rollout_logp, sampled)  # what algo.rollout_is reads
    rows = torch.arange(len(rollout))
    T = mask.shape[1]
    by_step = torch.cat([policy.logp(rollout, rows, t, t + 1) for t in range(T)], 1)
    whole = policy.logp(rollout, rows, 0, T)
    if sampler in ("full", "window"):  # one step's rows per call, as when sampling: bit for bit
        assert torch.equal(by_step.detach(), sampled)
    torch.testing.assert_close(whole.detach(), sampled, rtol=0, atol=1e-6)
    assert whole.requires_grad


def _grads_after_update(policy, rollout, adv, loss_fn, **settings):
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)  # a step that keeps the weights and leaves .grad
    s = LoopSettings(group_size=2, max_grad_norm=0.0, **settings)
    update(policy, opt, loss_fn, rollout, adv, s, torch.Generator().manual_seed(0))
    return torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("sampler", ["full", "tree"])
def test_t_chunked_and_micro_batched_gradients_equal_the_unsplit_gradient(tiny_sd3_path,
                                                                          tmp_path, sampler):
    cfg = tiny_config(tiny_sd3_path, str(tmp_path), sampler=sampler, algo={"beta": 0.05})
    policy = _policy(cfg)
    with torch.no_grad():
        rollout = policy.rollout(PROMPTS[:2], [{}, {}], 2, torch.Generator().manual_seed(0))
    adv = torch.linspace(-1.5, 1.3, len(rollout))
    loss_fn = PolicyLoss("grpo", beta=0.05)  # the KL term runs ref_logp (adapter disabled) too
    whole = _grads_after_update(policy, rollout, adv, loss_fn)
    chunked = _grads_after_update(policy, rollout, adv, loss_fn, t_chunk=1, micro_batch_size=3)
    assert whole.abs().sum() > 0
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("sampler", ["singular", "tree"])
def test_non_finite_rewards_are_dropped_counted_and_training_goes_on(tiny_sd3_path, tmp_path,
                                                                     sampler):
    from mmrl.train.loop import learn

    cfg = tiny_config(tiny_sd3_path, str(tmp_path), sampler=sampler)
    policy = _policy(cfg)
    with torch.no_grad():
        rollout = policy.rollout(PROMPTS[:2], [{}, {}], 2, torch.Generator().manual_seed(0))
    B = len(rollout.samples)
    values = torch.linspace(0.0, 1.0, B)
    values[0], values[3] = float("nan"), float("inf")
    rewards = RewardBatch(values[:, None], ["r"], torch.isfinite(values))
    adv = policy.advantages(rollout, rewards)
    params = [p for p in policy.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    out = learn(policy, torch.optim.AdamW(params, lr=1e-2), PolicyLoss("grpo"), rollout, rewards,
                LoopSettings(group_size=2), torch.Generator().manual_seed(0))
    assert out["dropped_samples"] == 2 and out["samples"] == B - 2
    assert torch.isfinite(adv).all() and torch.isfinite(torch.tensor(out["loss"]))
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    if sampler == "singular":  # rows are reward rows (m·G + g); groups (k, prompt, g) of 2
        # rows 0 and 3 failed; rows 2 and 1 are then alone in their groups: all four get 0
        assert torch.equal(adv[:4], torch.zeros(4)) and bool((adv[4:] != 0).all())


def test_singular_advantages_sum_to_the_g2rpo_integrated_advantage(tiny_sd3_path, tmp_path):
    from mmrl.diffusion import g2rpo_advantages

    cfg = tiny_config(tiny_sd3_path, str(tmp_path), sampler="singular", algo={"adv_eps": 1e-8})
    policy = _policy(cfg)
    with torch.no_grad():
        rollout = policy.rollout(PROMPTS[:2], [{}, {}], 3, torch.Generator().manual_seed(1))
    traj = rollout.data["trajectory"].traj
    r = torch.rand(len(rollout.samples), generator=torch.Generator().manual_seed(2))
    valid = torch.ones(len(r), dtype=torch.bool)
    rows = policy.advantages(rollout, RewardBatch(r[:, None], ["r"], valid))
    per_member = torch.zeros(traj.num_transitions).index_add_(0, traj.output_owner, rows)
    torch.testing.assert_close(per_member, g2rpo_advantages(r, traj, eps=1e-8))


def test_every_preset_is_selectable_or_rejected_with_a_reason(tiny_sd3_path, tmp_path):
    """No code branches on preset names: each preset trains one update through the job's
    policy (KL presets use the reference = adapter disabled), or the config says why not."""
    from mmrl.train.loop import learn
    from mmrl.algo.presets import PRESETS

    policy = None
    for name in sorted(PRESETS):
        try:
            cfg = tiny_config(tiny_sd3_path, str(tmp_path), algo={"preset": name})
        except ConfigError as err:
            # the two refusals and their reasons: TW weights need a vocabulary; ReMax a mode
            reason = ("vocabulary" if PRESETS[name].needs_token_weights else
                      "greedy completion" if PRESETS[name].needs_baseline else None)
            assert reason is not None and reason in str(err), (name, str(err))
            continue
        if policy is None:  # it stores the step means, so GRPO-Guard trains on its rollout too
            from mmrl.diffusion.job import build_policy
            policy = build_policy(cfg.task, "cpu", PRESETS["grpo_guard"])
            with torch.no_grad():
                rollout = policy.rollout(PROMPTS[:2], [{}, {}], 2,
                                         torch.Generator().manual_seed(0))
            r = torch.tensor([0.1, 0.4, 0.9, 0.3])
            rewards = RewardBatch(r[:, None], ["r"], torch.ones(4, dtype=torch.bool))
        params = [p for p in policy.parameters() if p.requires_grad]
        batch = rewards if not PRESETS[name].binary_rewards else RewardBatch(  # DRPO: 0/1
            torch.tensor([[1.0], [0.0], [0.0], [1.0]]), ["r"], torch.ones(4, dtype=torch.bool))
        out = learn(policy, torch.optim.SGD(params, lr=0.0), PolicyLoss(name, max_len=3),
                    rollout, batch, LoopSettings(group_size=2, inner_epochs=2),
                    torch.Generator().manual_seed(0))
        assert out["skipped_updates"] == 0 and math.isfinite(out["loss"]), name
        assert out["grad_norm"] > 0, name
