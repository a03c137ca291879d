"""Checkpoints: atomic, verified, torn ones skipped, disk-full safe; exact resume after SIGKILL;
SIGTERM checkpoints and exits cleanly; failing rewards are retried, isolated and counted."""
import errno
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrl.train import checkpoint as ckpt
from mmrl.train.loop import Rollout
from mmrl.train.reward_fn import robust_reward
from mmrl.train.runner import RunStopped

ROOT = Path(__file__).resolve().parents[2]
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
    from mmrl.config.schema import config_from_dict
    from mmrl.train.runner import run_training
    from mmrl.demo.toy import ToyPolicy
    cfg = config_from_dict({"job": "toy", "train": {
        "steps": 20, "prompts_per_step": 2, "group_size": 2, "max_bad_steps": 3,
        "progress": False, "output_dir": str(tmp_path), "log_every": 100},
        "toy": {"d_model": 16, "layers": 1, "heads": 2}})
    pol = ToyPolicy(cfg.task)
    with pytest.raises(RunStopped, match="3 consecutive step.s. had no valid sample"):
        run_training(cfg, pol, lambda s, p, m: [float("nan")] * len(s),
                     [[1, 2, 3, 4], [2, 2, 1, 1]], [{"target": [4, 3, 2, 1]}] * 2)
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step-00000003"


def test_same_size_byte_flip_is_caught_by_the_hash(tmp_path):
    _save(tmp_path, 1, 1.0)
    newest = _save(tmp_path, 2, 2.0)
    for name in ("optimizer.pt", "state.pt",
                 next(p.name for p in newest.iterdir() if p.name.startswith("weights"))):
        path = newest / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit, same size: only the sha256 can tell
        path.write_bytes(bytes(data))
        assert not ckpt.is_complete(newest)
        assert ckpt.latest_checkpoint(tmp_path).name == "step-00000001"
        with pytest.raises(ValueError, match="not a complete checkpoint"):
            ckpt.load_checkpoint(newest)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        assert ckpt.is_complete(newest)  # restored: the hash, not the size, was the check
    assert torch.equal(ckpt.load_checkpoint(newest)["weights"]["w"], torch.full((3,), 2.0))


def test_disk_full_inside_torch_save_raises_runtime_error_and_is_handled(tmp_path, monkeypatch):
    _save(tmp_path / "ck", 1)
    full = tmp_path / "full"
    full.symlink_to("/dev/full")  # every write there fails with ENOSPC, for real
    real = torch.save

    def onto_full_disk(obj, path, *a, **k):
        return real(obj, full if str(path).endswith("optimizer.pt") else path, *a, **k)
    with pytest.raises(RuntimeError):  # what torch itself raises on a full disk
        real({"x": torch.zeros(1000)}, full)
    monkeypatch.setattr(torch, "save", onto_full_disk)
    with pytest.raises(ckpt.CheckpointWriteError, match="is the disk full") as err:
        _save(tmp_path / "ck", 2)
    assert isinstance(err.value, OSError) and isinstance(err.value.__cause__, RuntimeError)
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step-00000001"]
    assert ckpt.latest_checkpoint(tmp_path / "ck").name == "step-00000001"


class _Killed(BaseException):
    """A simulated SIGKILL: raised at one file-system operation, after which nothing runs."""


def _kill_at(mp, k):
    """The k-th file-system operation of a save 'kills the process': it raises _Killed, and
    every later operation (the save's own cleanup included) does nothing, as after SIGKILL."""
    state = {"n": 0, "dead": False}

    def wrap(fn):
        def op(*a, **kw):
            if state["dead"]:
                return None
            if state["n"] == k:
                state["dead"] = True
                raise _Killed
            state["n"] += 1
            return fn(*a, **kw)
        return op
    for owner, name in [(ckpt.os, "replace"), (ckpt.shutil, "rmtree"), (ckpt, "_write_tensors"),
                        (torch, "save"), (ckpt, "_fsync_dir"), (ckpt.os, "fsync")]:
        mp.setattr(owner, name, wrap(getattr(owner, name)))


