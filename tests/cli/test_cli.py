"""The mmrl command line: help at every level, config validate/show/docs, algos, train."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmrl.cli.app import main

ROOT = Path(__file__).resolve().parents[2]
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
    from mmrl.algo.presets import PRESETS
    assert main(["algos"]) == 0
    out = capsys.readouterr().out
    for name, spec in PRESETS.items():
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        for axis in (spec.advantage, spec.ratio_level, spec.objective, spec.aggregation):
            assert axis in line
    assert main(["algos", "gspo"]) == 0
    assert "eps_low" in capsys.readouterr().out


def test_config_validate_reports_all_problems(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative output_dir: never the runs/ a `make demo` left
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
    from mmrl.cli.app import build_parser
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
    """The rule of mmrl.cli.app.main: ValueError/TypeError/OSError/ImportError -> message, exit 2
    (with where it was raised unless it is a UserError); anything else -> traceback."""
    import dataclasses

    from mmrl.config.core import UserError
    from mmrl.config.jobs import JOBS, get_job
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
        assert (f"{type(exc).__name__} raised at cli/test_cli.py:" in err) == located, err
    assert "/x/prompts.txt" in err
    job_raising(KeyError("k"))
    with pytest.raises(KeyError):  # not a user error: the traceback is the report
        main(argv)
    monkeypatch.setenv("MMRL_TRACEBACK", "1")
    job_raising(ValueError("x"))
    with pytest.raises(ValueError):
        main(argv)


def test_console_script_reports_unusable_configs_without_traceback(tmp_path):
    (tmp_path / "random.yaml").write_bytes(bytes(range(255, -1, -1)))
    (tmp_path / "folder").mkdir()
    bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb + ["train: {lr: *a8}"]))
    paths = [tmp_path / "random.yaml", tmp_path / "folder", tmp_path / "bomb.yaml",
             ROOT / "configs/demo/toy.yaml"]
    proc = subprocess.run([str(MMRL), "config", "validate", *map(str, paths), "--set",
                           "job=[1,2]"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "not UTF-8 text (byte 0xff at offset 0)" in proc.stderr
    assert f"{tmp_path / 'folder'} is a directory" in proc.stderr
    assert "aliases expand to more than 10000 nodes" in proc.stderr
    assert "job: got [1, 2] (list); expected a job name" in proc.stderr
    assert len(proc.stderr) < 3000


def test_train_refuses_what_it_cannot_run_before_any_work(tmp_path, capsys):
    toy = str(ROOT / "configs/demo/toy.yaml")
    out = tmp_path / "run"
    for override, needle in [
            ("train.resume=sometimes", "train.resume: got 'sometimes', which is not auto, never "
                                       "or an existing folder"),
            ("train.device=tpu", "train.device: got 'tpu'; expected auto, cpu, cuda"),
            ("train.seed=18446744073709551616", "train.seed: got 18446744073709551616; expected "
                                                "a value <= 9223372036854775807"),
            ("toy.num_prompts=3", "toy.num_prompts: got 3, fewer than train.prompts_per_step=16"),
            ("train.group_size=1", "train.group_size: got 1 with advantage 'grpo'")]:
        assert main(["train", toy, override, f"train.output_dir={out}"]) == 2, override
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (override, err)
    assert not out.exists()  # nothing was started, nothing written


def _write_video(path, h, w):
    import numpy as np

    from mmrl.video.synthetic import write_mp4
    return write_mp4(path, np.full((8, h, w, 3), 128, np.uint8), fps=4.0)


def test_video_inspect_names_the_size_problem_and_checks_out_first(tmp_path, capsys):
    tiny, thin = _write_video(tmp_path / "2x2.mp4", 2, 2), _write_video(tmp_path / "t.mp4", 2, 600)
    odd, good = _write_video(tmp_path / "48.mp4", 32, 48), _write_video(tmp_path / "g.mp4", 48, 64)
    for video, needle in [
            (tiny, "frame size 2x2 is below the minimum side 28 px"),
            (thin, "aspect ratio 300.0 (600x2) is over 200"),
            (odd, "decord cannot decode frames of size 48x32")]:
        assert main(["video", "inspect", video]) == 2
        err = capsys.readouterr().err
        assert needle in err and "corrupt" not in err, err
    assert main(["video", "inspect", good, "--out", str(tmp_path / "no" / "sheet.png")]) == 2
    err = capsys.readouterr().err
    assert f"the folder {tmp_path / 'no'} does not exist" in err and "decoded" not in err
    assert main(["video", "inspect", good, "--out", str(tmp_path / "sheet.png")]) == 0
    assert (tmp_path / "sheet.png").stat().st_size > 0


def test_video_data_that_cannot_train_exits_2_naming_the_file(tmp_path, capsys):
    blank, bad = tmp_path / "blank.jsonl", tmp_path / "bad.jsonl"
    blank.write_text("\n\n")
    bad.write_text('{"problem": "q"}\nnot json\n')
    base = ["train", str(ROOT / "configs/demo/video_tiny.yaml"), "train.progress=false",
            f"train.output_dir={tmp_path / 'run'}"]
    for data, needle in [
            (blank, f"video.data: {blank}: no usable record; the file holds no record"),
            (bad, f"video.data: {bad}: no usable record; skipped 2 of 2 records"),
            (tmp_path / "missing.jsonl", f"video.data: data file '{tmp_path / 'missing.jsonl'}' "
                                         f"not found")]:
        assert main([*base, f"video.data={data}"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err


def test_the_static_plugin_table_says_what_each_plugin_module_adds():
    """``mmrl --help`` lists plugin commands from PLUGINS without importing them; the one-line
    help there is the one the module's own parser gives."""
    import argparse

    from mmrl.cli.app import PLUGINS, build_parser

    def helps(parser):
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return {a.dest: a.help for a in sub._choices_actions}

    full, light = helps(build_parser()), helps(build_parser(load=()))
    assert full == light
    assert {name: p.help for name, p in PLUGINS.items()} == \
        {name: full[name] for name in PLUGINS}
    assert list(full)[:3] == ["train", "config", "algos"]


def test_a_plugin_command_builds_only_its_own_plugin():
    from mmrl.cli.app import build_parser, requested_command
    assert requested_command(["--version"]) is None
    assert requested_command(["reward", "serve", "--help"]) == "reward"
    parser = build_parser(load=["reward"])
    args = parser.parse_args(["reward", "serve", "brightness", "--token", "x"])
    assert args.reward_command == "serve" and args.token == "x"
    with pytest.raises(SystemExit):  # the video plugin was not loaded: 'video' has no options
        build_parser(load=["reward"]).parse_args(["video", "inspect", "x.mp4"])


def test_the_entry_point_is_importable_where_it_always_was():
    """``from mmrl.cli import main`` (the console script's target) is the function, as in the
    flat layout before the core was split into layers."""
    import mmrl.cli
    from mmrl.cli import app
    assert mmrl.cli.main is app.main and callable(mmrl.cli.main)
    assert mmrl.cli.build_parser is app.build_parser
