"""VideoReward (VideoAlign): template, frame rule, normalisation, checkpoint layout, the scorer,
and its forward against the VideoAlign/hpsv3 ``Qwen2VLRewardModelBT`` on transformers 4.45.2
(``hpsv3_peer.py``, one subprocess). One tiny checkpoint per layout, built once per module."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import pytest
import torch

from mmrl.rewards.videoreward import (DETAILED_SPECIAL, REWARD_TOKENS, build_prompt,
                                      frame_indices, frame_plan, normalise, per_dimension,
                                      read_layout, smart_nframes, to_uint8)

sys.path.insert(0, os.path.dirname(__file__))

PROMPTS = ["a red kite over the sea", "a dog runs left"]
PIX = dict(min_pixels=56 * 56, max_pixels=56 * 84)  # 56x84 frames: 6 visual tokens per 2 frames


def close(a, b, atol=1e-6, rtol=1e-5, what=""):
    """``a`` equals ``b`` within the tolerances (plain torch: torch.testing's first call costs
    about a second)."""
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    assert a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=rtol), \
        f"{what} max |a - b| = {(a - b).abs().max().item():.3g}"


@pytest.fixture(scope="module")
def peer_run(tmp_path_factory):
    """hpsv3 1.0.0 on transformers 4.45.2 in a subprocess, started first: its imports overlap
    this module's set-up; the oracle test hands it the jobs."""
    from hpsv3_peer import PeerRun
    run = PeerRun(str(tmp_path_factory.mktemp("videoreward_peer")))
    yield run
    run.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, peer_run):
    from mmrl.rewards.videoreward import build_tiny_videoreward
    return build_tiny_videoreward(str(tmp_path_factory.mktemp("videoreward")), step=100)


@pytest.fixture(scope="module")
def scorer(tiny):
    from mmrl.rewards import load
    return load("videoreward", path=tiny, device="cpu", fps=8, output="all", **PIX)


@pytest.fixture(scope="module")
def videos():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 8, 3, 60, 90, generator=g)


# ------------------------------------------------------------------ data and arithmetic
def test_template_matches_the_source_by_length_and_sha256():
    assert len(DETAILED_SPECIAL) == 3997
    assert hashlib.sha256(DETAILED_SPECIAL.encode()).hexdigest() == \
        "fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700"
    text = build_prompt("a cat")
    assert text.startswith("\nYou are tasked") and text.endswith("<|TA_reward|>\nEND\n")
    pos = [text.index(t) for t in REWARD_TOKENS]
    assert pos == sorted(pos) and pos[1] < text.index("Textual prompt - a cat") < pos[2]


def test_frame_rule_on_the_worked_examples():
    idx, size, tokens = frame_plan(120, 480, 832, 24.0)
    assert idx == [0, 13, 26, 40, 53, 66, 79, 93, 106, 119]
    assert size == (336, 588) and tokens == 1260
    assert smart_nframes(81, 16.0) == 10  # 81/16·2 = 10.125 -> 10
    assert smart_nframes(81, 16.0, sample_fps=1.0) == 6  # 5.06 -> round(2.53)·2
    assert smart_nframes(33, 16.0) == 4  # 4.125 < the minimum 4
    assert smart_nframes(3, 16.0) == 2  # the maximum floor(3/2)·2 wins over the minimum
    assert smart_nframes(120, None, num_frames=5) == 4  # round(2.5) = 2: half to even
    assert smart_nframes(6, None, num_frames=14) == 6  # capped at the frame count
    assert frame_indices(8, 4) == [0, 2, 5, 7]  # 2.33, 4.67 -> 2, 5
    with pytest.raises(ValueError, match="pass fps=RATE"):
        smart_nframes(81, None)
    with pytest.raises(ValueError, match="at least 2"):
        smart_nframes(1, 16.0)


def test_uint8_conversion_rounds_half_to_even_and_clamps():
    x = torch.tensor([-0.1, 0.5 / 255, 1.5 / 255, 2.5 / 255, 0.5, 1.0, 1.2])
    assert to_uint8(x).tolist() == [0, 0, 2, 2, 128, 255, 255]
    from mmrl.diffusion.eval_video import to_uint8 as written  # what mmrl writes to mp4 files
    v = torch.rand(2, 3, 3, 5, 7)
    assert torch.equal(to_uint8(v), written(v).movedim(-1, -3))


