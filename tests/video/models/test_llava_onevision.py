"""LLaVA-OneVision (SigLIP + Qwen2, 1-D positions) behind the VLM adapter interface, on a tiny
model built offline (video/models/llava_onevision/tiny.py) and loaded by path.

The inherited conformance suite (tests/video/models/vlm_conformance.py), then what is specific
to the family: the video token count (4 per frame + the newline), string contents rendered by a
list-only chat template, log-probs of left-padded video prompts and of an anyres (3-tile) image
prompt equal to transformers' own ``LlavaOnevisionForConditionalGeneration`` forward on each
unpadded sequence, what ``freeze_vision`` and LoRA touch, and the job's ``tiny_llava_ov``
model name."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from vlm_conformance import VLMAdapterConformance  # noqa: E402

from mmrl.video.models.llava_onevision.adapter import LlavaOneVisionAdapter  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
VIDEO = {"mode": "uniform", "fps": 4.0, "max_frames": 4}


class TestLlavaOnevision(VLMAdapterConformance):
    """The inherited conformance suite (tests/video/models/vlm_conformance.py)."""

    adapter = LlavaOneVisionAdapter()
    model_type = "llava_onevision"


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from mmrl.video.models.llava_onevision.tiny import build_tiny_llava_onevision
    return build_tiny_llava_onevision(str(tmp_path_factory.mktemp("tiny_llava_ov")), seed=0)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Two moving-square mp4s (8 frames of 56×56 at 8 fps)."""
    from mmrl.video.synthetic import write_mp4
    from mmrl.video.synthetic_task import moving_square
    folder = tmp_path_factory.mktemp("llava_videos")
    return [write_mp4(folder / f"{d}.mp4", moving_square(d, c), fps=8.0)
            for d, c in (("left", "red"), ("up", "blue"))]


def _video_messages(path, text="Which way does the square move?", **item):
    return [{"role": "system", "content": "Answer with a letter."},
            {"role": "user", "content": [{"type": "video", "video": path, **item},
                                         {"type": "text", "text": text}]}]


def _policy(path, **kw):
    from mmrl.video.policy import VLMPolicy, load_vlm
    torch.manual_seed(0)
    model, processor = load_vlm(path, finetune="full", freeze_vision=True)
    return VLMPolicy(model, processor, max_new_tokens=kw.pop("max_new_tokens", 4),
                     video=VIDEO, **kw)


