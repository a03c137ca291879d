"""Small configs of the diffusion job on the tiny pipeline (uniquely named helper module)."""
from __future__ import annotations

from mmrl.config.schema import config_from_dict

PROMPTS = ["a red apple", "a blue sky", "a white cat", "a dark night"]


def tiny_config(model: str, out: str, sampler: str = "full", train=None, algo=None, **section):
    """A RunConfig for 2 prompts x 2 samples, 4 steps, 8x8 images, LoRA r4 (CPU, ~0.1 s/step)."""
    data = {
        "job": "diffusion",
        "algo": {"preset": "grpo", **(algo or {})},
        "train": {"steps": 2, "prompts_per_step": 2, "group_size": 2, "lr": 1e-2, "seed": 0,
                  "device": "cpu", "progress": False, "output_dir": out, "resume": "never",
                  "log_every": 100, **(train or {})},
        "diffusion": {"model": model, "pipeline": "auto", "dtype": "float32", "lora_rank": 4,
                      "lora_alpha": 8, "max_sequence_length": 8, "height": 8, "width": 8,
                      "resolution_multiple": 1, "guidance_scale": 1.0, "num_steps": 4,
                      "eval_num_steps": 4, "sampler": sampler, "window": 2,
                      "singular_steps": [0, 1], "granularities": [1, 2],
                      "tree_split_steps": [1], "tree_branching": 2, "reward": "brightness",
                      "prompts": PROMPTS, **section},
    }
    return config_from_dict(data)
