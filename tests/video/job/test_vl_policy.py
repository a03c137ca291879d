"""QwenVLPolicy on the tiny Qwen2.5-VL loaded by path: logp parity, masks, reference, TW."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from vt_helpers import make_policy, rollout  # noqa: E402

from mmrl.algo.token_weights import tw_token_weights  # noqa: E402


def test_recomputed_logp_equals_the_rollouts_and_ratio_is_exactly_one(tiny_vl_dir, vt_batch):
    from mmrl.train.loop import LoopSettings, learn
    from mmrl.algo.losses import PolicyLoss
    from mmrl.train.reward_fn import RewardBatch
    pol = make_policy(tiny_vl_dir)
    ro = rollout(pol, vt_batch)
    assert len(ro) == 6 and ro.data["prompt_cache"].ids.shape[0] == 2  # one copy per prompt
    with torch.no_grad():
        lp = pol.logp(ro, torch.arange(len(ro)), 0, ro.mask.shape[1])
    diff = (lp - ro.rollout_logp).abs()[ro.mask]
    assert float(diff.max()) < 1e-5
    # chunked along T and split along rows: the same numbers
    with torch.no_grad():
        parts = torch.cat([torch.cat([pol.logp(ro, torch.arange(a, a + 2), t, t + 1)
                                      for t in range(ro.mask.shape[1])], 1)
                           for a in (0, 2, 4)])
    torch.testing.assert_close(parts, lp, atol=1e-5, rtol=0)
    loss_fn = PolicyLoss("grpo")
    rewards = RewardBatch(torch.tensor([[1.0], [0.0], [0.5], [0.0], [1.0], [1.0]]), ["acc"],
                          torch.ones(6, dtype=torch.bool))
    opt = torch.optim.SGD([p for p in pol.parameters() if p.requires_grad], lr=0.0)
    m = learn(pol, opt, loss_fn, ro, rewards, LoopSettings(group_size=3), torch.Generator())
    assert m["ratio_min"] == 1.0 and m["ratio_max"] == 1.0


def test_masks_end_at_the_first_end_token_and_stop_string(tiny_vl_dir, vt_batch):
    pol = make_policy(tiny_vl_dir, max_new_tokens=6, stop=["B"])
    ro = rollout(pol, vt_batch, group=4, seed=1)
    ends = torch.tensor(pol.eos)
    for toks, mask, text in zip(ro.data["response"], ro.mask, ro.samples):
        n = int(mask.sum())
        assert bool(mask[:n].all()) and not bool(mask[n:].any())  # a prefix
        kept = toks[:n]
        assert int(torch.isin(kept, ends).sum()) <= 1  # at most the one end token, last
        if torch.isin(kept, ends).any():
            assert bool(torch.isin(kept[-1:], ends).all())
        assert text.count("B") <= 1 and ("B" not in text or text.endswith("B"))
        if n < len(toks):  # ended early: by an end token or the stop string
            assert torch.isin(kept[-1:], ends).any() or text.endswith("B")
    assert [m["completion_length"] for m in ro.metadata] == ro.mask.sum(1).tolist()


def test_left_padding_changes_nothing(tiny_vl_dir, vt_batch):
    """A row's logp is the same in a batch with a longer prompt (padding masked out)."""
    pol = make_policy(tiny_vl_dir)
    prompts, meta = vt_batch
    long_meta = [dict(meta[0]), meta[1]]
    msgs = [dict(m) for m in meta[0]["messages"]]
    msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"][:-1] + [
        {"type": "text", "text": msgs[-1]["content"][-1]["text"] + " Think carefully!!"}]}
    long_meta[0]["messages"] = msgs
    ro_pair = rollout(pol, (prompts, long_meta), group=2)
    ro_one = rollout(pol, ([prompts[1]], [meta[1]]), group=2)
    assert ro_pair.data["prompt_cache"].ids.shape[1] > ro_one.data["prompt_cache"].ids.shape[1]
    ro_one.data["response"] = ro_pair.data["response"][2:4].clone()
    ro_one.mask = ro_pair.mask[2:4].clone()
    with torch.no_grad():
        a = pol.logp(ro_pair, torch.tensor([2, 3]), 0, 4)
        b = pol.logp(ro_one, torch.tensor([0, 1]), 0, 4)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_lora_reference_equals_the_base_model(tiny_vl_dir, vt_batch):
    pol = make_policy(tiny_vl_dir, finetune="lora")
    base = make_policy(tiny_vl_dir, finetune="full")
    ro = rollout(pol, vt_batch)
    rows = torch.arange(len(ro))
    with torch.no_grad():
        for p in pol.model.parameters():  # move the adapter away from its zero init
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
        ref, cur = pol.ref_logp(ro, rows, 0, 4), pol.logp(ro, rows, 0, 4)
        torch.testing.assert_close(ref, base.logp(ro, rows, 0, 4), atol=1e-5, rtol=0)
    assert float((cur - ref).abs().max()) > 1e-3
    trainable = {n for n, p in pol.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "visual" not in n for n in trainable)
    assert set(pol.state_dict()) and all("lora_" in k for k in pol.state_dict())


