"""The video job with a ``pref`` section: VerIPO's cycle (GRPO steps, then preference steps
whose pairs a verifier of video rewards ranks) through the console entry point, with the
reference built for the DPO loss under full fine-tuning; the verifier's names are checked with
the config."""
from __future__ import annotations

import json
import math
import os

from mmrl.cli.app import main

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
FAST = ["train.prompts_per_step=4", "train.group_size=8", "train.log_every=1",
        "train.progress=false", "train.device=cpu", "train.export=false", "video.synthetic_num=4",
        "algo.beta=0"]


def test_veripo_cycle_trains_dpo_steps_on_verifier_ranked_pairs(tiny_vl_dir, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", os.path.join(ROOT, "configs/demo/video_tiny.yaml"), *FAST,
               "train.steps=3", f"video.model={tiny_vl_dir}", f"train.output_dir={out}",
               "pref.mode=veripo", "pref.grpo_steps=1", "pref.dpo_steps=2",
               "pref.verifier=accuracy:answer_source=tag_or_text", "pref.beta=0.5"])
    assert rc == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 3
    assert "pairs" not in rows[0]  # step 0: a GRPO step
    for m in rows[1:]:  # steps 1-2: preference steps on the verifier's best/worst pairs
        assert m["pref_step"] == 1 and "verifier_mean" in m
        assert m["pairs"] + m["pair_groups_tied"] == 4  # one pair per group unless tied
    trained = [m for m in rows[1:] if m["pairs"] > 0]
    # full fine-tuning: the frozen reference copy was built for DPO (beta 0 needs none), so the
    # first preference step starts at the reference (margin 0 up to the GRPO step's update)
    assert trained and all(math.isfinite(m["loss"]) and math.isfinite(m["pref_reward_margin"])
                           for m in trained)


def test_an_unknown_verifier_reward_is_a_config_error(tiny_vl_dir, tmp_path, capsys):
    rc = main(["train", os.path.join(ROOT, "configs/demo/video_tiny.yaml"), *FAST,
               "train.steps=1", f"video.model={tiny_vl_dir}",
               f"train.output_dir={tmp_path / 'run'}", "pref.mode=veripo", "pref.grpo_steps=1",
               "pref.dpo_steps=1", "pref.verifier=acuracy"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "pref.verifier" in err and "accuracy" in err and "Traceback" not in err


def test_the_jobs_pair_reader_checks_records_and_resolves_media_against_the_file(tmp_path):
    """The job reads pair files with mmrl.video.pairs.load_pairs: media relative to the
    file's folder; every malformed line at once, as the user's error (no traceback)."""
    import pytest

    from mmrl.config.core import UserError
    from mmrl.video.job import read_pair_file
    from mmrl.video.synthetic_task import write_synthetic_task
    src = write_synthetic_task(str(tmp_path / "syn"), 2, seed=0)
    recs = [json.loads(line) for line in open(src)]
    path = tmp_path / "syn" / "pairs.jsonl"  # beside videos/, paths stay relative
    path.write_text("\n".join(json.dumps({**r, "chosen": "A", "rejected": "B"}) for r in recs))
    pairs = read_pair_file(str(path))
    assert [p.record.path for p in pairs] == [str(tmp_path / "syn" / r["path"]) for r in recs]
    path.write_text(json.dumps({**recs[0], "chosen": "A"}) + "\nnot json\n")
    with pytest.raises(UserError, match=r"pairs.jsonl:1.*\n.*pairs.jsonl:2"):
        read_pair_file(str(path))
