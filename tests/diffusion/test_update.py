"""One flow_grpo-style update on the tiny SD3 pipeline, through the pieces a trainer will chain:
sample_sde -> decode -> reward -> prompt_advantages -> rescore -> core policy_loss -> LoRA step.
"""
import pytest
import torch

from mmrl.diffusion import (flow_sigmas, initial_noise, prompt_advantages, rescore, sample_sde,
                            sde_kl)
from mmrl.diffusion.models.sd3 import SD3Adapter
from mmrl.algo.losses import policy_loss


@pytest.fixture(scope="module")
def policy(tiny_sd3_dir):
    return SD3Adapter.from_pretrained(tiny_sd3_dir, guidance_scale=1.0, max_sequence_length=8)


def _rollout(policy):
    prompts = ["a red cat"] * 3 + ["a blue dog"] * 3  # 2 groups of 3, shared noise per group
    cond = policy.encode(prompts)
    noise = initial_noise(2, 3, policy.latent_shape(8, 8), shared=True,
                          generator=torch.Generator().manual_seed(0))
    traj = sample_sde(policy, noise, flow_sigmas(3, 3.0), cond,
                      generator=torch.Generator().manual_seed(1))
    rewards = policy.decode(traj.final).mean(dim=(1, 2, 3))  # brightness, [6]
    return prompts, cond, traj, prompt_advantages(rewards, prompts, adv_clip=5.0)


def test_first_update_has_ratio_one_and_the_reinforce_gradient(policy):
    prompts, cond, traj, adv = _rollout(policy)
    index, old_logp, mask = traj.per_owner()  # [6, 2] trained steps per sample
    assert old_logp.shape == (6, 2) and bool(mask.all()) and bool((adv != 0).any())
    params = policy.trainable_parameters()
    logp = rescore(traj, policy, cond, index=index.flatten()).logp.reshape(6, 2)
    loss, stats = policy_loss(logp, old_logp, adv, mask, algo="grpo", eps_low=1e-4, eps_high=1e-4)
    assert abs(float(stats["ratio_max"]) - 1) < 1e-5 and abs(float(stats["ratio_min"]) - 1) < 1e-5
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    # At ratio 1 the clipped objective's gradient is REINFORCE's: -mean_i mean_t A_i ∇logp_i,t.
    reinforce = -(adv[:, None] * logp).mean()
    expected = torch.autograd.grad(reinforce, params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-9)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_kl_to_the_reference_is_zero_before_and_positive_after_a_step(policy):
    prompts, cond, traj, adv = _rollout(policy)
    idx = torch.arange(traj.num_transitions)
    with torch.no_grad():
        out = rescore(traj, policy, cond, index=idx)
        ref = rescore(traj, policy.reference, cond, index=idx)
    assert float(sde_kl(out, ref.mean).abs().max()) == 0.0  # LoRA B starts at 0: same velocity
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.5)
    index, old_logp, mask = traj.per_owner()
    logp = rescore(traj, policy, cond, index=index.flatten()).logp.reshape(6, 2)
    loss, _ = policy_loss(logp, old_logp, adv, mask, algo="grpo", eps_low=1e-4, eps_high=1e-4)
    loss.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        after = rescore(traj, policy, cond, index=idx)
    kl, kl_fg = sde_kl(after, ref.mean, "transition"), sde_kl(after, ref.mean, "flow_grpo")
    assert float(kl.min()) > 0
    sig = traj.sigmas[traj.step]  # flow_grpo's form is the transition KL times −dt
    torch.testing.assert_close(kl_fg, kl * (sig - traj.sigmas[traj.step + 1]))
    assert not torch.equal(after.logp, traj.logp)  # the policy moved