def test_normalisation_arithmetic():
    stats = {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646, "MQ_std": 1.3811,
             "TA_mean": 2.8105, "TA_std": 2.5121}
    raw = torch.tensor([[3.6757 + 2.2476, 1.1646, 2.8105 - 2 * 2.5121], [0.0, 0.0, 0.0]])
    cols = normalise(raw, stats)
    close(cols["vq"], torch.tensor([1.0, -3.6757 / 2.2476]))
    close(cols["mq"], torch.tensor([0.0, -1.1646 / 1.3811]))
    close(cols["ta"], torch.tensor([-2.0, -2.8105 / 2.5121]))
    close(cols["overall"], torch.tensor([-1.0, -3.6757 / 2.2476 - 1.1646 / 1.3811
                                         - 2.8105 / 2.5121]))
    raw_cols = normalise(raw, None)  # use_norm=False: raw values and their sum
    close(raw_cols["overall"], raw.sum(1))
    out = torch.arange(18.0).view(2, 3, 3)  # output_dim 3: dimension k at token k
    assert per_dimension(out).tolist() == [[0.0, 4.0, 8.0], [9.0, 13.0, 17.0]]
    assert per_dimension(out[..., :1]).tolist() == [[0.0, 3.0, 6.0], [9.0, 12.0, 15.0]]


def test_frames_and_patches_equal_transformers_video_processor(scorer, videos):
    """Steps 1-4 against transformers 5's own Qwen2-VL video processor on the same frames."""
    from transformers import Qwen2VLVideoProcessor
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize
    from mmrl.rewards.qwen2vl_rm import to_patches
    frames = scorer.frames(videos[0], 8.0)  # 8 frames @ 8 fps -> 4 frames, 56x84
    u8 = (videos[0, [0, 2, 5, 7]] * 255).round().to(torch.uint8)
    ref = resize(u8, [56, 84], interpolation=InterpolationMode.BICUBIC, antialias=True)
    assert frames.shape == (4, 3, 56, 84)
    assert torch.equal((frames * 255).round().to(torch.uint8), ref)
    vp = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=56 * 84, patch_size=14,
                               merge_size=2, temporal_patch_size=2)
    out = vp(videos=[ref], do_resize=False, do_sample_frames=False, return_tensors="pt")
    rows, grid = to_patches(frames, **scorer._patch)
    assert grid.tolist() == out["video_grid_thw"][0].tolist() == [2, 4, 6]
    close(rows, out["pixel_values_videos"], atol=1e-6, rtol=0)


# ------------------------------------------------------------------ checkpoint layout
def test_loader_merges_the_lora_into_the_released_weights(tiny, scorer):
    """Merged weight = base_layer + (alpha / r) B A from model.pth, by hand; the rest as saved."""
    layout = read_layout(tiny)
    assert layout["step"] == 100 and layout["weights"] == "full" and layout["tokenizer"]
    sd = torch.load(os.path.join(layout["checkpoint"], "model.pth"), weights_only=True)
    pre = "base_model.model.model.layers.0.self_attn.q_proj."
    a, b = sd[pre + "lora_A.default.weight"], sd[pre + "lora_B.default.weight"]
    merged = sd[pre + "base_layer.weight"] + (8 / 4) * b @ a
    q = scorer.model.base.model.language_model.layers[0].self_attn.q_proj
    close(q.weight, merged)
    assert (b @ a).abs().max() > 0.01  # the LoRA matters
    close(scorer.model.rm_head.weight, sd["base_model.model.rm_head.weight"])
    vis = scorer.model.base.model.visual.patch_embed.proj.weight
    close(vis, sd["base_model.model.visual.patch_embed.proj.weight"])


