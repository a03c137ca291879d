"""One output folder, one run: which run a folder holds, and refusing to mix two.

``output_dir/run.json`` names the run (``{"run_id": ...}``, a random id written when a run
starts fresh); every checkpoint's manifest records the same id. :func:`claim_output_dir` decides,
before anything is written, whether the starting run may use the folder.

Differs from the transformers example scripts: they refuse any non-empty ``output_dir`` that
has no checkpoint unless ``--overwrite_output_dir``, which then writes over the folder without
removing the old run's checkpoints; here the rule is which run the files belong to, and
overwriting removes the old run's outputs (and only them) first.
"""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import List, Optional

from mmrl.train.checkpoint_files import list_checkpoints, manifest
from mmrl.config.core import UserError

RUN_FILE = "run.json"
#: Everything a run writes under ``output_dir``; ``overwrite`` removes exactly these (inputs a
#: job keeps there, e.g. the video demo's tiny model and synthetic clips, are left alone).
RUN_OUTPUTS = (RUN_FILE, "config.yaml", "metrics.jsonl", "samples.jsonl", "checkpoints",
               "final.pt", "hf", "tb", "wandb", "eval.jsonl", "eval", "pref_eval.jsonl")
#: The outputs whose presence means a folder holds a run (config.yaml alone does not).
_RUN_EVIDENCE = (RUN_FILE, "metrics.jsonl", "final.pt", "hf")


def read_run_id(out) -> Optional[str]:
    """The ``run_id`` in ``out/run.json`` (None when there is none)."""
    try:
        return str(json.loads((Path(out) / RUN_FILE).read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _describe(out: Path) -> str:
    """What of a run ``out`` holds, for error messages."""
    steps = [p.name for p in list_checkpoints(out / "checkpoints")]
    found = [n for n in _RUN_EVIDENCE if (out / n).exists()]
    if steps:
        found.append(f"checkpoints {steps[0]}..{steps[-1]}" if len(steps) > 1 else
                     f"checkpoint {steps[0]}")
    run_id = read_run_id(out)
    return (f"run {run_id}" if run_id else "a run") + f" ({', '.join(found)})"


def _holds_a_run(out: Path) -> bool:
    return any((out / n).exists() for n in _RUN_EVIDENCE) or \
        bool(list_checkpoints(out / "checkpoints"))


def _remove_outputs(out: Path) -> None:
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


_FIX = (f"use another train.output_dir, train.resume=auto to continue the run there, or "
        f"train.overwrite=true to delete its outputs ({', '.join(RUN_OUTPUTS)}) first")


def _refused_never(out: Path) -> str:
    return (f"train.output_dir={out} holds {_describe(out)} and train.resume=never starts a new "
            f"run, whose checkpoints would be mixed with that run's; {_FIX}")


def output_dir_problems(out, resume: str, overwrite: bool) -> List[str]:
    """What :func:`claim_output_dir` would refuse, found before any work (no model loaded):
    ``out`` is a file, or ``resume=never`` without ``overwrite`` into a folder holding a run."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        return [f"train.output_dir: {out} exists and is a file; expected a folder (pick another "
                f"path)"]
    if resume == "never" and not overwrite and _holds_a_run(out):
        return [_refused_never(out)]
    return []


def claim_output_dir(out, resume: str, overwrite: bool = False) -> str:
    """The run id of the run starting in ``out``, after making sure ``out`` is its folder.

    A folder *holds a run* when it has ``run.json``, ``metrics.jsonl``, ``final.pt``, ``hf/``
    or a ``checkpoints/step-*`` folder; the run is the one named in ``run.json`` (a folder
    written before run ids existed holds an unnamed run). The starting run is:

    - ``resume=never``: a new run (a new id). A folder holding a run is refused unless
      ``overwrite``, which first deletes that run's outputs (:data:`RUN_OUTPUTS`, nothing else).
    - ``resume=auto``: the run the folder holds (its id; a new id for an empty folder or an
      unnamed run). ``overwrite`` is refused: it would delete what ``auto`` resumes.
    - ``resume=<checkpoint folder>``: the checkpoint's run. Refused unless ``overwrite`` when
      the folder holds another run, or holds newer checkpoints of the same run (continuing from
      an older one would mix the two futures); ``overwrite`` deletes the folder's run outputs
      (or only those newer checkpoints) first.

    ``run.json`` is (re)written with the id. Call on one process only.

    Raises:
        UserError: (a ValueError) the folder holds another run and ``overwrite`` is off, or a
            bad combination.
    """
    out = Path(out)
    held, folder_id = _holds_a_run(out), read_run_id(out)
    fix = _FIX
    if resume == "auto":
        if overwrite:
            raise UserError("train.overwrite=true with train.resume=auto would delete the "
                             "checkpoints auto resumes from; use train.resume=never with "
                             "train.overwrite=true to start over in this folder")
        run_id = folder_id or uuid.uuid4().hex[:16]
    elif resume == "never":
        if held and not overwrite:
            raise UserError(_refused_never(out))
        if held:
            _remove_outputs(out)
        run_id = uuid.uuid4().hex[:16]
    else:
        run_id = _claim_for_checkpoint(out, Path(resume), held, folder_id, overwrite, fix)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps({"run_id": run_id}) + "\n")
    return run_id


def _claim_for_checkpoint(out: Path, ckpt: Path, held: bool, folder_id: Optional[str],
                          overwrite: bool, fix: str) -> str:
    """:func:`claim_output_dir` for ``resume=<checkpoint folder>``."""
    run_id = manifest(ckpt).get("run_id") or folder_id or uuid.uuid4().hex[:16]
    inside = out.resolve() in ckpt.resolve().parents
    if held and not inside and folder_id != run_id:
        if not overwrite:
            raise UserError(f"train.output_dir={out} holds {_describe(out)}, not the run of "
                             f"train.resume={ckpt}; {fix}")
        _remove_outputs(out)
        return run_id
    step = manifest(ckpt).get("step")
    newer = [p for p in list_checkpoints(out / "checkpoints")
             if step is not None and p.name > f"step-{int(step):08d}"]
    if newer and not overwrite:
        raise UserError(f"train.resume={ckpt} is older than checkpoint(s) "
                         f"{', '.join(p.name for p in newer)} in {out / 'checkpoints'}: "
                         f"continuing from it would mix two histories; resume from the newest "
                         f"(train.resume=auto), use another train.output_dir, or "
                         f"train.overwrite=true to delete the newer checkpoints")
    for p in newer:
        shutil.rmtree(p)
    return run_id
