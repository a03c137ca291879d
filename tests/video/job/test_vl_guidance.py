"""The video job's guidance: records with ``hints`` / ``solution_steps``, the hinted prompts
(:class:`mmrl.video.guidance.VideoHints`), and ``VLMPolicy.retarget`` on the tiny model."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from mmrl.video.data import RecordError, build_messages, format_question, load_vl_dataset, \
    parse_record
from mmrl.video.guidance import GHPO_PREFIX, VideoHints
from mmrl.video.rounds import _Media

sys.path.insert(0, os.path.dirname(__file__))
from vt_helpers import make_policy  # noqa: E402

RAW = {"problem": "Which way?", "problem_type": "multiple choice", "options": ["A. left",
       "B. right"], "solution": "<answer>B</answer>", "hints": ["Track the square.",
       "Compare the first and last frames."], "solution_steps": ["It starts left.", "It ends "
       "right."]}


def test_records_carry_hints_and_solution_steps():
    r = parse_record(RAW)
    assert r.hints == ["Track the square.", "Compare the first and last frames."]
    assert r.solution_steps == ["It starts left.", "It ends right."]
    assert "hints" not in r.extra and r.metadata()["hints"] == r.hints
    assert parse_record(r.to_json()).hints == r.hints  # round trip
    assert parse_record({**RAW, "hints": "one"}).hints == ["one"]
    assert parse_record({k: v for k, v in RAW.items() if k != "hints"}).hints == []
    with pytest.raises(RecordError, match="'solution_steps' must be a list of non-empty"):
        parse_record({**RAW, "solution_steps": ["ok", ""]})


def test_video_hints_hand_values():
    rec = parse_record(RAW)
    hints = VideoHints(_Media([rec], "plain", None, fps=4.0, max_frames=8))
    meta = {**rec.metadata(), "record_index": 0, "messages": build_messages(rec, "plain")}
    assert hints.level_hints(meta) == ["Track the square.",
                                       "Track the square. Compare the first and last frames."]
    text = "It starts left.\nIt ends right."  # 30 characters
    assert hints.prefix_hint(meta, 0.5) == GHPO_PREFIX + text[:15]
    assert hints.prefix_hint(meta, 0.01) is None
    assert hints.answer_hint(meta) == "The correct answer is B. Explain why, step by step."
    prompt, m = hints.with_hint(format_question(rec, "plain"), meta, "Track the square.")
    assert prompt.endswith("\nHint: Track the square.") and m["augmented"] == "guided"
    assert m["messages"][-1]["content"][-1]["text"] == prompt


def test_vlm_retarget_rescores_under_the_plain_prompt_and_keeps_the_sampler_logp(
        tiny_vl_dir, task_jsonl):
    pol = make_policy(tiny_vl_dir)
    rec = list(load_vl_dataset(task_jsonl))[0]
    plain = (format_question(rec, "plain"), {**rec.metadata(),
                                             "messages": build_messages(rec, "plain")})
    hinted = (format_question(rec, "plain", "up"), {**rec.metadata(), "messages":
                                                    build_messages(rec, "plain", hint="up")})
    with torch.no_grad():
        r = pol.rollout([hinted[0]], [hinted[1]], 2, torch.Generator().manual_seed(0))
        rows = torch.arange(len(r))
        T = r.mask.shape[1]
        on_hint = pol.logp(r, rows, 0, T)
        moved = pol.retarget(r, [plain[0]] * 2, [plain[1]] * 2)
        on_plain = pol.logp(moved, rows, 0, T)
        back = pol.logp(pol.retarget(moved, [hinted[0]] * 2, [hinted[1]] * 2), rows, 0, T)
    m = r.mask
    torch.testing.assert_close(back[m], on_hint[m])  # the same responses, the same prompt
    torch.testing.assert_close(r.rollout_logp[m], on_hint[m], atol=1e-4, rtol=0)
    assert torch.equal(moved.rollout_logp, r.rollout_logp) and moved.samples == r.samples
    assert moved.prompts == [plain[0]] * 2 and "messages" not in moved.metadata[0]
    assert (on_plain[m] - on_hint[m]).abs().max() > 1e-4  # another context
