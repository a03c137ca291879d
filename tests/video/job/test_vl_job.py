"""The "video" job end to end: `mmrl train` on the tiny model loaded by path, Video-R1 JSONL with
a bad video in it, samples.jsonl, recipes validate; once through the console script."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmrl.cli.app import main

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
FAST = ["train.steps=2", "train.prompts_per_step=2", "train.group_size=2", "train.log_every=1",
        "train.progress=false", "train.device=cpu", "video.max_new_tokens=2",
        "video.fps=4.0", "video.max_frames=8", "video.token_budget=64", "video.min_tokens=4",
        "video.max_tokens=16"]


def _with_bad_video(task_jsonl, tmp_path):
    rows = [json.loads(line) for line in open(task_jsonl)][:3]
    (tmp_path / "bad.mp4").write_bytes(b"\x00garbage, not an mp4")
    rows.append({**rows[0], "problem_id": 99, "path": str(tmp_path / "bad.mp4")})
    for r in rows[:3]:
        r["path"] = os.path.join(os.path.dirname(task_jsonl), r["path"])
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_train_loads_the_model_by_path_and_counts_a_bad_video(tiny_vl_dir, task_jsonl, tmp_path,
                                                              capsys):
    data = _with_bad_video(task_jsonl, tmp_path)
    out = tmp_path / "run"
    rc = main(["train", os.path.join(ROOT, "configs/demo/video_tiny.yaml"), *FAST,
               "train.steps=4", "train.prompts_per_step=4", "train.sample_log_every=1",
               f"video.model={tiny_vl_dir}", f"video.data={data}", f"train.output_dir={out}",
               "video.rewards={accuracy: 1.0, think_answer_format: 0.5}"])
    assert rc == 0
    text = capsys.readouterr()
    assert "skipped" in text.out + text.err  # the unreadable video is reported, not a crash
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(metrics) == 4 and all("reward/accuracy" in m for m in metrics)
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert samples and set(samples[0]["rewards"]) == {"accuracy", "think_answer_format"}
    assert all(isinstance(s["sample"], str) for s in samples)


def test_console_script_runs_the_demo_config(tiny_vl_dir, task_jsonl, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "mmrl")
    out = tmp_path / "run"
    res = subprocess.run([exe, "train", os.path.join(ROOT, "configs/demo/video_tiny.yaml"), *FAST,
                          f"video.model={tiny_vl_dir}", f"video.data={task_jsonl}",
                          f"train.output_dir={out}"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "done: 2 steps" in res.stdout
    assert (out / "metrics.jsonl").exists()


def test_recipes_validate_and_config_problems_are_all_reported(capsys):
    for name in ("qwen25vl7b_video_r1_grpo", "qwen25vl7b_tw_grpo", "qwen25vl7b_reg_grpo"):
        assert main(["config", "validate", "--schema-only",  # data/ and weights: elsewhere
                     os.path.join(ROOT, f"configs/video/{name}.yaml")]) == 0
    rc = main(["config", "validate", os.path.join(ROOT, "configs/demo/video_tiny.yaml"),
               "video.data=train.csv", "video.min_tokens=99", "video.max_tokens=8"])
    text = capsys.readouterr()
    assert rc != 0
    assert "video.data" in text.out + text.err and "min_tokens=99" in text.out + text.err


def test_resume_reproduces_the_uninterrupted_run(tiny_vl_dir, task_jsonl, tmp_path):
    base = ["train", os.path.join(ROOT, "configs/demo/video_tiny.yaml"), *FAST,
            f"video.model={tiny_vl_dir}", f"video.data={task_jsonl}", "train.group_size=4"]

    def metrics(out):
        return [(m["reward_mean"], m["grad_norm"]) for m in
                (json.loads(line) for line in open(out / "metrics.jsonl"))]
    assert main([*base, "train.steps=4", f"train.output_dir={tmp_path / 'a'}"]) == 0
    assert main([*base, "train.steps=2", "train.save_every=2",
                 f"train.output_dir={tmp_path / 'b'}"]) == 0
    assert main([*base, "train.steps=4", "train.save_every=2", "train.resume=auto",
                 f"train.output_dir={tmp_path / 'b'}"]) == 0
    full, resumed = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    # Same samples and rewards; gradient norms to 1e-6 relative: the multithreaded CPU kernels
    # do not fix their reduction order, so two identical runs (resumed or not, before and after
    # the adapter split) differ in the 7th digit, and rounding to 6 places can split them.
    assert len(full) == 4 and [r for r, _ in resumed] == [r for r, _ in full]
    assert [g for _, g in resumed] == pytest.approx([g for _, g in full], rel=1e-6)
    assert any(g > 0 for _, g in full)  # the run really trained


def test_tiny_model_built_concurrently_into_one_folder_is_complete(tmp_path):
    """Ranks of one torchrun job build `model: tiny` at the same time: never a torn folder."""
    import threading

    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from mmrl.video.tiny import build_tiny_qwen_vl
    target, errors = str(tmp_path / "tiny"), []

    def build():
        try:
            build_tiny_qwen_vl(target)
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)
    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temporary folder left
    AutoProcessor.from_pretrained(target)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(target)
    assert model.config.text_config.hidden_size == 64


def test_a_dataset_whose_videos_are_all_bad_stops_with_the_reasons(tiny_vl_dir, task_jsonl,
                                                                   tmp_path, capsys):
    """Every prompt skipped is no result: exit != 0, the reasons and files named, no nan."""
    row = json.loads(open(task_jsonl).readline())
    for name in ("bad1.mp4", "bad2.mp4"):
        (tmp_path / name).write_bytes(b"\x00garbage, not an mp4")
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps({**row, "problem_id": i, "path": str(tmp_path / n)}) + "\n"
                            for i, n in enumerate(("bad1.mp4", "bad2.mp4"))))
    rc = main(["train", os.path.join(ROOT, "configs/demo/video_tiny.yaml"), *FAST,
               "train.steps=3", "train.max_bad_steps=2", f"video.model={tiny_vl_dir}",
               f"video.data={data}", f"train.output_dir={tmp_path / 'run'}"])
    text = capsys.readouterr()
    out = text.out + text.err
    assert rc != 0
    assert "the policy returned no samples" in out and "corrupt 2" in out  # per step, by reason
    assert "bad1.mp4" in out  # the skip report names a file
    assert "nan -> nan" not in out and "Traceback" not in out
