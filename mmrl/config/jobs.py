"""Jobs: what ``mmrl train`` can run (the toy demo, the video trainer, the diffusion trainer).

A job is a config section (a light dataclass, importable without the job's heavy dependencies)
and a ``run(config) -> summary`` function. Each job registers itself from a torch-free module
(:data:`JOB_MODULES`, ``<domain>/config.py``) whose ``run`` imports the heavy job module when the
job starts; those modules are imported lazily, on first use, so validating a config loads no
torch and the core never imports transformers or diffusers by itself.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from mmrl.registry import Registry


class Target:
    """A function named ``"module:attribute"``, imported on its first call: a job's ``run``
    given by name, so its config module neither imports the heavy job module nor forms an
    import cycle with it (the job module imports the section from the config module)."""

    def __init__(self, ref: str):
        module, _, attr = ref.partition(":")
        if not module or not attr.isidentifier():
            raise ValueError(f"job run target {ref!r}: expected 'module:function', e.g. "
                             f"'mmrl.demo.toy:run'")
        self.module, self.attr = module, attr

    def __call__(self, *args, **kwargs):
        return getattr(importlib.import_module(self.module), self.attr)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Target('{self.module}:{self.attr}')"


@dataclass(frozen=True)
class Job:
    """A runnable job.

    Attributes:
        name: the ``job:`` value in a config, and the name of its config section.
        section: the dataclass of the job's config section.
        run: ``run(config: RunConfig) -> dict`` (a summary of the finished run), or its name
            ``"module:function"`` (a :class:`Target`, imported when the job starts: the way a
            torch-free ``<domain>/config.py`` names its heavy job module).
        description: one line for ``mmrl train --help``.
        check: optional ``check(algo, train, task) -> list[str]`` for cross-section problems.
        algo_defaults: optional ``algo_defaults(task) -> dict`` of algorithm settings the job
            knows better than a preset (e.g. ``max_len`` for ``fixed_norm``), used where the
            config leaves them null.
        check_pref: optional ``check_pref(pref, task) -> list[str]``: what the job cannot do
            with an active ``pref`` section (a preset its scores cannot carry, a verifier it
            cannot build); called when ``pref.mode`` is not ``off``.
        preflight: optional ``preflight(config: RunConfig) -> list[str]``: problems with running
            on this machine (data, model and prompt files exist). Must be cheap: no model is
            loaded; ``mmrl train`` and ``mmrl config validate`` call it before any work.
        steps: the job's responses have steps (per-step rewards, anchor states, continuations
            from a prefix): ``algo.step_advantage`` (GiGPO, SPO-chain) is allowed.
    """

    name: str
    section: type
    run: Union[Callable[[Any], Dict[str, Any]], str]
    description: str = ""
    check: Optional[Callable[..., List[str]]] = None
    algo_defaults: Optional[Callable[[Any], Dict[str, Any]]] = None
    preflight: Optional[Callable[[Any], List[str]]] = None
    check_pref: Optional[Callable[..., List[str]]] = None
    steps: bool = False

    def __post_init__(self):
        if isinstance(self.run, str):
            object.__setattr__(self, "run", Target(self.run))


JOBS: Registry[Job] = Registry("job")

# job name -> the torch-free module that registers it (imported on first use): the section,
# its checks and a ``run`` that imports the heavy job module only when the job starts.
JOB_MODULES = {
    "toy": "mmrl.demo.config",
    "video": "mmrl.video.config",
    "diffusion": "mmrl.diffusion.config",
}

# Where a job registered before its section moved to a torch-free module (used only while that
# module does not exist yet).
def register_job(job: Job) -> Job:
    JOBS.register(job.name, job)
    return job


def step_problems(job: Job, algo) -> List[str]:
    """``algo.step_advantage`` other than none on a job whose responses have no steps."""
    name = algo.resolve().step_advantage
    if name == "none" or job.steps:
        return []
    with_steps = sorted(n for n, j in JOBS.items() if j.steps) or ["toy"]
    return [f"algo.step_advantage: got {name!r}, but job {job.name!r} gives its responses no "
            f"steps (per-step rewards, anchor states, continuations from a prefix); jobs with "
            f"steps: {', '.join(with_steps)}; set algo.step_advantage=none"]


def get_job(name: str) -> Job:
    """The job called ``name``, importing its module if needed.

    Raises:
        ValueError: unknown job, or a known job whose module/extra is not installed.
    """
    if not isinstance(name, str):
        raise TypeError(f"job name must be a string, got {type(name).__name__} {name!r}")
    if name not in JOBS and name in JOB_MODULES:
        try:
            _import_job_module(name)
        except ModuleNotFoundError as err:
            if (err.name or "").startswith("mmrl"):
                raise ValueError(f"job {name!r} is not available in this version of mmrl "
                                 f"({JOB_MODULES[name]} is missing)") from None
            raise ValueError(f"job {name!r} needs {err.name}, which is not installed; install "
                             f"it with: pip install 'mmrl[{name}]'") from None
    if name not in JOBS:
        known = sorted(set(JOBS.names()) | set(JOB_MODULES))
        from mmrl.registry import did_you_mean
        raise ValueError(f"unknown job {name!r} (known: {', '.join(known)})"
                         f"{did_you_mean(name, known)}")
    return JOBS.get(name)


def _import_job_module(name: str) -> None:
    importlib.import_module(JOB_MODULES[name])


def job_names() -> List[str]:
    return sorted(set(JOBS.names()) | set(JOB_MODULES))


# ---------------------------------------------------------------------------- preflight helpers
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def file_problems(key: str, path: str, what: str = "file") -> List[str]:
    """``[]`` when ``path`` is a readable, non-empty file; else one message naming ``key``."""
    p = Path(path).expanduser()
    if not p.exists():
        return [f"{key}: {what} {path!r} not found (looked at {p.resolve()}); fix the path "
                f"(relative paths are resolved from {os.getcwd()})"]
    if p.is_dir():
        return [f"{key}: {path!r} is a directory; expected a {what}"]
    if not os.access(p, os.R_OK):
        return [f"{key}: {what} {path!r} is not readable (permissions)"]
    if p.stat().st_size == 0:
        return [f"{key}: {what} {path!r} is empty (0 bytes)"]
    return []


def model_problems(key: str, name: str, marker: str) -> List[str]:
    """Problems with a model named by a local folder or a hub id (no download, no loading).

    A local folder must hold ``marker`` (``config.json`` for transformers, ``model_index.json``
    for a diffusers pipeline). A name that is not an existing path must look like a hub id
    (``org/name``); with ``HF_HUB_OFFLINE=1`` it must also be in the local Hugging Face cache.
    """
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            return [f"{key}: {name!r} is a file; expected a model folder (what save_pretrained "
                    f"writes, with {marker}) or a hub id"]
        if not (p / marker).is_file():
            return [f"{key}: folder {name!r} has no {marker}, so it is not a saved model; "
                    f"point it at the folder save_pretrained wrote"]
        return []
    if not _HUB_ID.match(name) or name.startswith((".", "~")):
        return [f"{key}: model folder {name!r} not found (looked at {p.resolve()}) and it is "
                f"not a hub id (org/name); fix the path"]
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return []
        if not isinstance(try_to_load_from_cache(name, marker), str):
            return [f"{key}: {name!r} is neither a local folder (no {p.resolve()}) nor in the "
                    f"Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it; give "
                    f"the path of a saved model or download it first"]
    return []
