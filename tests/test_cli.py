"""The mmrl command line: help at every level, config validate/show/docs, algos, train."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
MMRL = Path(sys.executable).parent / "mmrl"


def test_help_at_every_level(capsys):
    for argv in (["--help"], ["train", "--help"], ["config", "--help"],
                 ["config", "validate", "--help"], ["algos", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: mmrl" in out
    assert main([]) == 0 and "train" in capsys.readouterr().out


def test_algos_lists_every_preset_with_its_axes(capsys):
    from mmrl.presets import PRESETS
    assert main(["algos"]) == 0
    out = capsys.readouterr().out
    for name, spec in PRESETS.items():
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        for axis in (spec.advantage, spec.ratio_level, spec.objective, spec.aggregation):
            assert axis in line
    assert main(["algos", "gspo"]) == 0
    assert "eps_low" in capsys.readouterr().out


def test_config_validate_reports_all_problems(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: toy\nalgo: {preset: dapoo}\ntrain: {lr: fast, stepz: 3}\n")
    good = ROOT / "configs/demo/toy.yaml"
    assert main(["config", "validate", str(good), str(bad)]) == 2
    cap = capsys.readouterr()
    assert f"ok: {good}" in cap.out
    assert "3 problem(s)" in cap.err
    assert "did you mean 'dapo'" in cap.err and "did you mean 'steps'" in cap.err


def test_config_show_prints_docs_and_resolved_preset(capsys):
    assert main(["config", "show", str(ROOT / "configs/demo/toy.yaml"), "algo.preset=dapo"]) == 0
    out = capsys.readouterr().out
    assert "preset: dapo" in out and "# Named algorithm" in out
    assert "#   eps_high: 0.28" in out and "#   aggregation: token_mean" in out


def test_train_through_the_console_script(tmp_path):
    out_dir = tmp_path / "run"
    proc = subprocess.run(
        [str(MMRL), "train", str(ROOT / "configs/demo/toy.yaml"), "train.steps=4",
         "train.progress=false", f"train.output_dir={out_dir}", "toy.d_model=16", "toy.layers=1",
         "toy.heads=2", "train.prompts_per_step=4"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "done: 4 steps" in proc.stdout
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert {"reward_mean", "loss", "grad_norm", "zero_std_frac", "ratio_mean", "clipfrac_low",
            "clipfrac_high", "approx_kl", "adv_abs_mean", "tokens_per_sec", "peak_mem_mb",
            "step_time", "dropped_samples"} <= set(rows[0])
    assert rows[0]["tokens_per_sec"] > 0 and rows[0]["peak_mem_mb"] > 10
    assert (out_dir / "config.yaml").exists() and (out_dir / "final.pt").exists()


def test_train_with_bad_override_fails_cleanly(capsys):
    assert main(["train", str(ROOT / "configs/demo/toy.yaml"), "train.lr=fast"]) == 2
    assert "train.lr: got 'fast'" in capsys.readouterr().err


def test_wandb_without_the_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # unimportable, whatever is installed
    assert main(["train", str(ROOT / "configs/demo/toy.yaml"), "train.steps=1",
                 "train.progress=false", f"train.output_dir={tmp_path}",
                 "train.wandb_project=demo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmrl train: error: ") and "pip install wandb" in err


def _all_parsers(parser, path="mmrl"):
    import argparse
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{path} {name}")


def test_no_parser_in_the_tree_accepts_abbreviated_options(capsys):
    from mmrl.cli import build_parser
    tree = dict(_all_parsers(build_parser()))
    # every plugin's commands are in the walk (rewards, video, diffusion, sim, core)
    assert {"mmrl train", "mmrl config validate", "mmrl reward serve", "mmrl video inspect",
            "mmrl diffusion tiny-pipeline", "mmrl sim"} <= set(tree)
    assert [path for path, p in tree.items() if p.allow_abbrev] == []
    with pytest.raises(SystemExit) as e:  # --se is not --set (nor --schema-only)
        main(["config", "validate", str(ROOT / "configs/demo/toy.yaml"), "--se", "x=1"])
    assert e.value.code == 2 and "unrecognized arguments: --se" in capsys.readouterr().err


def test_user_errors_are_one_paragraph_and_bugs_keep_their_traceback(monkeypatch, capsys,
                                                                      tmp_path):
    """The rule of mmrl.cli.main: ValueError/TypeError/OSError/ImportError -> message, exit 2
    (with where it was raised unless it is a UserError); anything else -> traceback."""
    import dataclasses

    from mmrl.config import UserError
    from mmrl.jobs import JOBS, get_job
    argv = ["train", str(ROOT / "configs/demo/toy.yaml"), f"train.output_dir={tmp_path}"]
    job = get_job("toy")

    def job_raising(exc):
        def run(config):
            raise exc
        monkeypatch.setitem(JOBS._entries, "toy", dataclasses.replace(job, run=run))

    for exc, located in [(UserError("toy.x: bad; fix it"), False),
                         (ValueError("lr went bad"), True),
                         (FileNotFoundError(2, "No such file or directory", "/x/prompts.txt"),
                          True)]:
        job_raising(exc)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("mmrl train: error: ") and "Traceback" not in err
        assert (f"{type(exc).__name__} raised at tests/test_cli.py:" in err) == located, err
    assert "/x/prompts.txt" in err
    job_raising(KeyError("k"))
    with pytest.raises(KeyError):  # not a user error: the traceback is the report
        main(argv)
    monkeypatch.setenv("MMRL_TRACEBACK", "1")
    job_raising(ValueError("x"))
    with pytest.raises(ValueError):
        main(argv)
