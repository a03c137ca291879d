"""algo.step_advantage (mmrl.train.steps): GiGPO and SPO-chain token advantages on the toy job,
hand-worked, plus the loop's T-chunked [B, T] advantages and the config checks."""
from __future__ import annotations

import json
import math
import types

import pytest
import torch

from mmrl.algo.presets import resolve_algo
from mmrl.demo.config import ToyConfig
from mmrl.demo.toy import ToyPolicy, digit_reward, toy_step_fn
from mmrl.train.rollout import Rollout
from mmrl.train.steps import (STEP_RULES, StepAugmenter, gigpo_rule, mc_values, prefix_anchors,
                              step_advantages)


def _rollout(ids, mask, group_ids, **kw):
    b = len(ids)
    return Rollout([[0]] * b, [[0]] * b, [{} for _ in range(b)], torch.tensor(group_ids),
                   torch.tensor(mask), {"ids": torch.tensor(ids)}, **kw)


def test_prefix_anchors_exact_match():
    # start = 1 (prompt token 9); rows 0 and 1 share "9 1", row 2 differs after the prompt
    a = prefix_anchors(torch.tensor([[9, 1, 2], [9, 1, 3], [9, 4, 2]]), start=1)
    assert a[0, 0] == a[1, 0] == a[2, 0]  # the prompt alone
    assert a[0, 1] == a[1, 1] != a[2, 1]  # "9 1" vs "9 4"
    assert len({int(a[0, 1]), int(a[0, 0])}) == 2  # other length, other anchor


def test_gigpo_two_samples_shared_prefix_by_hand():
    # one group, rows "a b" and "a c" (3rd token padding): both states are shared anchors.
    # r = [.5, .5] and [.5, 0]: R(τ) = 1, .5 -> A^E (mean_norm over the 4 step rows, mean .75)
    # = ±.25; γ = .5: R_t = [.75, .5] and [.5, 0] -> A^S = ±.125 (t=0), ±.25 (t=1)
    ro = _rollout([[9, 1, 2, 0], [9, 1, 3, 0]], [[True, True, False]] * 2, [7, 7])
    ro.data["step_rewards"] = torch.tensor([[.5, .5, 9.], [.5, 0., 9.]])
    ro.data["anchors"] = prefix_anchors(ro.data["ids"], start=1)
    spec = resolve_algo("grpo", step_advantage="gigpo", gigpo_gamma=0.5, gigpo_omega=1.0,
                        gigpo_mode="mean_norm")
    adv = step_advantages(ro, torch.tensor([1.0, 0.5]), spec)
    torch.testing.assert_close(adv, torch.tensor([[.375, .5, 0.], [-.375, -.5, 0.]]))
    # a failed reward: the row stays out (the other is alone: 0 everywhere)
    adv = gigpo_rule(ro, torch.tensor([1.0, float("nan")]), spec)
    assert torch.equal(adv, torch.zeros(2, 3))


class _StubPolicy:
    """Deterministic continuations: sample j of a pair keeping k tokens is [k, j]."""

    capabilities = types.SimpleNamespace(continuations=True)

    def continue_from(self, rollout, rows, keep, m, generator):
        keep = torch.as_tensor(keep).repeat_interleave(m)
        samples = [[int(k), j % m] for j, k in enumerate(keep.tolist())]
        n = len(samples)
        return Rollout(samples, [[0]] * n, [{}] * n, torch.arange(n) // m,
                       torch.ones(n, 1, dtype=torch.bool))


def test_spo_mc_values_and_advantages_by_hand():
    # p = [.5, .95, .5, .5]: uncertain tokens 0, 2, 3 -> cuts c = t−1 = −1, 1, 2; K = 2 keeps
    # −1, 2. V(c) = mean over M = 2 continuations of 0.1·(c+1) + 0.01·j -> V(−1) = .005,
    # V(2) = .305; reward 1 at the last token. A: token 2 = .305 − .005, token 3 = 1 − .305,
    # token 0 takes token 2's (segment (−1, 2]), token 1 has p > .9: 0.
    ro = _rollout([[9, 1, 1, 1, 1]], [[True] * 4], [0],
                  rollout_logp=torch.tensor([[.5, .95, .5, .5]]).log())
    spec = resolve_algo("grpo", step_advantage="spo_chain", spo_interval=2, spo_samples=2,
                        spo_threshold=0.9)
    reward = lambda s, p, m: torch.tensor([0.1 * x[0] + 0.01 * x[1] for x in s])  # noqa: E731
    rounds = types.SimpleNamespace(policy=_StubPolicy(), reward_fn=reward, fsdp=None,
                                   gen=torch.Generator(), reward_weights=None,
                                   s=types.SimpleNamespace(reward_retries=0, reward_timeout=0))
    cuts, values, n = mc_values(rounds, ro, spec)
    assert n == 4 and cuts[0, :3].tolist() == [-1, 2, -2]
    torch.testing.assert_close(values[0, :2], torch.tensor([.005, .305]))
    ro.data["spo_cuts"], ro.data["spo_values"] = cuts, values
    adv = step_advantages(ro, torch.tensor([1.0]), spec)
    torch.testing.assert_close(adv, torch.tensor([[.3, 0., .3, .695]]))


