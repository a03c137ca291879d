"""HPSv3 (mmrl.rewards.hpsv3) and the shared Qwen2-VL reward backbone (mmrl.rewards.qwen2vl_rm).

The oracle is the hpsv3 1.0.0 package's own inference code on transformers 4.45.2, run in ONE
subprocess for this module (tests/rewards/hpsv3_peer.py), on the same tiny random checkpoint:
``HPSv3RewardInferencer(...).prepare_batch`` + ``Qwen2VLRewardModelBT`` for HPSv3, and
``Qwen2VLRewardModelBT(output_dim=1, rm_head_type="default")`` with three reward tokens on video
inputs for the VideoReward-style configuration of the backbone. The subprocess starts when the
module's fixtures are built and is collected by the oracle tests at the end of the file.
"""
from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import mmrl.rewards as R
from mmrl.rewards import hpsv3 as H
from mmrl.rewards import qwen2vl_rm as Q
from mmrl.rewards.base import WeightsNotFoundError

sys.path.insert(0, os.path.dirname(__file__))
from hpsv3_peer import PeerRun  # noqa: E402

SMALL = dict(min_pixels=56 * 56, max_pixels=56 * 56)  # 2x2 visual tokens: fast model tests
VIDEO_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
# (W, H): upscaled by the min bound, landscape, and 1024x768 (H x W) -> 504 x 364 by the max bound
ORACLE_SIZES = [(64, 64), (90, 50), (768, 1024)]
PROMPTS = ["a red cat on a sofa", "two dogs in the snow", "a cyberpunk city at night"]


def smooth_images(sizes, seed=0):
    """PIL images with distinct colours and shapes (a 4x4 random colour grid, upsampled)."""
    rng = np.random.default_rng(seed)
    out = []
    for w, h in sizes:
        grid = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        out.append(grid.resize((w, h), Image.BICUBIC))
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hpsv3")


@pytest.fixture(scope="module")
def peer_run(workdir):
    """The package's subprocess, started first: its imports overlap the model builds."""
    run = PeerRun(str(workdir))
    yield run
    run.close()


@pytest.fixture(scope="module")
def tiny(workdir, peer_run):
    """Two tiny checkpoints (hidden 32, one layer, one vision block): HPSv3's layout and a
    VideoReward-style one (three tokens, linear head, one output each)."""
    d = workdir
    hps = Q.build_tiny_checkpoint(str(d / "hps"), hidden_size=32, layers=1, vision_depth=1)
    vr = Q.build_tiny_checkpoint(str(d / "vr"), special_tokens=VIDEO_TOKENS, head="linear",
                                 out_dim=1, hidden_size=32, layers=1, vision_depth=1, seed=1)
    return {"dir": d, "hps": hps, "vr": vr}


@pytest.fixture(scope="module")
def video_case(tiny):
    """Two 4-frame videos at their final size (56x56 and 56x84) and texts with the three tokens,
    encoded by mmrl (saved for the package's forward) -> (mmrl inputs, file paths, texts)."""
    d, rng = tiny["dir"], np.random.default_rng(5)
    model, proc = Q.load_reward_model(tiny["vr"]["path"], tiny["vr"]["base"],
                                      special_tokens=VIDEO_TOKENS, head="linear", out_dim=1)
    videos = [torch.from_numpy(rng.integers(0, 256, (4, 3, h, w), dtype=np.uint8))
              for h, w in ((56, 56), (56, 84))]
    texts = ["a person running. <|VQ_reward|> <|MQ_reward|> <|TA_reward|>",
             "slow pan over a lake <|VQ_reward|><|MQ_reward|>\n<|TA_reward|> end"]
    rows, grids = zip(*[Q.to_patches(v.double().mul(1 / 255).float()) for v in videos])
    batch = Q.encode(proc, texts, rows, grids, media="video")
    paths = []
    for i, v in enumerate(videos):
        paths.append(str(d / f"video{i}.pt"))
        torch.save(v, paths[-1])
    torch.save(batch, str(d / "video_inputs.pt"))
    return model, batch, paths, texts


@pytest.fixture(scope="module")
def peer(peer_run, tiny, video_case):
    """The jobs handed to the package's subprocess (collected by the oracle tests)."""
    d = tiny["dir"]
    paths = []
    for i, im in enumerate(smooth_images(ORACLE_SIZES, seed=3)):
        paths.append(str(d / f"img{i}.png"))
        im.save(paths[-1])
    _, _, videos, texts = video_case
    vr = dict(mode="bt_forward", base=tiny["vr"]["base"], checkpoint=tiny["vr"]["path"],
              output_dim=1, rm_head_type="default", special_tokens=VIDEO_TOKENS)
    jobs = [dict(mode="hpsv3", base=tiny["hps"]["base"], checkpoint=tiny["hps"]["path"],
                 images=paths, prompts=PROMPTS, workdir=str(d)),
            dict(vr, inputs=str(d / "video_inputs.pt")),
            dict(vr, texts=texts, videos=videos)]
    peer_run.submit(jobs)
    return peer_run, paths


