"""Prompt selection, Knapsack budgets and DAPO dynamic sampling wired into the runner."""
import json

import pytest
import torch

from mmrl.train.loop import Rollout, concat_rollouts
from mmrl.train.runner import Run, run_training
from mmrl.config.schema import config_from_dict
from mmrl.demo.toy import ToyPolicy, digit_reward, make_prompts

TOY = {"digits": 5, "length": 3, "num_prompts": 24, "d_model": 16, "layers": 1, "heads": 2}


def _cfg(tmp_path, **train):
    return config_from_dict({"job": "toy", "train": {
        "steps": 4, "prompts_per_step": 4, "group_size": 4, "progress": False,
        "output_dir": str(tmp_path), "log_every": 100, "seed": 3, **train}, "toy": TOY})


def _run(cfg):
    pol = ToyPolicy(cfg.task, seed=cfg.train.seed)
    prompts = make_prompts(cfg.task, cfg.train.seed)
    meta = [{"target": p[::-1]} for p in prompts]
    return run_training(cfg, pol, digit_reward, prompts, meta)


def test_vade_knapsack_dynamic_sampling_and_sample_log(tmp_path):
    cfg = _cfg(tmp_path, selector="vade", rollout_allocation="knapsack", knapsack_n_min=2,
               dynamic_sampling_tries=3, sample_log_every=2)
    hist = _run(cfg)["history"]
    assert len(hist) == 4
    for h in hist:
        assert 1 <= h["dynamic_tries"] <= 3
        assert h["dynamic_groups_kept"] <= 4
    rows = [json.loads(l) for l in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {0, 2}
    assert all(isinstance(r["sample"], list) and "toy" not in r["rewards"] for r in rows)


def test_knapsack_counts_keep_the_budget(tmp_path):
    cfg = _cfg(tmp_path, rollout_allocation="knapsack", knapsack_n_min=2, knapsack_n_max=8)
    prompts = make_prompts(cfg.task, 0)
    run = Run(cfg, ToyPolicy(cfg.task), digit_reward, prompts, [{"target": p} for p in prompts])
    run.selector.update(torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 1.0, 0.0, 1.0]),
                        torch.tensor([0, 0, 1, 1]))
    counts = run.rounds.counts([0, 1, 2, 3])
    assert sum(counts) == 16 and min(counts) >= 2 and max(counts) <= 8
    assert counts[1] >= counts[0]  # a 50% prompt is worth more rollouts than a solved one


def test_resume_restores_the_selector_exactly(tmp_path):
    _run(_cfg(tmp_path / "a", selector="vade", rollout_allocation="knapsack"))
    _run(_cfg(tmp_path / "b", selector="vade", rollout_allocation="knapsack", steps=2))
    resumed = _run(_cfg(tmp_path / "b", selector="vade", rollout_allocation="knapsack"))
    assert resumed["steps"] == 4
    a = torch.load(tmp_path / "a" / "final.pt")
    b = torch.load(tmp_path / "b" / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_concat_rollouts_pads_mask_and_payload():
    def ro(n, T, gid):
        return Rollout(list(range(n)), ["p"] * n, [{}] * n, torch.full((n,), gid),
                       torch.ones(n, T, dtype=torch.bool),
                       {"ids": torch.ones(n, T + 2, dtype=torch.long), "shared": "x"})
    out = concat_rollouts([ro(2, 3, 0), ro(3, 5, 1)])
    assert len(out) == 5 and out.mask.shape == (5, 5)
    assert out.mask[:2, 3:].sum() == 0 and out.mask[2:].all()
    assert out.data["ids"].shape == (5, 7) and out.data["shared"] == "x"
    assert out.group_ids.tolist() == [0, 0, 1, 1, 1]


def test_too_few_prompts_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path, prompts_per_step=4)
    with pytest.raises(ValueError, match="only 2 prompt"):
        run_training(cfg, ToyPolicy(cfg.task), digit_reward, [[1, 2, 3], [3, 2, 1]],
                     [{"target": [1]}] * 2)