@pytest.fixture(scope="module")
def toy():
    c = ToyConfig(digits=5, length=3, d_model=16, layers=1, heads=2)
    policy = ToyPolicy(c, seed=0)
    prompts = [[1, 2, 3], [4, 0, 2]]
    meta = [{"target": p[::-1]} for p in prompts]
    with torch.no_grad():
        ro = policy.rollout(prompts, meta, 3, torch.Generator().manual_seed(0))
    return policy, ro


def test_toy_continue_from_keeps_prefix(toy):
    policy, ro = toy
    with torch.no_grad():
        cont = policy.continue_from(ro, torch.tensor([0, 4]), torch.tensor([2, 0]), 3,
                                    torch.Generator().manual_seed(1))
    start = ro.data["ids"].shape[1] - policy.T
    assert len(cont) == 6 and cont.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(cont.data["ids"][:3, :start + 2], ro.data["ids"][[0, 0, 0], :start + 2])
    assert torch.equal(cont.data["ids"][3:, :start], ro.data["ids"][[4, 4, 4], :start])
    assert cont.metadata[3] == ro.metadata[4]
    assert torch.equal(cont.rollout_logp[:3, :2], ro.rollout_logp[[0, 0, 0], :2])


def test_toy_step_rewards_sum_to_the_reward(toy):
    policy, ro = toy
    r, anchors = toy_step_fn(policy, "digits")(ro)
    torch.testing.assert_close(r.sum(-1), digit_reward(ro.samples, ro.prompts, ro.metadata))
    assert anchors.shape == ro.mask.shape
    assert (anchors[:3, 0] == anchors[0, 0]).all() and anchors[0, 0] != anchors[3, 0]


def test_token_advantages_t_chunked_equal_gradient(toy):
    from mmrl.algo.losses import PolicyLoss
    from mmrl.train.loop import LoopSettings, update
    policy, ro = toy
    adv = torch.randn(ro.mask.shape)
    loss_fn = PolicyLoss("grpo", step_advantage="gigpo")
    grads = []
    for t_chunk in (0, 2):
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        update(policy, opt, loss_fn, ro, adv, LoopSettings(t_chunk=t_chunk),
               torch.Generator())
        grads.append([p.grad.clone() for p in policy.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_config_checks():
    from mmrl.config.jobs import Job, step_problems
    algo = types.SimpleNamespace(resolve=lambda: resolve_algo("grpo", step_advantage="gigpo"))
    (msg,) = step_problems(Job("nosteps", ToyConfig, lambda c: {}), algo)
    assert "algo.step_advantage" in msg and "toy" in msg
    assert step_problems(Job("t", ToyConfig, lambda c: {}, steps=True), algo) == []
    with pytest.raises(ValueError, match="job's steps"):
        StepAugmenter(resolve_algo("grpo", step_advantage="gigpo"), step_fn=None)
    assert set(STEP_RULES.names()) == {"gigpo", "spo_chain"}
    assert not math.isnan(resolve_algo("grpo").gigpo_gamma)


@pytest.mark.parametrize("rule", ["gigpo", "spo_chain"])
def test_the_toy_job_trains_with_a_step_advantage(tmp_path, rule):
    from mmrl.config.jobs import get_job
    from mmrl.config.schema import config_from_dict
    cfg = config_from_dict({"job": "toy", "algo": {"step_advantage": rule, "spo_samples": 2},
                            "train": {"steps": 2, "prompts_per_step": 2, "group_size": 4,
                                      "progress": False, "output_dir": str(tmp_path),
                                      "log_every": 100, "t_chunk": 2},
                            "toy": {"digits": 5, "length": 3, "num_prompts": 4, "d_model": 16,
                                    "layers": 1, "heads": 2}})
    get_job("toy").run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").open()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["adv_abs_mean"] > 0
                                  for r in rows)
    assert (rule == "spo_chain") == ("spo_continuations" in rows[0])


def test_a_step_rule_needs_one_toy_reward_column():
    from mmrl.config.core import ConfigError
    from mmrl.config.schema import config_from_dict
    with pytest.raises(ConfigError, match="toy.reward: got 'digits,exact' with "
                                          "algo.step_advantage='gigpo'"):
        config_from_dict({"job": "toy", "algo": {"preset": "grpo", "step_advantage": "gigpo"},
                          "toy": {"reward": "digits,exact"}})