@pytest.fixture(scope="module")
def hps(tiny):
    """HPSv3 at the released sizes, built through the registry."""
    return R.load("hpsv3", path=tiny["hps"]["path"], base=tiny["hps"]["base"], device="cpu")


@pytest.fixture(scope="module")
def small(tiny):
    return R.load("hpsv3", path=tiny["hps"]["path"], base=tiny["hps"]["base"], device="cpu",
                  batch_size=2, **SMALL)


def test_templates_equal_hpsv3_by_length_and_sha256():
    for text, n, sha in (
            (H.INSTRUCTION, 2523,
             "0393599dad45a971903d1d62a3acf9bad3ccccdafa7f40f680523419e1f68b7a"),
            (H.PROMPT_WITH_SPECIAL_TOKEN, 67,
             "2471faca094ae5bd6fe17b71dce20c3d7583625545e235889f7e74e7eeb69d0a")):
        assert len(text) == n
        assert hashlib.sha256(text.encode("utf-8")).hexdigest() == sha
    text = H.hpsv3_text("a cat")
    assert text.count("<|Reward|>") == 1 and "Textual prompt - a cat\n\n\n\n" in text


@pytest.mark.parametrize("hw, want", [((1024, 1024), (448, 448)), ((512, 512), (448, 448)),
                                      ((768, 1344), (336, 588)), ((720, 1280), (336, 588)),
                                      ((1024, 768), (504, 364))])
def test_smart_resize_release_sizes(hw, want):
    assert Q.smart_resize(*hw, min_pixels=H.PIXELS, max_pixels=H.PIXELS) == want
    image = Image.new("RGB", (hw[1], hw[0]))
    assert tuple(Q.resize_pil(image, H.PIXELS, H.PIXELS).shape) == (3, *want)


