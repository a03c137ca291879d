"""``algo.reward_weighting`` (declared once, any job): the toy job with two reward columns
(``toy.reward: digits,exact``) and the hypervolume multiplier worked from the logged objective
means; the video job's deprecated ``video.reward_weighting`` cannot be set twice."""
import math

import pytest

from mmrl.config.core import UserError
from mmrl.config.schema import config_from_dict
from mmrl.train.reward_weighting import DynamicRewardWeights, with_reward_weighting


def test_toy_job_trains_with_the_hypervolume_multiplier(tmp_path):
    from mmrl.demo.toy import run
    cfg = config_from_dict({
        "job": "toy", "algo": {"preset": "grpo", "advantage": "rloo",
                               "reward_weighting": "hypervolume"},
        "train": {"steps": 4, "prompts_per_step": 4, "group_size": 3, "seed": 2,
                  "progress": False, "output_dir": str(tmp_path), "log_every": 100},
        "toy": {"reward": "digits,exact", "digits": 3, "length": 1, "num_prompts": 8,
                "d_model": 8, "layers": 1, "heads": 1}})
    hist = run(cfg)["history"]
    p = [(h["reward/digits"], h["reward/exact"]) for h in hist]
    m = [h["reward_multiplier"] for h in hist]
    # p0 is the reference point (m 1 for steps 0 and 1: the multiplier is the previous step's);
    # a vector joins the buffer when it adds volume; m_(t+1) = 0.5 + 1.5 tanh(gain of p_t)
    assert m[:2] == [1.0, 1.0]
    buffer = [p[0]]
    for t in (1, 2):
        gain = HV(buffer + [p[t]], p[0]) - HV(buffer, p[0])
        assert m[t + 1] == pytest.approx(0.5 + 1.5 * math.tanh(max(gain, 0.0)))
        buffer += [p[t]] if gain > 0 else []
    assert 0.5 < m[3] < 1.0  # this seed's step 2 adds volume: (0.29, 0.25) over (0.125, 0.083)
    for h in hist:  # the trained reward is m * (w . r), w = (1/2, 1/2)
        assert h["reward_weight/digits"] == 0.5
        expect = h["reward_multiplier"] * (h["reward/digits"] + h["reward/exact"]) / 2
        assert h["reward/weighted"] == pytest.approx(expect, abs=1e-6)


def HV(points, ref):
    """2-D hypervolume by hand: the union of the boxes [ref, p], by sweeping x."""
    pts = sorted((max(x - ref[0], 0.0), max(y - ref[1], 0.0)) for x, y in points)
    area, top = 0.0, 0.0
    for x, y in reversed(pts):  # from the largest x: each adds its strip above the others
        area += x * max(y - top, 0.0)
        top = max(top, y)
    return area


def test_shared_option_appends_last_and_refuses_a_second_weighting():
    algo = config_from_dict({"job": "toy", "algo": {"reward_weighting": "gradient",
                                                    "reward_weighting_lr": 1e-3}}).algo
    first = object()
    got = with_reward_weighting(algo, [first])
    assert got[0] is first and isinstance(got[1], DynamicRewardWeights)
    assert (got[1].mode, got[1].lr) == ("gradient", 1e-3)
    none = config_from_dict({"job": "toy"}).algo
    assert with_reward_weighting(none, [first]) == [first]
    with pytest.raises(UserError, match="video.reward_weighting"):
        with_reward_weighting(algo, [DynamicRewardWeights("hypervolume")])
