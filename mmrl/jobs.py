"""Jobs: what ``mmrl train`` can run (the toy demo, the video trainer, the diffusion trainer).

A job is a config section (a light dataclass, importable without the job's heavy dependencies)
and a ``run(config) -> summary`` function. Job modules register themselves on import; the modules
of known jobs are imported lazily, on first use, so the core never imports transformers or
diffusers by itself.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from mmrl.registry import Registry


@dataclass(frozen=True)
class Job:
    """A runnable job.

    Attributes:
        name: the ``job:`` value in a config, and the name of its config section.
        section: the dataclass of the job's config section.
        run: ``run(config: RunConfig) -> dict`` (a summary of the finished run).
        description: one line for ``mmrl train --help``.
        check: optional ``check(algo, train, task) -> list[str]`` for cross-section problems.
        algo_defaults: optional ``algo_defaults(task) -> dict`` of algorithm settings the job
            knows better than a preset (e.g. ``max_len`` for ``fixed_norm``), used where the
            config leaves them null.
    """

    name: str
    section: type
    run: Callable[[Any], Dict[str, Any]]
    description: str = ""
    check: Optional[Callable[..., List[str]]] = None
    algo_defaults: Optional[Callable[[Any], Dict[str, Any]]] = None


JOBS: Registry[Job] = Registry("job")

# job name -> module that registers it (imported on first use)
JOB_MODULES = {
    "toy": "mmrl.toy",
    "video": "mmrl.video.train",
    "diffusion": "mmrl.diffusion.train",
}


def register_job(job: Job) -> Job:
    JOBS.register(job.name, job)
    return job


def get_job(name: str) -> Job:
    """The job called ``name``, importing its module if needed.

    Raises:
        ValueError: unknown job, or a known job whose module/extra is not installed.
    """
    if name not in JOBS and name in JOB_MODULES:
        try:
            importlib.import_module(JOB_MODULES[name])
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


def job_names() -> List[str]:
    return sorted(set(JOBS.names()) | set(JOB_MODULES))
