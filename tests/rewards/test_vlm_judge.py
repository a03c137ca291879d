"""VLM judges (mmrl.rewards.vlm_judge) on tiny Qwen2-VL, Qwen3-VL and LLaVA-OneVision checkpoints
built by mmrl.video's tiny builders and loaded by path: the score equals a softmax written here
over the model's own full forward logits, a batch equals one-by-one, both orders are symmetric,
and the templates equal their sources (length + SHA-256 from REWARDS-VLM.md)."""
from __future__ import annotations

import functools
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

import mmrl.rewards as R
from mmrl.rewards.base import WeightsNotFoundError
from mmrl.rewards.judge_templates import TEMPLATES
from mmrl.rewards.vlm_judge import (VLMJudge, VLMPairJudge, VLMVideoPairJudge,
                                    pair_frame_indices)

FAMILIES = ("qwen2_vl", "qwen3_vl", "llava_onevision")
PROMPTS = ["a red cat", "two dogs on a beach", "an apple"]
# Short custom templates keep the byte-level tiny queries short (the built-in texts are 0.7k-3.7k
# byte tokens); the built-ins' wiring (prefix, answer classes) is checked without a forward, and
# forward-checked once for the two that read digits (C, D).
ASK = "Is this {prompt}? y/n"
WHICH = "Which fits {prompt}?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> folder of a saved tiny checkpoint (built once per module)."""
    from mmrl.video.models.llava_onevision.tiny import build_tiny_llava_onevision
    from mmrl.video.models.qwen_vl.tiny import build_tiny
    root = tmp_path_factory.mktemp("judges")
    out = {f: build_tiny(str(root / f), f) for f in ("qwen2_vl", "qwen3_vl")}
    out["llava_onevision"] = build_tiny_llava_onevision(str(root / "llava_onevision"))
    return out


def images(n, seed=0, sizes=((56, 56), (84, 28), (56, 70))):
    """n random RGB images of different sizes (so a batch needs padding)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (sizes[i % 3][1], sizes[i % 3][0], 3),
                                         dtype=np.uint8)) for i in range(n)]


def manual_next_token_probs(path, imgs, text, prefix):
    """softmax of the model's full forward logits at the last position of one unpadded query
    (the chat text built here, not by the judge)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    proc = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    msgs = [{"role": "user", "content": [{"type": "image"} for _ in imgs]
             + [{"type": "text", "text": text}]}]
    chat = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + prefix
    inputs = proc(text=[chat], images=[imgs], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].double()
    return logits.softmax(-1), proc.tokenizer


# ------------------------------------------------------------------ templates

SPEC = {  # REWARDS-VLM.md, "Prompt templates": (appendix, length, sha256)
    "flow_factory": ("G", 793, "64a0a112b120f4261d13b6860303e51fa9dfce2975ac3ded3e1415a0381e4afe"),
    "unifiedreward": ("C", 733, "75d52d3ae771f89b682db3b74cdaca1c7bde373a39162bc1c9dabd63cdc9b851"),
    "unifiedreward_pair": ("D", 1133,
                           "828e9ab2f81c3b6d42fb68dd5b8ea1b7647063c4b5d79a98d003ff25de5c5ca8"),
    "unifiedreward_think": ("E", 3191,
                            "a8a0d80818246406b783d5cca630336c5fdf1264fef13f09d09bd94d61a139d5"),
    "unifiedreward_think_video": (
        "F", 3675, "e40c6e7f767f2cca279d599365ee4066a7f49dd3dc55328d36d01bbc0a8ec3ab"),
}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_template_matches_its_source(name):
    _, length, sha = SPEC[name]
    text = TEMPLATES[name].text
    assert (len(text), hashlib.sha256(text.encode("utf-8")).hexdigest()) == (length, sha)
    assert TEMPLATES[name].uses_prompt == (name != "flow_factory")


