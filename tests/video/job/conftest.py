"""Fixtures for the video trainer tests: the tiny Qwen2.5-VL saved once per session, a few
synthetic moving-square videos, and prompts/metadata the way the job builds them."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory):
    from mmrl.video.tiny import build_tiny_qwen_vl
    return build_tiny_qwen_vl(str(tmp_path_factory.mktemp("tiny_vl")), seed=0)


@pytest.fixture(scope="session")
def task_jsonl(tmp_path_factory):
    from mmrl.video.synthetic_task import write_synthetic_task
    return write_synthetic_task(str(tmp_path_factory.mktemp("task")), 6, seed=0)




@pytest.fixture(scope="session")
def vt_batch(task_jsonl):
    """(prompts, metadata) for the first 2 synthetic records, as the job makes them."""
    from mmrl.video.data import build_messages, format_question, load_vl_dataset
    recs = list(load_vl_dataset(task_jsonl))[:2]
    return ([format_question(r, "plain") for r in recs],
            [{**r.metadata(), "messages": build_messages(r, "plain")} for r in recs])
