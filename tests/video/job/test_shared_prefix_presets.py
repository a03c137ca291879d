"""Shared-prefix training equals the unshared computation for every preset (issue 14).

One tiny Qwen2.5-VL in float64 (:func:`exact_float64`), one rollout of a video and an image
prompt with G = 3, fixed rewards; then one :func:`mmrl.train.loop.learn` per preset with
``video.shared_prefix`` on and off on the same rollout: micro-batches of 4 rows (in the loop's
order, so one mixes the two prompts and packs fewer rows for one of them) and of 2 tokens (the
loop's ``t_chunk``), an optimizer with lr 0 and no clipping, so the gradients left on the
parameters are the update's (the case ``+two_epochs`` also scores the old log-probs by the
micro-batched no-grad pass). Every parameter's gradient and every metric must agree to 1e-12
relative: the two paths differ only in float64 summation order. The presets get what the video
job gives them: a reference (beta > 0), TW weights, entropies, the sampler's log-probs
(rollout_is), ReMax's greedy baseline, fixed_norm's max_len. File time: ~16 s CPU on one thread
(7 s of it imports, the tiny model and two policies).
Full fine-tuning runs every case; LoRA the cases whose policy passes differ (LORA_CASES).

Also: sampling with the shared prefix (prefill once, KV cache expanded) draws the same tokens as
the unshared sampler, and gradient checkpointing with the shared prefix equals the unshared path
without it (full and LoRA).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from float64 import exact_float64  # noqa: E402

from mmrl.algo.losses import PolicyLoss  # noqa: E402
from mmrl.algo.presets import PRESETS  # noqa: E402
from mmrl.train.batch import greedy_baseline  # noqa: E402
from mmrl.train.loop import LoopSettings, learn  # noqa: E402
from mmrl.train.reward_fn import RewardBatch  # noqa: E402

VIDEO = dict(mode="slow_fast", fps=4.0, max_frames=2, token_budget=8, min_tokens=4,
             max_tokens=4)  # a 106-token video prompt: the vision tower is float64 too
# case "preset+extra": the extra's algorithm overrides and loop settings
EXTRA = {"": ({}, {}),
         # a reference (frozen copy / LoRA disabled), the entropy bonus and the sampler's logp
         "kl_entropy_is": (dict(beta=0.04, entropy_coef=0.01, rollout_is="token_mask"), {}),
         "top_entropy": (dict(top_entropy_quantile=0.5), {}),  # start-of-update entropies
         "seq_is": (dict(rollout_is="sequence_truncate"), {}),
         "two_epochs": ({}, dict(inner_epochs=2))}  # old log-probs scored micro-batched
# every preset a token policy can run (GRPO-Guard reads a denoising step's mean: flow only)
CASES = [p for p in sorted(PRESETS) if not PRESETS[p].needs_step_terms] + [
    "grpo+kl_entropy_is", "grpo+two_epochs", "dapo+top_entropy", "gspo+seq_is"]
# LoRA: the cases whose policy passes differ (the adapter-disabled reference, entropies, TW
# weights); the other presets differ only in what the loss does with the same log-probs
LORA_CASES = ["grpo+kl_entropy_is", "tw_grpo", "dapo+top_entropy"]
REWARDS = [1.0, 0.0, 0.5, 0.25, 1.0, 0.0]  # rows: video prompt x 3, image prompt x 3
RTOL = 1e-12


def _length_reward(samples, prompts, metadata):
    """ReMax's greedy completions: a reward that depends on the text."""
    return torch.tensor([float(len(s) % 3) / 2 for s in samples])


def _conversations(tmp):
    from PIL import Image

    from mmrl.video.data import build_messages, load_vl_dataset
    from mmrl.video.synthetic_task import write_synthetic_task
    record = list(load_vl_dataset(write_synthetic_task(tmp, 2, seed=0)))[0]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8))
    image = [{"role": "user", "content": [{"type": "image", "image": img},
                                          {"type": "text", "text": "What is it?"}]}]
    return [build_messages(record, "plain"), image]


def _policy(path, finetune, gradient_checkpointing=False):
    from mmrl.video.policy import VLMPolicy, load_vlm
    torch.manual_seed(0)
    model, proc = load_vlm(path, finetune=finetune, lora_rank=4, lora_alpha=8,
                           gradient_checkpointing=gradient_checkpointing)
    assert exact_float64(model) > 0
    if finetune == "lora":  # LoRA's B starts at 0: move it so the adapter's path is tested
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator()
                                               .manual_seed(len(n)), dtype=p.dtype))
    pol = VLMPolicy(model, proc, max_new_tokens=4, video=VIDEO)
    pol.enable_reference()  # full: a frozen (float64, patched) copy; LoRA: adapter disabled
    return pol


@pytest.fixture(scope="module")
def setup(tiny_vl_dir, tmp_path_factory):
    """``{finetune: policy}``, the rollout (sampled unshared), rewards, ReMax's baseline and
    the prompts' metadata."""
    convs = _conversations(str(tmp_path_factory.mktemp("sp_task")))
    meta = [{"messages": c} for c in convs]
    pols = {f: _policy(tiny_vl_dir, f) for f in ("full", "lora")}
    pol = pols["full"]
    pol.shared_prefix = False
    with torch.no_grad():
        ro = pol.rollout(["video", "image"], meta, 3, torch.Generator().manual_seed(0))
    assert len(ro) == 6 and ro.mask.shape[1] == 4 and int(ro.mask.sum()) >= 12
    rewards = RewardBatch(torch.tensor(REWARDS)[:, None], ["acc"], torch.ones(6, dtype=torch.bool))
    groups = {0: ("video", meta[0]), 1: ("image", meta[1])}
    baseline = greedy_baseline(pol, _length_reward, ro, groups, torch.Generator())
    return pols, ro, rewards, baseline, meta


