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


def test_a_job_module_not_written_yet_falls_back_to_the_old_one(monkeypatch, tmp_path):
    """Until a domain's torch-free config module exists its job registers from the old one."""
    (tmp_path / "old_later_job.py").write_text(
        "from mmrl.config.jobs import Job, register_job\n"
        "register_job(Job('later', dict, 'json:dumps'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(jobs.JOB_MODULES, "later", "mmrl.no_such_config")
    monkeypatch.setitem(jobs._OLD_JOB_MODULES, "later", "old_later_job")
    try:
        assert get_job("later").run({"b": 2}) == '{"b": 2}'
    finally:
        jobs.JOBS._entries.pop("later", None)
    monkeypatch.setitem(jobs.JOB_MODULES, "gone", "mmrl.no_such_config")
    with pytest.raises(ValueError, match="not available in this version"):
        get_job("gone")
