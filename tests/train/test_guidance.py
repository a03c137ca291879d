"""Guidance augmenters (mmrl.train.guidance) on a stub policy whose success is decided by the
hint, and the toy policy's hint segment / retarget, with hand-worked values."""
import math

import pytest
import torch

from mmrl.budget.selection import make_selector
from mmrl.demo.config import ToyConfig
from mmrl.demo.toy import ToyHints, ToyPolicy, ToyPrompt, toy_record
from mmrl.train.guidance import Guidance, build_guidance, failing_groups
from mmrl.train.policy import Capabilities
from mmrl.train.rollout import Rollout
from mmrl.train.rounds import Rounds, RoundSettings


class HintReader:
    """Answers with the hint it is given: sample = number of hint digits; rollout_logp = -that;
    ``retarget`` records that it was called (prompt swapped, sampler's log-probs kept)."""

    capabilities = Capabilities(rollout_logp=True, retarget=True)

    def rollout(self, prompts, metadata, group_size, generator):
        counts = [group_size] * len(prompts) if isinstance(group_size, int) else list(group_size)
        rep = lambda xs: [x for x, n in zip(xs, counts) for _ in range(n)]  # noqa: E731
        hint = [len(p.hint) if isinstance(p, ToyPrompt) else 0 for p in rep(prompts)]
        return Rollout(hint, rep(prompts), rep(metadata),
                       torch.arange(len(prompts)).repeat_interleave(torch.tensor(counts)),
                       torch.ones(len(hint), 1, dtype=torch.bool), {},
                       rollout_logp=-torch.tensor(hint, dtype=torch.float)[:, None])

    def retarget(self, rollout, prompts, metadata):
        return Rollout(rollout.samples, list(prompts), list(metadata), rollout.group_ids,
                       rollout.mask, {"retargeted": [True] * len(prompts)},
                       rollout_logp=rollout.rollout_logp)


def need_reward(samples, prompts, metadata):
    """1 when the hint had at least ``need`` digits (the record's difficulty)."""
    return torch.tensor([float(s >= m["need"]) for s, m in zip(samples, metadata)])


def _rounds(method, needs, start_step=0, step=0):
    c = ToyConfig(length=4)
    prompts = [[1, 2, 3, 4], [0, 1, 2, 3], [4, 3, 2, 1]]
    meta = [{**toy_record(c, p), "need": n} for p, n in zip(prompts, needs)]
    pol = HintReader()
    aug = build_guidance(method, Guidance(ToyHints(), threshold=0.5, start_step=start_step),
                         pol, ratios=[0.25, 0.5, 0.75])
    r = Rounds(pol, need_reward, prompts, meta, settings=RoundSettings(prompts_per_step=3,
               group_size=4), selector=make_selector("uniform", 3),
               generator=torch.Generator().manual_seed(0),
               prompt_generator=torch.Generator().manual_seed(0), augmenters=[aug])
    r.step = step
    return r, r.collect_groups(prompts, meta, [4, 4, 4], [0, 1, 2]), aug


def test_failing_groups_hand_values():
    values = torch.tensor([0.0, 0.0, float("nan"), 1.0, 0.0, 0.0, 0.0, float("nan")])
    gids = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    # group 0: two valid zeros -> all-fail; 1 has a success; 2 and 3: one valid row only
    assert failing_groups(values, gids, 0.5) == [0]


def test_failing_groups_match_the_loop_oracle_and_ignore_row_order():
    from tests.reference.guidance_ref import failing_groups as oracle
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        gids = torch.randint(0, 6, (24,), generator=g)
        values = (torch.rand(24, generator=g) < 0.15).double()  # mostly failures
        values[torch.rand(24, generator=g) < 0.2] = float("nan")
        want = oracle(values.tolist(), gids.tolist(), 0.5)
        assert failing_groups(values, gids, 0.5) == want
        perm = torch.randperm(24, generator=g)
        assert failing_groups(values[perm], gids[perm], 0.5) == want


def test_toy_hint_levels_and_prefixes_hand_values():
    meta = toy_record(ToyConfig(length=4, task="reverse"), [1, 2, 3, 4])
    assert meta["solution_steps"] == [[4], [3], [2], [1]]
    h = ToyHints()
    assert h.level_hints(meta) == [[4], [4, 3], [4, 3, 2]]  # never the whole answer
    assert [h.prefix_hint(meta, w) for w in (0.1, 0.25, 0.5, 0.75)] == [
        None, [4], [4, 3], [4, 3, 2]]
    assert h.answer_hint(meta) == [4, 3, 2, 1]


