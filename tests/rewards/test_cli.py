"""``mmrl reward score|eval|serve|convert|list`` via ``mmrl.cli.app.main`` and the console script."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
import torch
from PIL import Image

import mmrl.rewards as R
from mmrl.cli.app import main

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
    bright = torch.tensor([float(r["brightness"]) for r in rows])
    torch.testing.assert_close(bright, R.load("brightness")(images, None), atol=1e-6, rtol=1e-6)
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
    assert "hps_v2.1" in out.stdout and "\n  vlm_pair " in out.stdout.split("pairwise judges")[1]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _read_line(proc, timeout):
    line = []
    t = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return line[0] if line else ""


def _serve_args(*extra):
    from mmrl.cli.app import build_parser
    return build_parser().parse_args(["reward", "serve", "brightness", "--port", "0", "--quiet",
                                      *extra])


def _health(url, token=None):
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url + "/health",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture
def no_token_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MMRL_REWARD_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _serving(args):
    from mmrl.rewards.cli import build_server
    server, banner, path = build_server(args)
    return server.start(), banner, path


def test_serve_token_option_is_required_and_never_abbreviated(no_token_env, capsys):
    args = _serve_args("--token", "X")
    assert (args.token, args.token_env) == ("X", None)
    server, banner, path = _serving(args)
    try:
        assert "(token from --token;" in banner and path is None
        assert "--token is visible to every user" in capsys.readouterr().err
        assert [_health(server.url), _health(server.url, "Y"), _health(server.url, "X")] == \
            [401, 401, 200]
    finally:
        server.stop()
    for argv, message in (
            (["serve", "brightness", "--tok", "X"], "unrecognized arguments: --tok X"),
            (["serve", "brightness", "--token-e", "V"], "unrecognized arguments: --token-e V"),
            (["score", "--scor", "b", "--images", "."], "required: --scorer"),
            (["convert", "hpdv2", "a.json", "--ou", "b"], "required: --out")):
        with pytest.raises(SystemExit) as e:
            main(["reward", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reward", "serve", "brightness", "--token", "X", "--no-token"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_serve_generates_a_token_file_by_default(no_token_env, tmp_path):
    server, banner, path = _serving(_serve_args())
    try:
        assert path == os.path.join(str(tmp_path / "cache"), "mmrl",
                                    f"reward-{socket.gethostname()}-{server.port}.token")
        assert f"(new token in {path} (mode 0600;" in banner
        assert os.stat(path).st_mode & 0o777 == 0o600
        token = open(path).read().strip()
        assert len(token) >= 40 and server.token == token
        assert _health(server.url) == 401
        remote = R.load("remote", url=server.url)  # finds the file for this port
        assert remote.token == token
        x = torch.rand(2, 3, 4, 4)
        torch.testing.assert_close(remote(x, None), R.load("brightness")(x, None))
    finally:
        server.stop()
    # --token-file: created (0600) when missing, read when present
    tf = tmp_path / "rm.token"
    server, banner, _ = _serving(_serve_args("--token-file", str(tf)))
    server.stop()
    assert f"new token written to {tf}" in banner and os.stat(tf).st_mode & 0o777 == 0o600
    tf.write_text("from-file\n")
    server, banner, path = _serving(_serve_args("--token-file", str(tf)))
    try:
        assert server.token == "from-file" and path is None
        assert R.load("remote", url=server.url, token_file=str(tf)).token == "from-file"
    finally:
        server.stop()
    server, banner, path = _serving(_serve_args("--no-token"))
    try:
        assert server.token is None and "no token" in banner and _health(server.url) == 200
    finally:
        server.stop()
    from mmrl.rewards.cli import build_server
    with pytest.raises(ValueError, match="--token-env NOPE_UNSET: the variable is unset"):
        build_server(_serve_args("--token-env", "NOPE_UNSET"))
    with pytest.raises(ValueError, match="non-loopback host '0.0.0.0' without a token"):
        build_server(_serve_args("--no-token", "--host", "0.0.0.0"))
    with pytest.raises(ValueError, match="--token ''; expected a non-empty secret"):
        build_server(_serve_args("--token", ""))


def test_serve_through_console_script(tmp_path):
    """The real command: a generated token file the client finds, deleted on Ctrl-C."""
    env = {k: v for k, v in os.environ.items() if k != "MMRL_REWARD_TOKEN"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    proc = subprocess.Popen([MMRL, "reward", "serve", "brightness:target=0.5", "--port", "0",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = _read_line(proc, 120)
        assert "serving brightness:target=0.5 on http://127.0.0.1:" in line, \
            (line, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" on ")[1].split(" ")[0]
        path = line.split("new token in ")[1].split(" ")[0]
        assert os.path.isfile(path) and _health(url) == 401
        remote = R.load("remote", url=url, token_file=path, retries=1, backoff=0.1)
        x = torch.rand(3, 3, 8, 8)
        torch.testing.assert_close(remote(x, None), R.load("brightness", target=0.5)(x, None))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)  # generous: a loaded 2-core CI machine
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # on a failure, what the server said (a traceback, a stuck shutdown) is in the message
    assert proc.returncode == 0, (proc.returncode, proc.stdout.read()[-2000:],
                                  proc.stderr.read()[-4000:])
    assert not os.path.exists(path)  # the generated token does not outlive the server


def test_serve_ends_cleanly_on_sigterm(tmp_path):
    """``kill`` (SIGTERM, e.g. docker stop) ends the server like Ctrl-C: exit 0, token removed."""
    env = {k: v for k, v in os.environ.items() if k != "MMRL_REWARD_TOKEN"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    proc = subprocess.Popen([MMRL, "reward", "serve", "brightness", "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = _read_line(proc, 120)
        path = line.split("new token in ")[1].split(" ")[0]
        assert os.path.isfile(path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (proc.returncode, proc.stderr.read()[-4000:])
    assert not os.path.exists(path)