def _w(folder):
    return float(ckpt.load_checkpoint(folder)["weights"]["w"][0])


@pytest.mark.parametrize("keep", [1, 3])
@pytest.mark.parametrize("new_step", [2, 3], ids=["resave_same_step", "next_step"])
def test_a_kill_at_every_point_of_a_save_leaves_a_complete_checkpoint(tmp_path, keep, new_step):
    kills = 0
    for k in range(100):
        root = tmp_path / f"kill{k}"
        _save(root, 1, 1.0, keep)
        _save(root, 2, 2.0, keep)
        with pytest.MonkeyPatch.context() as mp:
            _kill_at(mp, k)
            try:
                _save(root, new_step, 5.0, keep)
                done = True
            except _Killed:
                done, kills = False, kills + 1
        latest = ckpt.latest_checkpoint(root)
        assert latest is not None, f"killed at operation {k}: no complete checkpoint left"
        # the newest complete state is the old step 2 (2.0) or the new save (5.0), never less
        assert (_w(latest), ckpt.manifest(latest)["step"]) in [(2.0, 2), (5.0, new_step)], k
        if done:
            assert (_w(latest), latest.name) == (5.0, f"step-{new_step:08d}")
            break
        # the next save (a resumed run's) recovers and leaves no stray folder
        _save(root, 4, 6.0, keep)
        assert ckpt.latest_checkpoint(root).name == "step-00000004"
        assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert kills >= 8  # every operation of the save was a kill point once


def test_kill_during_the_end_of_run_resave_then_resume_continues(tmp_path):
    """keep_last=1: a run that is complete, resumed (auto), killed while re-saving its last
    step at every point in turn, then resumed again, ends with the same final weights."""
    from mmrl.demo import toy
    cfg = _toy_cfg(tmp_path / "run", steps=3, save_every=1, keep_last=1)
    toy.run(cfg)
    final = _final(tmp_path / "run")
    for k in range(100):
        with pytest.MonkeyPatch.context() as mp:
            _kill_at(mp, k)
            try:
                toy.run(cfg)  # already complete: only the end-of-run re-save of step 3
                break
            except _Killed:
                pass
        summary = toy.run(cfg)
        assert summary["steps"] == 3, k  # resumed from step 3: nothing redone, nothing lost
        got = _final(tmp_path / "run")
        assert got.keys() == final.keys() and all(torch.equal(got[n], final[n]) for n in final)
    assert k >= 8


def _toy_cfg(out, **train):
    from mmrl.config.schema import config_from_dict
    return config_from_dict({"job": "toy", "train": {
        "prompts_per_step": 2, "group_size": 2, "progress": False, "output_dir": str(out),
        "log_every": 100, "export": False, **train},
        "toy": {"d_model": 16, "layers": 1, "heads": 2, "digits": 5, "length": 3}})


