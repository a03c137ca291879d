"""The runner exports the video job's final model in Hugging Face format (output_dir/hf)."""
from __future__ import annotations

import os

import torch

from mmrl.cli.app import main

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
FAST = ["train.steps=2", "train.prompts_per_step=2", "train.group_size=2", "train.progress=false",
        "video.synthetic_num=4"]


def test_full_run_exports_a_model_that_from_pretrained_loads(tiny_vl_dir, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    out = tmp_path / "run"
    assert main(["train", os.path.join(ROOT, "configs/demo/video_tiny.yaml"), *FAST,
                 f"video.model={tiny_vl_dir}", f"train.output_dir={out}"]) == 0
    model = AutoModelForImageTextToText.from_pretrained(str(out / "hf"))
    AutoProcessor.from_pretrained(str(out / "hf"))
    final = torch.load(out / "final.pt")
    state = model.state_dict()
    assert set(final) <= set(state)
    for k, v in final.items():
        assert torch.equal(state[k], v), k


def test_lora_run_exports_the_adapter_and_merge_lora_a_full_model(tiny_vl_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    out = tmp_path / "run"
    assert main(["train", os.path.join(ROOT, "configs/demo/video_tiny.yaml"), *FAST,
                 f"video.model={tiny_vl_dir}", f"train.output_dir={out}", "video.finetune=lora",
                 "video.lora_rank=4", "video.lora_alpha=8"]) == 0
    assert (out / "hf" / "adapter_config.json").exists()
    base = AutoModelForImageTextToText.from_pretrained(tiny_vl_dir)
    lora = PeftModel.from_pretrained(base, str(out / "hf"))
    final = torch.load(out / "final.pt")
    got = {k: v for k, v in lora.state_dict().items() if "lora_" in k}
    assert len(got) == len(final) > 0
    merged_out = tmp_path / "merged"
    assert main(["train", os.path.join(ROOT, "configs/demo/video_tiny.yaml"), *FAST,
                 f"video.model={tiny_vl_dir}", f"train.output_dir={merged_out}",
                 "video.finetune=lora", "video.lora_rank=4", "video.lora_alpha=8",
                 "train.export_merge_lora=true"]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(str(merged_out / "hf"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, lora(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
