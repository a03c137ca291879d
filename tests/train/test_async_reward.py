"""Asynchronous rewards (train.reward_chunks, mmrl/train/async_reward.py): the same rows, rewards,
advantages and weights as scoring the chunks one after the other; rows matched whatever order
the chunks finish in; a failing chunk costs only its rows; the queue stays bounded; both jobs
take the config key; the diffusion job's merged trajectories re-score as sampled."""
import functools
import os
import threading
import time

import pytest
import torch

from mmrl.algo.losses import PolicyLoss
from mmrl.cli.app import main
from mmrl.config.schema import config_from_dict
from mmrl.demo.toy import ToyConfig, ToyPolicy, digit_reward
from mmrl.train import async_reward
from mmrl.train.async_reward import ChunkScorer, chunk_bounds, collect_chunked, concat_rewards
from mmrl.train.batch import batch_advantages
from mmrl.train.policy import Capabilities, GroupPolicy
from mmrl.train.reward_fn import RewardBatch
from mmrl.train.rollout import Rollout

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {"digits": 5, "length": 3, "num_prompts": 32, "d_model": 16, "layers": 1, "heads": 2}


class FakePolicy(GroupPolicy):
    """Deterministic samples ``(prompt, j)``; records, at each call, how many sampled chunks
    the reward has not finished yet (``ahead``)."""

    def __init__(self, finished=None):
        self.calls, self.ahead, self.finished = 0, [], finished if finished is not None else []

    def rollout(self, prompts, metadata, group_size, generator):
        counts = [group_size] * len(prompts) if isinstance(group_size, int) else group_size
        self.ahead.append(self.calls - len(self.finished))
        self.calls += 1
        samples = [(p, j) for p, n in zip(prompts, counts) for j in range(n)]
        groups = torch.arange(len(prompts)).repeat_interleave(torch.tensor(counts))
        return Rollout(samples, [s[0] for s in samples], [{} for _ in samples], groups,
                       torch.ones(len(samples), 1, dtype=torch.bool),
                       {"x": torch.tensor([float(s[0] * 10 + s[1]) for s in samples])})


def _value(samples):
    return torch.tensor([float(p * 10 + j) for p, j in samples])


