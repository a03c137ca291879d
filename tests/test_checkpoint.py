"""Checkpoints: atomic, verified, torn ones skipped, disk-full safe; exact resume after SIGKILL;
SIGTERM checkpoints and exits cleanly; failing rewards are retried, isolated and counted."""
import errno
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrl import checkpoint as ckpt
from mmrl.loop import Rollout
from mmrl.reward_fn import robust_reward

ROOT = Path(__file__).resolve().parents[1]
MMRL = Path(sys.executable).parent / "mmrl"


def _save(root, step, value=1.0, keep=3):
    return ckpt.save_checkpoint(root, step, {"w": torch.full((3,), value)}, {"lr": 0.1},
                                {"step": step, "rng": ckpt.rng_state()}, keep_last=keep)


def test_roundtrip_and_rng_state(tmp_path):
    g = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.rng_state({"g": g})
    expect = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=g))
    folder = ckpt.save_checkpoint(tmp_path, 7, {"w": torch.arange(4.0)}, {"o": 1},
                                  {"rng": state, "step": 7})
    assert folder.name == "step-00000007" and ckpt.is_complete(folder)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    data = ckpt.load_checkpoint(folder)
    ckpt.set_rng_state(data["state"]["rng"], {"g": g})
    got = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=g))
    assert got[0] == expect[0] and got[1] == expect[1]
    assert torch.equal(got[2], expect[2]) and torch.equal(got[3], expect[3])
    assert torch.equal(data["weights"]["w"], torch.arange(4.0)) and data["optimizer"] == {"o": 1}


def test_keep_last_and_torn_newest_is_skipped(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, float(step), keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000003",
                                                                 "step-00000004"]
    newest = tmp_path / "step-00000004"
    weights = next(p for p in newest.iterdir() if p.name.startswith("weights"))
    weights.write_bytes(weights.read_bytes()[:-5])  # truncate: a torn write
    assert not ckpt.is_complete(newest)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(newest)
    (tmp_path / "step-00000003" / ckpt.MANIFEST).unlink()  # no manifest: also torn
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    real = torch.save

    def full(obj, path, *a, **k):
        if str(path).endswith("state.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space"):
        _save(tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]  # no tmp folder left
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000001"


def _train(out, *extra, steps=8):
    return [str(MMRL), "train", str(ROOT / "configs/demo/toy.yaml"), f"train.steps={steps}",
            "train.progress=false", f"train.output_dir={out}", "train.prompts_per_step=4",
            "train.group_size=4", "toy.d_model=16", "toy.layers=1", "toy.heads=2",
            "toy.digits=5", "toy.length=3", "train.resume=auto", "train.log_every=100", *extra]


def _final(out):
    return torch.load(Path(out) / "final.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    proc = subprocess.run(_train(out), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return _final(out)


def _wait_for(path: Path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 4, 6])
def test_sigkill_then_resume_is_bit_exact(tmp_path, reference_run, kill_after):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train(out, "train.save_every=1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for(out / "checkpoints" / f"step-{kill_after:08d}", proc)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: maybe mid-step, maybe mid-write
    proc.wait()
    assert not (out / "final.pt").exists()
    done = subprocess.run(_train(out, "train.save_every=1"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    final = _final(out)
    for k, v in reference_run.items():
        assert torch.equal(final[k], v), f"{k} differs after resume"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [int(l.split('"step": ')[1].split(",")[0]) for l in lines] == list(range(8))


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, reference_run):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train(out, "train.log_every=1"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    # wait for the first step's line, then ask it to stop
    line = proc.stdout.readline()
    while "step" not in line or "reward" not in line:
        line = proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert "stopped by signal" in rest
    folder = ckpt.latest_checkpoint(out / "checkpoints")
    assert folder is not None and not (out / "final.pt").exists()
    done = subprocess.run(_train(out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for k, v in reference_run.items():
        assert torch.equal(_final(out)[k], v)


def _rollout(n=4):
    return Rollout(list(range(n)), ["p"] * n, [{} for _ in range(n)],
                   torch.zeros(n, dtype=torch.long), torch.ones(n, 2, dtype=torch.bool))


def _args(r):
    return r.samples, r.prompts, r.metadata


def test_reward_that_fails_once_is_retried():
    calls = []

    def flaky(samples, prompts, metadata):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("reward server hiccup")
        return [float(s) for s in samples]
    rb, err = robust_reward(flaky, *_args(_rollout()), retries=2)
    assert rb.valid.all() and rb.values[:, 0].tolist() == [0, 1, 2, 3]
    assert "hiccup" in err and len(calls) == 2


def test_reward_failing_on_one_sample_drops_only_that_sample():
    def picky(samples, prompts, metadata):
        if 2 in samples:
            raise ValueError("cannot parse sample 2")
        return [float(s) for s in samples]
    rb, err = robust_reward(picky, *_args(_rollout()), retries=1)
    assert rb.valid.tolist() == [True, True, False, True]
    assert rb.values[[0, 1, 3], 0].tolist() == [0, 1, 3] and "cannot parse" in err


def test_reward_timeout_drops_samples_and_returns():
    def slow(samples, prompts, metadata):
        time.sleep(5)
        return [1.0] * len(samples)
    t0 = time.time()
    rb, err = robust_reward(slow, *_args(_rollout(2)), retries=0, timeout=0.05)
    assert not rb.valid.any() and rb.num_invalid == 2
    assert "Timeout" in err
    assert time.time() - t0 < 4  # did not wait for the hung calls


def test_all_nan_rewards_stop_the_run_with_a_checkpoint(tmp_path):
    from mmrl.schema import config_from_dict
    from mmrl.runner import run_training
    from mmrl.toy import ToyPolicy
    cfg = config_from_dict({"job": "toy", "train": {
        "steps": 20, "prompts_per_step": 2, "group_size": 2, "max_bad_steps": 3,
        "progress": False, "output_dir": str(tmp_path), "log_every": 100},
        "toy": {"d_model": 16, "layers": 1, "heads": 2}})
    pol = ToyPolicy(cfg.task)
    with pytest.raises(RuntimeError, match="3 consecutive steps"):
        run_training(cfg, pol, lambda s, p, m: [float("nan")] * len(s),
                     [[1, 2, 3, 4], [2, 2, 1, 1]], [{"target": [4, 3, 2, 1]}] * 2)
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step-00000003"
