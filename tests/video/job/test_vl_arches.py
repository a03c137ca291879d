"""Qwen-specific checks on each Qwen architecture (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), tiny models
loaded by path: positions against the model's own ``get_rope_index``, LoRA/freezing targets,
other model types refused. Rollout logp = recomputed logp, logits = the plain HF forward and a
short job run are the adapter conformance suite's (tests/video/models/test_qwen_vl.py)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from vt_helpers import VIDEO, make_policy  # noqa: E402

ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
UNIFORM = dict(VIDEO, mode="uniform")  # one video entry per video: its grid t is frames / 2


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    from mmrl.video.tiny import build_tiny_qwen2_vl, build_tiny_qwen3_vl, build_tiny_qwen_vl
    root = tmp_path_factory.mktemp("arches")
    return {"qwen2_vl": build_tiny_qwen2_vl(str(root / "q2")),
            "qwen2_5_vl": build_tiny_qwen_vl(str(root / "q25")),
            "qwen3_vl": build_tiny_qwen3_vl(str(root / "q3"))}


def _image_meta(seed=0, size=64):
    from PIL import Image
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3),
                                                               dtype=np.uint8))
    return {"messages": [{"role": "user", "content": [
        {"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]}]}


def _video_meta(frames, seed=0, size=64):
    """A conversation with a random-noise video of ``frames`` frames at 2 fps."""
    rgb = np.random.default_rng(seed).integers(0, 255, (frames, size, size, 3), dtype=np.uint8)
    return {"messages": [{"role": "user", "content": [
        {"type": "video", "video": torch.from_numpy(rgb), "sample_fps": 2.0},
        {"type": "text", "text": "Which way?"}]}]}


def _types(ids, cfg):
    """mm_token_type_ids as the processor makes them: text 0, image 1, video 2."""
    return (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()


@pytest.mark.parametrize("arch", ARCHS)
def test_builders_load_by_path_with_lora_on_the_language_model_only(arch, arch_dirs):
    from mmrl.video.policy import load_qwen_vl
    model, proc = load_qwen_vl(arch_dirs[arch], finetune="lora", lora_rank=4, lora_alpha=8)
    assert model.get_base_model().config.model_type == arch
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # 2 layers x (q, k, v, o) x (A, B): every LoRA on the language model, none in the tower
    assert len(trainable) == 16
    assert all("lora_" in n and ".language_model." in n and "visual" not in n for n in trainable)
    full, _ = load_qwen_vl(arch_dirs[arch], finetune="full", freeze_vision=True)
    frozen = {n for n, p in full.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {n for n, _ in full.named_parameters()
                                 if n.startswith("model.visual.")}


def test_other_model_types_are_refused_with_the_supported_list(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmrl.video.policy import QwenVLPolicy, load_qwen_vl
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="model_type='llama'.*qwen2_vl, qwen2_5_vl, "
                                                  "qwen3_vl"):
        load_qwen_vl(str(tmp_path))
    with pytest.raises(NotImplementedError, match="'llama'"):
        QwenVLPolicy(model, type("P", (), {"tokenizer": None})())


@pytest.mark.parametrize("arch", ("qwen2_vl", "qwen3_vl"))
def test_positions_equal_the_models_get_rope_index_where_it_is_right(arch, arch_dirs):
    """Image and one-temporal-grid video: ours == HF. Qwen3-VL (every video block one temporal
    grid, behind a timestamp): == HF for a longer video too, and == the Qwen2-VL rule on the
    split grids."""
    from mmrl.video.qwen_inputs import mrope_position_ids, qwen2_position_ids
    pol = make_policy(arch_dirs[arch], video=UNIFORM)  # one video entry of frames / 2 grids
    inner, cfg = pol.base.model, pol.cfg
    for meta in (_image_meta(), _video_meta(2), _video_meta(6)):
        r = pol._encode_one(meta["messages"])
        ids = r["input_ids"]
        ours, delta = mrope_position_ids(inner, r)
        grid = r.get("video_grid_thw")
        hf, hf_delta = inner.get_rope_index(
            ids, mm_token_type_ids=_types(ids, cfg), image_grid_thw=r.get("image_grid_thw"),
            video_grid_thw=None if grid is None else grid.clone())
        assert grid is None or grid[:, 0].tolist() == [len(meta["messages"][0]["content"][0]
                                                         ["video"]) // 2]
        if grid is not None and arch == "qwen2_vl":  # +1 per temporal grid, no time scaling
            t_pos = ours[0, 0, ids[0] == cfg.video_token_id].unique()
            assert t_pos.tolist() == list(range(int(t_pos[0]), int(t_pos[0]) + int(grid[0, 0])))
        torch.testing.assert_close(ours, hf, rtol=0, atol=0)
        torch.testing.assert_close(delta, hf_delta, rtol=0, atol=0)
        if arch == "qwen3_vl" and grid is not None:
            split = torch.repeat_interleave(grid, grid[:, 0], 0)
            split[:, 0] = 1
            oracle, _ = qwen2_position_ids(ids, None, split, video_token_id=cfg.video_token_id,
                                           spatial_merge_size=2)
            torch.testing.assert_close(ours, oracle, rtol=0, atol=0)
            text = pol.tok.decode(ids[0])
            assert text.count(" seconds>") == int(grid[0, 0])  # one timestamp per grid


def test_qwen2_text_after_a_long_video_resumes_after_all_its_positions(arch_dirs):
    """More temporal grids than spatial cells (t=4, h=w=2 merged): transformers 5.24 resumes the
    text at s + max(h, w)/merge, inside the video's temporal positions; ours after them."""
    from transformers import AutoModelForImageTextToText

    from mmrl.video.qwen_inputs import qwen2_position_ids
    inner = AutoModelForImageTextToText.from_pretrained(arch_dirs["qwen2_vl"]).model
    cfg = inner.config
    vid, start, end = cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    ids = torch.tensor([[7, start] + [vid] * 16 + [end, 8, 9]])
    grid = torch.tensor([[4, 4, 4]])  # 4 temporal grids of 2x2 merged cells
    ours, delta = qwen2_position_ids(ids, None, grid, video_token_id=vid, spatial_merge_size=2)
    # video block starts at 2: temporal 2..5, spatial 2..3; text resumes at 6
    assert ours[:, 0, 2:18].amax(1).tolist() == [5, 3, 3]
    assert ours[0, 0, 18:].tolist() == [6, 7, 8] and delta.tolist() == [[8 + 1 - 21]]
    hf, _ = inner.get_rope_index(ids, mm_token_type_ids=_types(ids, cfg), video_grid_thw=grid)
    assert hf[0, 0, 18:].tolist() == [4, 5, 6]  # re-uses temporal positions 4, 5 of the video
