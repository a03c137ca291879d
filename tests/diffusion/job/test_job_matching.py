"""The weighted matching objectives (diffusion.objective: nft | awm) through the diffusion job on a
tiny SD3 pipeline: pinned training values, micro-batching = the unsplit step, the old copy at step
0 and its soft update, exact resume, the config's refusals and the recipes."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

from mmrl.config.core import ConfigError

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
ADV = {"advantage": "batch_std", "beta": 0.0}


def _cfg(path, out, objective, train=None, **section):
    if objective == "awm":  # 3 strata of ⌊linspace(0, 3, 4)⌋ at T = 4 (AWM's 6 repeat indices)
        section.setdefault("matching", {"num_times": 3})
    return tiny_config(path, str(out), objective=objective, algo=ADV,
                       train={"steps": 2, **(train or {})}, **section)


def _policy(cfg):
    from mmrl.diffusion.job import build_policy
    torch.manual_seed(cfg.train.seed)
    return build_policy(cfg.task, "cpu", cfg.algo.resolve())


# (reward_mean, grad_norm, loss) per step, pinned on CPU (torch 2.14.1, diffusers 0.42.1, seed 0).
PINNED = {
    "nft": [(0.512130, 0.015872288, 6.532513), (0.514450, 0.002362567, 4.634963)],
    "awm": [(0.512126, 0.002309153, 2.856e-07), (0.510810, 0.000956916, 4.396e-07)],
}


def _check_pinned_run(objective, out, summary, before):
    from mmrl.train import checkpoint as ckpt
    after = torch.load(out / "final.pt")
    lora = [k for k in after if "lora" in k and not k.startswith("matching_old.")]
    assert lora and any(not torch.equal(after[k], before[k]) for k in lora)
    # the old copy moved toward the weights: η = 0.001·s (nft), min(0.3, 0.001·s) (awm)
    old = [k for k in after if k.startswith("matching_old.")]
    assert len(old) == len(lora) and any(not torch.equal(after[k], before[k]) for k in old)
    hist = summary["history"]
    assert [h["nfe"] for h in hist] == [4 * 4, 4 * 4]  # ODE: every sample at every step
    assert [h["terms"] for h in hist] == [12.0, 12.0]  # 4 samples x 3 times
    assert [h["train_nfe"] for h in hist] == [36.0, 36.0]  # v, v_old, v_ref per term
    got = [(h["reward_mean"], h["grad_norm"], h["loss"]) for h in hist]
    # AWM's loss is −mean A′ (≈ 0: advantages are centred per prompt) plus penalties ~1e-7
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               torch.tensor(PINNED[objective], dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))["state"]
    assert state["policy_extra"] == {"rollout_iteration": 2, "matching_updates": 2}


def test_awm_trains_the_lora_with_pinned_values(tiny_sd3_path, tmp_path):
    from mmrl.diffusion.job import run
    cfg = _cfg(tiny_sd3_path, tmp_path, "awm", train={"save_every": 1})
    before = {k: v.clone() for k, v in _policy(cfg).state_dict().items()}
    _check_pinned_run("awm", tmp_path, run(cfg), before)


def test_nft_trains_with_pinned_values_and_resumes_exactly(tiny_sd3_path, tmp_path):
    """2 steps straight (pinned), and 1 step then a resume to 2: the same weights and old copy,
    bit for bit (the copy is in the checkpoint's weights, its step count in the extra state)."""
    from mmrl.diffusion.job import run
    cfg = _cfg(tiny_sd3_path, tmp_path / "a", "nft", train={"save_every": 1})
    before = {k: v.clone() for k, v in _policy(cfg).state_dict().items()}
    _check_pinned_run("nft", tmp_path / "a", run(cfg), before)
    run(_cfg(tiny_sd3_path, tmp_path / "b", "nft", train={"steps": 1, "save_every": 1}))
    summary = run(_cfg(tiny_sd3_path, tmp_path / "b", "nft", train={"resume": "auto"}))
    assert summary["steps"] == 2 and len(summary["history"]) == 1
    a, b = torch.load(tmp_path / "a" / "final.pt"), torch.load(tmp_path / "b" / "final.pt")
    assert a.keys() == b.keys() and any(k.startswith("matching_old.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _one_update(policy, batch, settings, seed=0):
    from mmrl.train.matching import train_matching
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    m = train_matching(policy, opt, None, batch, settings, torch.Generator().manual_seed(seed))
    return m, {k: v.clone() for k, v in policy.state_dict().items()}


def test_micro_batches_along_rows_and_times_give_the_unsplit_update(tiny_sd3_path, tmp_path):
    """NFT (the loss's own split invariance, AWM's too, is tests/algo/test_matching.py's)."""
    from mmrl.algo.losses import PolicyLoss
    from mmrl.train.batch import batch_advantages
    from mmrl.train.loop import LoopSettings, collect
    cfg = _cfg(tiny_sd3_path, tmp_path, "nft")
    policy = _policy(cfg)
    loss_fn = PolicyLoss("grpo", **cfg.algo.overrides())
    whole = LoopSettings(group_size=2, max_grad_norm=0.0)
    rollout, rewards, _ = collect(policy, _reward(), ["a red apple", "a blue sky"],
                                  [{}, {}], whole, torch.Generator().manual_seed(3))
    batch = batch_advantages(policy, loss_fn, rollout, rewards)
    start = {k: v.clone() for k, v in policy.state_dict().items()}  # live tensors: copy
    extra = policy.extra_state()
    m1, w1 = _one_update(policy, batch, whole)
    policy.load_state_dict(start)
    policy.load_extra_state(extra)
    m2, w2 = _one_update(policy, batch, dataclasses.replace(whole, micro_batch_size=1,
                                                            t_chunk=2))
    assert m1["terms"] == m2["terms"] > 0
    moved = max(float((w1[k] - start[k]).abs().max()) for k in w1)
    assert moved > 0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-8)
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5, abs=1e-8)


def _reward():
    from mmrl.diffusion.evaluate import ImageReward
    from mmrl.rewards import compose
    return ImageReward(compose("brightness", device="cpu"))


def test_the_old_copy_is_the_policy_at_step_zero_samples_the_rollouts_and_follows_its_schedule(
        tiny_sd3_path, tmp_path):
    from mmrl.algo.matching import nft_implicit_velocities
    policy = _policy(_cfg(tiny_sd3_path, tmp_path, "nft"))
    rollout = policy.rollout(["a red apple"], [{}], 2, torch.Generator().manual_seed(0))
    assert rollout.mask.shape == (2, 1) and rollout.data["x0"].shape[0] == 2
    terms = policy.match_terms(rollout, torch.arange(2), torch.tensor([[0, 2], [1, 3]]),
                               torch.tensor([[5, 6], [7, 8]]))
    assert torch.equal(terms.v_old, terms.v.detach())  # θ_old = θ: the same forward
    pos, neg = nft_implicit_velocities(terms.v, terms.v_old, 1.0)
    assert torch.equal(pos.detach(), terms.v_old) and torch.equal(neg.detach(), terms.v_old)
    sig = policy.sigmas
    assert terms.t.tolist() == [[sig[0].item(), sig[2].item()], [sig[1].item(), sig[3].item()]]
    eps = torch.randn(policy.latent, generator=torch.Generator().manual_seed(7))  # seed of (1, 0)
    assert torch.equal(terms.target[1, 0], eps - rollout.data["x0"][1])
    before = {k: v.clone() for k, v in policy.old.items()}
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    moved = {k: p.detach().clone() for k, p in policy._trainable().items()}
    # DiffusionNFT samples with the old copy: the moved weights do not change the rollout,
    # and they are back in place after it
    again = policy.rollout(["a red apple"], [{}], 2, torch.Generator().manual_seed(0))
    assert torch.equal(again.data["x0"], rollout.data["x0"])
    assert all(torch.equal(p, moved[k]) for k, p in policy._trainable().items())
    policy.match_after_update(100)  # nft_ramp: η = 0.001·100 = 0.1
    for k, p in policy._trainable().items():
        torch.testing.assert_close(policy.old[k], 0.1 * before[k] + 0.9 * p.detach())


def test_the_config_refuses_what_a_matching_objective_cannot_run(tiny_sd3_path, tmp_path):
    with pytest.raises(ConfigError) as err:  # the section's problems, all at once
        tiny_config(tiny_sd3_path, str(tmp_path), objective="nft", sampler="window",
                    matching={"betta": 0.1, "weighting": "t"})
    text = str(err.value)
    for needle in ("sampler: got 'window'", "matching: unknown matching override 'betta'",
                   "matching: weighting='t' is not read by loss 'nft'"):
        assert needle in text, text
    with pytest.raises(ConfigError) as err:  # then the cross-section checks
        tiny_config(tiny_sd3_path, str(tmp_path), objective="nft",
                    algo={"eps_low": 0.1, "beta": 0.0}, train={"parallel": "fsdp"})
    text = str(err.value)
    for needle in ("algo.eps_low: objective=nft takes only the advantage",
                   "fsdp is not supported with objective=nft"):
        assert needle in text, text
    with pytest.raises(ConfigError, match="algo.beta: objective=awm takes only the advantage"):
        tiny_config(tiny_sd3_path, str(tmp_path), objective="awm", algo={"beta": 0.01})
    with pytest.raises(ConfigError, match="matching: got {'beta': 0.1}; .* objective=grpo has"):
        tiny_config(tiny_sd3_path, str(tmp_path), matching={"beta": 0.1})
    with pytest.raises(ConfigError, match="objective"):
        tiny_config(tiny_sd3_path, str(tmp_path), objective="dpo")


def test_matching_recipes_validate_and_carry_the_papers_settings():
    from mmrl.algo.match_presets import resolve_match
    from mmrl.config.schema import load_config
    nft = load_config(REPO / "configs/diffusion/sd35m_pickscore_nft.yaml")
    assert (nft.task.objective, nft.task.guidance_scale, nft.task.num_steps, nft.train.group_size,
            nft.algo.advantage, nft.train.lr) == ("nft", 1.0, 10, 24, "batch_std", 3e-4)
    assert resolve_match(nft.task.objective, **nft.task.matching).old_decay == "nft_ramp"
    awm = load_config(REPO / "configs/diffusion/sd35m_pickscore_awm.yaml")
    spec = resolve_match(awm.task.objective, **awm.task.matching)
    assert (awm.task.num_steps, spec.weighting, spec.times, spec.kl_coef) == (
        14, "ghuber", "stratified", 1e-4)
    flux = load_config(REPO / "configs/diffusion/flux_hps_nft.yaml")
    assert (flux.task.pipeline, flux.task.reward.split(":")[0], flux.task.objective) == (
        "flux", "hps_v2.1", "nft")
