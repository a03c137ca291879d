"""The diffusion job end to end on a tiny SD3 pipeline saved to a temp dir and loaded by path."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from mmrl.config import ConfigError
from mmrl.loop import LoopSettings, update
from mmrl.losses import PolicyLoss
from mmrl.reward_fn import RewardBatch

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import PROMPTS, tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _policy(cfg):
    from mmrl.diffusion.train import build_policy

    spec = cfg.algo.resolve()
    return build_policy(cfg.task, "cpu", spec)


def _lora(policy):
    return {k: v.detach().clone() for k, v in policy.state_dict().items() if "lora" in k}


def test_recipes_validate_and_carry_the_paper_settings():
    from mmrl.schema import load_config

    flow = load_config(REPO / "configs/diffusion/sd35m_pickscore_flow_grpo.yaml")
    d, a, t = flow.task, flow.algo, flow.train
    assert (d.num_steps, d.eval_num_steps, t.group_size, a.eps_low, a.eps_high, a.beta,
            a.adv_clip, d.lora_rank, d.lora_alpha, d.sampler) == (
        10, 40, 24, 1e-4, 1e-4, 0.01, 5.0, 32, 64, "full")
    g2 = load_config(REPO / "configs/diffusion/flux_hps_g2rpo.yaml")
    assert (g2.task.pipeline, g2.task.reward, g2.task.sampler, g2.task.granularities,
            g2.task.shared_noise) == ("flux", "hps_v2.1", "singular", [1, 2], True)
    tree = load_config(REPO / "configs/diffusion/sd35m_pickscore_tree.yaml")
    assert tree.train.group_size == 2 ** 3 and tree.task.sampler == "tree"
    demo = load_config(REPO / "configs/demo/diffusion_tiny.yaml")
    assert demo.task.reward == "brightness" and demo.algo.max_len == demo.task.num_steps - 1


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


def test_bad_prompt_files_fail_clearly(tmp_path):
    from mmrl.diffusion.train import DiffusionConfig, load_prompts

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


def test_over_long_prompts_are_truncated_with_a_counted_warning(tiny_sd3_path, tmp_path):
    cfg = tiny_config(tiny_sd3_path, str(tmp_path))
    policy = _policy(cfg)
    with pytest.warns(UserWarning, match="1 of 2 prompts are longer than CLIP's 77 tokens"):
        policy.rollout(["x" * 120, "short"], [{}, {}], 2, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sampler", ["full", "window", "singular", "tree"])
def test_logp_before_the_first_update_equals_the_sampling_logp(tiny_sd3_path, tmp_path, sampler):
    """ratio = exp(logp − logp_sampled) is exactly 1 before any update, through the job path."""
    cfg = tiny_config(tiny_sd3_path, str(tmp_path), sampler=sampler)
    policy = _policy(cfg)
    with torch.no_grad():
        rollout = policy.rollout(PROMPTS[:2], [{}, {}], 2, torch.Generator().manual_seed(0))
    traj, index, mask = rollout.data["trajectory"].traj, rollout.data["index"], rollout.mask
    # every sampled transition is trained (singular: once per granularity row)
    assert sorted(set(index[mask].tolist())) == list(range(traj.num_transitions))
    sampled = torch.where(mask, traj.logp[index], torch.zeros(()))
    rows = torch.arange(len(rollout))
    T = mask.shape[1]
    by_step = torch.cat([policy.logp(rollout, rows, t, t + 1) for t in range(T)], 1)
    whole = policy.logp(rollout, rows, 0, T)
    if sampler in ("full", "window"):  # one step's rows per call, as when sampling: bit for bit
        assert torch.equal(by_step.detach(), sampled)
    torch.testing.assert_close(whole.detach(), sampled, rtol=0, atol=1e-6)
    assert whole.requires_grad


def _run(cfg):
    from mmrl.diffusion.train import run

    return run(cfg)


# (reward_mean, grad_norm) per step, pinned on CPU (torch 2.14.1, diffusers 0.42.1, seed 0).
PINNED = {
    "full": [(0.5083159804344177, 0.0019750394858419895),
             (0.5161511898040771, 0.003017204347997904)],
    "window": [(0.5123003125190735, 0.0017914528725668788),
               (0.5103429555892944, 0.0018544350750744343)],
    "sliding": [(0.5057342052459717, 0.0006937419530004263),
                (0.5120634436607361, 0.0012919867876917124)],
    "singular": [(0.5047793388366699, 0.0011616609990596771),
                 (0.5113945007324219, 0.001387351076118648)],
    "tree": [(0.5054961442947388, 0.0016624531708657742),
             (0.5102717876434326, 0.001543707214295864)],
}


@pytest.mark.parametrize("sampler", sorted(PINNED))
def test_a_few_steps_per_sampler_train_the_lora_with_pinned_values(tiny_sd3_path, tmp_path,
                                                                   sampler):
    cfg = tiny_config(tiny_sd3_path, str(tmp_path), sampler=sampler, train={"steps": 2})
    before = _lora(_policy(cfg))
    summary = _run(cfg)
    after = {k: v for k, v in torch.load(tmp_path / "final.pt").items() if "lora" in k}
    assert after.keys() == before.keys() and len(after) > 0
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed, "no LoRA weight changed"
    got = [(h["reward_mean"], h["grad_norm"]) for h in summary["history"]]
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in summary["history"]])))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(PINNED[sampler]), rtol=1e-4,
                               atol=1e-7)
