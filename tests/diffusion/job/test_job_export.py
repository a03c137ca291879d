"""The runner exports the diffusion job's final policy in diffusers format (output_dir/hf)."""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import tiny_config  # noqa: E402


def test_lora_run_exports_an_adapter_that_diffusers_loads(tiny_sd3_path, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from mmrl.diffusion.job import run
    out = tmp_path / "run"
    cfg = tiny_config(str(tiny_sd3_path), str(out))
    run(cfg)
    info = json.loads((out / "hf" / "mmrl_export.json").read_text())
    assert info["finetune"] == "lora" and not info["merged"]
    final = torch.load(out / "final.pt")
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_path),
                                                    text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(out / "hf"))
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if "lora" in k}
    trained = {k: v for k, v in final.items() if "lora" in k}
    assert len(loaded) == len(trained) > 0
    # diffusers names the adapter "default_0"; the tensors are the trained ones
    by_shape = sorted(float(v.double().sum()) for v in loaded.values())
    assert by_shape == sorted(float(v.double().sum()) for v in trained.values())


def test_export_can_be_turned_off(tiny_sd3_path, tmp_path):
    from mmrl.diffusion.job import run
    out = tmp_path / "run"
    run(tiny_config(str(tiny_sd3_path), str(out), train={"steps": 1, "export": False}))
    assert (out / "final.pt").exists() and not (out / "hf").exists()
