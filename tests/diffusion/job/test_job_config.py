"""The diffusion job: recipes, config checks, prompt files, grids and the CLI."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from mmrl.config.core import ConfigError

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def test_recipes_validate_and_carry_the_paper_settings():
    from mmrl.config.schema import load_config

    flow = load_config(REPO / "configs/diffusion/sd35m_pickscore_flow_grpo.yaml")
    d, a, t = flow.task, flow.algo, flow.train
    assert (d.num_steps, d.eval_num_steps, t.group_size, a.eps_low, a.eps_high, a.beta,
            a.adv_clip, d.lora_rank, d.lora_alpha, d.sampler) == (
        10, 40, 24, 1e-4, 1e-4, 0.01, 5.0, 32, 64, "full")
    g2 = load_config(REPO / "configs/diffusion/flux_hps_g2rpo.yaml")
    assert (g2.task.pipeline, g2.task.reward, g2.task.sampler, g2.task.granularities,
            g2.task.shared_noise) == ("flux", "hps_v2.1", "singular", [1, 2], True)
    guard = load_config(REPO / "configs/diffusion/sd35m_pickscore_grpo_guard.yaml")
    spec = guard.algo.resolve()  # flow_grpo's pickscore_hps_sd3_ratio_norm
    assert (spec.ratio_level, spec.step_reweight, spec.eps_low, spec.eps_high, spec.beta,
            spec.adv_clip, spec.advantage, guard.train.lr, guard.train.num_mini_batches,
            guard.task.guidance_scale, guard.task.sampler, guard.task.trained_steps()) == (
        "ratio_norm", True, 4e-6, 4e-6, 0.0, 5.0, "grpo", 1e-4, 2, 4.5, "full", 9)
    dance = load_config(REPO / "configs/diffusion/flux_hps_dancegrpo.yaml")
    assert (dance.task.kind, dance.task.noise_level, dance.task.timestep_fraction,
            dance.task.trained_steps(), dance.train.group_size, dance.task.shared_noise) == (
        "dance", 0.3, 0.6, 9, 12, True)  # finetune_flux_grpo.sh
    tree = load_config(REPO / "configs/diffusion/sd35m_pickscore_tree.yaml")
    assert tree.train.group_size == 2 ** 3 and tree.task.sampler == "tree"
    demo = load_config(REPO / "configs/demo/diffusion_tiny.yaml")
    assert demo.task.reward == "prompt_color" and demo.algo.max_len == demo.task.num_steps - 1


def test_config_reports_every_problem_before_any_work(tiny_sd3_path, tmp_path):
    with pytest.raises(ConfigError) as err:  # section problems, all at once
        tiny_config(tiny_sd3_path, str(tmp_path), sampler="tree", height=20,
                    resolution_multiple=16, tree_noise_levels=[0.7], prompts=[])
    text = str(err.value)
    for needle in ("height/width: got 20x8; expected multiples of resolution_multiple=16; use "
                   "16x16", "tree_noise_levels: got 1 levels", "no training prompts"):
        assert needle.replace("; use", " (VAE factor x patch size); use") in text or \
            needle in text, text
    with pytest.raises(ConfigError) as err:  # then the cross-section checks, all at once
        tiny_config(tiny_sd3_path, str(tmp_path), sampler="tree",
                    train={"group_size": 3, "dynamic_sampling_tries": 2})
    text = str(err.value)
    assert "train.group_size: got 3; sampler=tree gives" in text and \
        "dynamic_sampling_tries" in text, text
    with pytest.raises(ConfigError, match="algo.advantage: 'remax' needs the reward of a greedy "
                       "completion per prompt, and a flow-matching generator has none"):
        tiny_config(tiny_sd3_path, str(tmp_path), algo={"preset": "remax"})


def test_the_section_names_the_registries_choices_and_preflight_checks_the_family(
        tiny_sd3_path, tmp_path):
    from mmrl.diffusion.config import SDE_KIND_NAMES, SDE_KL_FORM_NAMES, preflight
    from mmrl.diffusion.sde import SDE_KINDS, SDE_KL_FORMS

    # the torch-free section lists the names of the registries in sde.py (which imports torch)
    assert list(SDE_KIND_NAMES) == SDE_KINDS.names()
    assert list(SDE_KL_FORM_NAMES) == SDE_KL_FORMS.names()
    assert preflight(tiny_config(tiny_sd3_path, str(tmp_path), pipeline="auto")) == []
    wrong = preflight(tiny_config(tiny_sd3_path, str(tmp_path), pipeline="flux"))
    assert wrong == [f"diffusion.pipeline: diffusion.pipeline='flux' adapts FluxPipeline but "
                     f"{tiny_sd3_path!r} is a StableDiffusion3Pipeline; set "
                     f"diffusion.pipeline=auto (or sd3)"]
    other = tmp_path / "cogvideo"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
    got = preflight(tiny_config(str(other), str(tmp_path)))
    assert len(got) == 1 and got[0].startswith(
        "diffusion.pipeline: no flow adapter for the pipeline class 'CogVideoXPipeline'; "
        "supported: "
        "sd3 (StableDiffusion3Pipeline), flux (FluxPipeline)")
    with pytest.raises(ConfigError, match="pipeline: got 'sdxl'; expected one of"):
        tiny_config(tiny_sd3_path, str(tmp_path), pipeline="sdxl")


def test_bad_prompt_files_fail_clearly(tmp_path):
    from mmrl.diffusion.config import DiffusionConfig
    from mmrl.diffusion.job import load_prompts

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompts(DiffusionConfig(prompt_file=str(empty)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(DiffusionConfig(prompt_file=str(tmp_path / "nope.txt")))
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c"}\n')
    train, evals = load_prompts(DiffusionConfig(prompt_file=str(good), eval_holdout=1))
    assert (train, evals) == (["a", "b"], ["c"])


def test_save_grid_rejects_bad_input(tmp_path):
    from mmrl.diffusion.evaluate import save_grid

    with pytest.raises(ValueError, match="expected a float tensor"):
        save_grid(torch.rand(2, 8, 8), ["a", "b"], tmp_path / "g.png")
    with pytest.raises(ValueError, match="one caption per image"):
        save_grid(torch.rand(2, 3, 8, 8), ["a"], tmp_path / "g.png")
    path = save_grid(torch.rand(5, 3, 8, 8), list("abcde"), tmp_path / "g.png", cols=2)
    assert path.exists()


def test_save_grid_layout_and_weighted_columns(tmp_path):
    from PIL import Image

    from mmrl.diffusion.evaluate import save_grid, weighted

    # 5 flat 8x8 images, 2 columns: zoom 16 -> 128 px cells, one caption line -> 18 px of text
    levels = [0.0, 0.25, 0.5, 0.75, 1.0]
    images = torch.tensor(levels)[:, None, None, None].expand(5, 3, 8, 8)
    grid = Image.open(save_grid(images, list("abcde"), tmp_path / "g.png", cols=2))
    assert grid.size == (2 * 128, 3 * (128 + 18))
    cells = [grid.getpixel(((i % 2) * 128 + 64, (i // 2) * 146 + 64))[0] for i in range(5)]
    assert cells == [round(v * 255) for v in levels]  # row-major, rounded to uint8
    cols = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0, 20.0])}
    assert weighted(cols, {"a": 2.0}).tolist() == [12.0, 24.0]  # a missing weight is 1


def test_cli_builds_the_tiny_pipeline_and_trains_from_yaml(tmp_path):
    import subprocess

    import yaml

    from mmrl.cli.app import main

    model = tmp_path / "tiny"
    assert main(["diffusion", "tiny-pipeline", str(model), "--size", "8",
                 "--demo"]) == 0  # the demo's linear VAE
    assert (model / "model_index.json").exists()
    cfg = yaml.safe_load((REPO / "configs/demo/diffusion_tiny.yaml").read_text())
    cfg["diffusion"].update(model=str(model), height=8, width=8, num_steps=3, eval_every=0)
    cfg["train"].update(steps=1, prompts_per_step=2, group_size=2, progress=False,
                        output_dir=str(tmp_path / "run"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    assert (tmp_path / "run" / "final.pt").exists()
    exe = Path(sys.executable).parent / "mmrl"
    out = subprocess.run([str(exe), "diffusion", "tiny-pipeline", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "mmrl train configs/demo/diffusion_tiny.yaml" in out.stdout


def test_evaluation_is_wired_on_the_main_rank_only(tmp_path):
    from types import SimpleNamespace

    from mmrl.diffusion.evaluate import Evaluator
    from mmrl.diffusion.job import attach_evaluator

    cfg = tiny_config(str(tmp_path), str(tmp_path), eval_every=2, eval_prompts=["a cat"])
    for is_main in (False, True):
        policy = SimpleNamespace(evaluator=None, eval_every=0)
        attach_evaluator(policy, cfg, ["a cat"], reward=None, is_main=is_main)
        assert isinstance(policy.evaluator, Evaluator) is is_main
        assert policy.eval_every == (2 if is_main else 0)
    policy = SimpleNamespace(evaluator=None, eval_every=0)
    with pytest.warns(UserWarning, match="no eval prompts; evaluation is off"):
        attach_evaluator(policy, cfg, [], reward=None, is_main=True)
    assert policy.evaluator is None


def test_the_reward_must_score_the_jobs_media(tmp_path):
    """A video reward on an image job, an image reward on a video job and bad ``frames`` lift
    options are config problems naming the value and the fix (torch-free, before any work)."""
    from mmrl.diffusion.config import reward_media_problems

    with pytest.raises(ConfigError) as err:
        tiny_config(str(tmp_path), str(tmp_path), reward="motion_direction")
    assert ("reward: motion_direction scores videos [B, F, 3, H, W] but diffusion.frames=0 (an "
            "image job); set diffusion.frames to the frames per sample of a video family") in \
        str(err.value)
    assert reward_media_problems("pickscore:weight=2,flicker", 9) == [
        "reward: pickscore scores images [B, 3, H, W] but diffusion.frames=9 (a video job: "
        "samples are [F, 3, H, W]); lift it: frames:scorer=pickscore:reduce=mean (num=N to "
        "score N frames), or set diffusion.frames=0 for an image family"]
    assert reward_media_problems("frames:scorer=pickscore:num=8,motion_direction", 9) == []
    assert reward_media_problems("frames:scorer=pickscore:num=8:every=2", 9) == [
        "reward: frames: got num and every; pick one way to sample frames (num=N uniformly "
        "spaced, indices=[...] or every=k)"]
    assert reward_media_problems("frames:scorer=brightness", 0)[0].startswith(
        "reward: frames scores videos")
    # the frame sampling is checked against the job's frame count before any work
    assert reward_media_problems("frames:scorer=pickscore:num=12", 9) == [
        "reward: frames: num=12 but the videos have 9 frames; expected 1 <= num <= 9"]
    assert reward_media_problems("frames:scorer=pickscore:indices=[0,9]", 9) == [
        "reward: frames: indices=[0, 9]; expected a non-empty list of indices in [-9, 8] for "
        "videos of 9 frames"]
    assert reward_media_problems("frames:scorer=pickscore:reduce=frame:frame=-10", 9) == [
        "reward: frames: frame=-10 but the videos have 9 frames; expected an index in [-9, 8] "
        "(-1: the last)"]
    assert reward_media_problems("frames:scorer=pickscore:every=0", 9) == [
        "reward: frames: every=0; expected a positive step"]
