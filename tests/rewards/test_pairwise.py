"""Pairwise preference rewards (Pref-GRPO): pair schedules, win rates, the spec's test vector,
batched judge calls, groups from the loop's ids or from prompts, the bradley_terry judge, config
checks, and the group plumbing of the core (group ids in metadata, whole groups per rank,
failures isolated by group)."""
from __future__ import annotations

import math

import pytest
import torch

from mmrl.algo.advantages import group_advantages
from mmrl.rewards import load
from mmrl.rewards.pairwise import (PrefWinRate, batch_pairs, group_index, hard_outcome,
                                   pair_schedule, win_rates)
from mmrl.rewards.specs import JUDGES, media_of, pref_problems
from mmrl.train.reward_fn import CombinedReward, evaluate_reward, is_groupwise, robust_reward


class TableJudge:
    """A fake judge: P(a preferred) from a table of ids (an image's id is 100 x pixel [0, 0, 0])
    or from scores (logistic), plus a constant pull towards the first position (``bias``);
    records the size of every call."""

    name, media = "table", "image"

    def __init__(self, table=None, bias=0.0, score=None):
        self.table, self.bias, self.score, self.calls = table or {}, bias, score, []

    def compare(self, a, b, prompts):
        self.calls.append(len(prompts))
        ia = (a[:, 0, 0, 0] * 100).round().long().tolist()
        ib = (b[:, 0, 0, 0] * 100).round().long().tolist()
        out = []
        for i, j in zip(ia, ib):
            if self.score is not None:
                p = 1 / (1 + math.exp(-(self.score[i] - self.score[j])))
            else:
                p = self.table[i, j] if (i, j) in self.table else 1 - self.table[j, i]
            out.append(min(1.0, max(0.0, p + self.bias)))
        return torch.tensor(out)


def ids(n):
    """n images carrying their id in pixel [0, 0, 0] (as id / 100)."""
    x = torch.zeros(n, 3, 2, 2)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32) / 100
    return x


def call(judge, prompts, x=None, metadata=None, **options):
    """PrefWinRate(judge object, options) on ``x`` (default: ids)."""
    return PrefWinRate(judge, **options)(ids(len(prompts)) if x is None else x, prompts,
                                         metadata)


# --------------------------------------------------------------------------- the spec's vector

# 0≻1, 0≻2, 0≻3, 1≻2, (1, 3) unparsed, 2≻3 (REWARDS-VLM.md, Pref-GRPO test vector, G = 4)
SPEC_TABLE = {(0, 1): 1.0, (0, 2): 1.0, (0, 3): 1.0, (1, 2): 1.0, (1, 3): 0.5, (2, 3): 1.0}


def test_spec_vector_win_rates_and_grpo_advantages():
    judge = TableJudge(SPEC_TABLE)
    prompts = ["p"] * 4
    # Pref-GRPO exactly: each pair once, lower index first, parsed outcomes, 3 decimals
    w = call(judge, prompts, both_orders=False, hard=True, decimals=3)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.5, 0.333, 0.167]))
    assert judge.calls == [6]  # the 6 pairs in one batched call
    # mmrl's grpo advantage (per group, unbiased std) with Pref-GRPO's eps 1e-8
    A = group_advantages(w, torch.zeros(4, dtype=torch.long), "grpo", eps=1e-8)
    torch.testing.assert_close(A, torch.tensor([1.3889, 0.0, -0.4639, -0.9250]), atol=1e-4,
                               rtol=0)
    assert abs(float(w.std()) - 0.3600) < 1e-4
    # unrounded (mmrl's default): w = [1, 1/2, 1/3, 1/6]
    w = call(TableJudge(SPEC_TABLE), prompts, both_orders=False)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.5, 1 / 3, 1 / 6]))
    A = group_advantages(w, torch.zeros(4, dtype=torch.long), "grpo", eps=1e-8)
    torch.testing.assert_close(A, torch.tensor([1.3887, 0.0, -0.4629, -0.9258]), atol=1e-4,
                               rtol=0)
    # both orders of a consistent judge give the same win rates
    w2 = call(TableJudge(SPEC_TABLE), prompts)
    torch.testing.assert_close(w2, w)


# --------------------------------------------------------------------------- the math

