"""Checks of a valid run config against *this machine*, before any work: the device exists, the
resume checkpoint and the output folder are usable, and the job's files exist.

``mmrl train`` and ``mmrl config validate`` (unless ``--schema-only``) run them after
:func:`mmrl.config.schema.load_config`. They live above the config layer because the output
folder's rules are the runner's own (:mod:`mmrl.train.run_folder`, the same messages). Cheap:
nothing is loaded or hashed, and torch is imported only for a device other than cpu/auto, the
run-folder rules only when the output folder exists.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

from mmrl.config.core import show
from mmrl.config.jobs import get_job
from mmrl.config.schema import RunConfig, device_problems


def device_here(device: str, key: str = "train.device") -> List[str]:
    """Problems with using ``device`` on this machine (it must exist and be visible)."""
    if device in ("auto", "cpu") or device_problems(device):
        return []
    import torch
    dev = torch.device(device)
    if dev.type == "cpu":
        return []
    backend = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None),
               "mps": getattr(torch.backends, "mps", None)}[dev.type]
    if backend is None or not backend.is_available():
        return [f"{key}: {device!r} but torch sees no {dev.type} device on this machine; use "
                f"auto (falls back to cpu) or cpu, or run where a {dev.type} device is visible"]
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    # under torchrun each process uses GPU LOCAL_RANK (cuda means "my GPU")
    index = dev.index if dev.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= count:
        return [f"{key}: {device!r} but this machine has {count} {dev.type} device(s) "
                f"(indices 0..{count - 1}); pick one of those"]
    return []


def resume_problems(resume: str, output_dir: str) -> List[str]:
    """Problems with ``train.resume`` naming a checkpoint folder (auto and never pass)."""
    if resume in ("auto", "never"):
        return []
    folder = Path(resume).expanduser()
    if not folder.is_dir():
        return [f"train.resume: got {show(resume)}, which is not auto, never or an existing "
                f"folder ({folder.resolve()} does not exist); expected auto (newest checkpoint "
                f"in output_dir), never, or a checkpoint folder such as "
                f"{Path(output_dir) / 'checkpoints' / 'step-00000040'}"]
    if not (folder / "MANIFEST.json").is_file():
        return [f"train.resume: {folder} has no MANIFEST.json, so it is not a complete "
                f"checkpoint; pick a step-XXXXXXXX folder under output_dir/checkpoints, or use "
                f"resume=auto"]
    return []


def preflight(run: RunConfig) -> List[str]:
    """Problems with running ``run`` on this machine, all at once: the device exists, the resume
    checkpoint and the output folder are usable, and the job's files exist (its
    ``Job.preflight``)."""
    t = run.train
    out = device_here(t.device) + resume_problems(t.resume, t.output_dir)
    if Path(t.output_dir).expanduser().exists():  # a folder not there yet holds no run
        from mmrl.train.run_folder import output_dir_problems
        out.extend(output_dir_problems(t.output_dir, t.resume, t.overwrite))
    out.extend(pref_file_problems(run))
    job = get_job(run.job)
    if job.preflight is not None:
        out.extend(job.preflight(run))
    return out


def pref_file_problems(run: RunConfig) -> List[str]:
    """The ``pref`` section's pair files exist and are files."""
    out = []
    for key in ("pairs_file", "eval_pairs"):
        path = getattr(run.pref, key, None)
        if path is not None and not Path(path).expanduser().is_file():
            out.append(f"pref.{key}: {path} is not a file; expected a JSONL file of pair "
                       f"records (one {{..., chosen, rejected}} object per line)")
    return out