def test_disk_full_during_a_run_warns_keeps_going_and_changes_nothing(tmp_path, monkeypatch,
                                                                       capsys):
    from mmrl.demo import toy
    toy.run(_toy_cfg(tmp_path / "ref", steps=3, save_every=1))
    real, calls = torch.save, []

    def full_once(obj, path, *a, **k):
        calls.append(str(path))
        if str(path).endswith("step-00000002/optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
        return real(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", full_once)
    toy.run(_toy_cfg(tmp_path / "run", steps=3, save_every=1))
    err = capsys.readouterr().err
    assert "warning: checkpoint at step 2 failed" in err and "is the disk full" in err
    names = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert sorted(names) == ["step-00000001", "step-00000003"]  # no partial step 2 left
    ref, got = _final(tmp_path / "ref"), _final(tmp_path / "run")
    assert all(torch.equal(got[n], ref[n]) for n in ref)


def test_a_hung_reward_does_not_keep_the_process_from_exiting():
    script = ("import time\n"
              "from mmrl.train.reward_fn import robust_reward\n"
              "def hang(s, p, m):\n"
              "    time.sleep(600)\n"
              "    return [1.0] * len(s)\n"
              "rb, err = robust_reward(hang, [1, 2], ['p', 'p'], [{}, {}], retries=0, "
              "timeout=0.05)\n"
              "print(rb.num_invalid, err)\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)  # the stuck threads sleep 600 s
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("2 reward 'hang' raised TimeoutError: no result after "
                                   "0.05s (train.reward_timeout)")
    assert time.time() - t0 < 60


def _toy_run_with(policy_or_reward, tmp_path, steps, max_bad_steps):
    from mmrl.train.runner import run_training
    from mmrl.demo.toy import ToyPolicy, digit_reward
    cfg = _toy_cfg(tmp_path, steps=steps, max_bad_steps=max_bad_steps)
    pol = ToyPolicy(cfg.task)
    if isinstance(policy_or_reward, type):
        pol.__class__, reward = policy_or_reward, digit_reward
    else:
        reward = policy_or_reward
    return run_training(cfg, pol, reward, [[1, 2, 3], [2, 2, 1]],
                        [{"target": [3, 2, 1]}, {"target": [1, 2, 2]}])


def test_an_always_raising_reward_stops_the_run_naming_the_reward_and_its_error(tmp_path):
    def format_reward(samples, prompts, metadata):
        raise KeyError("answer")
    with pytest.raises(RunStopped) as err:
        _toy_run_with(format_reward, tmp_path, steps=10, max_bad_steps=2)
    msg = str(err.value)
    assert msg.startswith("2 consecutive step(s) had no valid sample to learn from (last step "
                          "1): every sample was dropped because reward 'format_reward' raised "
                          "KeyError: 'answer'. Fix the reward")
    assert "non-finite loss or gradient" not in msg
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step-00000002"


def test_a_run_in_which_no_input_was_usable_fails_instead_of_reporting_nan(tmp_path):
    from mmrl.demo.toy import ToyPolicy

    class NoUsableInput(ToyPolicy):  # every prompt's input is skipped (all videos unreadable)
        def rollout(self, prompts, metadata, group_size, generator):
            r = super().rollout(prompts, metadata, group_size, generator)
            r.skipped = {"corrupt": len(prompts) - 1, "too_short": 1}
            return r.select(torch.zeros(len(r), dtype=torch.bool))
    with pytest.raises(RunStopped, match=r"2 consecutive step\(s\) had no valid sample .*"
                                           r"the policy returned no samples: every prompt's "
                                           r"input was skipped \(corrupt 1, too_short 1;"):
        _toy_run_with(NoUsableInput, tmp_path, steps=2, max_bad_steps=5)  # fewer than 5
    assert not (tmp_path / "final.pt").exists()
    metrics = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["samples"], m["dropped_samples"]) for m in metrics] == \
        [(0, 0.0, 0.0), (1, 0.0, 0.0)]


def test_summary_rewards_skip_steps_without_samples(tmp_path):
    from mmrl.demo.toy import ToyPolicy
    calls = []

    class FirstStepEmpty(ToyPolicy):
        def rollout(self, prompts, metadata, group_size, generator):
            r = super().rollout(prompts, metadata, group_size, generator)
            calls.append(1)
            return r.select(torch.full((len(r),), len(calls) > 1))
    summary = _toy_run_with(FirstStepEmpty, tmp_path, steps=3, max_bad_steps=5)
    rewards = [h["reward_mean"] for h in summary["history"][1:]]
    assert "reward_mean" not in summary["history"][0]
    assert summary["reward_first"] == rewards[0] and summary["reward_last"] == rewards[-1]


def test_the_stop_message_says_when_its_checkpoint_could_not_be_written(tmp_path, monkeypatch):
    def disk_full(obj, path, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(RunStopped, match=r"no valid sample .* writing a checkpoint failed "
                                           r"\(see the warning above\); the previous one is kept"):
        _toy_run_with(lambda s, p, m: [float("nan")] * len(s), tmp_path, steps=5,
                      max_bad_steps=1)
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") is None