def test_pair_schedules():
    assert pair_schedule(4).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    assert pair_schedule(1).shape == (0, 2)
    for n, k in [(8, 2), (8, 3), (9, 4), (16, 5), (6, 5), (6, 9)]:
        p = pair_schedule(n, k)
        deg = torch.bincount(p.flatten(), minlength=n)
        kk = min(k, n - 1)
        assert (deg == kk).all(), (n, k)  # every sample meets exactly k others
        assert len({tuple(r) for r in p.tolist()}) == len(p) == n * kk // 2  # no pair twice
        assert (p[:, 0] < p[:, 1]).all()
    assert pair_schedule(8, 2).tolist() == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 6],
                                            [6, 7], [0, 7]]
    with pytest.raises(ValueError, match="odd number of opponents each needs an even group"):
        pair_schedule(7, 3)
    with pytest.raises(ValueError, match="positive int"):
        pair_schedule(4, 0)


def test_hard_outcomes_and_win_rate_edges():
    p = torch.tensor([0.9, 0.1, 0.5, float("nan")])
    assert hard_outcome(p).tolist() == [1.0, 0.0, 0.5, 0.5]
    pairs = torch.tensor([[0, 1]])
    # a pair judged in both orders with a contradicting hard judge is a tie
    w = win_rates(pairs, torch.tensor([0.9]), 3, torch.tensor([0.8]), hard=True)
    assert w.tolist() == [0.5, 0.5, 0.5]  # sample 2 is in no pair: 0.5
    w = win_rates(pairs, torch.tensor([0.9]), 2, torch.tensor([0.5]), hard=True)
    assert w.tolist() == [0.75, 0.25]


def test_both_orders_cancel_a_position_bias():
    score = [0.0, 0.3, 0.6, 0.9]  # P in [0.29, 0.71]: + 0.2 stays inside [0, 1]
    fair = call(TableJudge(score=score), ["p"] * 4)
    biased = call(TableJudge(score=score, bias=0.2), ["p"] * 4)
    one = call(TableJudge(score=score, bias=0.2), ["p"] * 4, both_orders=False)
    assert (torch.diff(fair) > 0).all()  # higher score, higher win rate
    torch.testing.assert_close(biased, fair)  # (p + b + 1 - (1 - p + b)) / 2 = p
    # one order: sample i is shown first against the 3 - i later ones, each worth + 0.2
    torch.testing.assert_close(one - fair, torch.tensor([3, 1, -1, -3]) * 0.2 / 3)
    always_first = TableJudge(score=[0.0] * 4, bias=0.4)  # prefers whatever is shown first
    assert call(always_first, ["p"] * 4).tolist() == [0.5] * 4


def test_groups_are_batched_together_and_permutation_invariant():
    judge = TableJudge(score=[0.3 * i % 1.7 for i in range(12)])
    prompts = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    w = call(judge, prompts)
    assert judge.calls == [36]  # 3 groups x 6 pairs x 2 orders in one call
    for g in range(3):
        assert abs(float(w[4 * g:4 * g + 4].mean()) - 0.5) < 1e-6
    judge.calls.clear()
    w10 = call(judge, prompts, pairs_per_call=10)
    assert judge.calls == [10, 10, 10, 6] and torch.allclose(w10, w)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    wp = call(judge, [prompts[i] for i in perm], ids(12)[perm])
    torch.testing.assert_close(wp, w[perm])
    # the circulant subset keeps the group mean at 0.5
    wk = call(judge, prompts, opponents=2)
    assert all(abs(float(wk[4 * g:4 * g + 4].mean()) - 0.5) < 1e-6 for g in range(3))


def test_groups_come_from_metadata_group_id_else_from_prompts():
    assert group_index(["a", "b", "a"], None).tolist() == [0, 1, 0]
    meta = [{"group_id": 7}, {"group_id": 7}, {"group_id": 3}]
    assert group_index(["a", "a", "a"], meta).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="give every row its group id or none"):
        group_index(["a", "a"], [{"group_id": 1}, {}])
    assert batch_pairs(torch.tensor([0, 1, 0, 1])).tolist() == [[0, 2], [1, 3]]


# --------------------------------------------------------------------------- registry and judges

def test_pref_winrate_over_bradley_terry_brightness_from_the_registry():
    s = load("pref_winrate", judge="bradley_terry", scorer="brightness", temperature=0.01,
             hard=True)
    assert is_groupwise(s) and s.media == "image" and s.uses_prompts is False
    levels = torch.tensor([0.2, 0.8, 0.5, 0.4, 0.1, 0.9])
    x = levels.view(6, 1, 1, 1).expand(6, 3, 4, 4).clone()
    meta = [{"group_id": g} for g in (5, 5, 5, 9, 9, 9)]
    w = s(x, None, meta)
    # within each group of 3: brightest wins both (1), middle one (0.5), darkest none (0)
    assert w.tolist() == [0.0, 1.0, 0.5, 0.5, 0.0, 1.0]
    # through the core interface: the groups reach the reward as metadata group ids
    got = evaluate_reward(s, x, [""] * 6, [{}] * 6, group_ids=torch.tensor([1, 1, 1, 2, 2, 2]))
    assert got.values[:, 0].tolist() == w.tolist()


