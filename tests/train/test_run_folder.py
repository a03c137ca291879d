"""The output folder belongs to one run (run.json's run_id): resume=never refuses a folder of
another run unless train.overwrite=true, which removes that run's outputs (and nothing else)
first, so checkpoints, final.pt and metrics of two runs are never mixed."""
import json

import pytest
import torch

from mmrl.train import checkpoint as ckpt
from mmrl.demo import toy
from mmrl.train.run_folder import read_run_id
from mmrl.config.schema import config_from_dict


def _cfg(out, **train):
    return config_from_dict({"job": "toy", "train": {
        "prompts_per_step": 2, "group_size": 2, "progress": False, "output_dir": str(out),
        "log_every": 100, "export": False, "save_every": 1, "keep_last": 2, **train},
        "toy": {"d_model": 16, "layers": 1, "heads": 2, "digits": 5, "length": 3}})


def _final(out):
    return torch.load(out / "final.pt", weights_only=True)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rewards(out):
    return [json.loads(line)["reward_mean"]
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 5-step run (seed 1) in 'old', and a fresh 2-step run (seed 0) for reference."""
    base = tmp_path_factory.mktemp("runs")
    toy.run(_cfg(base / "old", steps=5, seed=1))
    toy.run(_cfg(base / "fresh", steps=2))
    return base


def test_resume_never_refuses_a_folder_of_another_run(runs, tmp_path):
    old = runs / "old"
    run_id = read_run_id(old)
    assert run_id and len(run_id) == 16
    before = {p.name: p.stat().st_mtime_ns for p in (old / "checkpoints").iterdir()}
    final = _final(old)
    with pytest.raises(ValueError, match=f"holds run {run_id} .*checkpoints step-00000004.."
                                         f"step-00000005.*train.overwrite=true"):
        toy.run(_cfg(old, steps=2, resume="never"))
    assert {p.name: p.stat().st_mtime_ns for p in (old / "checkpoints").iterdir()} == before
    assert _same(_final(old), final) and read_run_id(old) == run_id
    assert _steps(old) == [0, 1, 2, 3, 4]


def test_overwrite_deletes_the_old_run_and_never_mixes_it(runs, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(runs / "old", out)
    (out / "synthetic").mkdir()  # a job's input kept in output_dir (the video demo's clips)
    (out / "synthetic" / "clip.txt").write_text("input")
    old_id = read_run_id(out)
    toy.run(_cfg(out, steps=2, resume="never", overwrite=True))
    new_id = read_run_id(out)
    assert new_id != old_id
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000001", "step-00000002"]  # keep_last=2 kept the new run's own
    assert [ckpt.manifest(out / "checkpoints" / n)["run_id"] for n in names] == [new_id] * 2
    assert _same(_final(out), _final(runs / "fresh"))  # exactly a fresh run's weights
    assert _steps(out) == [0, 1]
    assert (out / "synthetic" / "clip.txt").read_text() == "input"
    # a later resume=auto continues the new run (complete), not the old 5-step one
    summary = toy.run(_cfg(out, steps=2))
    assert summary["steps"] == 2 and _same(_final(out), _final(runs / "fresh"))
    rewards = _rewards(out)  # nothing left to do: the summary is the recorded run's, not nan
    assert (summary["reward_first"], summary["reward_last"]) == (rewards[0], rewards[-1])
    assert read_run_id(out) == new_id


def test_auto_adopts_the_folder_and_refuses_overwrite(runs, tmp_path):
    out = tmp_path / "out"
    toy.run(_cfg(out, steps=1))
    run_id = read_run_id(out)
    toy.run(_cfg(out, steps=2))  # resume=auto: the same run, one more step
    assert read_run_id(out) == run_id and _steps(out) == [0, 1]
    assert _same(_final(out), _final(runs / "fresh"))  # == an uninterrupted 2-step run
    with pytest.raises(ValueError, match="overwrite=true with resume=auto would delete"):
        toy.run(_cfg(out, steps=2, overwrite=True))


def test_resume_from_an_older_checkpoint_of_the_same_run(runs, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(runs / "old", out)
    older = out / "checkpoints" / "step-00000004"
    with pytest.raises(ValueError, match="older than checkpoint.s. step-00000005"):
        toy.run(_cfg(out, steps=5, seed=1, resume=str(older)))
    toy.run(_cfg(out, steps=5, seed=1, resume=str(older), overwrite=True))
    assert _same(_final(out), _final(runs / "old"))  # step 4 -> 5 redone, bit for bit
    assert read_run_id(out) == read_run_id(runs / "old")


def test_checkpoint_of_another_run_into_a_folder_of_a_third(runs, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(runs / "fresh", out)
    src = runs / "old" / "checkpoints" / "step-00000004"
    with pytest.raises(ValueError, match="not the run of train.resume"):
        toy.run(_cfg(out, steps=5, seed=1, resume=str(src)))
    toy.run(_cfg(tmp_path / "empty", steps=5, seed=1, resume=str(src)))  # a new folder: fine
    assert read_run_id(tmp_path / "empty") == read_run_id(runs / "old")
    assert _same(_final(tmp_path / "empty"), _final(runs / "old"))


def test_validation_refuses_the_folder_of_another_run_before_any_work(runs, tmp_path):
    """`mmrl config validate` / the start of `mmrl train` (preflight) find what the runner would
    refuse, before a model is built; the same message as the runner's."""
    from mmrl.train.run_folder import output_dir_problems
    old = runs / "old"
    got = output_dir_problems(old, "never", False)
    assert len(got) == 1 and got[0].startswith(f"train.output_dir={old} holds run "
                                               f"{read_run_id(old)} (")
    assert output_dir_problems(old, "never", True) == []  # overwrite: allowed
    assert output_dir_problems(old, "auto", False) == []  # auto continues it
    assert output_dir_problems(tmp_path / "new", "never", False) == []  # nothing there yet
    (tmp_path / "f").write_text("x")
    assert output_dir_problems(tmp_path / "f", "auto", False)[0].startswith(
        f"train.output_dir: {tmp_path / 'f'} exists and is a file")
