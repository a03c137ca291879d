"""The toy job end to end: every preset trains, losses match values pinned on CPU, reward rises."""
import math

import pytest
import torch

from mmrl.algo.presets import PRESETS
from mmrl.config.schema import config_from_dict
from mmrl.demo.toy import ToyConfig, ToyPolicy, digit_reward


TINY = {"digits": 5, "length": 3, "num_prompts": 32, "d_model": 16, "layers": 1, "heads": 2}


def _run(tmp_path, preset, steps=3, toy=TINY, **train):
    from mmrl.config.jobs import get_job
    cfg = config_from_dict({
        "job": "toy", "algo": {"preset": preset, "beta": 0.02},
        "train": {"steps": steps, "prompts_per_step": 4, "group_size": 4, "lr": 3e-3,
                  "seed": 0, "device": "cpu", "progress": False, "log_every": 1000,
                  "output_dir": str(tmp_path / preset), **train},
        "toy": toy})
    return get_job("toy").run(cfg)


def test_digit_reward_hand_values():
    meta = [{"target": [1, 2, 3]}] * 4
    r = digit_reward([[1, 2, 3], [1, 0, 3], [1, 2], [1, 2, 3, 4]], [None] * 4, meta)
    torch.testing.assert_close(r, torch.tensor([1.0, 2 / 3, 2 / 3, 3 / 4]))


def test_rollout_masks_stop_after_first_eos():
    pol = ToyPolicy(ToyConfig(digits=5, length=3, d_model=16, layers=1, heads=2))
    r = pol.rollout([[1, 2, 3], [0, 0, 1]], [{}, {}], 4, torch.Generator().manual_seed(0))
    resp = r.data["ids"][:, -pol.T:]
    for row, m in zip(resp, r.mask):
        eos = (row == pol.eos).nonzero().flatten()
        n = int(eos[0]) + 1 if len(eos) else pol.T
        assert m.tolist() == [True] * n + [False] * (pol.T - n)
    # on-policy: recomputed logp equals itself; re-scoring is deterministic
    a = pol.logp(r, torch.arange(8), 0, pol.T)
    b = pol.logp(r, torch.arange(8), 0, pol.T)
    assert torch.equal(a, b)


def test_logp_scores_the_temperature_scaled_distribution_the_rollout_sampled_from():
    """At a very high temperature the sampler draws uniformly over the V tokens, so every
    re-scored log-prob is -log V; at temperature 1 it is not."""
    c = dict(digits=5, length=3, d_model=16, layers=1, heads=2)
    hot = ToyPolicy(ToyConfig(temperature=1e4, **c))
    r = hot.rollout([[1, 2, 3]], [{}], 4, torch.Generator().manual_seed(0))
    V = 5 + 2  # digits + <sep> + <eos>
    with torch.no_grad():
        logp = hot.logp(r, torch.arange(4), 0, hot.T)
        cold = ToyPolicy(ToyConfig(temperature=1.0, **c)).logp(r, torch.arange(4), 0, hot.T)
    torch.testing.assert_close(logp, torch.full_like(logp, -math.log(V)), atol=1e-3, rtol=0)
    assert (cold + math.log(V)).abs().max() > 0.01


# GRPO-Guard (step terms of a Gaussian denoising step) runs on flow policies only; the toy
# policy is refused by name (tests/diffusion/job/test_job_guard.py).
@pytest.mark.parametrize("preset", [p for p in sorted(PRESETS) if not PRESETS[p].needs_step_terms])
def test_every_preset_trains_three_steps(tmp_path, preset):
    # objectives that read binary rewards (DRPO) need toy.reward=exact (the config refuses
    # digits); one answer digit, so the tiny policy's groups mix right and wrong in 3 steps
    toy = {**TINY, "reward": "exact", "length": 1} if PRESETS[preset].binary_rewards else TINY
    summary = _run(tmp_path, preset, toy=toy)
    hist = summary["history"]
    assert len(hist) == 3
    for h in hist:
        assert math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"])
        assert h["skipped_updates"] == 0.0
    state = torch.load(tmp_path / preset / "final.pt")
    torch.manual_seed(0)
    fresh = ToyPolicy(ToyConfig(**toy), seed=0).model.state_dict()
    assert all(state[k].shape == fresh[k].shape for k in fresh)
    changed = sum(not torch.equal(state[k], fresh[k]) for k in fresh)
    assert changed > 0, "training did not change any parameter"
    assert (tmp_path / preset / "metrics.jsonl").read_text().count("\n") == 3


# Pinned on CPU (torch 2.14.1, seed 0): (reward_mean, loss, grad_norm) of grpo's first 3 steps.
# The loss at step 0 is 0: ratio 1, zero-mean advantages, KL 0 against the initial weights.
PINNED_GRPO = [(0.11979, 0.0, 0.48732), (0.15104, 2.975e-05, 0.61126), (0.18229, 0.00011479, 0.84373)]


def test_grpo_losses_match_pinned_cpu_values(tmp_path):
    hist = _run(tmp_path, "grpo")["history"]
    got = [(h["reward_mean"], h["loss"], h["grad_norm"]) for h in hist]
    for g, p in zip(got, PINNED_GRPO):
        assert g == pytest.approx(p, rel=2e-3, abs=2e-6), got


def test_reward_rises_with_grpo(tmp_path):
    hist = _run(tmp_path, "grpo", steps=60, prompts_per_step=8, group_size=8,
                toy={"digits": 5, "length": 4, "num_prompts": 128})["history"]
    first = sum(h["reward_mean"] for h in hist[:10]) / 10
    last = sum(h["reward_mean"] for h in hist[-10:]) / 10
    assert last > first + 0.25, (first, last)


def test_make_demo_can_be_run_twice_into_the_same_folders(tmp_path, capsys):
    """`make demo` twice: the demo configs start fresh (resume: never), so the Makefile must pass
    train.overwrite=true, or the second run is refused as "a folder of another run"."""
    import json
    from pathlib import Path

    from mmrl.cli.app import main
    from mmrl.config.core import load_yaml
    root = Path(__file__).resolve().parents[2]
    make = (root / "Makefile").read_text()
    for name in ("toy", "video_tiny", "diffusion_tiny", "diffusion_video_tiny"):
        assert load_yaml(root / "configs" / "demo" / f"{name}.yaml")["train"]["resume"] == "never"
        assert f"train configs/demo/{name}.yaml train.overwrite=true" in make, name
    out = tmp_path / "demo-toy"
    args = ["train", str(root / "configs/demo/toy.yaml"), "train.steps=2", "train.log_every=1",
            "train.progress=false", f"train.output_dir={out}", "train.overwrite=true"]
    assert main(args) == 0
    first = json.loads((out / "run.json").read_text())["run_id"]
    assert main(args[:-1]) == 2 and "train.overwrite=true" in capsys.readouterr().err  # refused
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["run_id"] != first  # a fresh run
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # not 4: old run removed
