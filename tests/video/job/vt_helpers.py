"""Helpers for tests/video_train (a uniquely named module: no clash with other test folders)."""
from __future__ import annotations

import torch

VIDEO = dict(mode="slow_fast", fps=4.0, max_frames=8, token_budget=64, min_tokens=4,
             max_tokens=16)


def make_policy(path, finetune="full", **kw):
    from mmrl.video.policy import QwenVLPolicy, load_qwen_vl
    torch.manual_seed(0)
    model, proc = load_qwen_vl(path, finetune=finetune, lora_rank=4, lora_alpha=8,
                               freeze_vision=kw.pop("freeze_vision", True))
    opts = dict(max_new_tokens=4, video=VIDEO)
    opts.update(kw)
    return QwenVLPolicy(model, proc, **opts)


def rollout(policy, batch, group=3, seed=0):
    prompts, meta = batch
    with torch.no_grad():
        return policy.rollout(prompts, meta, group, torch.Generator().manual_seed(seed))