def test_tw_weights_match_the_full_vocabulary_reference(tiny_vl_dir, vt_batch):
    pol = make_policy(tiny_vl_dir, max_new_tokens=5, tw_chunk=2)
    ro = rollout(pol, vt_batch, group=3, seed=2)
    got = pol.token_weights(ro)
    model = pol.model
    for g in range(2):
        rows = (ro.group_ids == g).nonzero().flatten()
        cache, T = ro.data["prompt_cache"], ro.mask.shape[1]
        u = int(ro.data["prompt_index"][rows[0]])
        v = cache.vision[u]
        P = cache.ids.shape[1]
        ids = torch.cat([cache.ids[[u] * len(rows)], ro.data["response"][rows]], 1)
        attn = torch.cat([cache.attn[[u] * len(rows)],
                          torch.ones(len(rows), T, dtype=torch.long)], 1)
        pos = torch.cat([cache.pos[:, [u] * len(rows)],
                         (cache.next_pos[u] + torch.arange(T)).expand(3, len(rows), -1)], 2)
        with torch.no_grad():  # the plain HF forward, vision copied per row: the oracle
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos,
                           pixel_values_videos=torch.cat([v["pixel_values_videos"]] * len(rows)),
                           video_grid_thw=torch.cat([v["video_grid_thw"]] * len(rows))).logits
        logits = logits[:, P - 1:P - 1 + T].float()
        logits[..., pol.banned] = float("-inf")  # vision placeholders are never sampled
        keep = torch.ones(logits.shape[-1], dtype=torch.bool)
        keep[pol.banned] = False
        full = torch.log_softmax(logits, -1)[..., keep]  # [N, T, V - 4]
        want = tw_token_weights(full, ro.mask[rows], alpha=pol.tw_alpha)
        torch.testing.assert_close(got[rows], want, atol=1e-4, rtol=0)
    assert float(got.max()) > 1.0 and bool((got[~ro.mask] == 1.0).all())


def test_a_bad_video_is_skipped_and_counted(tiny_vl_dir, vt_batch, tmp_path):
    prompts, meta = vt_batch
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    broken = dict(meta[0])
    msgs = [dict(m) for m in meta[0]["messages"]]
    msgs[-1] = {**msgs[-1], "content": [{**msgs[-1]["content"][0], "video": str(bad)}] +
                msgs[-1]["content"][1:]}
    broken["messages"] = msgs
    pol = make_policy(tiny_vl_dir)
    ro = rollout(pol, (prompts, [broken, meta[1]]), group=2)
    assert ro.group_ids.tolist() == [1, 1] and pol.skips.total == 1
    assert "1 skipped" in pol.skips.summary()


def test_image_and_video_prompts_mix_and_checkpointing_keeps_gradients(tiny_vl_dir, vt_batch):
    import numpy as np
    from PIL import Image

    from mmrl.video.policy import QwenVLPolicy, load_qwen_vl
    from vt_helpers import VIDEO
    prompts, meta = vt_batch
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8))
    image_meta = {"messages": [{"role": "user", "content": [
        {"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]}]}
    batch = ([prompts[0], "What is it?"], [meta[0], image_meta])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model, proc = load_qwen_vl(tiny_vl_dir, finetune="full", gradient_checkpointing=ckpt)
        pol = QwenVLPolicy(model, proc, max_new_tokens=3, video=VIDEO)
        assert model.training and model.model.language_model.gradient_checkpointing == ckpt
        ro = rollout(pol, batch, group=2)
        assert "pixel_values" in ro.data["prompt_cache"].vision[1]
        lp = pol.logp(ro, torch.arange(4), 0, 3)
        assert float((lp - ro.rollout_logp).abs()[ro.mask].max()) < 1e-5
        (lp * ro.mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()
                                if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_top_p_keeps_the_smallest_head_reaching_p(tiny_vl_dir):
    # probabilities 0.35, 0.4, 0.25 and top_p 0.5: the head {0.4, 0.35} is the smallest with
    # mass >= 0.5, so token 0 is drawn (0.35 / 0.75 ≈ 47 % of the time) and token 2 never
    policy = make_policy(tiny_vl_dir, top_p=0.5)
    logp = torch.tensor([[0.35, 0.4, 0.25]]).log().expand(400, 3)  # sorted order differs
    draws = policy._sample(logp, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=3).tolist()
    assert counts[2] == 0 and 140 < counts[0] < 260 and counts[0] + counts[1] == 400


def test_temperature_divides_the_logits(tiny_vl_dir):
    # log-prob differences are logit differences / T (tokens 0 and 1 are plain text ids)
    policy = make_policy(tiny_vl_dir, temperature=2.0)
    vocab = policy.model.get_output_embeddings().out_features
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    lp = policy._logprobs(lambda h: h, logits)  # identity head: hidden states are the logits
    torch.testing.assert_close(lp[:, 0] - lp[:, 1], (logits[:, 0] - logits[:, 1]) / 2.0)


def test_the_first_end_token_is_inside_the_mask(tiny_vl_dir, vt_batch):
    # decoding restricted to "A" and the end tokens: most rows end early, and the end token
    # itself is trained on (mask length = its index + 1), nothing after it
    pol = make_policy(tiny_vl_dir, max_new_tokens=6, allowed_answers=["A"])
    ro = rollout(pol, vt_batch, group=4, seed=0)
    ends, early = torch.tensor(pol.eos), 0
    for toks, mask in zip(ro.data["response"], ro.mask):
        hit = torch.isin(toks, ends).nonzero().flatten()
        want = int(hit[0]) + 1 if hit.numel() else toks.shape[0]
        assert mask.tolist() == [True] * want + [False] * (toks.shape[0] - want)
        early += hit.numel() > 0
    assert early >= 4