def test_every_template_is_tested_and_registered():
    assert sorted(TEMPLATES) == sorted(SPEC)
    from mmrl.rewards.specs import JUDGES, VIDEO_JUDGES
    assert "vlm_judge" in R.SCORERS.names()
    assert {"vlm_pair", "vlm_pair_video"} <= set(JUDGES.names())
    assert "vlm_pair_video" in VIDEO_JUDGES and "vlm_pair" not in VIDEO_JUDGES


# ------------------------------------------------------------------ pointwise

@pytest.mark.parametrize("family", FAMILIES)
def test_yes_no_equals_softmax_of_the_models_own_logits(tiny, family):
    judge = R.load("vlm_judge", path=tiny[family], template=ASK, yes="y", no="n", device="cpu")
    imgs = images(1, seed=3)
    got = judge(imgs, PROMPTS[:1])
    p, tok = manual_next_token_probs(tiny[family], imgs, ASK.replace("{prompt}", PROMPTS[0]), "")
    # canonical variants that are single byte tokens here: y, Y / n, N (" y" is two tokens)
    py = p[tok.convert_tokens_to_ids("y")] + p[tok.convert_tokens_to_ids("Y")]
    pn = p[tok.convert_tokens_to_ids("n")] + p[tok.convert_tokens_to_ids("N")]
    torch.testing.assert_close(got.double(), (py / (py + pn)).reshape(1), atol=1e-5, rtol=0)
    logp = judge.answer_logprobs(imgs, PROMPTS[:1])  # full-softmax mass of each class
    torch.testing.assert_close(logp.double().exp(), torch.stack([py, pn])[None], atol=1e-5,
                               rtol=1e-4)


def test_builtin_templates_wiring(tiny):
    """Default template, forced prefix and answer tokens of each built-in (no forward)."""
    path, ids = tiny["qwen2_vl"], lambda s: [TOK(path).convert_tokens_to_ids(c) for c in s]
    ff = VLMJudge(path=path, yes="y", no="n", device="cpu")
    assert ff.template.name == "flow_factory" and not ff.uses_prompts  # the prompt is not sent
    assert ff.reader.text("ignored", 1).endswith("Answer Yes or No.<|im_end|>\n"
                                                 "<|im_start|>assistant\n")
    think = VLMPairJudge(path=path, device="cpu")
    assert think.template.name == "unifiedreward_think" and think.reader.prefix == "<answer>Image "
    assert think.reader.class_ids == [ids("1"), ids("2")]
    video = VLMVideoPairJudge(path=path, device="cpu")
    assert (video.template.name, video.reader.prefix) == ("unifiedreward_think_video",
                                                          "<answer>Video ")
    assert "「two dogs」" in video.reader.text("two dogs", 16)
    point = VLMJudge(path=path, template="unifiedreward", device="cpu")
    assert point.reader.prefix == "Alignment Score (1-5): "
    assert point.reader.class_ids == [ids(str(k)) for k in range(1, 6)]
    pair = VLMPairJudge(path=path, template="unifiedreward_pair", dimension="coherence",
                        device="cpu")
    assert pair.reader.prefix == "Coherence Score:\n Image 1: 0."
    assert pair.reader.values.tolist() == pytest.approx([(d + 0.5) / 10 for d in range(10)])


