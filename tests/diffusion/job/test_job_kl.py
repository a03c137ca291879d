"""The diffusion job's KL to the reference: the closed form of diffusion.kl, through the loop."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from mmrl.config.core import ConfigError
from mmrl.train.loop import LoopSettings, update
from mmrl.algo.losses import PolicyLoss

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import PROMPTS, tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
BETA = 0.5


def _moved_policy(cfg):
    """The job's policy with its LoRA B matrices moved off 0, so policy != reference."""
    from mmrl.diffusion.job import build_policy

    torch.manual_seed(0)  # the LoRA A init draws from the global RNG
    policy = build_policy(cfg.task, "cpu", cfg.algo.resolve())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in policy.flow.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return policy


def _rollout(policy):
    with torch.no_grad():
        return policy.rollout(PROMPTS[:2], [{}, {}], 2, torch.Generator().manual_seed(0))


def test_the_flow_grpo_recipe_uses_flow_grpos_kl_form():
    from mmrl.config.schema import load_config

    flow = load_config(REPO / "configs/diffusion/sd35m_pickscore_flow_grpo.yaml")
    assert (flow.task.kl, flow.task.kind, flow.algo.beta, flow.algo.kl) == (
        "flow_grpo", "flow_grpo", 0.01, None)


def test_a_log_prob_estimator_is_rejected_with_the_reason(tiny_sd3_path, tmp_path):
    with pytest.raises(ConfigError) as err:
        tiny_config(tiny_sd3_path, str(tmp_path), algo={"beta": 0.01, "kl": "k3"})
    assert "algo.kl: got 'k3', a log-prob estimator" in str(err.value)
    assert "diffusion.kl (transition or flow_grpo)" in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'flow_grpo'"):
        tiny_config(tiny_sd3_path, str(tmp_path), kl="flow-grpo")


@pytest.mark.parametrize("sampler", ["full", "tree"])
def test_job_kl_is_sde_kl_of_the_policy_and_reference_means(tiny_sd3_path, tmp_path, sampler):
    from mmrl.diffusion import rescore, sde_kl

    forms = {}
    for form in ("transition", "flow_grpo"):
        policy = _moved_policy(tiny_config(tiny_sd3_path, str(tmp_path), sampler=sampler,
                                           kl=form))
        rollout = _rollout(policy)
        rows, mask, index = torch.arange(len(rollout)), rollout.mask, rollout.data["index"]
        T = mask.shape[1]
        logp, kl = policy.logp_and_kl(rollout, rows, 0, T)
        assert kl.requires_grad and logp.requires_grad
        torch.testing.assert_close(logp, policy.logp(rollout, rows, 0, T), rtol=0, atol=0)
        traj, cond = rollout.data["trajectory"].traj, rollout.data["trajectory"].cond
        with torch.no_grad():  # by hand: both means of every stored transition
            out = rescore(traj, policy.flow, cond)
            ref = rescore(traj, policy.flow.reference, cond)
        expected = torch.where(mask, sde_kl(out, ref.mean, form)[index], torch.zeros(()))
        torch.testing.assert_close(kl.detach(), expected, rtol=1e-5, atol=1e-9)
        kl = kl.detach()
        assert float(kl[mask].min()) > 0 and torch.equal(kl[~mask], torch.zeros_like(kl[~mask]))
        forms[form] = (kl, mask, traj.sigmas[traj.step[index]] -
                       traj.sigmas[traj.step[index] + 1])
    (kl_t, mask, minus_dt), (kl_f, _, _) = forms["transition"], forms["flow_grpo"]
    # same rollout (same seed, same weights): flow_grpo's form = transition·(−dt) per step
    torch.testing.assert_close(kl_f[mask], (kl_t * minus_dt)[mask], rtol=1e-5, atol=1e-12)


def test_policy_loss_adds_beta_times_a_given_kl():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.25, -3.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    kl = torch.tensor([[0.2, 0.4, float("nan")], [0.1, 0.0, 0.3]])  # padding never counts
    adv = torch.tensor([1.0, -2.0])
    loss_fn = PolicyLoss("grpo", beta=BETA, aggregation="token_mean")
    loss, stats = loss_fn(logp, logp.detach(), adv, mask, kl=kl)
    # ratio 1: token_mean(−A) + β·token_mean(kl) = (−1·2 + 2·3)/5 + 0.5·(1.0/5)
    assert float(loss.detach()) == pytest.approx(0.8 + 0.1)
    assert float(stats["kl_ref"]) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="one of them; got both"):
        loss_fn(logp, logp.detach(), adv, mask, kl=kl, ref_logp=logp.detach())
    with pytest.raises(ValueError, match="needs ref_logp .* got neither"):
        loss_fn(logp, logp.detach(), adv, mask)


def test_update_adds_beta_times_the_closed_form_kl(tiny_sd3_path, tmp_path):
    """The loop's gradient with beta > 0 = the gradient of token_mean(objective + β·KL)."""
    cfg = tiny_config(tiny_sd3_path, str(tmp_path), kl="flow_grpo")
    policy = _moved_policy(cfg)
    rollout = _rollout(policy)
    adv = torch.linspace(-1.0, 1.2, len(rollout))
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)  # keeps the weights and leaves .grad
    update(policy, opt, PolicyLoss("grpo", beta=BETA, aggregation="token_mean"), rollout, adv,
           LoopSettings(group_size=2, max_grad_norm=0.0, t_chunk=1),
           torch.Generator().manual_seed(0))
    got = torch.cat([p.grad.flatten() for p in params])
    rows, mask = torch.arange(len(rollout)), rollout.mask
    logp, kl = policy.logp_and_kl(rollout, rows, 0, mask.shape[1])
    # at ratio 1 the clipped objective's gradient is REINFORCE's: token_mean of −A·logp
    manual = ((-adv[:, None] * logp + BETA * kl) * mask).sum() / mask.sum()
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(manual, params,
                                                                   retain_graph=True)])
    kl_part = torch.cat([g.flatten() for g in torch.autograd.grad(
        (BETA * kl * mask).sum() / mask.sum(), params)])
    assert float(kl_part.norm()) > 0.05 * float(expected.norm())  # the KL term is not negligible
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)