def test_adapter_layout_loads_the_same_model(tiny, scorer, tmp_path):
    from mmrl.rewards.videoreward import build_tiny_videoreward, load_videoreward
    root = build_tiny_videoreward(str(tmp_path / "adapter"), step=7, weights="adapter")
    assert read_layout(root)["weights"] == "adapter"
    model, _, _ = load_videoreward(root)
    want = scorer.model.state_dict()
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        if "lm_head" not in k:  # lm_head is unused by the score
            close(got[k], want[k], what=k)


def test_layout_errors_say_what_is_missing(tiny, tmp_path):
    from mmrl.rewards.base import WeightsNotFoundError
    from mmrl.rewards.videoreward import load_videoreward
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        read_layout(str(tmp_path / "nowhere"))
    with pytest.raises(WeightsNotFoundError, match="no model_config.json"):
        read_layout(str(tmp_path))
    shutil.copy(os.path.join(tiny, "model_config.json"), tmp_path)
    with pytest.raises(WeightsNotFoundError, match="no checkpoint-<step>/"):
        read_layout(str(tmp_path))
    os.makedirs(tmp_path / "checkpoint-5" / "tokenizer")
    with pytest.raises(WeightsNotFoundError, match="expected model.pth, or adapter"):
        read_layout(str(tmp_path))
    with pytest.raises(ValueError, match=r"step=9 but .* holds the steps \[5\]"):
        read_layout(str(tmp_path), step=9)
    open(tmp_path / "checkpoint-5" / "model.pth", "wb").close()
    cfg = json.load(open(tmp_path / "model_config.json"))
    cfg["model_config"]["model_name_or_path"] = "Qwen/Qwen2-VL-2B-Instruct"  # not cached
    json.dump(cfg, open(tmp_path / "model_config.json", "w"))
    with pytest.raises(WeightsNotFoundError, match="base=DIR"):
        load_videoreward(str(tmp_path))
    cfg["model_config"]["use_special_tokens"] = False
    json.dump(cfg, open(tmp_path / "model_config.json", "w"))
    with pytest.raises(ValueError, match="not a VideoReward checkpoint config"):
        read_layout(str(tmp_path))


# ------------------------------------------------------------------ the scorer
def test_scores_columns_and_causality(scorer, videos):
    """Columns are normalise(raw) with the released stats; VQ and MQ precede the prompt
    (causal attention: prompt-free), TA reads it; the fps comes from the metadata."""
    from mmrl.train.reward_fn import evaluate_reward
    from mmrl.rewards.videoreward import RELEASED_STATS as S
    v = [videos[0], videos[0]]
    batch = evaluate_reward(scorer, v, PROMPTS, [{"fps": 4}, {"fps": 4}])  # 8 frames -> 4
    assert batch.names == ["overall", "vq", "mq", "ta"]
    c = dict(zip(batch.names, batch.values.unbind(1)))
    close(c["overall"], c["vq"] + c["mq"] + c["ta"])
    raw = {d: c[d.lower()] * S[f"{d}_std"] + S[f"{d}_mean"] for d in ("VQ", "MQ", "TA")}
    for d in ("VQ", "MQ"):
        close(raw[d][0], raw[d][1], atol=1e-5, rtol=0)
    assert (raw["TA"][0] - raw["TA"][1]).abs() > 1e-4
    with pytest.raises(ValueError, match="at least 2"):  # a one-frame video
        scorer(videos[:1, :1], PROMPTS[:1], [{"fps": 100}])