@functools.lru_cache(maxsize=None)
def TOK(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_expected_digit_with_forced_prefix(tiny, family):
    judge = VLMJudge(path=tiny[family], template="unifiedreward", dimension="style",
                     device="cpu")
    imgs = images(1, seed=4)
    got = judge(imgs, PROMPTS[1:2])
    text = TEMPLATES["unifiedreward"].text.replace("{prompt}", PROMPTS[1])
    p, tok = manual_next_token_probs(tiny[family], imgs, text, "Style Score (1-5): ")
    pk = torch.stack([p[tok.convert_tokens_to_ids(str(k))] for k in range(1, 6)])
    want = (pk * torch.arange(1, 6, dtype=torch.float64)).sum() / pk.sum()
    torch.testing.assert_close(got.double(), want.reshape(1), atol=1e-5, rtol=0)
    assert 1 <= float(got) <= 5


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_batch_equals_one_by_one(tiny, family):
    imgs = images(5, seed=1)  # three sizes -> different image-token counts -> padding
    prompts = ["a", "a much longer prompt about two dogs on a beach", "b", "cat", "x y z"]
    judge = VLMJudge(path=tiny[family], template=ASK, yes="y", no="n", answer_prefix="A: ",
                     device="cpu", batch_size=5)
    batch = judge(imgs, prompts)
    judge.batch_size = 1
    single = judge(imgs, prompts)
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    assert batch.std() > 0  # the images / prompts change the score
    pair = VLMPairJudge(path=tiny[family], template=WHICH, answers=("1", "2"), device="cpu",
                        batch_size=6)
    together = pair.compare(imgs[:3], imgs[2:], prompts[:3])
    pair.batch_size = 1
    torch.testing.assert_close(together, pair.compare(imgs[:3], imgs[2:], prompts[:3]),
                               atol=1e-5, rtol=0)


# ------------------------------------------------------------------ pairwise

@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_pair_reads_1_vs_2_after_the_answer_prefix_and_both_orders_are_symmetric(tiny, family):
    a, b = images(2, seed=5), images(2, seed=6)
    kw = dict(path=tiny[family], template=WHICH, answer_prefix="<answer>Image ", device="cpu")
    one = VLMPairJudge(both_orders=False, **kw)
    p_ab, p_ba = one.compare(a, b, PROMPTS[:2]), one.compare(b, a, PROMPTS[:2])
    text = WHICH.replace("{prompt}", PROMPTS[0])
    p, tok = manual_next_token_probs(tiny[family], [a[0], b[0]], text, "<answer>Image ")
    p1, p2 = p[tok.convert_tokens_to_ids("1")], p[tok.convert_tokens_to_ids("2")]
    torch.testing.assert_close(p_ab[0].double(), p1 / (p1 + p2), atol=1e-5, rtol=0)
    both = VLMPairJudge(**kw)
    ab, ba = both.compare(a, b, PROMPTS[:2]), both.compare(b, a, PROMPTS[:2])
    torch.testing.assert_close(ab, (p_ab + 1 - p_ba) / 2, atol=1e-6, rtol=0)
    torch.testing.assert_close(ab + ba, torch.ones(2), atol=1e-6, rtol=0)
    same = both.compare(a, a, PROMPTS[:2])  # a pair of equal images is a tie
    torch.testing.assert_close(same, torch.full((2,), 0.5), atol=1e-6, rtol=0)


def test_unifiedreward_pair_reads_image_1s_first_decimal(tiny):
    a, b = images(1, seed=7), images(1, seed=8)
    judge = VLMPairJudge(path=tiny["qwen2_vl"], template="unifiedreward_pair",
                         both_orders=False, device="cpu")
    got = judge.compare(a, b, PROMPTS[:1])
    text = TEMPLATES["unifiedreward_pair"].text.replace("{prompt}", PROMPTS[0])
    p, tok = manual_next_token_probs(tiny["qwen2_vl"], a + b, text,
                                     "Alignment Score:\n Image 1: 0.")
    pd = torch.stack([p[tok.convert_tokens_to_ids(str(d))] for d in range(10)])
    want = (pd * (torch.arange(10, dtype=torch.float64) + 0.5) / 10).sum() / pd.sum()
    torch.testing.assert_close(got.double(), want.reshape(1), atol=1e-5, rtol=0)


def test_video_pair_samples_8_frames_per_video_as_images(tiny):
    assert pair_frame_indices(10) == [0, 1, 2, 3, 5, 6, 7, 9]  # np.linspace(0, 9, 8) truncated
    assert pair_frame_indices(4) == [0, 0, 0, 1, 1, 2, 2, 3]
    g = torch.Generator().manual_seed(0)
    va, vb = torch.rand(1, 10, 3, 28, 28, generator=g), torch.rand(1, 10, 3, 28, 28, generator=g)
    judge = VLMVideoPairJudge(path=tiny["qwen2_vl"], template=WHICH, both_orders=False,
                              answer_prefix="<answer>Video ", device="cpu")
    got = judge.compare(va, vb, PROMPTS[:1])
    pil = lambda x: Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy())  # noqa
    idx = [0, 1, 2, 3, 5, 6, 7, 9]
    frames = [pil(va[0, t]) for t in idx] + [pil(vb[0, t]) for t in idx]
    text = WHICH.replace("{prompt}", PROMPTS[0])
    p, tok = manual_next_token_probs(tiny["qwen2_vl"], frames, text, "<answer>Video ")
    p1, p2 = p[tok.convert_tokens_to_ids("1")], p[tok.convert_tokens_to_ids("2")]
    torch.testing.assert_close(got.double(), (p1 / (p1 + p2)).reshape(1), atol=1e-5, rtol=0)
    from mmrl.rewards.scorers import scorer_class
    assert scorer_class("vlm_pair_video").media == "video"