def test_chunk_bounds_split_whole_groups_by_sample_count():
    assert chunk_bounds([4] * 8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert chunk_bounds([4] * 3, 8) == [(0, 1), (1, 2), (2, 3)]  # never an empty chunk
    assert chunk_bounds([12, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]
    assert chunk_bounds([3, 5], 1) == [(0, 2)]
    with pytest.raises(ValueError, match="expected an int >= 1"):
        chunk_bounds([1], 0)


def test_async_equals_sync_rows_rewards_and_advantages_on_the_toy_policy():
    pol = ToyPolicy(ToyConfig(**{k: v for k, v in TINY.items() if k != "num_prompts"}))
    prompts = [[1, 2, 3], [0, 4, 1], [2, 2, 0], [3, 1, 4], [4, 0, 0]]
    meta = [{"target": list(reversed(p))} for p in prompts]
    loss = PolicyLoss("grpo")
    out = []
    for overlap in (True, False):
        gen = torch.Generator().manual_seed(5)
        r, w, err, _ = collect_chunked(pol, digit_reward, prompts, meta, [4] * 5, gen,
                                       [7, 8, 9, 10, 11], 3, overlap=overlap)
        out.append((r, w, batch_advantages(pol, loss, r, w).advantages, gen.get_state()))
        assert err is None
    (ra, wa, aa, ga), (rb, wb, ab, gb) = out
    assert ra.samples == rb.samples and torch.equal(ra.data["ids"], rb.data["ids"])
    assert torch.equal(wa.values, wb.values) and torch.equal(aa, ab) and torch.equal(ga, gb)
    assert ra.group_ids.tolist() == [g for g in [7, 8, 9, 10, 11] for _ in range(4)]
    # given the samples, the reward of the joined rows is the chunked one
    assert torch.equal(wa.values[:, 0], digit_reward(ra.samples, ra.prompts, ra.metadata))


def test_a_run_with_overlap_ends_with_the_weights_of_the_same_chunks_scored_in_turn(
        tmp_path, monkeypatch):
    from mmrl.config.jobs import get_job

    def run(name):
        cfg = config_from_dict({
            "job": "toy", "algo": {"preset": "grpo"},
            "train": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "lr": 3e-3,
                      "seed": 0, "device": "cpu", "progress": False, "log_every": 1000,
                      "reward_chunks": 3, "output_dir": str(tmp_path / name)},
            "toy": TINY})
        summary = get_job("toy").run(cfg)
        return summary, torch.load(tmp_path / name / "final.pt")
    sa, wa = run("async")
    assert all("reward_wait_s" in h for h in sa["history"])
    monkeypatch.setattr("mmrl.train.rounds.collect_chunked",
                        functools.partial(collect_chunked, overlap=False))
    sb, wb = run("sync")
    assert [h["reward_mean"] for h in sa["history"]] == [h["reward_mean"] for h in sb["history"]]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_rows_match_when_chunks_finish_out_of_order():
    done = []

    def slow_first(samples, prompts, metadata):  # the first chunk finishes last
        time.sleep(0.15 if samples[0][0] == 0 else 0.0)
        done.append(samples[0][0])
        return _value(samples)
    r, w, err, _ = collect_chunked(FakePolicy(), slow_first, list(range(6)), [{}] * 6,
                                   [2] * 6, torch.Generator(), list(range(6)), 3, workers=3,
                                   max_pending=3)
    assert done[-1] == 0 and done != sorted(done)
    assert err is None and torch.equal(w.values[:, 0], _value(r.samples))
    assert torch.equal(w.values[:, 0], r.data["x"])


def test_a_failing_chunk_gets_nan_rows_and_the_others_keep_their_rewards():
    class Flaky:
        name, names = "flaky", ["a", "b"]

        def __call__(self, samples, prompts, metadata):
            if any(p in (2, 3) for p in prompts):  # the second of three chunks
                raise RuntimeError("scorer down")
            return {"a": _value(samples), "b": -_value(samples)}
    r, w, err, _ = collect_chunked(FakePolicy(), Flaky(), list(range(6)), [{}] * 6, [2] * 6,
                                   torch.Generator(), list(range(6)), 3, reward_retries=1)
    bad = torch.tensor([p in (2, 3) for p in r.prompts])
    assert w.names == ["a", "b"] and torch.equal(~w.valid, bad)
    assert torch.isnan(w.values[bad]).all()
    assert torch.equal(w.values[~bad, 0], _value(r.samples)[~bad])
    assert "RuntimeError: scorer down" in err
    with pytest.raises(ValueError, match="same columns"):
        concat_rewards([RewardBatch(torch.ones(1, 1), ["a"], torch.ones(1, dtype=torch.bool)),
                        RewardBatch(torch.ones(1, 1), ["b"], torch.ones(1, dtype=torch.bool))])


@pytest.mark.parametrize("pending", [1, 2])
def test_the_sampler_never_runs_more_than_max_pending_chunks_ahead(pending, monkeypatch):
    finished = []

    def slow(samples, prompts, metadata):
        time.sleep(0.03)
        finished.append(1)
        return _value(samples)
    pol = FakePolicy(finished)
    scorer_peaks = []
    real = ChunkScorer.results

    def spy(self):
        scorer_peaks.append(self.peak_pending)
        return real(self)
    monkeypatch.setattr(ChunkScorer, "results", spy)
    collect_chunked(pol, slow, list(range(8)), [{}] * 8, [1] * 8, torch.Generator(),
                    list(range(8)), 8, max_pending=pending)
    assert max(pol.ahead) == pending and scorer_peaks == [pending]
    assert threading.active_count() < 20  # the workers are not left behind per round


def test_a_policy_that_trains_other_rows_than_the_rewarded_ones_is_refused():
    class Tree(FakePolicy):
        capabilities = Capabilities(row_advantages=True)
    with pytest.raises(ValueError, match="reward_chunks=1"):
        async_reward.check_chunkable(Tree())


def test_both_jobs_accept_the_key_and_the_diffusion_job_refuses_tree_sampling(capsys):
    configs = [os.path.join(ROOT, "configs/demo", n) for n in ("diffusion_tiny.yaml",
                                                              "video_tiny.yaml")]
    assert main(["config", "validate", "--schema-only", *configs,
                 "--set", "train.reward_chunks=4"]) == 0
    assert main(["config", "validate", "--schema-only", configs[0], "--set",
                 "train.reward_chunks=0"]) == 2
    assert main(["config", "validate", "--schema-only", configs[0], "--set",
                 "train.reward_chunks=2", "--set", "diffusion.sampler=tree", "--set",
                 "train.group_size=4"]) == 2
    assert "train.reward_chunks: 2 chunks need training rows" in capsys.readouterr().err


def test_diffusion_chunks_merge_into_one_rollout_that_rescores_as_sampled(tmp_path):
    import sys
    sys.path.insert(0, os.path.join(ROOT, "tests/diffusion/job"))
    from diffusion_train_helpers import tiny_config
    from mmrl.diffusion.job import build_policy
    from mmrl.diffusion.models.sd3 import save_tiny_sd3
    cfg = tiny_config(str(save_tiny_sd3(tmp_path / "sd3", size=8)), str(tmp_path / "out"),
                      sampler="window")
    pol = build_policy(cfg.task, "cpu", cfg.algo.resolve())

    def bright(samples, prompts, metadata):
        return torch.stack(samples).mean((1, 2, 3))
    out = []
    for overlap in (True, False):
        pol.iteration = 0
        r, w, _, _ = collect_chunked(pol, bright, ["a", "b", "c"], [{}] * 3, [2] * 3,
                                     torch.Generator().manual_seed(1), [0, 1, 2], 3,
                                     overlap=overlap)
        out.append((r, w))
        assert pol.iteration == 1  # one round, not one per chunk
    (r, w), (r2, w2) = out
    assert torch.equal(w.values, w2.values)
    assert all(torch.equal(a, b) for a, b in zip(r.samples, r2.samples))
    with torch.no_grad():
        logp = pol.logp(r, torch.arange(len(r)), 0, r.mask.shape[1])
    torch.testing.assert_close(logp, r.rollout_logp, atol=1e-5, rtol=0)
    traj = r.data["trajectory"].traj
    assert traj.final.shape[0] == 6 and r.nfe == 6 * 4  # B images x 4 steps
    assert len(set(traj.step.tolist())) == 2  # one SDE window (window: 2) for the round


def test_a_groupwise_reward_sees_each_chunks_global_group_ids():
    """pref_winrate-style rewards (groupwise = True) get metadata[i]["group_id"] in every chunk,
    the global ids, whole groups per chunk."""
    seen = []

    class PerGroup:
        name, groupwise = "per_group", True

        def __call__(self, samples, prompts, metadata):
            gids = [m["group_id"] for m in metadata]
            seen.append(gids)
            return torch.tensor([float(g) for g in gids])
    r, w, err, _ = collect_chunked(FakePolicy(), PerGroup(), list(range(6)), [{}] * 6, [2] * 6,
                                   torch.Generator(), [10 + g for g in range(6)], 3)
    assert err is None and len(seen) == 3
    assert all(len(set(ids)) == 2 and len(ids) == 4 for ids in seen)  # 2 whole groups each
    assert torch.equal(w.values[:, 0], r.group_ids.float())
    assert sorted(set(r.group_ids.tolist())) == list(range(10, 16))
