"""Thinking control of the video job (mmrl.video.thinking): thought reading, TON's thought
dropout, the ThinkingRounds augmenter's columns and metrics, and the config keys."""
import random

import pytest
import torch

from mmrl.config.core import ConfigError
from mmrl.config.schema import config_from_dict
from mmrl.train.distributed import Dist
from mmrl.train.reward_fn import RewardBatch
from mmrl.train.rollout import Rollout
from mmrl.train.rounds import Round
from mmrl.video.thinking import (ThinkingRounds, thinking_columns, thinks, thought_dropout,
                                 thought_text)


def test_thought_reading_by_style():
    assert thought_text("<think>look left</think><answer>B</answer>") == "look left"
    assert not thinks("<think>\n\n</think><answer>B</answer>")  # TON's skipped thought
    assert thinks("<think>x</think><answer>B</answer>") and not thinks("<answer>B</answer>")
    assert thought_text("   B ", "filler") == "   " and thinks("   B", "filler")
    assert not thinks("B", "filler") and thought_text("", "filler") is None
    with pytest.raises(ValueError, match="think style"):
        thought_text("x", "xml")


def test_ton_thought_dropout():
    target = "<think>it moves left</think><answer>A</answer>"
    rng = random.Random(0)
    out = [thought_dropout(target, 0.5, rng) for _ in range(400)]
    dropped = [o for o in out if o != target]
    assert set(dropped) == {"<think>\n\n</think><answer>A</answer>"}
    assert 160 < len(dropped) < 240  # p = 0.5 of 400
    assert thought_dropout("....C", 1.0, rng, "filler") == "C"
    assert thought_dropout(target, 0.0, rng) == target
    with pytest.raises(ValueError, match="no thought"):
        thought_dropout("<answer>A</answer>", 0.5, rng)


class _Rounds:
    """What an augmenter reads of mmrl.train.rounds.Rounds, for one process."""

    def __init__(self):
        self.dist, self.metrics = Dist(), {}

    def gathered(self, rollout, values):
        return values, rollout.sample_group_ids

    def add_round_metrics(self, values, means=None):
        self.metrics.update({k: t / n for k, (t, n) in (means or {}).items()})


def _round(samples, acc, gids, lengths):
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    ro = Rollout(samples, ["q"] * len(samples), [{}] * len(samples), torch.tensor(gids), mask)
    values = torch.tensor([[a, 0.5] for a in acc])
    values[-1, 0] = float("nan")  # an invalid row keeps its NaN and gets no reward
    rewards = RewardBatch(values, ["accuracy", "format"], torch.isfinite(values).all(1))
    return Round(["q", "q"], [{}, {}], [3, 3], [0, 1], ro, rewards)


def test_thinking_rounds_columns_and_metrics():
    samples = ["  A", "A", "    B", " C", "D", "  C"]
    rnd = _round(samples, [1.0, 1.0, 0.0, 1.0, 0.0, 0.0], [0, 0, 0, 1, 1, 1], [3, 1, 5, 2, 1, 3])
    rounds = _Rounds()
    out = ThinkingRounds("grpo_lambda", mode=True, style="filler", min_accuracy=0.5)(rounds, rnd)
    assert out.rewards.names == ["accuracy", "format", "length", "mode"]
    length, mode = out.rewards.column("length"), out.rewards.column("mode")
    # group 0 (accuracy 2/3 >= 0.5): Kimi λ over lengths 3, 1, 5 -> 0, 0.5, min(0, −0.5)
    assert length[:3].tolist() == [0.0, 0.5, -0.5]
    # group 1 (valid rows 3, 4: accuracy 1/2) is on: λ over lengths 2, 1 -> −0.5, 0.5 -> 0 (wrong)
    assert length[3:5].tolist() == [-0.5, 0.0] and length[5] == 0.0
    # group 0: think rows 1/2 vs no-think 1/1 -> no-think; group 1: think 1/1 > 0/1 -> think
    assert mode[:5].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert torch.equal(out.rewards.valid, rnd.rewards.valid)
    assert rounds.metrics == {"think_frac": 0.6, "thought_chars": 1.4, "length_groups_on": 1.0}


def test_serial_decay_replaces_the_accuracy_of_correct_rows():
    rnd = _round(["  A", "A", " A", "B", "B", "B"], [1.0, 1.0, 1.0, 0.0, 1.0, 0.0],
                 [0, 0, 0, 1, 1, 1], [3, 1, 2, 1, 1, 1])
    out = ThinkingRounds("serial_decay", style="filler", decay=0.5)(_Rounds(), rnd)
    assert out.rewards.names == ["accuracy", "format"]
    assert out.rewards.values[:5, 0].tolist() == [0.25, 1.0, 0.5, 0.0, 1.0]
    assert torch.isnan(out.rewards.values[5, 0])


def test_config_keys_and_their_checks():
    assert thinking_columns("kimi", True) == {"length": 1.0, "mode": 1.0}
    assert thinking_columns("serial_decay", False) == {}
    base = {"job": "video", "video": {"model": "tiny", "rewards": {"accuracy": 1.0},
                                      "length_reward": "grpo_lambda"}}
    with pytest.raises(ConfigError, match="length_switch_accuracy"):
        config_from_dict(base)
    base["video"]["length_switch_accuracy"] = 0.5
    assert config_from_dict(base).task.length_reward == "grpo_lambda"
    with pytest.raises(ValueError, match="needs decay"):
        ThinkingRounds("serial_decay")
    base["algo"] = {"preset": "drpo"}  # reads binary rewards: the length reward moves them
    with pytest.raises(ConfigError, match="algo.objective='drpo' reads binary rewards"):
        config_from_dict(base)
    base["video"]["length_reward"] = "none"
    assert config_from_dict(base).algo.preset == "drpo"