def test_video_judge_makes_a_video_reward():
    s = load("pref_winrate", judge="bradley_terry", scorer="brightness_trend", trend="up")
    assert s.media == "video" == media_of("pref_winrate", {"judge": "bradley_terry",
                                                            "scorer": "brightness_trend"})
    assert not s.uses_prompts  # like its scorer with trend=up
    up = torch.linspace(0, 1, 4).view(1, 4, 1, 1, 1).expand(1, 4, 3, 2, 2)
    v = torch.cat([up, up.flip(1)])  # [2, F, 3, H, W]: brightening beats darkening
    w = s(v, None)
    assert w[0] > 0.5 > w[1]


def test_judge_resolution_and_option_errors():
    with pytest.raises(ValueError, match="unknown judge 'vlm_pairr'"):
        load("pref_winrate", judge="vlm_pairr")
    with pytest.raises(TypeError, match="not a pairwise judge"):
        load("pref_winrate", judge="brightness")
    with pytest.raises(ValueError, match="odd number of opponents"):
        load("pref_winrate", judge="bradley_terry", scorer="brightness", opponents=3)(
            torch.rand(5, 3, 2, 2), None)
    with pytest.raises(ValueError, match="judge=bradley_terry needs scorer=NAME"):
        load("pref_winrate", judge="bradley_terry", scorer="pref_winrate")
    with pytest.raises(TypeError, match="does not take 'nonsense'"):
        load("pref_winrate", judge="bradley_terry", scorer="brightness", nonsense=1)
    assert pref_problems({"judge": "bradley_terry", "scorer": "brightness", "opponents": 0,
                          "hard": "yes", "decimals": -1}) == [
        "pref_winrate: opponents=0; expected a positive int (each sample meets that many "
        "others) or leave it out for all pairs",
        "pref_winrate: hard='yes'; expected true or false",
        "pref_winrate: decimals=-1; expected a non-negative int (3: Pref-GRPO's rounding) or "
        "leave it out"]


class FakeVlmPair:
    """Stands in for lane judge's vlm_pair (rewards/vlm_judge.py) in the registry."""

    name, media = "vlm_pair", "image"

    def __init__(self, path=None, batch_size=8):
        self.path = path

    def compare(self, a, b, prompts):
        return (a.mean((1, 2, 3)) > b.mean((1, 2, 3))).float()


