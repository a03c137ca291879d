"""The diffusion job in ``pref.mode: dpo`` (Diffusion-DPO, preset diffusion_dpo) on the tiny SD3:
online pairs from the step's groups and pairs from an image file, through the runner.

Needs the ``pref`` config section and the runner's preference steps (Lane P3, branch i19-p3)
and ``mmrl.algo.preference`` (Lane P1, branch i19-p1).
"""
from __future__ import annotations

import json
import math
import os
import sys

from mmrl.config.jobs import get_job
from mmrl.config.schema import config_from_dict

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import PROMPTS  # noqa: E402


def run(model, out, pref, steps):
    """A diffusion run of 2 prompts x 2 images per step (8x8, 4 steps, LoRA r4) in DPO mode."""
    cfg = config_from_dict({
        "job": "diffusion", "algo": {"preset": "grpo"},
        "pref": {"mode": "dpo", "preset": "diffusion_dpo", **pref},
        "train": {"steps": steps, "prompts_per_step": 2, "group_size": 2, "lr": 1e-3, "seed": 0,
                  "device": "cpu", "progress": False, "output_dir": out, "resume": "never",
                  "log_every": 100},
        "diffusion": {"model": model, "pipeline": "auto", "dtype": "float32", "lora_rank": 4,
                      "lora_alpha": 8, "max_sequence_length": 8, "height": 8, "width": 8,
                      "resolution_multiple": 1, "guidance_scale": 1.0, "num_steps": 4,
                      "eval_num_steps": 4, "reward": "brightness", "prompts": PROMPTS}})
    return get_job("diffusion").run(cfg)


def test_online_pairs_train_the_lora_from_the_groups_best_and_worst(tiny_sd3_path, tmp_path):
    result = run(tiny_sd3_path, str(tmp_path), {}, steps=3)
    history = result["history"]
    assert [h["pairs"] for h in history] == [2.0, 2.0, 2.0]  # one pair per group, no ties
    # LoRA B starts at 0: policy = reference, every margin 0, loss log 2
    assert abs(history[0]["loss"] - math.log(2)) < 1e-6 and history[0]["pref_reward_margin"] == 0.0
    assert all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in history)
    assert history[1]["pref_reward_margin"] != 0.0  # the first update moved the policy


def test_file_pairs_learn_the_preference(tiny_sd3_path, tmp_path):
    from PIL import Image
    records = []
    for i, prompt in enumerate(PROMPTS):  # chosen light, rejected dark
        light, dark = str(tmp_path / f"light{i}.png"), str(tmp_path / f"dark{i}.png")
        Image.new("RGB", (8, 8), (250, 250, 250)).save(light)
        Image.new("RGB", (8, 8), (5, 5, 5)).save(dark)
        records.append({"prompt": prompt, "chosen": light, "rejected": dark})
    records.append({"prompt": PROMPTS[0], "chosen": str(tmp_path / "gone.png"),
                    "rejected": str(tmp_path / "dark0.png")})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in records[:4]))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("\n".join(json.dumps(r) for r in records[2:]))
    result = run(tiny_sd3_path, str(tmp_path / "out"), {"pairs": "file",
                                                        "pairs_file": str(pairs),
                                                        "eval_pairs": str(held_out)}, steps=10)
    losses = [h["loss"] for h in result["history"]]
    assert abs(losses[0] - math.log(2)) < 1e-6 and losses[-1] < 0.3
    assert all(map(math.isfinite, losses))
    first, last = result["pref_eval"][0], result["pref_eval"][-1]
    assert (first["accuracy"], first["pairs"]) == (0.5, 2.0)  # unreadable record left out
    assert last["accuracy"] == 1.0 and last["margin"] > 0


def test_the_config_refuses_what_flow_scores_cannot_carry_and_checks_the_verifier(tiny_sd3_path,
                                                                                 tmp_path):
    """The job's check_pref runs with the config check: SimPO (reference-free) is refused with
    its reason, and pref.verifier is parsed like diffusion.reward (an unknown scorer named)."""
    import pytest

    from mmrl.config.core import ConfigError
    base = {"job": "diffusion", "train": {"output_dir": str(tmp_path)},
            "diffusion": {"model": tiny_sd3_path, "reward": "brightness", "prompts": PROMPTS}}
    with pytest.raises(ConfigError, match="reference_free=true"):
        config_from_dict({**base, "pref": {"mode": "dpo", "preset": "simpo"}})
    with pytest.raises(ConfigError, match="pref.verifier: unknown scorer 'brightnes'"):
        config_from_dict({**base, "pref": {"mode": "veripo", "grpo_steps": 1, "dpo_steps": 1,
                                           "verifier": "brightnes"}})
    ok = config_from_dict({**base, "pref": {"mode": "veripo", "grpo_steps": 1, "dpo_steps": 1,
                                            "verifier": "brightness:weight=2"}})
    assert ok.pref.verifier == "brightness:weight=2"


def test_the_jobs_pair_reader_resolves_image_paths_against_the_files_folder(tmp_path):
    from mmrl.diffusion.job import read_pair_file
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "img/a.png",
                                "rejected": "/abs/b.png"}) + "\n")
    (rec,) = read_pair_file(str(path))
    assert rec == {"prompt": "a", "chosen": str(tmp_path / "sub" / "img" / "a.png"),
                   "rejected": "/abs/b.png"}
