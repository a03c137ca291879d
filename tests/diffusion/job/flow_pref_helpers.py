"""The tiny flow policies and pair rollouts of the Diffusion-DPO tests (uniquely named helper
module, shared by test_preference.py and test_preference_loss.py)."""
from __future__ import annotations

import torch

from mmrl.diffusion.config import DiffusionConfig
from mmrl.diffusion.policy import DiffusionGroupPolicy
from mmrl.train.rollout import Rollout

PROMPTS = ["a red cat", "a blue dog", "a green frog"]
FAMILIES = {  # family: (tiny pipeline fixture, image side, adapter kwargs)
    "sd3": ("tiny_sd3_dir", 8, {"guidance_scale": 4.5, "max_sequence_length": 8}),
    "flux": ("tiny_flux_dir", 16, {"guidance_scale": 3.5, "max_sequence_length": 16}),
}
BETA = 100.0  # flow_grpo config/dpo.py


def make_policy(request, family, finetune="lora", move=True, **section):
    """A policy over the family's tiny pipeline; LoRA B (or the full weights) moved off the
    base so the policy differs from its reference."""
    from mmrl.diffusion.models import adapter_class
    fixture, size, kwargs = FAMILIES[family]
    torch.manual_seed(0)  # the LoRA A init draws from the global RNG
    flow = adapter_class(family).from_pretrained(
        request.getfixturevalue(fixture), height=size, width=size, finetune=finetune,
        lora_rank=4, lora_alpha=8, **kwargs)
    if move:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in flow.transformer.named_parameters():
                if p.requires_grad and ("lora_B" in name or finetune == "full"):
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    c = DiffusionConfig(model="tiny", height=size, width=size, num_steps=3, eval_num_steps=3,
                        guidance_scale=kwargs["guidance_scale"], **section)
    return DiffusionGroupPolicy(flow, c)


def pair_rollout_of(policy, P=3, seed=5):
    """A pair rollout over random clean latents (rows 0..P−1 chosen, P..2P−1 rejected)."""
    x0 = torch.randn((2 * P, *policy.latent), generator=torch.Generator().manual_seed(seed))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(P)] * 2
    rollout = Rollout([None] * 2 * P, prompts, [{}] * 2 * P, torch.arange(P).repeat(2),
                      torch.ones(2 * P, 1, dtype=torch.bool), {"x0": x0})
    return rollout, torch.arange(P), torch.arange(P, 2 * P)
