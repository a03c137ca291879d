"""``mmrl reward score|eval|serve|convert|list`` via ``mmrl.cli.main`` and the console script."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from PIL import Image

import mmrl.rewards as R
from mmrl.cli import main

sys.path.insert(0, os.path.dirname(__file__))
from reward_testlib import make_images  # noqa: E402

MMRL = os.path.join(os.path.dirname(sys.executable), "mmrl")


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, im in enumerate(make_images(3, size=(40, 36), seed=5)):
        im.save(d / f"{i}.png")
    return d


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["reward", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("score", "eval", "serve", "convert", "examples:", "--scorer hps_v2.1"):
        assert word in out
    assert main(["reward", "list"]) == 0
    assert "pickscore" in capsys.readouterr().out


def test_score_writes_csv_equal_to_the_python_api(tmp_path, image_dir, tiny_clip_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na boat\n")
    out = tmp_path / "s.csv"
    rc = main(["reward", "score", "--scorer", f"pickscore:path={tiny_clip_dir},brightness",
               "--images", str(image_dir), "--prompts", str(prompts), "--out", str(out),
               "--batch-size", "2", "--device", "cpu"])
    assert rc == 0
    rows = list(csv.DictReader(open(out)))
    assert [os.path.basename(r["image"]) for r in rows] == ["0.png", "1.png", "2.png"]
    images = [Image.open(image_dir / f"{i}.png") for i in range(3)]
    want = R.load("pickscore", path=tiny_clip_dir)(images, ["a cat", "a dog", "a boat"])
    got = torch.tensor([float(r["pickscore"]) for r in rows])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert "3/3 images" in capsys.readouterr().err  # progress


def test_score_errors_are_clear(image_dir, tiny_clip_dir, capsys):
    assert main(["reward", "score", "--scorer", f"pickscore:path={tiny_clip_dir}", "--images",
                 str(image_dir)]) == 2
    assert "pass --prompts FILE" in capsys.readouterr().err
    assert main(["reward", "score", "--scorer", "pickscor", "--images", str(image_dir)]) == 2
    assert "did you mean 'pickscore'" in capsys.readouterr().err


def _write_pairs(tmp_path):
    recs = []
    for i in range(8):
        for k, v in (("a", 220 - i), ("b", 40 + i)):
            Image.new("RGB", (8, 8), (v, v, v)).save(tmp_path / f"{i}{k}.png")
        recs.append({"prompt": "p", "image_a": f"{i}a.png", "image_b": f"{i}b.png",
                     "label": "a" if i < 6 else "b"})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return data


def test_eval_two_scorers_writes_report_and_chart(tmp_path, capsys):
    data = _write_pairs(tmp_path)
    out = tmp_path / "report"
    rc = main(["reward", "eval", "--scorer", "brightness,brightness:target=0", "--data",
               str(data), "--format", "pairs", "--out", str(out), "--bootstrap", "100",
               "--quiet"])
    assert rc == 0
    rep = json.load(open(out / "report.json"))
    assert rep["scorers"]["brightness"]["accuracy"] == pytest.approx(6 / 8)
    assert rep["scorers"]["brightness#2"]["accuracy"] == pytest.approx(2 / 8)  # darker wins
    assert (out / "accuracy.png").stat().st_size > 1000
    assert "75.00%" in capsys.readouterr().out


def test_convert_hpdv2_then_eval_ranked(tmp_path, capsys):
    src = tmp_path / "HPDv2"
    (src / "test").mkdir(parents=True)
    items = []
    for p in range(2):
        names = []
        for k in range(4):
            v = 50 * k + p
            Image.new("RGB", (8, 8), (v, v, v)).save(src / "test" / f"{p}_{k}.png")
            names.append(f"{p}_{k}.png")
        items.append({"prompt": f"prompt {p}", "image_path": names,
                      "rank": [4, 3, 2, 1] if p == 0 else [1, 2, 3, 4]})
    (src / "test.json").write_text(json.dumps(items))
    out = tmp_path / "hpdv2.jsonl"
    assert main(["reward", "convert", "hpdv2", str(src / "test.json"), "--out", str(out)]) == 0
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["images"][0] == os.path.join("HPDv2", "test", "0_0.png")
    assert main(["reward", "eval", "--scorer", "brightness", "--data", str(out), "--format",
                 "ranked", "--quiet", "--bootstrap", "0"]) == 0
    # prompt 0: brighter is better (6/6 pairs right); prompt 1: the reverse (0/6)
    assert "accuracy 50.00%" in capsys.readouterr().out


def test_import_and_list_stay_light():
    """The registry is lazy: importing mmrl.rewards loads no model library."""
    code = ("import sys, mmrl.rewards, mmrl.rewards.cli as c; c.cmd_list(None); "
            "print(sorted(m for m in ('transformers', 'open_clip', 'diffusers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr
    assert "hps_v2.1" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _read_line(proc, timeout):
    line = []
    t = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return line[0] if line else ""


def test_serve_through_console_script(tmp_path):
    env = dict(os.environ, MMRL_REWARD_TOKEN="tok")
    proc = subprocess.Popen([MMRL, "reward", "serve", "brightness:target=0.5", "--port", "0",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = _read_line(proc, 120)
        assert "serving brightness:target=0.5 on http://127.0.0.1:" in line, \
            (line, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" on ")[1].split(" ")[0]
        remote = R.load("remote", url=url, token="tok", retries=1, backoff=0.1)
        x = torch.rand(3, 3, 8, 8)
        torch.testing.assert_close(remote(x, None), R.load("brightness", target=0.5)(x, None))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
