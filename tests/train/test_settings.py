"""The loop's and the rounds' settings are TrainConfig fields, read by name."""
from dataclasses import MISSING, fields

import pytest

from mmrl.config.schema import TrainConfig
from mmrl.train.loop import LoopSettings
from mmrl.train.rounds import RoundSettings


def _default(f):
    return f.default_factory() if f.default is MISSING else f.default


@pytest.mark.parametrize("cls", [LoopSettings, RoundSettings])
def test_every_field_is_a_train_config_field_with_the_same_default(cls):
    train = {f.name: f for f in fields(TrainConfig)}
    for f in fields(cls):
        assert f.name in train, f"{cls.__name__}.{f.name} is not a TrainConfig field"
        assert _default(f) == _default(train[f.name]), f.name
        assert type(_default(f)) is type(_default(train[f.name])), f.name


def test_from_train_reads_each_field_by_name():
    t = TrainConfig(group_size=3, inner_epochs=2, num_mini_batches=4, micro_batch_size=5,
                    t_chunk=6, max_grad_norm=0.5, prompts_per_step=7, seed=9,
                    reward_timeout=2.5, dynamic_sampling_tries=3)
    assert LoopSettings.from_train(t) == LoopSettings(
        group_size=3, inner_epochs=2, num_mini_batches=4, micro_batch_size=5, t_chunk=6,
        max_grad_norm=0.5)
    r = RoundSettings.from_train(t)
    assert (r.prompts_per_step, r.group_size, r.seed, r.reward_timeout, r.reward_retries,
            r.dynamic_sampling_tries, r.rollout_allocation) == (7, 3, 9, 2.5, 2, 3, "fixed")
