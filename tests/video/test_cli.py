"""mmrl video inspect: table, JSON, contact sheet, errors; once through the console script."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from mmrl.cli.app import main


def test_inspect_table_and_sheet(make_video, synth, tmp_path, capsys):
    path = make_video(synth.scene_cuts([4, 4], 112, 168), fps=2.0)
    sheet = tmp_path / "sheet.png"
    assert main(["video", "inspect", path, "--out", str(sheet), "--columns", "4"]) == 0
    out = capsys.readouterr()
    rows = [line.split() for line in out.out.splitlines()[1:9]]
    assert [r[2] for r in rows] == ["slow"] + ["fast"] * 3 + ["slow"] + ["fast"] * 3
    assert [r[1] for r in rows] == [f"{t / 2:.2f}s" for t in range(8)]
    assert float(rows[4][3]) < 0.5 and float(rows[1][3]) > 0.95
    # 112x168 is raised to the 48-token minimum: 168x252 = 6 x 9 = 54 tokens, slow and fast alike
    assert {r[4] for r in rows} == {"54"}
    assert "2 slow at 252x168, 6 fast at 252x168" in out.out and "decoded 8 frames" in out.err
    img = np.asarray(Image.open(sheet).convert("RGB"))
    assert img.shape == (2 * (round(160 * 112 / 168) + 22), 4 * 168, 3)
    red = (img == (220, 40, 40)).all(-1).sum()
    blue = (img == (40, 110, 230)).all(-1).sum()
    assert red > 0 and blue > 2.5 * red   # 2 slow frames framed red, 6 fast framed blue


def test_inspect_json(make_video, synth, capsys):
    path = make_video(synth.scene_cuts([3, 5], 112, 168), fps=2.0)
    assert main(["video", "inspect", path, "--json", "--max-tokens", "24", "--min-tokens", "8"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [f["type"] for f in r["frames"]] == ["slow", "fast", "fast", "slow"] + ["fast"] * 4
    assert r["slow_hw"] == [112, 168] and r["total_tokens"] == sum(f["tokens"] for f in r["frames"])
    assert r["total_tokens"] == 2 * 24 + 6 * 6 <= r["token_budget"]


def test_inspect_bad_file_exit_2(tmp_path, capsys):
    missing = str(tmp_path / "nope.mp4")
    assert main(["video", "inspect", missing]) == 2
    err = capsys.readouterr().err
    assert missing in err and "file not found" in err


def test_console_script(make_video, synth):
    exe = os.path.join(os.path.dirname(sys.executable), "mmrl")
    path = make_video(synth.scene_cuts([4], 56, 84), fps=2.0)
    res = subprocess.run([exe, "video", "inspect", path], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "1 slow" in res.stdout and "3 fast" in res.stdout


def test_inspect_help_has_examples(capsys):
    import pytest
    with pytest.raises(SystemExit) as info:
        main(["video", "inspect", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--token-budget" in text and "contact sheet" in text
