"""Diffusion-DPO through the core's preference loss: ``PreferenceLoss("diffusion_dpo")`` on the
flow policy's ``pair_scores`` is flow_grpo's loss (values and LoRA gradients), and the diffusion
job accepts or refuses each preference preset with its reason.

Needs ``mmrl.algo.preference`` (Lane P1, branch i19-p1); tests/diffusion/job/test_preference.py
checks the same scores against the formula without it.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from mmrl.algo.preference import PREF_PRESETS, PreferenceLoss
from mmrl.diffusion.config import preference_problems

sys.path.insert(0, os.path.dirname(__file__))
from flow_pref_helpers import BETA, FAMILIES, make_policy, pair_rollout_of  # noqa: E402


@pytest.mark.parametrize("family", list(FAMILIES))
def test_preference_loss_diffusion_dpo_is_flow_grpos_loss(request, family):
    policy = make_policy(request, family)
    rollout, chosen, rejected = pair_rollout_of(policy)
    s = policy.pair_scores(rollout, chosen, rejected, torch.Generator().manual_seed(11), True)
    pref = PreferenceLoss("diffusion_dpo")
    assert pref.spec.beta == BETA and pref.spec.needs_ref
    loss, stats = pref(s.chosen_logp, s.rejected_logp, s.chosen_mask, s.rejected_mask,
                       chosen_ref=s.chosen_ref, rejected_ref=s.rejected_ref)
    params = policy.flow.trainable_parameters()
    grads = torch.autograd.grad(loss, params, retain_graph=True)  # `expected` shares the graph
    # flow_grpo's loss block, written on the errors e = −2·score of the same forwards
    e_w, e_l = -2 * s.chosen_logp[:, 0], -2 * s.rejected_logp[:, 0]
    r_w, r_l = -2 * s.chosen_ref[:, 0], -2 * s.rejected_ref[:, 0]
    expected = -F.logsigmoid(-0.5 * BETA * ((e_w - r_w) - (e_l - r_l))).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    for got, want in zip(grads, torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    margin = BETA * ((s.chosen_logp - s.chosen_ref) - (s.rejected_logp - s.rejected_ref))
    torch.testing.assert_close(stats["reward_margin"], margin.detach().mean())


def test_every_preference_preset_is_accepted_or_refused_with_its_reason():
    refused = {name: preference_problems(spec) for name, spec in PREF_PRESETS.items()}
    assert {name for name, problems in refused.items() if problems} == {"simpo", "tgdpo"}
    assert refused["simpo"][0].startswith("pref: reference_free=true (SimPO)")
    assert refused["tgdpo"][0].startswith("pref: token_guidance=true (TGDPO)")
