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
    "full": [(0.5083159804344177, 0.0016564513789489865),
             (0.5162512063980103, 0.003440663916990161)],
    "window": [(0.5123003125190735, 0.0011956308735534549),
               (0.5107721090316772, 0.0014545547310262918)],
    "sliding": [(0.5057342052459717, 0.0005343189695850015),
                (0.512215256690979, 0.0009573724819347262)],
    "singular": [(0.5047793388366699, 0.0008947165333665907),
                 (0.5115194320678711, 0.000961851910687983)],
    "tree": [(0.5054961442947388, 0.0011951077030971646),
             (0.5103175640106201, 0.0012662602821364999)],
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


def _grads_after_update(policy, rollout, adv, loss_fn, **settings):
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)  # a step that keeps the weights and leaves .grad
    s = LoopSettings(group_size=2, max_grad_norm=0.0, **settings)
    update(policy, opt, loss_fn, rollout, adv, s, torch.Generator().manual_seed(0))
    return torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("sampler", ["full", "tree"])
def test_t_chunked_and_micro_batched_gradients_equal_the_unsplit_gradient(tiny_sd3_path,
                                                                          tmp_path, sampler):
    cfg = tiny_config(tiny_sd3_path, str(tmp_path), sampler=sampler, algo={"beta": 0.05})
    policy = _policy(cfg)
    with torch.no_grad():
        rollout = policy.rollout(PROMPTS[:2], [{}, {}], 2, torch.Generator().manual_seed(0))
    adv = torch.linspace(-1.5, 1.3, len(rollout))
    loss_fn = PolicyLoss("grpo", beta=0.05)  # the KL term runs ref_logp (adapter disabled) too
    whole = _grads_after_update(policy, rollout, adv, loss_fn)
    chunked = _grads_after_update(policy, rollout, adv, loss_fn, t_chunk=1, micro_batch_size=3)
    assert whole.abs().sum() > 0
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-9)


def test_resume_reproduces_the_uninterrupted_run(tiny_sd3_path, tmp_path):
    straight = tiny_config(tiny_sd3_path, str(tmp_path / "a"), sampler="sliding",
                           sliding_shift_every=1, train={"steps": 3})
    _run(straight)
    first = tiny_config(tiny_sd3_path, str(tmp_path / "b"), sampler="sliding",
                        sliding_shift_every=1, train={"steps": 2, "save_every": 1})
    _run(first)
    rest = tiny_config(tiny_sd3_path, str(tmp_path / "b"), sampler="sliding",
                       sliding_shift_every=1, train={"steps": 3, "resume": "auto"})
    summary = _run(rest)
    assert summary["steps"] == 3 and len(summary["history"]) == 1
    a, b = torch.load(tmp_path / "a" / "final.pt"), torch.load(tmp_path / "b" / "final.pt")
    assert a.keys() == b.keys() and int(b["mmrl_rollout_iteration"]) == 3
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("sampler", ["singular", "tree"])
def test_non_finite_rewards_are_dropped_counted_and_training_goes_on(tiny_sd3_path, tmp_path,
                                                                     sampler):
    from mmrl.loop import learn

    cfg = tiny_config(tiny_sd3_path, str(tmp_path), sampler=sampler)
    policy = _policy(cfg)
    with torch.no_grad():
        rollout = policy.rollout(PROMPTS[:2], [{}, {}], 2, torch.Generator().manual_seed(0))
    B = len(rollout.samples)
    values = torch.linspace(0.0, 1.0, B)
    values[0], values[3] = float("nan"), float("inf")
    rewards = RewardBatch(values[:, None], ["r"], torch.isfinite(values))
    adv = policy.advantages(rollout, rewards)
    params = [p for p in policy.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    out = learn(policy, torch.optim.AdamW(params, lr=1e-2), PolicyLoss("grpo"), rollout, rewards,
                LoopSettings(group_size=2), torch.Generator().manual_seed(0))
    assert out["dropped_samples"] == 2 and out["samples"] == B - 2
    assert torch.isfinite(adv).all() and torch.isfinite(torch.tensor(out["loss"]))
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    if sampler == "singular":  # rows are reward rows (m·G + g); groups (k, prompt, g) of 2
        # rows 0 and 3 failed; rows 2 and 1 are then alone in their groups: all four get 0
        assert torch.equal(adv[:4], torch.zeros(4)) and bool((adv[4:] != 0).all())


def test_singular_advantages_sum_to_the_g2rpo_integrated_advantage(tiny_sd3_path, tmp_path):
    from mmrl.diffusion import g2rpo_advantages

    cfg = tiny_config(tiny_sd3_path, str(tmp_path), sampler="singular", algo={"adv_eps": 1e-8})
    policy = _policy(cfg)
    with torch.no_grad():
        rollout = policy.rollout(PROMPTS[:2], [{}, {}], 3, torch.Generator().manual_seed(1))
    traj = rollout.data["trajectory"].traj
    r = torch.rand(len(rollout.samples), generator=torch.Generator().manual_seed(2))
    rows = policy.advantages(rollout, RewardBatch(r[:, None], ["r"], torch.ones(len(r), dtype=bool)))
    per_member = torch.zeros(traj.num_transitions).index_add_(0, traj.output_owner, rows)
    torch.testing.assert_close(per_member, g2rpo_advantages(r, traj, eps=1e-8))


def test_periodic_evaluation_writes_grids_and_eval_jsonl(tiny_sd3_path, tmp_path):
    cfg = tiny_config(tiny_sd3_path, str(tmp_path), train={"steps": 3},
                      eval_every=2, eval_prompts=["a red apple", "a dark night", "a cat"],
                      eval_batch_size=2)
    summary = _run(cfg)
    lines = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 2, 3]  # first step, every 2, after the last
    assert summary["eval"]["step"] == 3
    from PIL import Image
    grid = Image.open(tmp_path / "eval" / "step_000000.png")
    assert grid.size[0] == 3 * 128 and grid.size[1] > 128  # 8 px upscaled x16, captions below
    # fixed noise: the base weights (LoRA B = 0 before training) evaluate to step 0's numbers
    from mmrl.diffusion.evaluate import Evaluator, ImageReward
    from mmrl.rewards import compose
    again = Evaluator(_policy(cfg), cfg.task.eval_prompts, ImageReward(compose("brightness")),
                      {}, tmp_path / "again", seed=cfg.train.seed, batch_size=3)(0)
    assert again["reward_mean"] == lines[0]["reward_mean"]
    assert lines[2]["reward_mean"] != lines[0]["reward_mean"]


def test_save_grid_rejects_bad_input(tmp_path):
    from mmrl.diffusion.evaluate import save_grid

    with pytest.raises(ValueError, match="expected a float tensor"):
        save_grid(torch.rand(2, 8, 8), ["a", "b"], tmp_path / "g.png")
    with pytest.raises(ValueError, match="one caption per image"):
        save_grid(torch.rand(2, 3, 8, 8), ["a"], tmp_path / "g.png")
    path = save_grid(torch.rand(5, 3, 8, 8), list("abcde"), tmp_path / "g.png", cols=2)
    assert path.exists()


def test_cli_builds_the_tiny_pipeline_and_trains_from_yaml(tmp_path):
    import subprocess

    import yaml

    from mmrl.cli import main

    model = tmp_path / "tiny"
    assert main(["diffusion", "tiny-pipeline", str(model), "--size", "8"]) == 0
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
