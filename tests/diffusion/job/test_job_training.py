"""The diffusion job end to end on a tiny SD3 pipeline: training per sampler, resume, evaluation."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch


sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def _policy(cfg):
    from mmrl.diffusion.job import build_policy

    spec = cfg.algo.resolve()
    return build_policy(cfg.task, "cpu", spec)


def _lora(policy):
    return {k: v.detach().clone() for k, v in policy.state_dict().items() if "lora" in k}


def _run(cfg):
    from mmrl.diffusion.job import run

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
    # the sampler's model evaluations reach the metrics (2 prompts x 2 samples, 4 steps: the
    # full SDE run evaluates every sample at every step; the others spend their own counts)
    assert all(h["nfe"] > 0 and h["nfe_per_sec"] > 0 for h in summary["history"])
    if sampler in ("full", "window", "sliding"):
        assert [h["nfe"] for h in summary["history"]] == [4 * 4, 4 * 4]
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in summary["history"]])))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(PINNED[sampler]), rtol=1e-4,
                               atol=1e-7)


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
    assert a.keys() == b.keys() and _saved_rollout_iteration(tmp_path / "b") == 3
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _saved_rollout_iteration(out: Path) -> int:
    """The policy's rollout counter in the newest checkpoint: its ``extra_state()``, saved
    under ``policy_extra`` (never among the weights)."""
    from mmrl.train import checkpoint as ckpt
    data = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))
    assert not any(k.startswith("mmrl_") for k in data["weights"])
    return int(data["state"]["policy_extra"]["rollout_iteration"])


def test_the_rollout_counter_is_declared_extra_state(tiny_sd3_path, tmp_path):
    from mmrl.diffusion.policy import LEGACY_COUNTER_KEY
    from mmrl.train.state import legacy_extra_state
    from mmrl.train.policy import check_policy

    cfg = tiny_config(tiny_sd3_path, str(tmp_path), sampler="sliding", sliding_shift_every=1)
    policy = _policy(cfg)
    assert check_policy(policy, cfg.algo.resolve()).extra_state
    with torch.no_grad():
        for _ in range(2):
            policy.rollout(["a"], [{}], 2, torch.Generator().manual_seed(0))
    assert policy.extra_state() == {"rollout_iteration": 2}
    weights = policy.state_dict()
    assert weights and all("lora" in k for k in weights)  # weights only
    fresh = _policy(cfg)
    fresh.load_extra_state({"rollout_iteration": 5})
    assert fresh.iteration == 5
    # a checkpoint from before extra_state kept the counter among the weights
    fresh.load_extra_state(legacy_extra_state({LEGACY_COUNTER_KEY: torch.tensor(3)}))
    assert fresh.iteration == 3 and fresh.extra_state() == {"rollout_iteration": 3}
    fresh.load_state_dict(weights)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights.items())
    with pytest.raises(ValueError, match="checkpoint lacks .* trainable tensors"):
        fresh.load_state_dict({})


def test_periodic_evaluation_writes_grids_and_eval_jsonl(tiny_sd3_path, tmp_path):
    cfg = tiny_config(tiny_sd3_path, str(tmp_path), train={"steps": 3},
                      eval_every=2, eval_prompts=["a red apple", "a dark night", "a cat"],
                      eval_batch_size=2)
    (tmp_path / "eval.jsonl").write_text('{"step": 5, "reward_mean": 0.0}\n')  # an old run's
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
    # (another batch size: equal up to float32 rounding, not bitwise)
    assert again["reward_mean"] == pytest.approx(lines[0]["reward_mean"], rel=1e-6, abs=0)
    assert lines[2]["reward_mean"] != lines[0]["reward_mean"]


def test_flux_g2rpo_path_trains_on_a_tiny_flux_pipeline(tmp_path):
    """The FLUX recipe's code path (packed latents, FLUX schedule, singular sampling)."""
    from mmrl.diffusion.models.flux import save_tiny_flux
    save_tiny_flux(str(tmp_path / "flux"), size=16)
    cfg = tiny_config(str(tmp_path / "flux"), str(tmp_path / "run"), sampler="singular",
                      pipeline="flux", height=16, width=16, guidance_scale=3.5, kind="dance",
                      noise_level=0.3, train={"steps": 2, "group_size": 2})
    before = _lora(_policy(cfg))
    summary = _run(cfg)
    after = {k: v for k, v in torch.load(tmp_path / "run" / "final.pt").items() if "lora" in k}
    assert after.keys() == before.keys() and len(after) > 0
    assert any(not torch.equal(after[k], before[k]) for k in after)
    h = summary["history"][0]
    assert h["samples"] == 2 * 2 * 2 * 2  # prompts x k x members x granularities
    assert math.isfinite(h["loss"]) and 0.0 < h["reward_mean"] < 1.0  # brightness in [0, 1]
    # pinned on CPU (2 threads, the pinned stack), like the SD3 samplers above: a change in the
    # packed latents, the FLUX schedule or the singular advantages moves these
    got = [(h["reward_mean"], h["grad_norm"]) for h in summary["history"]]
    assert all(h["nfe"] > 0 for h in summary["history"])  # G²RPO's sampler counts its own
    torch.testing.assert_close(torch.tensor(got), torch.tensor(
        [(0.49879834, 2.1871831e-3), (0.49744192, 1.6875452e-3)]), rtol=1e-4, atol=1e-7)