def test_ghpo_stages_until_the_group_succeeds():
    """need 0: succeeds plain (kept); need 2: ω=.25 gives 1 digit (fails), ω=.5 gives 2
    (succeeds); need 4: no ratio < 1 gives 4 digits, so it stays all-fail after ω=.75."""
    rounds, rnd, aug = _rounds("ghpo", needs=[0, 2, 4])
    out = aug(rounds, rnd)
    hints = {int(g): len(p.hint) if isinstance(p, ToyPrompt) else 0
             for g, p in zip(out.rollout.group_ids, out.rollout.prompts)}
    assert hints == {0: 0, 1: 2, 2: 3}
    rew = {g: out.rewards.values[out.rollout.group_ids == g, 0].tolist() for g in range(3)}
    assert rew == {0: [1.0] * 4, 1: [1.0] * 4, 2: [0.0] * 4}
    # stage 1: groups 1, 2 (8 rows); stage 2: both again; stage 3: group 2 only
    assert rounds.step_round_metrics() == {"guided_groups": 2.0, "guided_rescued": 1.0,
                                           "guided_rollouts": 20.0}


def test_scaf_replaces_one_row_with_the_lowest_level_that_succeeds_and_waits():
    rounds, rnd, aug = _rounds("scaf", needs=[1, 2, 9], start_step=5, step=4)
    assert aug(rounds, rnd) is rnd  # guidance exemption: step 4 < start_step 5
    rounds.step = 5
    out = aug(rounds, rnd)
    rows = out.rollout.group_ids
    assert sorted(rows.tolist()) == [0] * 4 + [1] * 4 + [2] * 4  # group sizes kept
    g0 = out.rewards.values[rows == 0, 0].tolist()
    g1 = out.rewards.values[rows == 1, 0].tolist()
    assert sorted(g0) == [0.0, 0.0, 0.0, 1.0] and sorted(g1) == [0.0, 0.0, 0.0, 1.0]
    won = [len(p.hint) for p, g in zip(out.rollout.prompts, rows.tolist())
           if isinstance(p, ToyPrompt)]
    assert sorted(won) == [1, 2]  # the minimal level per group: 1 digit for need 1, 2 for 2
    assert out.rewards.values[rows == 2, 0].tolist() == [0.0] * 4  # no level reaches 9
    # Scaf's worked value: N = 4, one success -> A = (1 - 1/4) / std = 0.75 / 0.5 = 1.5
    v = torch.tensor(g0)
    assert ((1.0 - v.mean()) / v.std()).item() == pytest.approx(1.5)


def test_guide_rows_are_retargeted_to_the_plain_prompt_with_the_hinted_sampler_logp():
    rounds, rnd, aug = _rounds("guide", needs=[0, 3, 9])
    out = aug(rounds, rnd)
    g1 = out.rollout.group_ids == 1
    assert [out.rollout.prompts[i] for i in g1.nonzero().flatten()] == [[0, 1, 2, 3]] * 4
    assert out.rewards.values[g1, 0].tolist() == [1.0] * 4  # the full hint (3 of 4 digits)
    # the sampler's log-probs are the hinted ones (-3 here), plain rows keep theirs (0)
    assert out.rollout.rollout_logp[g1, 0].tolist() == [-3.0] * 4
    assert out.rollout.rollout_logp[out.rollout.group_ids == 0, 0].tolist() == [0.0] * 4
    # every re-rolled row (groups 1 and 2, all-fail before) is flagged for off_policy_shaping
    assert torch.equal(out.rollout.off_policy, out.rollout.group_ids != 0)


def test_guide_and_expo_refuse_a_policy_that_cannot_retarget():
    class Plain:
        capabilities = Capabilities()
    for method in ("guide", "expo"):
        with pytest.raises(TypeError, match="retarget"):
            build_guidance(method, Guidance(ToyHints()), Plain())
    with pytest.raises(ValueError, match="expected one of"):
        build_guidance("ghpo2", Guidance(ToyHints()))