def _model_logp(policy, inputs, response):
    """transformers' own forward on the unpadded prompt + response -> the response tokens'
    log-probs, with the policy's banned (vision placeholder) ids masked out as it does."""
    ids = torch.cat([inputs["input_ids"], response[None]], 1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = policy.base(input_ids=ids, **extra).logits[0].float()
    logits[:, policy.banned] = float("-inf")
    n = inputs["input_ids"].shape[1]
    lp = torch.log_softmax(logits[n - 1:-1], -1)
    return lp.gather(-1, response[:, None])[:, 0]


def test_video_is_four_tokens_per_frame_plus_newline_and_string_contents_render(llava_dir,
                                                                              videos):
    from transformers import AutoProcessor

    from mmrl.video.models import adapter_for
    ad = adapter_for("llava_onevision")
    proc = AutoProcessor.from_pretrained(llava_dir)
    vid = proc.tokenizer.convert_tokens_to_ids("<video>")
    for frames in (2, 4):
        out = ad.encode(_video_messages(videos[0], max_frames=frames), proc, VIDEO)
        assert out["pixel_values_videos"].shape == (1, frames, 3, 56, 56)
        assert int((out["input_ids"] == vid).sum()) == 4 * frames + 1
    text = proc.tokenizer.decode(out["input_ids"][0])
    # the release's template renders list contents only: the system string became a text item
    assert text == ("<|im_start|>system \nAnswer with a letter.<|im_end|>\n<|im_start|>user "
                    + "<video>" * (4 * 4 + 1) + "\nWhich way does the square move?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert ad.end_token_ids(proc.tokenizer) == sorted(
        proc.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    with pytest.warns(UserWarning, match="slow_fast.*does not apply to LLaVA-OneVision"):
        ad.encode(_video_messages(videos[0]), proc, {**VIDEO, "mode": "slow_fast"})


def test_left_padded_video_logp_equals_transformers_forward(llava_dir, videos):
    """Two prompts of 2 and 4 frames (different lengths: the shorter is left-padded), 2 samples
    each: every row's log-probs (training forward and sampling's KV cache) equal the model's
    own forward on that row's unpadded sequence."""
    policy = _policy(llava_dir)
    convs = [_video_messages(videos[0], max_frames=2), _video_messages(videos[1])]
    with torch.no_grad():
        roll = policy.rollout(["a", "b"], [{"messages": c} for c in convs], 2,
                              torch.Generator().manual_seed(0))
    cache = roll.data["prompt_cache"]
    assert cache.attn[0].sum() < cache.attn[1].sum() == cache.attn.shape[1]  # row 0 padded
    T = roll.mask.shape[1]
    logp = policy.logp(roll, torch.arange(4), 0, T).detach()
    torch.testing.assert_close(logp[roll.mask], roll.rollout_logp[roll.mask],
                               atol=1e-5, rtol=0)
    for row in range(4):
        inputs = policy.adapter.encode(convs[int(roll.group_ids[row])], policy.processor, VIDEO)
        n = int(roll.mask[row].sum())
        want = _model_logp(policy, inputs, roll.data["response"][row, :n])
        torch.testing.assert_close(logp[row, :n], want, atol=1e-5, rtol=0)


def test_anyres_image_prompt_logp_equals_transformers_forward(llava_dir, tmp_path):
    from PIL import Image
    img = np.random.default_rng(0).integers(0, 255, (40, 90, 3), dtype=np.uint8)
    path = str(tmp_path / "wide.png")
    Image.fromarray(img).save(path)
    policy = _policy(llava_dir)
    conv = [{"role": "user", "content": [{"type": "image", "image": path},
                                         {"type": "text", "text": "What colour?"}]}]
    with torch.no_grad():
        roll = policy.rollout(["q"], [{"messages": conv}], 2, torch.Generator().manual_seed(1))
    inputs = policy.adapter.encode(conv, policy.processor, VIDEO)
    # anyres: a 2-tile grid (wide image), the base tile's 16 tokens + the unpadded grid rows
    assert inputs["pixel_values"].shape[:2] == (1, 3)
    img_id = policy.processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == img_id).sum()) == 52
    # the same pixels as an array (the difficulty augmenter's noised copy): the same inputs
    pixels = [{**conv[0], "content": [{"type": "image", "image": img}, conv[0]["content"][1]]}]
    same = policy.adapter.encode(pixels, policy.processor, VIDEO)
    assert all(torch.equal(same[k], inputs[k]) for k in inputs)
    logp = policy.logp(roll, torch.arange(2), 0, roll.mask.shape[1]).detach()
    for row in range(2):
        n = int(roll.mask[row].sum())
        want = _model_logp(policy, inputs, roll.data["response"][row, :n])
        torch.testing.assert_close(logp[row, :n], want, atol=1e-5, rtol=0)


def test_freeze_vision_freezes_tower_projector_and_newline_and_lora_is_text_only(llava_dir):
    from mmrl.video.policy import load_vlm
    model, _ = load_vlm(llava_dir, finetune="full", freeze_vision=True)
    inner = model.model
    frozen = [*inner.vision_tower.parameters(), *inner.multi_modal_projector.parameters(),
              inner.image_newline]
    assert not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in inner.language_model.parameters())
    assert model.lm_head.weight.requires_grad
    lora, _ = load_vlm(llava_dir, finetune="lora", lora_rank=2, lora_alpha=4)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 2 * 4  # 2 layers × (A, B) × 4 projections
    assert all(".language_model." in n and ".lora_" in n for n in names)


def test_job_model_name_builds_the_tiny_llava_ov_trains_and_exports_it(tmp_path):
    """``video.model: tiny_llava_ov`` (the registry's tiny name; the 3-step job on a
    model folder is the conformance suite's): built in its folder, trained, exported."""
    from transformers import AutoModelForImageTextToText

    from mmrl.cli.app import main
    out = tmp_path / "run"
    rc = main(["train", os.path.join(ROOT, "configs/demo/video_tiny_llava_ov.yaml"),
               "train.steps=2", "train.prompts_per_step=2", "train.group_size=4",
               "train.log_every=1", "train.progress=false", f"train.output_dir={out}",
               "video.synthetic_num=2"])
    assert rc == 0
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["samples"] for m in metrics] == [8, 8]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    # both folders through the library's own loader: the built tiny model, the export
    start = AutoModelForImageTextToText.from_pretrained(out / "tiny_llava_ov")
    model = AutoModelForImageTextToText.from_pretrained(out / "hf")
    assert start.config.model_type == model.config.model_type == "llava_onevision"
    before, after = start.state_dict(), model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # the demo trains everything (finetune full, freeze_vision false): text and vision move
    assert any(".language_model." in k for k in changed)
    assert any(".vision_tower." in k for k in changed)
    with open(out / "hf" / "mmrl_export.json") as f:
        assert json.load(f)["kind"] == "llava_onevision"