def test_smart_resize_bounds_and_errors():
    # min branch (the max is not re-checked after it), max branch (nor the min after it)
    assert Q.smart_resize(20, 30, min_pixels=56 * 56, max_pixels=56 * 56) == (56, 84)
    assert Q.smart_resize(50, 90, min_pixels=56 * 56, max_pixels=56 * 56) == (28, 56)
    assert Q.smart_resize(42, 42, min_pixels=1, max_pixels=10 ** 6) == (56, 56)  # round half even
    assert Q.smart_resize(10, 10, min_pixels=1, max_pixels=10 ** 6) == (28, 28)  # at least 28
    with pytest.raises(ValueError, match="aspect ratio"):
        Q.smart_resize(10, 2100)
    # visual tokens: 448² -> 256, 336x588 -> 252, 504x364 -> 234
    for (h, w), n in (((448, 448), 256), ((336, 588), 252), ((504, 364), 234)):
        rows, grid = Q.to_patches(torch.zeros(1, 3, h, w))
        assert rows.shape == (4 * n, 1176) and grid.tolist() == [1, h // 14, w // 14]


def _score_texts(scorer, texts, image):
    """The model at the reward token for one image and arbitrary user texts -> [len(texts)]."""
    frames = Q.resize_pil(image, scorer.min_pixels, scorer.max_pixels)[None]
    rows, grid = Q.to_patches(frames)
    batch = Q.encode(scorer.processor, texts, [rows] * len(texts), [grid] * len(texts))
    with torch.no_grad():
        return scorer.model(**batch)[:, 0, 0], batch


def test_plain_positions_padding_and_text_after_token_change_nothing(small):
    image = smooth_images([(60, 40)], seed=1)[0]
    alone, _ = _score_texts(small, ["a cat <|Reward|>"], image)
    after, _ = _score_texts(small, ["a cat <|Reward|> and a long tail of text after it"], image)
    padded, batch = _score_texts(small, ["a cat <|Reward|>", "x" * 80 + " <|Reward|>"], image)
    assert (batch["attention_mask"][0] == 0).sum() > 70  # the first row is right padded
    torch.testing.assert_close(after, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded[:1], alone, rtol=0, atol=1e-5)
    # the positions are plain arange(L): transformers 5's own mRoPE positions (get_rope_index)
    # give another value, so the model must not be called through Qwen2VLModel.forward
    base = small.model.base
    with torch.no_grad():
        _, b1 = _score_texts(small, ["a cat <|Reward|>"], image)
        types = (b1["input_ids"] == base.config.image_token_id).int()  # 1 = image, 0 = text
        hid = base.model(input_ids=b1["input_ids"], attention_mask=b1["attention_mask"],
                         pixel_values=b1["pixel_values"], image_grid_thw=b1["image_grid_thw"],
                         mm_token_type_ids=types).last_hidden_state
        mrope = small.model.rm_head(hid[b1["input_ids"] == small.model.token_ids[0]])[:, 0]
    assert (mrope - alone).abs().max() > 1e-3


def test_tensor_inputs_equal_pil_at_final_size_and_get_gradients(small, tiny):
    images = smooth_images([(56, 56), (56, 56), (70, 50)], seed=2)
    x = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)
                     for im in images[:2]])
    prompts = PROMPTS[:2]
    ms = small.mu_sigma(images, PROMPTS)  # [3, 2] = (μ, σ) of the PIL path, chunks of 2 + 1
    torch.testing.assert_close(small(x, prompts), ms[:2, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(small(images[2:], PROMPTS[2:]), ms[2:, 0], rtol=0, atol=1e-5)
    assert (ms[:, 1] > 0).all()
    graded = R.load("hpsv3", path=tiny["hps"]["path"], base=tiny["hps"]["base"], device="cpu",
                    grad=True, **SMALL)
    y = torch.from_numpy(np.asarray(images[2], np.float32) / 255).permute(2, 0, 1)[None]
    y.requires_grad_(True)
    score = graded(y, prompts[:1])  # 50x70 -> resized to 56x84 inside: gradients pass the resize
    score.sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_model_key_unwrapped_from_a_torch_pickle(tiny, small, tmp_path):
    from safetensors.torch import load_file
    sd = load_file(tiny["hps"]["path"])
    path = str(tmp_path / "final_model.pth")
    torch.save({"model": sd}, path)
    other = R.load("hpsv3", path=str(tmp_path), base=tiny["hps"]["base"], device="cpu", **SMALL)
    want = small.model.state_dict()
    got = other.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_clear_errors(tiny, small, tmp_path):
    base = tiny["hps"]["base"]
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        R.load("hpsv3", path=str(tmp_path / "nope.safetensors"), base=base)
    with pytest.raises(WeightsNotFoundError, match="HPSv3.safetensors"):
        R.load("hpsv3", path=str(tmp_path), base=base)  # a folder without a checkpoint
    with pytest.raises(WeightsNotFoundError, match="MizzenAI/HPSv3"):
        R.load("hpsv3", base=base)  # no path, hub offline (HF_HUB_OFFLINE=1), not cached
    with pytest.raises(WeightsNotFoundError, match="base="):
        R.load("hpsv3", path=tiny["hps"]["path"], base=str(tmp_path / "no_base"))
    # the VideoReward-style file (linear head, three tokens) is not an HPSv3 checkpoint
    with pytest.raises(ValueError, match=r"missing keys \(e.g. \['rm_head.0.bias'"):
        R.load("hpsv3", path=tiny["vr"]["path"], base=tiny["vr"]["base"])
    image = smooth_images([(40, 40)], seed=1)[0]
    with pytest.raises(ValueError, match="exactly 1 reward tokens"):
        _score_texts(small, ["no reward token here"], image)
    with pytest.raises(ValueError, match="exactly 1 reward tokens"):
        _score_texts(small, ["two <|Reward|> tokens <|Reward|>"], image)


def test_hpsv3_equals_the_hpsv3_package(peer, hps):
    run, paths = peer
    want = run.results()[0]
    images = [Image.open(p) for p in paths]
    assert hps.inputs(images, PROMPTS)["input_ids"].tolist() == want["input_ids"]
    ms = hps.mu_sigma(images, PROMPTS)  # [3, 2] = (μ, σ), through the scorer's batching
    got = torch.stack([ms[:, 0], ms[:, 1].log()], dim=1)  # (μ, log σ) as the package returns
    want = torch.tensor(want["logits"])
    diff = (got - want).abs().max().item()
    print(f"max |mmrl - hpsv3| over (μ, log σ) of {len(paths)} images: {diff:.2e}")
    assert want[:, 0].std() > 1e-2  # the images' scores differ: the check has teeth
    assert diff <= 1e-4


def test_videoreward_style_backbone_equals_the_package(peer, video_case):
    model, batch, _, _ = video_case
    results = peer[0].results()
    with torch.no_grad():
        got = model(**batch)  # [2, 3, 1]
    for want in results[1:]:  # on mmrl's inputs, then on inputs built by the 4.45.2 processor
        assert want["input_ids"] == batch["input_ids"].tolist()
        want = torch.tensor(want["logits"])  # [2, 3]
        diff = (got[..., 0] - want).abs().max().item()
        print(f"max |mmrl - Qwen2VLRewardModelBT| (3 tokens, linear head, video): {diff:.2e}")
        assert diff <= 1e-4 and want.std() > 1e-2
