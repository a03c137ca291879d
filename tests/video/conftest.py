"""Fixtures for the video tests: synthetic mp4s (mmrl.video.synthetic), tiny Qwen2.5-VL."""
from __future__ import annotations

import pytest

from mmrl.video import synthetic


@pytest.fixture
def synth():
    """The synthetic-video module: ``synth.scene_cuts([6, 5])``, ``synth.slow_pan(20)``, ..."""
    return synthetic


@pytest.fixture
def make_video(tmp_path):
    """``make_video(frames, fps=10, name="v.mp4") -> path`` inside the test's tmp dir."""
    def _make(frames, fps: float = 10.0, name: str = "v.mp4") -> str:
        return synthetic.write_mp4(tmp_path / name, frames, fps)
    return _make


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_qwen(folder: str):
    """Save a tiny Qwen2.5-VL processor (byte-level tokenizer) and model to ``folder``
    (recipe: ../shared/TINY_MODELS.md)."""
    import json
    import os

    from tokenizers import pre_tokenizers
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2Tokenizer, Qwen2VLImageProcessor,
                              Qwen2VLVideoProcessor)

    os.makedirs(folder, exist_ok=True)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = Qwen2Tokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", additional_special_tokens=specials)
    pix = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2,
               temporal_patch_size=2)
    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pix), tokenizer=tok,
                               video_processor=Qwen2VLVideoProcessor(**pix),
                               chat_template=CHAT_TEMPLATE)
    proc.save_pretrained(folder)
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                          "mrope_section": [2, 3, 3]},
                         bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
        **ids)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """Folder of a tiny Qwen2.5-VL processor + model saved with ``save_pretrained``."""
    return build_tiny_qwen(str(tmp_path_factory.mktemp("tiny_qwen")))


@pytest.fixture(scope="session")
def tiny_processor(tiny_qwen_dir):
    """The tiny processor loaded the way a user loads a checkpoint's processor."""
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(tiny_qwen_dir)
