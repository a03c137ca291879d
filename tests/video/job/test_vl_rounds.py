"""The video job's round augmenters: difficulty-aware re-rolls (DeepVideo-R1) and T-GRPO temporal
contrast (Video-R1), on real synthetic videos; then both through `mmrl train` on the tiny model."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from mmrl.train.loop import Rollout
from mmrl.train.reward_fn import RewardBatch
from mmrl.train.rounds import Round, Rounds, RoundSettings
from mmrl.video.augment import DifficultyAugmenter
from mmrl.video.data import build_messages, format_question, load_vl_dataset
from mmrl.video.io import VideoClip
from mmrl.video.rounds import DifficultyRounds, TemporalContrast, _Media

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


class FakeRun(Rounds):
    """The :class:`mmrl.train.rounds.Rounds` an augmenter receives, on one rank;
    ``collect_groups`` returns rows whose accuracy comes from ``answer(group id, metadata)``."""

    def __init__(self, answer):
        super().__init__(None, None, ["p"], None, settings=RoundSettings(prompts_per_step=1),
                         selector=None, generator=torch.Generator(),
                         prompt_generator=torch.Generator())
        self.answer, self.requests = answer, []
        self.metrics = self.round_metrics

    def all_agree(self, flags):
        return [bool(f) for f in flags]

    def gathered(self, rollout, values):
        return values, rollout.sample_group_ids

    def collect_groups(self, prompts, metadata, counts, group_ids):
        self.requests.append((prompts, metadata, counts, group_ids))
        return make_round(prompts, metadata, counts, group_ids,
                          [self.answer(g, m) for g, m in zip(group_ids, metadata)])


def make_round(prompts, metadata, counts, group_ids, accs) -> Round:
    rows = [(j, k) for j, c in enumerate(counts) for k in range(c)]
    acc = torch.tensor([float(accs[j][k]) for j, k in rows])
    rollout = Rollout([f"s{j}.{k}" for j, k in rows], [prompts[j] for j, _ in rows],
                      [metadata[j] for j, _ in rows],
                      torch.tensor([group_ids[j] for j, _ in rows]),
                      torch.ones(len(rows), 1, dtype=torch.bool))
    rewards = RewardBatch(torch.stack([acc, torch.zeros_like(acc)], 1),
                          ["accuracy", "think_answer_format"], torch.ones(len(rows), dtype=torch.bool))
    return Round(list(prompts), list(metadata), list(counts), list(group_ids), rollout, rewards)


@pytest.fixture()
def records(task_jsonl):
    return list(load_vl_dataset(task_jsonl))[:3]


def _groups(records):
    prompts = [format_question(r, "plain") for r in records]
    meta = [{**r.metadata(), "record_index": j, "messages": build_messages(r, "plain")}
            for j, r in enumerate(records)]
    return prompts, meta


def _media(records):
    return _Media(records, "plain", None, fps=4.0, max_frames=8)


def test_difficulty_rerolls_flat_groups_harder_or_easier(records):
    prompts, meta = _groups(records)
    # group 10 all correct (above the reference 0.5), 11 all wrong (below), 12 mixed
    rnd = make_round(prompts, meta, [4, 4, 4], [10, 11, 12], [[1] * 4, [0] * 4, [1, 0, 1, 0]])
    run = FakeRun(lambda g, m: [0.5] * 4)
    aug = DifficultyRounds(DifficultyAugmenter(reference=0.5, noise_std=25.0, drop_ratio=0.25),
                           _media(records))
    out = aug(run, rnd)
    assert len(run.requests) == 1
    new_prompts, new_meta, counts, gids = run.requests[0]
    assert gids == [10, 11] and counts == [4, 4]
    harder, easier = new_meta
    assert harder["augmented"] == "harder" and easier["augmented"] == "easier"
    clip = harder["messages"][-1]["content"][0]["video"]
    assert isinstance(clip, VideoClip) and clip.num_frames == 6  # 8 frames, a quarter dropped
    assert np.all(np.diff(clip.timestamps) > 0)  # the kept frames' times, in order
    orig = _media(records).clip(records[0])
    stamp = dict(zip(orig.frame_indices, np.asarray(orig.timestamps).tolist()))
    assert np.asarray(clip.timestamps).tolist() == [stamp[i] for i in clip.frame_indices]
    assert clip.sample_fps == pytest.approx(orig.sample_fps * 6 / 8)  # 6 of 8 frames kept
    assert new_prompts[0] == prompts[0]  # harder: same text, other frames
    assert "is not correct" in new_prompts[1] and new_prompts[1].startswith(prompts[1].split("\n")[0])
    assert easier["messages"][-1]["content"][-1]["text"] == new_prompts[1]
    # rows of groups 10 and 11 replaced by the re-rolls (reward 0.5), group 12 kept
    by_group = {g: out.rewards.values[out.rollout.group_ids == g, 0].tolist() for g in (10, 11, 12)}
    assert by_group == {10: [0.5] * 4, 11: [0.5] * 4, 12: [1.0, 0.0, 1.0, 0.0]}
    assert out.metadata[0]["augmented"] == "harder" and out.prompts[1] == new_prompts[1]
    assert run.metrics == {"aug_harder": 1.0, "aug_easier": 1.0}
    # the reference moved toward this batch's mean of group means (0.5): stays 0.5
    assert aug.state_dict() == {"reference": pytest.approx(0.5)}


def test_difficulty_is_reproducible_per_step_and_group(records):
    prompts, meta = _groups(records)
    frames = []
    for _ in range(2):
        rnd = make_round(prompts, meta, [2, 2, 2], [0, 1, 2], [[1, 1], [1, 1], [0, 1]])
        run = FakeRun(lambda g, m: [1, 1])
        DifficultyRounds(DifficultyAugmenter(reference=0.2), _media(records))(run, rnd)
        frames.append([m["messages"][-1]["content"][0]["video"].frames for m in run.requests[0][1]])
    assert len(frames[0]) == 2
    assert all(torch.equal(a, b) for a, b in zip(*frames))
    assert not torch.equal(frames[0][0], frames[0][1])  # different groups, different noise


def test_temporal_contrast_bonus_column(records):
    prompts, meta = _groups(records)
    # ordered accuracy per group: 1.0, 0.5, 0.25; shuffled accuracy: 1.0, 0.5, 1.0
    rnd = make_round(prompts, meta, [4, 4, 4], [0, 1, 2],
                     [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    shuffled = {0: [1, 1, 1, 1], 1: [1, 0, 1, 0], 2: [1, 1, 1, 1]}
    run = FakeRun(lambda g, m: shuffled[g])
    out = TemporalContrast(_media(records), alpha=0.3, mu=0.8)(run, rnd)
    (sp, smeta, counts, gids), = run.requests
    assert gids == [0, 1, 2] and sp == prompts
    from mmrl.video.io import read_video
    for m, r in zip(smeta, records):  # the clip's frames, permuted (not the identity)
        clip = m["messages"][-1]["content"][0]["video"]
        assert m["augmented"] == "shuffled" and isinstance(clip, VideoClip)
        orig = read_video(r.path, fps=4.0, max_frames=8)
        order = [next(i for i in range(orig.num_frames) if torch.equal(f, orig.frames[i]))
                 for f in clip.frames]
        assert sorted(order) == list(range(orig.num_frames)) and order != sorted(order)
        assert np.array_equal(clip.timestamps, orig.timestamps)  # times stay in order
    assert out.rewards.names == ["accuracy", "think_answer_format", "temporal"]
    bonus = out.rewards.column("temporal").view(3, 4)
    # p >= 0.8 p~: group 0 (1 >= .8) and 1 (.5 >= .4) yes, group 2 (.25 < .8) no; only correct rows
    expect = torch.tensor([[.3, .3, .3, .3], [.3, .3, 0, 0], [0, 0, 0, 0]])
    assert torch.allclose(bonus, expect)
    assert run.metrics["temporal_groups"] == 3 and run.metrics["temporal_applied"] == 2
    assert run.step_round_metrics()["shuffled_accuracy"] == pytest.approx(10 / 12)


def test_temporal_contrast_skips_images_and_needs_accuracy(records, tmp_path):
    from PIL import Image
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(img)
    recs = [records[0].replace(data_type="image", path=str(img))]
    prompts, meta = _groups(recs)
    rnd = make_round(prompts, meta, [2], [0], [[1, 0]])
    run = FakeRun(lambda g, m: [1, 1])
    out = TemporalContrast(_media(recs))(run, rnd)
    assert run.requests == [] and out.rewards.column("temporal").tolist() == [0.0, 0.0]
    bad = Round(rnd.prompts, rnd.metadata, rnd.counts, rnd.group_ids, rnd.rollout,
                RewardBatch(rnd.rewards.values[:, 1:], ["think_answer_format"], rnd.rewards.valid))
    with pytest.raises(ValueError, match="accuracy"):
        TemporalContrast(_media(records))(FakeRun(lambda g, m: [1, 1]), bad)


def test_video_job_trains_with_both_augmenters(tiny_vl_dir, task_jsonl, tmp_path):
    from mmrl.cli.app import main
    out = tmp_path / "run"
    rc = main(["train", os.path.join(ROOT, "configs/demo/video_tiny.yaml"), "train.steps=3",
               "train.prompts_per_step=3", "train.group_size=4", "train.progress=false",
               "train.sample_log_every=1", f"video.model={tiny_vl_dir}",
               f"video.data={task_jsonl}", f"train.output_dir={out}",
               "video.difficulty_augmentation=true", "video.temporal_contrast=true",
               "video.length_reward=grpo_lambda", "video.length_switch_accuracy=0.5",
               "video.mode_reward=true", "video.think_style=filler"])
    assert rc == 0
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(metrics) == 3
    for m in metrics:
        assert m["temporal_groups"] == 3.0 and 0 <= m["temporal_applied"] <= 3
        assert "reward/temporal" in m and "aug_harder" in m and "aug_easier" in m
        # one-letter completions have no thought: no mode signal, think_frac 0
        assert m["think_frac"] == 0.0 and m["reward/mode"] == 0.0 and "reward/length" in m
        assert 0.0 <= m["length_groups_on"] <= 1.0
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert set(samples[0]["rewards"]) == {"accuracy", "temporal", "length", "mode"}
    import yaml
    saved = yaml.safe_load(open(out / "config.yaml"))
    assert saved["algo"]["reward_weights"] == {"accuracy": 1.0, "temporal": 1.0, "length": 1.0,
                                               "mode": 1.0}


def test_variants_do_not_depend_on_which_rows_a_rank_holds(records):
    """Two ranks holding different halves of the same groups see the same gathered rewards and
    build the same variants (prompts, frames), so a split group is re-rolled consistently."""
    prompts, meta = _groups(records)
    full = make_round(prompts, meta, [4, 4, 4], [0, 1, 2], [[1] * 4, [0] * 4, [1, 0, 1, 0]])

    class RankRun(FakeRun):
        def gathered(self, rollout, values):  # every rank sees all rows (an all_gather)
            return self.all_values(values), full.rollout.sample_group_ids

    requests = []
    for rank in (0, 1):
        rows = torch.arange(12) // 6 == rank
        local = Round(full.prompts, full.metadata, full.counts, full.group_ids,
                      full.rollout.select(rows), full.rewards.select(rows))
        run = RankRun(lambda g, m: [0.5] * 4)
        # the local values are a function of local rewards: rebuild the global ones the same way
        run.all_values = lambda v, rows=rows: _global_like(v, rows, full)
        DifficultyRounds(DifficultyAugmenter(reference=0.5), _media(records))(run, local)
        requests.append(run.requests[0])
    (p0, m0, c0, g0), (p1, m1, c1, g1) = requests
    assert p0 == p1 and c0 == c1 and g0 == g1 == [0, 1]
    f0 = m0[0]["messages"][-1]["content"][0]["video"].frames
    f1 = m1[0]["messages"][-1]["content"][0]["video"].frames
    assert torch.equal(f0, f1)


def _global_like(local_values, rows, full):
    """The all_gather of ``local_values`` when the other rank computed the same quantity on its
    rows: recomputed from the full round (weighted sums or reward columns)."""
    if local_values.dim() == 2:  # reward columns
        return full.rewards.values.double()
    return full.rewards.weighted_sum(None)


def test_difficulty_skips_groups_with_varying_columns_or_one_sample(records):
    prompts, meta = _groups(records)
    # group 0: weighted sum constant (1 + 0 = 0 + 1) but the columns vary -> has an advantage
    # group 1: a single valid sample -> nothing to compare; group 2: flat, all correct
    rnd = make_round(prompts, meta, [2, 2, 2], [0, 1, 2], [[1, 0], [1, 1], [1, 1]])
    rnd.rewards.values[:2, 1] = torch.tensor([0.0, 1.0])
    rnd.rewards.valid[3] = False
    run = FakeRun(lambda g, m: [0.5, 0.5])
    DifficultyRounds(DifficultyAugmenter(reference=0.2), _media(records))(run, rnd)
    assert run.requests[0][3] == [2]


def test_a_variant_some_rank_cannot_build_is_skipped_everywhere(records):
    prompts, meta = _groups(records)
    rnd = make_round(prompts, meta, [2, 2, 2], [0, 1, 2], [[1, 1], [1, 1], [1, 1]])
    run = FakeRun(lambda g, m: [1, 1])
    run.all_agree = lambda flags: [False] + [bool(f) for f in flags[1:]]  # rank 1 lacks group 0
    DifficultyRounds(DifficultyAugmenter(reference=0.2), _media(records))(run, rnd)
    assert run.requests[0][3] == [1, 2]
    run = FakeRun(lambda g, m: [1, 1])
    run.all_agree = lambda flags: [False] + [bool(f) for f in flags[1:]]
    out = TemporalContrast(_media(records))(run, rnd)
    assert run.requests[0][3] == [1, 2] and out.rewards.column("temporal")[:2].tolist() == [0, 0]


def test_temporal_contrast_reports_a_failed_shuffled_reward(records):
    prompts, meta = _groups(records)
    rnd = make_round(prompts, meta, [2], [0], [[1, 0]])

    class Failing(FakeRun):
        def collect_groups(self, *a, **kw):
            out = super().collect_groups(*a, **kw)
            return dataclasses.replace(out, error="reward server down")
    out = TemporalContrast(_media(records[:1]))(Failing(lambda g, m: [1, 1]), rnd)
    assert out.error == "reward server down"


def test_replace_groups_says_what_is_wrong(records):
    prompts, meta = _groups(records)
    rnd = make_round(prompts, meta, [2, 2], [0, 1], [[1, 0], [0, 1]])
    run = FakeRun(lambda g, m: [1, 1])
    with pytest.raises(ValueError, match=r"group ids \[7\] are not in the round"):
        run.replace_groups(rnd, make_round(prompts[:1], meta[:1], [2], [7], [[1, 1]]))
    other = make_round(prompts[:1], meta[:1], [2], [0], [[1, 1]])
    other = dataclasses.replace(other, rewards=RewardBatch(other.rewards.values[:, :1],
                                                           ["accuracy"], other.rewards.valid))
    with pytest.raises(ValueError, match="reward columns"):
        run.replace_groups(rnd, other)
