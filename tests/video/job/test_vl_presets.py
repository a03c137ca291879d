"""Three training steps per preset on the tiny Qwen2.5-VL: parameters change, losses are pinned.

The losses were recorded on CPU (torch 2.14.1, transformers 5.24) with the seeds below; a change
in any of the policy's rollout/logp/TW code paths moves them.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from vt_helpers import make_policy  # noqa: E402

from mmrl.train.loop import LoopSettings, train_step  # noqa: E402
from mmrl.algo.losses import PolicyLoss  # noqa: E402
from mmrl.algo.presets import PRESETS  # noqa: E402

# GRPO-Guard reads a Gaussian denoising step's terms: flow policies only (the VLM policy is
# refused by name, tests/diffusion/job/test_job_guard.py).
CASES = [p for p in sorted(PRESETS) if not PRESETS[p].needs_step_terms] + ["grpo+kl_full",
                                                                          "grpo+kl_lora"]
PINNED = {
    "dapo": [-0.388391, -0.212113, 0.0],
    "dr_grpo": [-0.12037, -0.157407, 0.0],
    "grpo": [-0.057716, -0.042385, -0.033042],
    "gspo": [0.0, 0.0, 0.0],  # sequence ratio 1 on policy: the loss is -mean(A) = 0
    "gspo_token": [0.0, 0.0, 0.0],
    "lite_ppo": [-0.311387, -0.231312, 0.0],
    "ngrpo": [-0.109391, -0.135298, 0.116408],
    "reg_grpo": [0.666349, 0.333256, 0.666418],
    "sapo": [-0.035639, -0.033186, -0.035639],
    "tw_grpo": [-0.649965, -0.346338, 0.0],
    # on policy (one inner epoch) the CISPO/VESPO weights are 1: the value is −mean(A·logp)
    "cispo": [0.620901, 0.187007, 0.086811],
    "cispo_trl": [0.620901, 0.187007, 0.086811],
    "vespo": [0.620901, 0.187007, 0.086811],
    # ratio 1: no covariance candidate in 1 < Cov < 5 here, and |x| = 0: dapo's values (clip_cov:
    # its pick draws from the run's generator, so the next rollouts differ from step 2 on)
    "clip_cov": [-0.388391, -0.036078, 0.0],  # the pick draws from the run's generator
    "kl_cov": [-0.388391, -0.212113, 0.0],
    # token-weighted whitening (REINFORCE++) and OPO's length-weighted baseline make Σ_t A = 0
    # over the batch's tokens, so at ratio 1 the token-mean loss value is exactly 0 (the
    # gradient is not: the parameters still move)
    "reinforce_pp": [0.0, 0.0, 0.0],
    "reinforce_pp_baseline": [0.0, 0.0, 0.0],
    "opo": [0.0, 0.0, 0.0],
    "remax": [-0.227273, 0.678571, 0.5625],
    "passk": [-0.650732, -0.330874, -0.218189],
    "gdpo": [-0.43429, -0.237162, 0.0],
    "gpg": [0.622907, 0.321873, -0.003004],
    # issue 18: on policy the rank-shaped advantages are zero-mean per group (loss value 0, the
    # gradient is not); RiskPO's advantages are <= 0 (it pushes the lower tail down); DRPO on
    # 0/1 rewards (answer_reward), whole groups per call
    "unlikeliness": [0.0, 0.0, 0.0],
    # steps 2-3: the "mix" of the PolicyLoss's tracked quantiles (step 1: batch quantiles)
    "riskpo": [0.799573, 0.346293, 0.159038],
    "drpo": [5.885662, 5.852489, 11.629841],
    "grpo+kl_full": [-0.055978, -0.039395, -0.028661],
    "grpo+kl_lora": [-0.004699, -0.001951, -0.004127],
}


def letter_reward(samples, prompts, metadata):
    """Dense and deterministic: 1 per 'A', 0.5 per 'B' -> [B]."""
    return torch.tensor([s.count("A") + 0.5 * s.count("B") for s in samples])


def answer_reward(samples, prompts, metadata):
    """Binary: 1 when the answer holds an 'A' -> [B]."""
    return torch.tensor([float("A" in s) for s in samples])


@pytest.mark.parametrize("case", CASES)
def test_three_steps_change_the_parameters_and_match_pinned_losses(case, tiny_vl_dir, vt_batch):
    preset, _, extra = case.partition("+")
    overrides = {"beta": 0.04} if extra else {}
    if PRESETS[preset].aggregation == "fixed_norm":
        overrides["max_len"] = 3  # the job fills it from video.max_new_tokens
    finetune = "lora" if extra == "kl_lora" else "full"
    loss_fn = PolicyLoss(preset, **overrides)
    pol = make_policy(tiny_vl_dir, finetune=finetune, max_new_tokens=3,
                      allowed_answers=["A", "B", "C", "D"], tw_alpha=loss_fn.spec.tw_alpha)
    if loss_fn.spec.needs_ref:
        pol.enable_reference()
    params = [p for p in pol.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    prompts, meta = vt_batch
    binary = PRESETS[preset].binary_rewards  # DRPO reads 0/1 rewards, whole groups per call
    settings = LoopSettings(group_size=3, inner_epochs=2 if preset == "grpo" else 1,
                            micro_batch_size=3 if binary else 4)
    reward = answer_reward if binary else letter_reward
    losses = []
    for _ in range(3):
        m = train_step(pol, opt, loss_fn, reward, prompts, meta, settings, gen)
        assert m["skipped_updates"] == 0.0 and torch.isfinite(torch.tensor(m["loss"]))
        losses.append(round(m["loss"], 6))
    moved = sum(float((p.detach() - b).abs().max()) for p, b in zip(params, before))
    assert moved > 0
    if loss_fn.spec.needs_ref:
        assert "kl_ref" in m
    print(f"PINNED {case!r}: {losses}")
    assert case in PINNED, f"no pinned losses for {case}: record {losses}"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(PINNED[case]), atol=2e-5,
                               rtol=1e-4)
