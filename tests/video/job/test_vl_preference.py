"""VLMPolicy's preference capability on the tiny Qwen2.5-VL: pair records read and checked
(mmrl.video.pairs), ``pair_rollout`` and ``pair_scores`` equal to ``logp`` / ``ref_logp`` of the
same completions scored through an ordinary rollout, gradients (full and LoRA), bad records and
unreadable media."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from vt_helpers import make_policy, rollout  # noqa: E402

from mmrl.video.pairs import PairRecordError, load_pairs  # noqa: E402

# (chosen, rejected) for the first two synthetic records; the second chosen ends with the
# end-of-turn token's text, which is not appended a second time
TEXTS = [("<think>it goes left</think><answer>A</answer>", "<answer>B</answer>"),
         ("B<|im_end|>", "the square moves up")]


@pytest.fixture(scope="module")
def records(task_jsonl):
    from mmrl.video.data import load_vl_dataset
    return list(load_vl_dataset(task_jsonl))


def _write(folder, lines) -> str:
    path = os.path.join(folder, "pairs.jsonl")
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def _pair(record, chosen, rejected, folder=None):
    """A raw pair record; its media path relative to ``folder`` (absolute without one)."""
    rel = None if folder is None else str(folder)
    return {**record.to_json(relative_to=rel), "chosen": chosen, "rejected": rejected}


def _ids(pol, text):
    ids = pol.tok(text, add_special_tokens=False)["input_ids"]
    end = pol.tok.convert_tokens_to_ids("<|im_end|>")
    return ids if ids[-1] == end else ids + [end]


def _ordinary(pol, vt_batch, seqs):
    """A rollout built the ordinary way (2 rows per prompt), its rows' tokens replaced by
    ``seqs`` (rows 0, 1: prompt 0; rows 2, 3: prompt 1)."""
    ro = rollout(pol, vt_batch, group=2)
    T = max(len(s) for s in seqs)
    ro.data["response"] = torch.full((4, T), pol.tok.pad_token_id, dtype=torch.long)
    ro.mask = torch.zeros(4, T, dtype=torch.bool)
    for r, s in enumerate(seqs):
        ro.data["response"][r, :len(s)], ro.mask[r, :len(s)] = torch.tensor(s), True
    return ro


def _pairs(tmp_path, records):
    return load_pairs(_write(tmp_path, [_pair(records[i], *TEXTS[i], tmp_path)
                                        for i in range(2)]))


def test_pair_scores_equal_logp_and_ref_logp_of_the_same_completions(tiny_vl_dir, vt_batch,
                                                                     records, tmp_path):
    pol = make_policy(tiny_vl_dir, template="plain", tw_chunk=2, temperature=0.7)
    pol.enable_reference()
    with torch.no_grad():  # move the policy away from its frozen reference
        for p in pol.model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    ro, chosen, rejected = pol.pair_rollout(_pairs(tmp_path, records))
    assert chosen.tolist() == [0, 2] and rejected.tolist() == [1, 3]
    assert ro.group_ids.tolist() == [0, 0, 1, 1] and ro.skipped == {}
    assert ro.samples == [t for pair in TEXTS for t in pair]
    assert [m["pair_role"] for m in ro.metadata] == ["chosen", "rejected"] * 2
    seqs = [_ids(pol, t) for pair in TEXTS for t in pair]
    b_ids = pol.tok("B", add_special_tokens=False)["input_ids"]
    assert len(seqs[2]) == len(b_ids) + 1  # "B<|im_end|>": the end token not doubled
    for row, s in enumerate(seqs):
        assert ro.data["response"][row, :len(s)].tolist() == s
        assert int(ro.mask[row].sum()) == len(s) == ro.metadata[row]["completion_length"]
    ordinary = _ordinary(pol, vt_batch, seqs)
    assert torch.equal(ordinary.data["prompt_cache"].ids, ro.data["prompt_cache"].ids)

    scores = pol.pair_scores(ro, chosen, rejected, torch.Generator(), with_ref=True)
    T = ro.mask.shape[1]
    with torch.no_grad():
        lp = pol.logp(ordinary, torch.arange(4), 0, T)
        ref = pol.ref_logp(ordinary, torch.arange(4), 0, T)
    assert torch.equal(scores.chosen_mask, ro.mask[[0, 2]])
    assert torch.equal(scores.rejected_mask, ro.mask[[1, 3]])
    for got, want, m in ((scores.chosen_logp, lp[[0, 2]], ro.mask[[0, 2]]),
                         (scores.rejected_logp, lp[[1, 3]], ro.mask[[1, 3]]),
                         (scores.chosen_ref, ref[[0, 2]], ro.mask[[0, 2]]),
                         (scores.rejected_ref, ref[[1, 3]], ro.mask[[1, 3]])):
        torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=0)
    assert scores.chosen_logp.requires_grad and not scores.chosen_ref.requires_grad
    assert float((lp - ref).abs()[ordinary.mask].max()) > 1e-3  # the reference is another model
    # the lm head in chunks of 2 or all at once: the same numbers; a pair on its own too
    pol.tw_chunk = 64
    whole = pol.pair_scores(ro, chosen, rejected, None, with_ref=False)
    assert whole.chosen_ref is None and whole.rejected_ref is None
    torch.testing.assert_close(whole.rejected_logp, scores.rejected_logp, atol=1e-5, rtol=0)
    one = pol.pair_scores(ro, chosen[1:], rejected[1:], None, with_ref=False)
    n = one.chosen_logp.shape[1]
    assert n == int(ro.mask[[2, 3]].sum(1).max())  # T: the longest of its rows
    torch.testing.assert_close(one.chosen_logp[0], scores.chosen_logp[1, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_gradients_equal_those_through_logp(tiny_vl_dir, vt_batch, records, tmp_path, finetune):
    pol = make_policy(tiny_vl_dir, finetune=finetune, template="plain", tw_chunk=3)
    named = [(n, p) for n, p in pol.model.named_parameters() if p.requires_grad]
    if finetune == "lora":  # lora_B starts at 0, which would leave lora_A without gradient
        with torch.no_grad():
            for n, p in named:
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        assert named and all("lora_" in n for n, _ in named)
    else:
        assert named and not any(".visual." in n for n, _ in named)  # frozen vision
    params = [p for _, p in named]
    ro, chosen, rejected = pol.pair_rollout(_pairs(tmp_path, records))
    s = pol.pair_scores(ro, chosen, rejected, None, with_ref=finetune == "lora")
    obj = (torch.where(s.chosen_mask, s.chosen_logp, 0).sum()
           - 0.5 * torch.where(s.rejected_mask, s.rejected_logp, 0).sum())
    got = torch.autograd.grad(obj, params)
    ordinary = _ordinary(pol, vt_batch, [_ids(pol, t) for pair in TEXTS for t in pair])
    lp = pol.logp(ordinary, torch.arange(4), 0, ordinary.mask.shape[1])
    m = ordinary.mask
    want = torch.autograd.grad(torch.where(m[[0, 2]], lp[[0, 2]], 0).sum()
                               - 0.5 * torch.where(m[[1, 3]], lp[[1, 3]], 0).sum(), params)
    for (n, _), g, w in zip(named, got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=n)
    assert all(float(g.abs().max()) > 0 for g in got)
    if finetune == "full":  # no frozen copy was made: the reference is refused, with the fix
        with pytest.raises(ValueError, match=r"call policy.enable_reference\(\) first"):
            pol.pair_scores(ro, chosen, rejected, None, with_ref=True)
    if finetune == "lora":  # the reference: the base model (adapter disabled)
        base = make_policy(tiny_vl_dir, finetune="full", template="plain")
        with torch.no_grad():
            want_ref = base.logp(ordinary, torch.arange(4), 0, m.shape[1])
        torch.testing.assert_close(s.chosen_ref[s.chosen_mask], want_ref[[0, 2]][m[[0, 2]]],
                                   atol=1e-5, rtol=0)


def test_every_bad_record_of_a_file_is_reported_at_once_with_its_line(records, tmp_path):
    good = _pair(records[0], "A", "B", tmp_path)
    bad_type = {**good, "problem_type": "essay", "chosen": 5}
    path = _write(tmp_path, [good, "{not json", {k: v for k, v in good.items()
                                                  if k != "rejected"},
                             {**good, "rejected": "A"}, bad_type, {**good, "solution": "Z"}])
    with pytest.raises(PairRecordError) as err:
        load_pairs(path)
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert msg.startswith(f"{path}: 6 bad pair records; fix or remove these lines:")
    assert [(p.source, p.reason) for p in err.value.problems] == [
        ("pairs.jsonl:2", "invalid_json"), ("pairs.jsonl:3", "bad_rejected"),
        ("pairs.jsonl:4", "same_completions"), ("pairs.jsonl:5", "bad_problem_type"),
        ("pairs.jsonl:5", "bad_chosen"), ("pairs.jsonl:6", "bad_solution")]
    assert "pairs.jsonl:1" not in msg and "'essay' is not one of" in msg


def test_completions_the_policy_cannot_emit_are_errors(tiny_vl_dir, records, tmp_path):
    pol = make_policy(tiny_vl_dir, template="plain", allowed_answers=["A", "B"])
    raw = [_pair(records[i], "A", "B") for i in range(3)]
    raw[1]["chosen"] = "A<|video_pad|>"
    raw[2]["rejected"] = "xyz"
    with pytest.raises(PairRecordError) as err:
        pol.pair_rollout(raw)
    assert [(p.source, p.reason) for p in err.value.problems] == [
        ("records[1]", "bad_chosen"), ("records[2]", "bad_rejected")]
    assert "['<|video_pad|>']" in str(err.value) and "allowed_answers" in str(err.value)
    assert pol.skips.total == 0  # checked before any video was decoded
    raw[1]["rejected"] = 3
    with pytest.raises(PairRecordError, match=r"records\[1\]: 'rejected' must be a non-empty"):
        pol.pair_rollout(raw)


def test_unreadable_media_are_skipped_and_counted(tiny_vl_dir, records, tmp_path):
    broken_video = tmp_path / "broken.mp4"
    broken_video.write_bytes(b"not a video at all")
    broken_image = tmp_path / "broken.png"
    broken_image.write_bytes(b"not an image")
    lines = [_pair(records[0], "A", "B", tmp_path),
             {**_pair(records[1], "A", "B", tmp_path), "path": "nowhere.mp4"},
             {**_pair(records[1], "B", "A", tmp_path), "path": "broken.mp4"},
             {**_pair(records[2], "C", "D", tmp_path), "path": "broken.png",
              "data_type": "image"},
             _pair(records[3], "D", "C", tmp_path)]
    pairs = load_pairs(_write(tmp_path, lines))
    assert len(pairs) == 4 and pairs.skip_counts() == {"missing_media": 1}
    assert pairs.skipped[0].source == "pairs.jsonl:2"
    pol = make_policy(tiny_vl_dir, template="plain")
    ro, chosen, rejected = pol.pair_rollout(pairs)
    assert ro.skipped == {"corrupt": 1, "unreadable_image": 1} and pol.skips.total == 2
    assert ro.group_ids.tolist() == [0, 0, 3, 3]  # the records' indices
    assert chosen.tolist() == [0, 2] and rejected.tolist() == [1, 3]
    assert ro.samples == ["A", "B", "D", "C"]
    s = pol.pair_scores(ro, chosen, rejected, None, with_ref=False)
    assert bool(torch.isfinite(s.chosen_logp[s.chosen_mask]).all())
    empty, c, r = pol.pair_rollout(pairs.records[1:3])  # nothing readable: no rows
    assert len(empty) == 0 and c.numel() == r.numel() == 0
    assert empty.skipped == {"corrupt": 1, "unreadable_image": 1}


def test_the_job_policy_builds_pair_prompts_with_the_jobs_template(tiny_vl_dir, records,
                                                                    tmp_path):
    """``build_policy`` hands ``video.template`` / ``video.system_prompt`` to the policy, so a
    pair's prompt is the one the job's rollouts see."""
    from mmrl.video.config import VideoConfig
    from mmrl.video.data import build_messages
    from mmrl.video.job import build_policy
    c = VideoConfig(model=tiny_vl_dir, template="tw_grpo", system_prompt="Be brief.",
                    dtype="float32", max_new_tokens=2)
    pol = build_policy(c, str(tmp_path), "cpu")
    ro, _, _ = pol.pair_rollout([_pair(records[0], "A", "B")])
    cache, _ = pol.encode_prompts([build_messages(records[0], "tw_grpo",
                                                  system_prompt="Be brief.")])
    assert torch.equal(ro.data["prompt_cache"].ids, cache.ids)
    text = pol.tok.decode(cache.ids[0])
    assert "Be brief." in text and "or the letters separated by commas" in text


def test_a_file_without_usable_pairs_and_a_long_problem_list(records, tmp_path):
    with pytest.raises(ValueError, match="no usable pair; the file holds no record"):
        load_pairs(_write(tmp_path, []))
    gone = {**_pair(records[0], "A", "B", tmp_path), "path": "gone.mp4"}
    with pytest.raises(ValueError, match=r"no usable pair; all 2 records' media files are "
                                         r"missing \(e.g. pairs.jsonl:1: video '.*gone.mp4'"):
        load_pairs(_write(tmp_path, [gone, gone]))
    assert len(load_pairs(_write(tmp_path, [gone, gone]), check_media=False)) == 2
    bad = {**_pair(records[0], "A", "B", tmp_path), "chosen": ""}
    with pytest.raises(PairRecordError) as err:
        load_pairs(_write(tmp_path, [bad] * 60))
    lines = str(err.value).splitlines()
    assert len(err.value.problems) == 60 and len(lines) == 1 + 50 + 1
    assert lines[50].startswith("  pairs.jsonl:50: 'chosen' must be a non-empty completion")
    assert lines[-1] == "  ... and 10 more (bad_chosen: 10)"