# ------------------------------------------------------------------ errors

def test_multi_token_answer_is_a_clear_error(tiny):
    # the tiny byte-level tokenizer has no "Yes" token: Flow-Factory's default answer fails
    with pytest.raises(ValueError, match=r"answer string 'Yes' is 3 tokens of this judge's "
                                         r"tokenizer \['Y', 'e', 's'\].*e\.g\. 'Y'"
                                         r".*yes=\[\.\.\.\]"):
        VLMJudge(path=tiny["qwen2_vl"], device="cpu")
    with pytest.raises(ValueError, match=r"'one' is 3 tokens.*answers="):
        VLMPairJudge(path=tiny["qwen2_vl"], answers=("one", "2"), device="cpu")


def test_argument_errors(tiny):
    path = tiny["qwen2_vl"]
    with pytest.raises(ValueError, match=r"neither a known template.*\{prompt\}"
                                         r".*did you mean 'flow_factory'"):
        VLMJudge(path=path, template="flow_factor", yes="y", no="n")
    with pytest.raises(ValueError, match="pairwise template; load it with 'vlm_pair'"):
        VLMJudge(path=path, template="unifiedreward_think")
    with pytest.raises(ValueError, match="judges video pairs; load it with 'vlm_pair_video'"):
        VLMPairJudge(path=path, template="unifiedreward_think_video")
    with pytest.raises(ValueError, match="reads digits"):
        VLMJudge(path=path, template="unifiedreward", yes="y")
    with pytest.raises(ValueError, match="dimension='color'.*alignment, coherence, style"):
        VLMJudge(path=path, template="unifiedreward", dimension="color")
    with pytest.raises(ValueError, match="answers two classes"):
        VLMJudge(path=path, yes="y", no="Y")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        VLMJudge(path="/nonexistent/judge")
    with pytest.raises(WeightsNotFoundError, match="hf download Qwen/Qwen3-VL-8B-Instruct"):
        VLMJudge()  # HF_HUB_OFFLINE=1 and not cached
    custom = VLMJudge(path=path, template="Is [{prompt}] shown? {json: 1}", yes="y", no="n",
                      answer_prefix="A: ", device="cpu")
    assert custom.reader.text("cat", 1).endswith("Is [cat] shown? {json: 1}<|im_end|>\n"
                                                 "<|im_start|>assistant\nA: ")
    with pytest.raises(TypeError, match="pass a list with one prompt per image"):
        custom(images(1), "cat")
    pair = VLMPairJudge(path=path, device="cpu")
    with pytest.raises(TypeError, match=r"pairwise judge.*compare\(images_a, images_b, "
                                        r"prompts\).*'pref_winrate'"):
        pair(images(2), PROMPTS[:2])
    with pytest.raises(ValueError, match="got 2 A images and 1 B images"):
        pair.compare(images(2), images(1), PROMPTS[:2])
    with pytest.raises(ValueError, match="got 2 images but 1 prompts"):
        pair.compare(images(2), images(2), PROMPTS[:1])
    with pytest.raises(ValueError, match="an image batch"):
        VLMVideoPairJudge(path=path, device="cpu").compare(
            torch.rand(1, 3, 28, 28), torch.rand(1, 3, 28, 28), PROMPTS[:1])