def test_forward_equals_videoalign_model_on_transformers_4_45(peer_run, tiny, scorer, videos,
                                                              tmp_path):
    """The forward against Qwen2VLRewardModelBT (hpsv3 1.0.0's class, VideoAlign's forward;
    output_dim 1, rm_head_type "default", the three token ids) on transformers 4.45.2, on the
    merged tiny weights: (a) on our input tensors, (b) on inputs its 4.45.2 processor builds
    from the same texts and final-size uint8 frames (chat template, pad expansion, patches).
    Short texts holding the three tokens keep the peer fast; padding: batch of 2 lengths."""
    from safetensors.torch import save_file
    from mmrl.rewards.qwen2vl_rm import encode, to_patches, to_released_keys
    ckpt = str(tmp_path / "merged.safetensors")
    save_file({k: v.contiguous() for k, v in to_released_keys(scorer.model.state_dict()).items()},
              ckpt, metadata={"format": "pt"})
    texts = [f"{p}: quality <|VQ_reward|> motion <|MQ_reward|> match <|TA_reward|>"
             for p in PROMPTS]
    frames = [scorer.frames(v, f) for v, f in zip(videos, (8.0, 4.0))]  # 4 and 2 frames
    patches = [to_patches(f, **scorer._patch) for f in frames]
    inputs = encode(scorer.processor, texts, [r for r, _ in patches], [g for _, g in patches],
                    "video")
    torch.save(inputs, tmp_path / "inputs.pt")
    clips = []
    for i, f in enumerate(frames):
        clips.append(str(tmp_path / f"clip{i}.pt"))
        torch.save((f * 255).round().to(torch.uint8), clips[-1])
    job = dict(mode="bt_forward", base=os.path.join(tiny, "base"), checkpoint=ckpt,
               output_dim=1, rm_head_type="default", special_tokens=list(REWARD_TOKENS))
    peer_run.submit([{**job, "inputs": str(tmp_path / "inputs.pt")},
                     {**job, "texts": texts, "videos": clips}])
    with torch.no_grad():
        mine = scorer.model(**inputs)[..., 0]  # [2, 3, 1] -> [2, 3]
        alone = scorer.model(**{k: v[1:] if k in ("input_ids", "attention_mask") else
                                (v[48:] if k == "pixel_values_videos" else v[1:])
                                for k, v in inputs.items()})[..., 0]
    ref = peer_run.results()
    assert ref[1]["input_ids"] == inputs["input_ids"].tolist()
    for r in ref:
        diff = (mine - torch.tensor(r["logits"])).abs().max().item()
        print(f"max |mmrl - Qwen2VLRewardModelBT(4.45.2)| = {diff:.2e}")
        assert diff < 1e-4
    assert (mine[0] - mine[1]).abs().max() > 1e-3  # the inputs differ, so do the scores
    close(alone[0], mine[1], atol=1e-5, rtol=1e-5)  # right padding


def test_grad_path_reaches_the_pixels(tiny, videos):
    """grad=True: float frames (no uint8 rounding) with gradients; within rounding of the
    file path."""
    from mmrl.rewards.videoreward import VideoReward
    s = VideoReward(path=tiny, device="cpu", fps=8, grad=True, **PIX)
    v = videos[0].clone().requires_grad_(True)
    f = s.frames(v, 8.0)
    f.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    s.grad = False
    assert (f.detach() - s.frames(videos[0], 8.0)).abs().max() < 1.5 / 255


def test_registry_spec_and_options(tiny, videos):
    from mmrl.rewards import compose
    from mmrl.rewards.specs import VIDEO_SCORERS, media_of
    assert "videoreward" in VIDEO_SCORERS and media_of("videoreward") == "video"
    reward = compose(f"videoreward:path={tiny}:fps=8:output=ta:num_frames=2:"
                     f"min_pixels=3136:max_pixels=4704", device="cpu")
    fn = reward.fns["videoreward"]
    assert fn.num_frames == 2 and fn.max_pixels == 4704 and fn.output == "ta"
    out = reward(videos[:1], PROMPTS[:1])
    assert list(out) == ["videoreward"] and out["videoreward"].shape == (1,)
    with pytest.raises(ValueError, match="output='vqa'; expected one of overall, vq"):
        compose(f"videoreward:path={tiny}:output=vqa")
    with pytest.raises(ValueError, match="sample_fps and num_frames both given"):
        compose(f"videoreward:path={tiny}:sample_fps=2:num_frames=4")
    with pytest.raises(ValueError, match="contains .*<|TA_reward|>"):
        fn(videos[:1], ["say <|TA_reward|> twice"])
    fn.min_pixels = fn.max_pixels = 28 * 28  # 28x28 frames: the processor would upscale them
    with pytest.raises(ValueError, match=r"outside the processor's pixel bounds \[3136"):
        fn(videos[:1], PROMPTS[:1])
