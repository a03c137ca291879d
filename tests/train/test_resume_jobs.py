"""Exact resume for the real trainers: SIGKILL a video / diffusion run mid-way, resume, and get
the weights of an uninterrupted run bit for bit (CPU, fixed seed, one thread: with several
threads some CPU kernels of the vision tower sum in a varying order, so two *uninterrupted* runs
already differ in the last bits)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MMRL = str(Path(sys.executable).parent / "mmrl")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3") / "pipe"
    subprocess.run([MMRL, "diffusion", "tiny-pipeline", str(out)], check=True,
                   capture_output=True, timeout=300)
    return out


def _cmd(job, out, tiny_sd3):
    common = ["train.steps=4", "train.progress=false", f"train.output_dir={out}",
              "train.resume=auto", "train.save_every=1", "train.prompts_per_step=2",
              "train.group_size=3"]
    if job == "video":
        return [MMRL, "train", str(ROOT / "configs/demo/video_tiny.yaml"), *common,
                "video.synthetic_num=4"]
    return [MMRL, "train", str(ROOT / "configs/demo/diffusion_tiny.yaml"), *common,
            f"diffusion.model={tiny_sd3}", "diffusion.eval_every=0", "diffusion.num_steps=4",
            "diffusion.height=8", "diffusion.width=8"]


@pytest.mark.parametrize("job", ["video", "diffusion"])
def test_sigkill_and_resume_match_an_uninterrupted_run(tmp_path, tiny_sd3, job):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_cmd(job, ref, tiny_sd3), check=True, capture_output=True, timeout=600,
                   env=ENV)
    proc = subprocess.Popen(_cmd(job, cut, tiny_sd3), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    marker, t0 = cut / "checkpoints" / "step-00000002", time.time()
    while not marker.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() - t0 < 300
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(_cmd(job, cut, tiny_sd3), capture_output=True, text=True, timeout=600,
                          env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    a, b = torch.load(ref / "final.pt"), torch.load(cut / "final.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
