"""The video job's SFT targets (mmrl.video.sft): Video-R1-COT records (``process``), guidance
records (``solution_steps``), the synthetic demo's filler targets, the thought-dropout fraction,
the stage the job builds, and the config checks of video.sft_steps / thought_dropout."""
import random

import pytest

from mmrl.config.core import UserError
from mmrl.video.config import VideoConfig
from mmrl.video.data import VLRecord
from mmrl.video.sft import build_sft_stage, record_answer, sft_target


def _rec(**kw):
    base = dict(problem="Which way?", problem_type="multiple choice",
                solution="<answer>B</answer>", options=["A. left", "B. right"], source="t:1")
    return VLRecord(**{**base, **kw})


def test_targets_from_video_r1_cot_and_guidance_records():
    rng = random.Random(0)
    cot = _rec(extra={"process": "<think>\nIt slides right.\n</think>"})
    assert record_answer(cot) == "B"
    assert sft_target(cot, "tags", rng, 0.0) == "<think>It slides right.</think><answer>B</answer>"
    assert sft_target(cot, "tags", rng, 1.0) == "<think>\n\n</think><answer>B</answer>"
    steps = _rec(solution="3.5", problem_type="numerical", solution_steps=["a", "b"])
    assert sft_target(steps, "tags", rng, 0.0) == "<think>a\nb</think><answer>3.5</answer>"
    assert sft_target(_rec(), "tags", rng, 0.0) is None  # no reasoning: not an SFT example


def test_filler_targets_and_the_dropout_fraction():
    rng = random.Random(1)
    outs = [sft_target(_rec(), "filler", rng, 0.5, max_new_tokens=12) for _ in range(4000)]
    kept = [t for t in outs if len(t) > 1]
    assert all(t.endswith("B") and set(t[:-1]) == {" "} and 6 <= len(t) - 1 <= 10 for t in kept)
    assert all(t == "B" for t in outs if len(t) == 1)
    assert abs(len(kept) / len(outs) - 0.5) < 0.03  # binomial sd 0.008
    assert {len(t) - 1 for t in kept} == set(range(6, 11))
    with pytest.raises(ValueError, match="one-character"):
        sft_target(_rec(solution="<answer>12</answer>"), "filler", rng, 0.0)


def test_the_stage_the_job_builds_and_its_errors():
    c = VideoConfig(think_style="filler", sft_steps=2, thought_dropout=0.5, max_new_tokens=12)
    stage = build_sft_stage(c, [_rec(), _rec(solution="<answer>C</answer>")], 2, 3, seed=0)
    batch = stage.batch(0)
    assert len(batch) == 6 and stage.steps == 2 and stage.lr is None
    assert {e.target[-1] for e in batch} <= {"B", "C"}
    assert [stage.data.thinks(e) for e in batch] == [len(e.target) > 1 for e in batch]
    assert build_sft_stage(VideoConfig(), [_rec()], 2, 3, 0) is None  # sft_steps 0
    with pytest.raises(UserError, match="reasoning"):
        build_sft_stage(VideoConfig(sft_steps=1), [_rec()], 2, 3, 0)  # tags, no reasoning


def test_config_checks():
    from mmrl.config.core import ConfigError
    from mmrl.config.schema import config_from_dict
    with pytest.raises(ConfigError, match="sft_steps: got 4, more than train.steps=3"):
        config_from_dict({"job": "video", "train": {"steps": 3}, "video": {"sft_steps": 4}})
    with pytest.raises(ConfigError, match="thought_dropout drops thoughts of SFT targets"):
        config_from_dict({"job": "video", "video": {"thought_dropout": 0.5}})
