"""Round collection (:class:`mmrl.train.rounds.Rounds`, on its own and in the runner) and round
augmenters: groups re-rolled in place, metrics, state in checkpoints (exact resume), and FSDP's
refusal."""
import pytest
import torch

from mmrl.algo.losses import PolicyLoss
from mmrl.budget.selection import make_selector
from mmrl.train.distributed import check_fsdp_settings
from mmrl.train.policy import Capabilities
from mmrl.train.rounds import Rounds, RoundSettings, needs_whole_groups
from mmrl.train.runner import Run, run_training
from mmrl.config.schema import config_from_dict
from mmrl.demo.toy import ToyPolicy, digit_reward, make_prompts

TOY = {"digits": 5, "length": 3, "num_prompts": 24, "d_model": 16, "layers": 1, "heads": 2}


def _cfg(tmp_path, **train):
    return config_from_dict({"job": "toy", "train": {
        "steps": 4, "prompts_per_step": 4, "group_size": 4, "progress": False,
        "output_dir": str(tmp_path), "log_every": 100, "seed": 3, **train}, "toy": TOY})


def _data(cfg):
    prompts = make_prompts(cfg.task, cfg.train.seed)
    return prompts, [{"target": p[::-1]} for p in prompts]


class RerollOdd:
    """Re-rolls the groups at odd positions with a marked copy of their metadata; stateful."""

    def __init__(self):
        self.calls, self.seen = 0, []

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]

    def __call__(self, run, rnd):
        self.calls += 1
        pick = [j for j in range(len(rnd.group_ids)) if j % 2 == 1]
        self.seen.append((list(rnd.group_ids), run.round_seed(5, rnd.group_ids[0])))
        run.add_round_metrics({"rerolled": len(pick)})
        new = run.collect_groups([rnd.prompts[j] for j in pick],
                                 [{**rnd.metadata[j], "rerolled": self.calls} for j in pick],
                                 [rnd.counts[j] for j in pick], [rnd.group_ids[j] for j in pick])
        return run.replace_groups(rnd, new)


def test_rerolled_groups_replace_their_rows_and_keep_their_ids(tmp_path):
    cfg = _cfg(tmp_path)
    prompts, meta = _data(cfg)
    aug = RerollOdd()
    run = Run(cfg, ToyPolicy(cfg.task, seed=3), digit_reward, prompts, meta, augmenters=[aug])
    rollout, rewards, error = run.rounds.collect_round()
    assert error is None and len(rollout) == 16 and len(rewards.values) == 16
    gids = rollout.group_ids
    assert sorted(gids.tolist()) == sorted([0, 1, 2, 3] * 4)
    for i in range(16):
        rerolled = "rerolled" in rollout.metadata[i]
        assert rerolled == (int(gids[i]) % 2 == 1)
    # the replaced rows' rewards are their own samples' rewards
    fresh = torch.as_tensor(digit_reward(rollout.samples, rollout.prompts, rollout.metadata),
                            dtype=rewards.values.dtype)
    assert torch.equal(rewards.values[:, 0], fresh)
    assert run.rounds.round_metrics == {"rerolled": 2.0}


def _rounds(cfg, policy, **kw):
    """A :class:`Rounds` built alone, without a Run: a toy policy, the digit reward, a uniform
    selector and the config's settings."""
    prompts, meta = _data(cfg)
    return Rounds(policy, digit_reward, prompts, meta,
                  settings=RoundSettings.from_train(cfg.train),
                  selector=make_selector("uniform", len(prompts)),
                  generator=torch.Generator().manual_seed(11),
                  prompt_generator=torch.Generator().manual_seed(12), **kw)


def test_rounds_collect_a_step_without_a_run(tmp_path):
    """Rounds alone: a step's groups drawn by the selector, rolled out and scored, the
    augmenter applied and its metrics returned; each step starts its metrics afresh."""
    cfg = _cfg(tmp_path)
    aug = RerollOdd()
    rounds = _rounds(cfg, ToyPolicy(cfg.task, seed=3), augmenters=[aug])
    got = rounds.collect(step=5)
    assert got.error is None and got.metrics == {"rerolled": 2.0}
    assert sorted(got.rollout.group_ids.tolist()) == sorted([0, 1, 2, 3] * 4)
    prompts = {tuple(p) for p in got.rollout.prompts}
    assert len(prompts) == 4 and prompts <= {tuple(p) for p in rounds.prompts}
    fresh = torch.as_tensor(digit_reward(got.rollout.samples, got.rollout.prompts,
                                         got.rollout.metadata), dtype=got.rewards.values.dtype)
    assert torch.equal(got.rewards.values[:, 0], fresh)
    assert aug.seen[0][1] == rounds.round_seed(5, aug.seen[0][0][0])  # step 5's seed
    assert rounds.collect(step=6).metrics == {"rerolled": 2.0} and aug.calls == 2


def test_rounds_dynamic_sampling_without_a_run(tmp_path):
    cfg = _cfg(tmp_path, dynamic_sampling_tries=3)
    got = _rounds(cfg, ToyPolicy(cfg.task, seed=3)).collect(step=0)
    m = got.metrics
    assert 1 <= m["dynamic_tries"] <= 3 and m["dynamic_groups_kept"] <= 4
    assert len(got.rollout) == len(got.rewards.values) == 4 * m["dynamic_groups_kept"]