def test_toy_retarget_keeps_the_hinted_sampler_logp_and_rescores_without_the_hint():
    c = ToyConfig(digits=5, length=3, d_model=16, layers=1, heads=2, hint_slot=True)
    pol = ToyPolicy(c, seed=0)
    hinted = ToyPrompt((1, 2, 3), (3, 2))
    r = pol.rollout([hinted], [{}], 4, torch.Generator().manual_seed(0))
    pad = pol.pad
    assert r.data["ids"][0, :6].tolist() == [1, 2, 3, 3, 2, pad]
    with torch.no_grad():
        scored = pol.logp(r, torch.arange(4), 0, pol.T)
        plain = pol.retarget(r, [[1, 2, 3]] * 4, [{}] * 4)
        rescored = pol.logp(plain, torch.arange(4), 0, pol.T)
    m = r.mask
    # the sampler's log-probs are the hinted prompt's (re-scored, up to float rounding)
    torch.testing.assert_close(r.rollout_logp[m], scored[m], atol=1e-5, rtol=0)
    assert plain.data["ids"][0, :6].tolist() == [1, 2, 3, pad, pad, pad]
    assert torch.equal(plain.rollout_logp, r.rollout_logp)
    assert (rescored[m] - scored[m]).abs().max() > 1e-3  # another context, other log-probs
    with pytest.raises(ValueError, match="hint segment"):
        ToyPolicy(ToyConfig(length=3, d_model=16, heads=2)).prompt_ids([hinted])


def test_toy_job_with_guide_trains_and_reports_the_guidance_metrics(tmp_path):
    from mmrl.config.jobs import get_job
    from mmrl.config.schema import config_from_dict
    cfg = config_from_dict({
        "job": "toy", "algo": {"preset": "grpo", "beta": 0.0, "rollout_is": "token_truncate",
                               "off_policy_shaping": "percentile"},
        "train": {"steps": 2, "prompts_per_step": 2, "group_size": 4, "seed": 0,
                  "progress": False, "log_every": 1000, "output_dir": str(tmp_path)},
        "toy": {"digits": 3, "length": 2, "num_prompts": 4, "d_model": 16, "layers": 1,
                "heads": 2, "reward": "exact", "guidance": "guide"}})
    hist = get_job("toy").run(cfg)["history"]
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert all("guided_groups" in h and "guided_rollouts" in h for h in hist)
    assert all(0.0 <= h["off_policy_rows"] <= 1.0 for h in hist)


def test_configs_refuse_guide_without_the_rollout_correction_and_bad_ratios():
    from mmrl.config.core import ConfigError
    from mmrl.config.schema import config_from_dict
    for job in ("toy", "video"):
        with pytest.raises(ConfigError, match=f"{job}.guidance=guide corrects .* set "
                           r"algo.off_policy_shaping=percentile \(Guide's\) or "
                           "algo.rollout_is=token_truncate"):
            config_from_dict({"job": job, job: {"guidance": "guide"}})
        with pytest.raises(ConfigError, match=f"shapes the hinted rows that {job}.guidance=guide "
                           f"flags, got {job}.guidance=ghpo"):
            config_from_dict({"job": job, job: {"guidance": "ghpo"},
                              "algo": {"off_policy_shaping": "percentile"}})
        assert config_from_dict({"job": job, job: {"guidance": "guide"}, "algo": {
            "off_policy_shaping": "percentile"}}).algo.resolve().off_policy_gamma == 0.9
        with pytest.raises(ConfigError, match=r"guidance_ratios: got \[0.5, 1.5\]"):
            config_from_dict({"job": job, job: {"guidance_ratios": [0.5, 1.5]}})
        ok = config_from_dict({"job": job, job: {"guidance": "guide"},
                               "algo": {"rollout_is": "token_truncate"}})
        assert ok.task.guidance == "guide"


def test_expo_swaps_in_one_answer_conditioned_success_for_the_plain_prompt():
    """The answer hint is the whole target (4 digits): need 4 is rescued by one row, need 9 is
    not; the swapped row is trained for the plain prompt, its sampler log-prob kept (-4)."""
    rounds, rnd, aug = _rounds("expo", needs=[0, 4, 9])
    out = aug(rounds, rnd)
    g1 = (out.rollout.group_ids == 1).nonzero().flatten().tolist()
    assert sorted(out.rewards.values[g1, 0].tolist()) == [0.0, 0.0, 0.0, 1.0]
    assert [out.rollout.prompts[i] for i in g1] == [[0, 1, 2, 3]] * 4  # all plain prompts
    assert sorted(out.rollout.rollout_logp[g1, 0].tolist()) == [-4.0, 0.0, 0.0, 0.0]
    assert out.rewards.values[out.rollout.group_ids == 2, 0].tolist() == [0.0] * 4
    assert rounds.step_round_metrics() == {"guided_groups": 2.0, "guided_rescued": 1.0,
                                           "guided_rollouts": 8.0}
