"""Preference steps in the toy job: DPO on online and on file pairs, VerIPO's cycles with a
verifier, the held-out implicit-reward accuracy rising, and a resume after SIGKILL that ends
bit for bit where the uninterrupted run ends. The toy policy's pair capability is tested too."""
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmrl.config.schema import config_from_dict
from mmrl.demo.config import TASKS
from mmrl.demo.toy import ToyConfig, ToyPolicy

ROOT = Path(__file__).resolve().parents[2]
TOY = {"digits": 5, "length": 3, "num_prompts": 32, "d_model": 16, "layers": 1, "heads": 2}


def _pair_file(path: Path, n: int, seed: int) -> Path:
    """n pairs of reverse-task prompts: chosen = the right answer, rejected = the right answer
    with every digit shifted by one (mod 5)."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        p = torch.randint(0, 5, (3,), generator=g).tolist()
        right = TASKS["reverse"](p)
        lines.append(json.dumps({"prompt": p, "chosen": right,
                                 "rejected": [(d + 1) % 5 for d in right]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(tmp_path, name, pref, steps=3, **train):
    from mmrl.config.jobs import get_job
    cfg = config_from_dict({
        "job": "toy", "pref": pref, "toy": TOY,
        "train": {"steps": steps, "prompts_per_step": 4, "group_size": 4, "lr": 3e-3,
                  "seed": 0, "device": "cpu", "progress": False, "log_every": 1000,
                  "export": False, "output_dir": str(tmp_path / name), **train}})
    return get_job("toy").run(cfg)


def _fresh_weights():
    return ToyPolicy(ToyConfig(**TOY), seed=0).model.state_dict()


def _changed(tmp_path, name):
    final, fresh = torch.load(tmp_path / name / "final.pt"), _fresh_weights()
    return sum(not torch.equal(final[k], fresh[k]) for k in fresh)


def test_pair_rollout_lays_out_answers_and_counts_bad_records():
    pol = ToyPolicy(ToyConfig(**TOY))
    pol.enable_reference()
    recs = [{"prompt": [1, 2, 3], "chosen": [3, 2, 1], "rejected": [1]},
            {"prompt": [1, 2], "chosen": [2, 1], "rejected": [1, 2]},  # prompt too short
            {"prompt": [0, 0, 4], "chosen": [4, 0, 0], "rejected": [9, 9]},  # not digits < 5
            {"prompt": [4, 4, 0], "chosen": [], "rejected": [4, 4, 0]}]
    rollout, chosen, rejected = pol.pair_rollout(recs)
    assert rollout.skipped == {"bad_record": 2}
    assert chosen.tolist() == [0, 1] and rejected.tolist() == [2, 3]
    assert rollout.samples == [[3, 2, 1], [], [1], [4, 4, 0]]
    # answer + <eos>: lengths 4, 1, 2, 4 of T = 4
    assert rollout.mask.sum(-1).tolist() == [4, 1, 2, 4]
    sep, eos = pol.sep, pol.eos
    assert rollout.data["ids"][2].tolist() == [1, 2, 3, sep, 1, eos, eos, eos]
    s = pol.pair_scores(rollout, chosen, rejected, torch.Generator(), True)
    full = pol.logp(rollout, torch.arange(4), 0, pol.T)
    torch.testing.assert_close(s.chosen_logp, full[:2])
    torch.testing.assert_close(s.rejected_logp, full[2:])
    assert torch.equal(s.chosen_ref, s.chosen_logp.detach())  # the reference is the start copy
    assert s.chosen_logp.requires_grad and s.chosen_ref is not None
    assert pol.pair_scores(rollout, chosen, rejected, None, False).chosen_ref is None


def test_dpo_on_online_pairs_trains_on_each_groups_best_and_worst(tmp_path):
    summary = _run(tmp_path, "online", {"mode": "dpo"}, steps=3)
    hist = summary["history"]
    assert [h["pref_step"] for h in hist] == [1.0, 1.0, 1.0]
    for h in hist:  # 4 groups: each gives a pair or is tied
        assert h["pairs"] + h["pair_groups_tied"] == 4.0 and h["samples"] == 16.0
        assert 0 <= h["reward_mean"] <= 1
    trained = [h for h in hist if h["pairs"] > 0]
    assert trained and all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in trained)
    # DPO at the reference: every margin is 0 at the first step, loss log 2
    first = trained[0]
    if first is hist[0]:
        assert first["loss"] == pytest.approx(math.log(2), rel=1e-5)
        assert first["pref_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert _changed(tmp_path, "online") > 0


def test_sppo_gets_each_pairs_group_win_rates_and_micro_batches_do_not_matter(tmp_path):
    """SPPO's targets read the win rates of the pair's samples in their group (online pairs
    only); one pair per micro-batch trains the same weights as the whole batch at once."""
    a = _run(tmp_path, "sppo", {"mode": "dpo", "preset": "sppo", "beta": 0.1}, steps=2)
    b = _run(tmp_path, "sppo_micro", {"mode": "dpo", "preset": "sppo", "beta": 0.1}, steps=2,
             micro_batch_size=2)
    trained = [h for h in a["history"] if h["pairs"] > 0]
    assert trained and all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in trained)
    # (weights are not compared: AdamW's g / sqrt(v) turns rounding in near-zero gradient
    # entries into whole steps; the losses after the first update show the same step)
    for ha, hb in zip(a["history"], b["history"]):
        for k in ("loss", "pairs", "pref_reward_margin", "grad_norm"):
            assert hb[k] == pytest.approx(ha[k], rel=1e-5, abs=1e-7), (k, ha, hb)


def test_dpo_on_file_pairs_raises_the_held_out_accuracy(tmp_path):
    pairs = _pair_file(tmp_path / "train.jsonl", 64, seed=11)
    held = _pair_file(tmp_path / "held.jsonl", 32, seed=12)
    summary = _run(tmp_path, "file", {"mode": "dpo", "pairs": "file",
                                      "pairs_file": str(pairs), "eval_pairs": str(held),
                                      "beta": 0.5}, steps=20, lr=1e-2)
    start, end = summary["pref_eval"]
    assert (start["step"], end["step"]) == (0, 20)
    assert start["accuracy"] == 0.5 and start["margin"] == 0.0  # the policy is the reference
    assert start["pairs"] == end["pairs"] == 32.0
    assert end["accuracy"] >= 0.9 and end["margin"] > 0, end  # measured: 1.0
    hist = summary["history"]
    assert all(h["pairs"] == 4.0 and h["pair_records_skipped"] == 0.0 for h in hist)
    assert hist[-1]["pref_reward_accuracy"] > 0.5
    lines = (tmp_path / "file" / "pref_eval.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 20]


def test_veripo_alternates_grpo_and_verifier_ranked_dpo_steps(tmp_path):
    summary = _run(tmp_path, "veripo", {"mode": "veripo", "grpo_steps": 2, "dpo_steps": 1,
                                        "verifier": "digits"}, steps=6)
    hist = summary["history"]
    assert [h.get("pref_step", 0.0) for h in hist] == [0, 0, 1, 0, 0, 1]
    for h in hist:
        assert ("verifier_mean" in h) == (h.get("pref_step") == 1.0)
        assert ("adv_abs_mean" in h) == (h.get("pref_step") is None)
    # the verifier here is the run's own reward: the same ranking, the same mean
    assert all(h["verifier_mean"] == pytest.approx(h["reward_mean"]) for h in hist
               if "verifier_mean" in h)
    assert _changed(tmp_path, "veripo") > 0


def test_an_unknown_toy_verifier_is_refused_by_name(tmp_path):
    from mmrl.config.core import UserError
    with pytest.raises(UserError, match="pref.verifier: got 'judge'; the toy job knows "
                                        "digits, exact"):
        _run(tmp_path, "bad", {"mode": "dpo", "verifier": "judge"})


def _cli(out, *extra):
    return [sys.executable, "-m", "mmrl.cli", "train", str(ROOT / "configs/demo/toy.yaml"),
            "train.steps=7", "train.progress=false", f"train.output_dir={out}",
            "train.prompts_per_step=4", "train.group_size=4", "toy.d_model=16", "toy.layers=1",
            "toy.heads=2", "toy.digits=5", "toy.length=3", "train.resume=auto",
            "train.save_every=1", "train.export=false", "pref.mode=veripo",
            "pref.grpo_steps=2", "pref.dpo_steps=1", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact_across_stages(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    done = subprocess.run(_cli(ref), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    proc = subprocess.Popen(_cli(cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker, t0 = cut / "checkpoints" / "step-00000003", time.time()  # after the first DPO step
    while not marker.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() - t0 < 120
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(_cli(cut), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    a, b = torch.load(ref / "final.pt"), torch.load(cut / "final.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(7))
    assert [r["step"] for r in rows if r.get("pref_step")] == [2, 5]
    assert all(r["pairs"] > 0 for r in rows if r.get("pref_step"))  # the DPO steps trained


@pytest.mark.slow
def test_file_pairs_on_two_ranks_train_as_one_process(tmp_path):
    """Each rank scores its share of a step's records; losses and the held-out accuracy equal
    one process's (the runner also checks that both ranks end with identical weights)."""
    from tests.train.test_distributed import TORCHRUN, _run as run_cmd
    pairs = _pair_file(tmp_path / "train.jsonl", 16, seed=11)
    held = _pair_file(tmp_path / "held.jsonl", 6, seed=12)
    args = ["-m", "mmrl.cli", "train", str(ROOT / "configs/demo/toy.yaml"), "train.steps=3",
            "train.progress=false", "train.prompts_per_step=5", "train.group_size=2",
            "toy.d_model=16", "toy.layers=1", "toy.heads=2", "toy.digits=5", "toy.length=3",
            "train.export=false", "train.lr=1e-2", "pref.mode=dpo", "pref.pairs=file",
            f"pref.pairs_file={pairs}", f"pref.eval_pairs={held}", "train.micro_batch_size=2"]
    one = run_cmd([sys.executable, *args, f"train.output_dir={tmp_path / 'one'}"])
    two = run_cmd(TORCHRUN + [*args, f"train.output_dir={tmp_path / 'two'}"])
    assert "parameters identical on 2 ranks" in two.stdout
    rows = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
            for k in ("one", "two")}
    assert len(rows["one"]) == len(rows["two"]) == 3
    for a, b in zip(rows["one"], rows["two"]):
        assert b["pairs"] == a["pairs"] == 5.0
        for k in ("loss", "grad_norm", "pref_reward_margin"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a, b)
    evals = {k: [json.loads(x) for x in (tmp_path / k / "pref_eval.jsonl").read_text()
                 .splitlines()] for k in ("one", "two")}
    assert [e["pairs"] for e in evals["two"]] == [6.0, 6.0]
    for a, b in zip(evals["one"], evals["two"]):
        assert b["accuracy"] == a["accuracy"] and b["margin"] == pytest.approx(a["margin"],
                                                                               rel=1e-4)