def test_shared_prefix_sampling_equals_the_unshared_sampler(setup):
    """The same generator gives the same tokens, masks and sampler log-probs whether each
    prompt is prefilled once (its KV cache expanded to the rows) or once per row; the greedy
    rollout too."""
    pols, ro, _, _, meta = setup
    pol = pols["full"]
    out = {}
    for shared in (True, False):
        pol.shared_prefix = shared
        with torch.no_grad():
            out[shared] = (pol.rollout(["video", "image"], meta, 3,
                                       torch.Generator().manual_seed(0)),
                           pol.greedy_rollout(["video", "image"], meta, None))
    for a, b in zip(out[True], out[False]):
        assert torch.equal(a.data["response"], b.data["response"])
        assert torch.equal(a.mask, b.mask) and a.samples == b.samples
        torch.testing.assert_close(a.rollout_logp, b.rollout_logp, rtol=RTOL, atol=1e-12)
    assert torch.equal(out[False][0].data["response"], ro.data["response"])


def _learn(pol, case, ro, rewards, baseline, shared: bool):
    """(gradients, metrics) of one learn call on the rollout; lr 0 leaves the weights."""
    preset, _, extra = case.partition("+")
    overrides, loop = EXTRA[extra]
    overrides = dict(overrides)
    if PRESETS[preset].aggregation == "fixed_norm":
        overrides["max_len"] = 4  # the job fills it from video.max_new_tokens
    loss_fn = PolicyLoss(preset, **overrides)
    pol.shared_prefix, pol.tw_alpha = shared, loss_fn.spec.tw_alpha
    params = [p for p in pol.parameters() if p.requires_grad]
    s = LoopSettings(**{**dict(group_size=3, micro_batch_size=4, t_chunk=2, max_grad_norm=0.0),
                        **loop})
    m = learn(pol, torch.optim.SGD(params, lr=0.0), loss_fn, ro, rewards, s,
              torch.Generator().manual_seed(0),
              baseline=baseline if loss_fn.spec.needs_baseline else None)
    assert m["skipped_updates"] == 0.0
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
             for p in params]
    for p in params:
        p.grad = None
    return grads, {k: v for k, v in m.items() if isinstance(v, float)}


def _assert_equal_grads(shared, unshared):
    assert len(shared) == len(unshared) > 0
    total = sum(float(g.norm()) ** 2 for g in unshared) ** 0.5
    assert total > 1e-6  # a gradient of zero would prove nothing
    worst = max(float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30 * total)
                for a, b in zip(shared, unshared) if float(b.abs().max()) > 0)
    assert worst < RTOL, f"max relative gradient difference {worst:.3g}"
    for a, b in zip(shared, unshared):  # parameters without gradient: none in either path
        assert float(b.abs().max()) > 0 or float(a.abs().max()) == 0


@pytest.mark.parametrize("case,finetune", [(c, "full") for c in CASES]
                         + [(c, "lora") for c in LORA_CASES])
def test_shared_prefix_gradients_and_metrics_equal_the_unshared_path(case, finetune, setup):
    pols, ro, rewards, baseline, _ = setup
    pol = pols[finetune]
    g_sh, m_sh = _learn(pol, case, ro, rewards, baseline, shared=True)
    g_un, m_un = _learn(pol, case, ro, rewards, baseline, shared=False)
    _assert_equal_grads(g_sh, g_un)
    assert m_sh.keys() == m_un.keys() and "loss" in m_sh
    for k in m_un:
        assert m_sh[k] == pytest.approx(m_un[k], rel=RTOL, abs=1e-12, nan_ok=True), k


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_gradient_checkpointing_with_shared_prefix_equals_unshared_without(finetune, setup,
                                                                           tiny_vl_dir):
    """``load_vlm(gradient_checkpointing=True)`` + shared prefix: the decoder layers really
    recompute (an MLP starts twice per micro-batch: a pre-hook, since the recompute stops
    once the saved tensors are rebuilt) and the result is the unshared, uncheckpointed
    one (reference, entropy and rollout correction included)."""
    pols, ro, rewards, baseline, _ = setup
    ckpt = _policy(tiny_vl_dir, finetune, gradient_checkpointing=True)
    mlp = ckpt.adapter.decoder_layers(ckpt.base)[0].mlp
    calls = []
    hook = mlp.register_forward_pre_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    g_ck, m_ck = _learn(ckpt, "grpo+kl_entropy_is", ro, rewards, baseline, shared=True)
    hook.remove()
    g_un, m_un = _learn(pols[finetune], "grpo+kl_entropy_is", ro, rewards, baseline,
                        shared=False)
    # 4 micro-batches (2 row x 2 T chunks): forward, then the recompute in the backward pass
    # (LoRA's reference passes run the same layers without gradient: not counted)
    assert sum(calls) == 8
    _assert_equal_grads(g_ck, g_un)
    assert m_ck.keys() == m_un.keys()
    for k in m_un:
        assert m_ck[k] == pytest.approx(m_un[k], rel=RTOL, abs=1e-12, nan_ok=True), k