def test_a_registered_vlm_pair_judge_gets_its_options_and_the_job_config_validates(
        monkeypatch, tmp_path):
    from mmrl.diffusion.config import reward_media_problems, reward_spec_problems
    monkeypatch.setitem(JUDGES._entries, "vlm_pair", FakeVlmPair)
    spec = f"pref_winrate:judge=vlm_pair:path={tmp_path}:opponents=2"
    assert reward_spec_problems(spec) == [] and reward_media_problems(spec, 0) == []
    assert "give it a video judge" in reward_media_problems(spec, 9)[0]
    s = load("pref_winrate", judge="vlm_pair", path=str(tmp_path))
    assert s.judge.path == str(tmp_path)
    w = s(torch.linspace(0, 1, 4).view(4, 1, 1, 1).expand(4, 3, 2, 2), ["p"] * 4)
    torch.testing.assert_close(w, torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    assert reward_media_problems("pref_winrate:judge=vlm_pairr", 0)[0].startswith(
        "reward: pref_winrate: unknown judge 'vlm_pairr'")


# --------------------------------------------------------------------------- the core plumbing

class GroupSum:
    """A groupwise toy reward: sample value minus its group's mean; fails on group 2."""

    groupwise, name = True, "gsum"

    def __init__(self):
        self.seen = []

    def __call__(self, samples, prompts, metadata):
        gid = [m["group_id"] for m in metadata]
        self.seen.append(gid)
        if 2 in gid:
            raise RuntimeError("judge down for group 2")
        x = torch.tensor(samples, dtype=torch.float32)
        g = torch.tensor(gid)
        return torch.stack([x[i] - x[g == g[i]].mean() for i in range(len(x))])


def test_group_ids_reach_groupwise_rewards_and_failures_are_isolated_by_group():
    fn = GroupSum()
    samples, gids = [1.0, 3.0, 5.0, 9.0, 0.0, 2.0], [0, 0, 1, 1, 2, 2]
    batch, err = robust_reward(fn, samples, ["p"] * 6, [{}] * 6, retries=0,
                               group_ids=torch.tensor(gids))
    assert "judge down for group 2" in err
    assert batch.values[:4, 0].tolist() == [-1.0, 1.0, -2.0, 2.0]  # scored group by group
    assert batch.valid.tolist() == [True] * 4 + [False] * 2
    assert fn.seen[1:] == [[0, 0], [1, 1], [2, 2]]
    # wrappers stay groupwise; plain rewards never see a group id they did not ask for
    combined = CombinedReward({"g": GroupSum(), "plain": lambda s, p, m: [len(m[0])] * len(s)})
    assert combined.groupwise
    out = evaluate_reward(combined, samples[:4], ["p"] * 4, [{}] * 4, group_ids=gids[:4])
    assert out.column("g").tolist() == [-1.0, 1.0, -2.0, 2.0]
    assert out.column("plain").tolist() == [1.0] * 4  # metadata {"group_id": ..}: one key
    plain = evaluate_reward(lambda s, p, m: [len(m[0])] * len(s), samples, ["p"] * 6, [{}] * 6,
                            group_ids=gids, name="plain")
    assert plain.values[:, 0].tolist() == [0.0] * 6


def test_the_loop_keeps_groups_whole_and_passes_their_ids(tmp_path):
    from mmrl.algo.losses import PolicyLoss
    from mmrl.config.schema import config_from_dict
    from mmrl.demo.toy import ToyPolicy, make_prompts
    from mmrl.train.policy import Capabilities
    from mmrl.train.rounds import needs_whole_groups
    from mmrl.train.runner import Run

    class Rank(GroupSum):
        def __call__(self, samples, prompts, metadata):
            self.seen.append([m["group_id"] for m in metadata])
            return [float(len(s)) for s in samples]

    assert needs_whole_groups(PolicyLoss("grpo").spec, Capabilities(), Rank())
    assert not needs_whole_groups(PolicyLoss("grpo").spec, Capabilities(), lambda *a: [])
    cfg = config_from_dict({"job": "toy", "train": {
        "steps": 1, "prompts_per_step": 3, "group_size": 4, "progress": False,
        "output_dir": str(tmp_path), "log_every": 100, "seed": 3},
        "toy": {"digits": 5, "length": 3, "num_prompts": 8, "d_model": 16, "layers": 1,
                "heads": 2}})
    prompts = make_prompts(cfg.task, cfg.train.seed)
    fn = Rank()
    run = Run(cfg, ToyPolicy(cfg.task, seed=3), fn, prompts, [{} for _ in prompts])
    rollout, rewards, error = run.rounds.collect_round()
    assert error is None and fn.seen[-1] == rollout.sample_group_ids.tolist()
    assert run.rounds.whole_groups  # GRPO alone would split groups over ranks
    run.rounds.dist = type("D", (), {"world": 2, "rank": 0, "active": True})()
    assert run.rounds.shard([4, 4, 4], [10, 11, 12]) == [(0, 4, 10), (2, 4, 12)]


def test_a_judge_named_as_a_reward_points_at_pref_winrate():
    from mmrl.diffusion.config import reward_spec_problems
    (msg,) = reward_spec_problems("vlm_pair:path=/ckpt")
    assert "pairwise judge" in msg and "pref_winrate:judge=vlm_pair" in msg
    assert reward_spec_problems("pref_winrate:judge=vlm_pair:path=/ckpt") == []


def test_pref_winrate_asks_a_vlm_pair_judge_each_query_once(tmp_path, monkeypatch):
    """vlm_pair averages both orders by default; inside pref_winrate (which orders its queries
    itself) it is built with both_orders=False, so a pair costs 2 forwards, not 4."""
    import inspect

    import mmrl.rewards.pairwise as pw
    from mmrl.rewards.vlm_judge import VLMPairJudge
    assert "both_orders" in inspect.signature(VLMPairJudge.__init__).parameters
    seen = {}

    class SpyJudge(FakeVlmPair):
        def __init__(self, path=None, both_orders=True, batch_size=8):
            seen["both_orders"] = both_orders

    def factory(**kw):
        return SpyJudge(**kw)

    factory.target = ("pairwise", "SpyJudge", {})  # a lazy entry: its class's signature counts
    monkeypatch.setattr(pw, "SpyJudge", SpyJudge, raising=False)
    monkeypatch.setitem(JUDGES._entries, "spy", factory)
    load("pref_winrate", judge="spy", path=str(tmp_path))
    assert seen["both_orders"] is False
    pw.load_judge("spy", if_taken={"both_orders": False}, both_orders=True)
    assert seen["both_orders"] is True  # an explicit option wins