def test_round_seed_depends_on_seed_step_and_keys_only(tmp_path):
    cfg = _cfg(tmp_path)
    rounds = _rounds(cfg, ToyPolicy(cfg.task, seed=3))
    rounds.step = 2
    a = rounds.round_seed(1, 7)
    assert a == rounds.round_seed(1, 7) and a != rounds.round_seed(1, 8)
    rounds.step = 3
    assert a != rounds.round_seed(1, 7)
    other = _rounds(_cfg(tmp_path, seed=4), ToyPolicy(cfg.task, seed=3))
    other.step = 2
    assert a != other.round_seed(1, 7)


def test_round_settings_and_too_few_prompts(tmp_path):
    cfg = _cfg(tmp_path, dynamic_sampling_tries=2, reward_timeout=1.5)
    s = RoundSettings.from_train(cfg.train)
    assert (s.prompts_per_step, s.group_size, s.dynamic_sampling_tries, s.reward_timeout,
            s.seed) == (4, 4, 2, 1.5, 3)
    prompts, meta = _data(cfg)
    with pytest.raises(ValueError, match="prompts_per_step=30 but there are only 24"):
        Rounds(ToyPolicy(cfg.task), digit_reward, prompts, meta,
               settings=RoundSettings(prompts_per_step=30), selector=None,
               generator=torch.Generator(), prompt_generator=torch.Generator())


def test_metrics_logged_and_resume_restores_augmenter_state_bit_for_bit(tmp_path):
    def go(out, steps):
        cfg = _cfg(out, steps=steps, save_every=1)
        prompts, meta = _data(cfg)
        aug = RerollOdd()
        summary = run_training(cfg, ToyPolicy(cfg.task, seed=3), digit_reward, prompts, meta,
                               augmenters=[aug])
        return summary, aug
    full, aug_full = go(tmp_path / "a", 4)
    assert all(h["rerolled"] == 2.0 for h in full["history"])
    go(tmp_path / "b", 2)
    resumed, aug_resumed = go(tmp_path / "b", 4)
    assert resumed["steps"] == 4
    assert aug_resumed.calls == aug_full.calls == 4  # the state came back from the checkpoint
    assert aug_resumed.seen == aug_full.seen[2:]  # same groups, same seeds after resume
    a, b = torch.load(tmp_path / "a" / "final.pt"), torch.load(tmp_path / "b" / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_accepts_augmenters_and_refuses_what_would_desynchronize_ranks(tmp_path):
    def check(**train):
        whole = needs_whole_groups(PolicyLoss("grpo").spec, Capabilities())
        check_fsdp_settings(_cfg(tmp_path, parallel="fsdp", **train).train, 2, whole)
    check()  # augmenters are fine: ranks with fewer rows run idle passes
    with pytest.raises(ValueError, match="dynamic_sampling_tries"):
        check(dynamic_sampling_tries=2)
    with pytest.raises(ValueError, match="t_chunk=0"):
        check(t_chunk=4)
    with pytest.raises(ValueError, match="divisible by the 2 ranks"):
        check(prompts_per_step=3, group_size=3)


def test_policies_can_ask_for_whole_groups_per_rank(tmp_path):
    """A group whose samples share one initial noise (diffusion shared_noise) must not be split
    over ranks; other groups are split sample by sample."""
    cfg = _cfg(tmp_path)
    spec = PolicyLoss("grpo").spec
    shards = {}
    for whole in (False, True):
        whole_groups = needs_whole_groups(spec, Capabilities(whole_groups=whole))
        for rank in (0, 1):
            dist = type("D", (), {"world": 2, "rank": rank, "active": True})()
            rounds = _rounds(cfg, ToyPolicy(cfg.task), whole_groups=whole_groups, dist=dist)
            shards[whole, rank] = rounds.shard([4, 4, 4], [10, 11, 12])
    # 12 samples in two contiguous halves: group 11 is split 2 + 2
    assert shards[False, 0] == [(0, 4, 10), (1, 2, 11)]
    assert shards[False, 1] == [(1, 2, 11), (2, 4, 12)]
    assert shards[True, 0] == [(0, 4, 10), (2, 4, 12)]
    assert shards[True, 1] == [(1, 4, 11)]


def test_root_forward_runs_the_modules_hooks_and_restores_forward():
    from mmrl.train.distributed import root_forward
    lin = torch.nn.Linear(2, 2)
    calls = []
    lin.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    lin.register_forward_hook(lambda m, args, out: calls.append(("post", out)))
    assert root_forward(lin, lambda: 7) == 7 and calls == ["pre", ("post", 7)]
    x = torch.ones(1, 2)
    assert torch.equal(lin(x), x @ lin.weight.T + lin.bias)  # the class forward is back
    own = lambda x: x * 0  # noqa: E731  (an instance-level forward set by someone else)
    lin.forward = own
    root_forward(lin, lambda: None)
    assert lin.forward is own


@pytest.mark.parametrize("preset, caps, whole", [
    ("grpo", Capabilities(), False),
    ("reg_grpo", Capabilities(), True),  # the objective normalizes within the group
    ("tw_grpo", Capabilities(token_weights=True), True),  # a group's tokens weighted together
    ("grpo", Capabilities(row_advantages=True), True),
    ("grpo", Capabilities(whole_groups=True), True),
])
def test_whole_groups_rule(preset, caps, whole):
    assert needs_whole_groups(PolicyLoss(preset).spec, caps) is whole
