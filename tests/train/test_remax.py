"""ReMax through the training code: the policy's greedy rollout, the baseline it yields, and the
runner using it (every advantage = reward − the greedy completion's reward)."""
import math

import pytest
import torch

from mmrl.algo.losses import PolicyLoss
from mmrl.config.schema import config_from_dict
from mmrl.demo.toy import ToyConfig, ToyPolicy, digit_reward
from mmrl.train.batch import batch_advantages, greedy_baseline
from mmrl.train.loop import LoopSettings, collect, train_step
from mmrl.train.policy import Capabilities, GroupPolicy, check_policy

TOY = ToyConfig(digits=5, length=3, d_model=16, layers=1, heads=2)
PROMPTS = [[1, 2, 3], [0, 4, 1], [2, 2, 0]]
META = [{"target": p[::-1]} for p in PROMPTS]


def test_toy_greedy_rollout_is_the_argmax_and_draws_nothing():
    pol = ToyPolicy(TOY)
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    r = pol.greedy_rollout(PROMPTS, META, gen)
    assert torch.equal(gen.get_state(), state)
    assert r.group_ids.tolist() == [0, 1, 2] and len(r.samples) == 3
    ids = r.data["ids"]
    logits = pol.model(ids[:, :-1])[:, -pol.T:].float()  # the logits of each response token
    assert torch.equal(ids[:, -pol.T:], logits.argmax(-1))
    again = pol.greedy_rollout(PROMPTS, META, torch.Generator().manual_seed(9))
    assert again.samples == r.samples


def test_baseline_is_the_greedy_reward_of_each_rows_group():
    pol = ToyPolicy(TOY)
    rollout, rewards, _ = collect(pol, digit_reward, PROMPTS, META, LoopSettings(group_size=3),
                                  torch.Generator().manual_seed(0), group_ids=[10, 11, 12])
    groups = {10 + k: (p, m) for k, (p, m) in enumerate(zip(PROMPTS, META))}
    base = greedy_baseline(pol, digit_reward, rollout, groups, torch.Generator())
    greedy = pol.greedy_rollout(PROMPTS, META, torch.Generator())
    want = digit_reward(greedy.samples, greedy.prompts, greedy.metadata)
    assert base.shape == (9, 1)
    torch.testing.assert_close(base[:, 0], want.repeat_interleave(3))
    batch = batch_advantages(pol, PolicyLoss("remax"), rollout, rewards, baseline=base)
    torch.testing.assert_close(batch.advantages, rewards.values[:, 0] - base[:, 0])


def test_a_failed_greedy_reward_drops_its_groups_rows():
    pol = ToyPolicy(TOY)
    rollout, rewards, _ = collect(pol, digit_reward, PROMPTS, META, LoopSettings(group_size=2),
                                  torch.Generator().manual_seed(0))
    base = torch.tensor([[0.5], [0.5], [math.nan], [math.nan], [0.0], [0.0]])
    batch = batch_advantages(pol, PolicyLoss("remax"), rollout, rewards, baseline=base)
    assert len(batch.rollout) == 4 and batch.metrics["dropped_samples"] == 2
    keep = torch.tensor([0, 1, 4, 5])
    torch.testing.assert_close(batch.advantages, rewards.values[keep, 0] - base[keep, 0])


def test_train_step_rolls_out_the_greedy_baseline():
    pol = ToyPolicy(TOY)
    calls = []
    greedy = pol.greedy_rollout

    def counted(prompts, metadata, generator):
        calls.append(list(prompts))
        return greedy(prompts, metadata, generator)
    pol.greedy_rollout = counted
    opt = torch.optim.SGD(pol.parameters(), lr=0.1)
    out = train_step(pol, opt, PolicyLoss("remax"), digit_reward, PROMPTS, META,
                     LoopSettings(group_size=4), torch.Generator().manual_seed(0))
    assert calls == [PROMPTS] and math.isfinite(out["loss"])


class _NoGreedy(GroupPolicy):
    capabilities = Capabilities()

    def rollout(self, *a):
        raise NotImplementedError

    def logp(self, *a):
        raise NotImplementedError


def test_a_policy_without_greedy_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"Capabilities\(greedy=True\).*pick another advantage"):
        check_policy(_NoGreedy(), PolicyLoss("remax").spec)
    check_policy(_NoGreedy(), PolicyLoss("grpo", advantage="rloo").spec)


def test_runner_uses_the_greedy_completion_as_baseline(tmp_path, monkeypatch):
    """The greedy completions score 10 (marked in their metadata), the sampled ones at most 1:
    every advantage is r − 10, so adv_abs_mean = 10 − reward_mean at every step."""
    from mmrl.config.jobs import get_job
    greedy = ToyPolicy.greedy_rollout

    def marked(self, prompts, metadata, generator):
        out = greedy(self, prompts, metadata, generator)
        out.metadata = [{**m, "greedy": True} for m in out.metadata]
        return out

    def reward(samples, prompts, metadata):
        base = digit_reward(samples, prompts, metadata)
        return torch.where(torch.tensor([m.get("greedy", False) for m in metadata]), 10.0, base)
    monkeypatch.setattr(ToyPolicy, "greedy_rollout", marked)
    monkeypatch.setitem(__import__("mmrl.demo.toy", fromlist=["VERIFIERS"]).VERIFIERS,
                        "digits", reward)  # the job's toy.reward: digits
    cfg = config_from_dict({
        "job": "toy", "algo": {"preset": "remax"},
        "train": {"steps": 2, "prompts_per_step": 3, "group_size": 2, "seed": 0, "device": "cpu",
                  "progress": False, "log_every": 1000, "output_dir": str(tmp_path / "run")},
        "toy": {"digits": 5, "length": 3, "num_prompts": 8, "d_model": 16, "layers": 1,
                "heads": 2}})
    hist = get_job("toy").run(cfg)["history"]
    assert len(hist) == 2
    for h in hist:
        assert h["reward_mean"] < 1.0
        assert h["adv_abs_mean"] == pytest.approx(10.0 - h["reward_mean"], rel=1e-6)
