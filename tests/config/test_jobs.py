"""The job registry: sections registered from torch-free modules, ``run`` named and imported
when the job starts."""
import pytest

from mmrl.config import jobs
from mmrl.config.jobs import Job, Target, get_job


def test_a_job_run_given_by_name_is_imported_on_its_first_call():
    job = get_job("toy")
    assert jobs.JOB_MODULES["toy"] == "mmrl.demo.config"
    assert isinstance(job.run, Target) and repr(job.run) == "Target('mmrl.demo.toy:run')"
    echo = Job("echo", dict, "json:dumps")
    assert echo.run({"a": 1}) == '{"a": 1}'
    for bad in ("json", "json:", ":dumps", "json:dump s"):
        with pytest.raises(ValueError, match="expected 'module:function'"):
            Job("bad", dict, bad)


def test_every_domain_job_registers_from_its_torch_free_config_module():
    assert jobs.JOB_MODULES == {"toy": "mmrl.demo.config", "video": "mmrl.video.config",
                                "diffusion": "mmrl.diffusion.config"}
    for name, target in (("video", "mmrl.video.job:run"),
                         ("diffusion", "mmrl.diffusion.job:run")):
        assert repr(get_job(name).run) == f"Target({target!r})"


def test_a_missing_job_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(jobs.JOB_MODULES, "gone", "mmrl.no_such_config")
    with pytest.raises(ValueError, match="not available in this version"):
        get_job("gone")
