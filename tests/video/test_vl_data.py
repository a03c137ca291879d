"""Video-R1-style data: loading mixed records, malformed lines, paths, prompts and messages."""
import json
import os

import numpy as np
import pytest
import torch

from mmrl.video import vl_rewards as vr
from mmrl.video.data import (PROMPT_TEMPLATES, PromptTemplate, build_messages, format_question,
                             load_vl_dataset, parse_record, save_vl_dataset)

GOOD = [
    {"problem_id": 7, "problem": "Which way does the red square move?",
     "options": ["A. left", "B. right", "C. up", "D. down"], "solution": "<answer>B</answer>",
     "problem_type": "multiple choice", "data_type": "video", "path": "./media/clip.mp4",
     "data_source": "synthetic"},
    {"problem": "How many flashes?", "solution": "<answer>3</answer>", "problem_type": "numerical",
     "data_type": "image", "path": "media/frame.png"},
    {"problem": "Say hi", "solution": "<answer>hi there</answer>", "problem_type": "free-form"},
]


def write_jsonl(folder, lines, name="train.jsonl"):
    path = folder / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "clip.mp4").write_bytes(b"")
    (tmp_path / "media" / "frame.png").write_bytes(b"")
    return tmp_path


def test_mixed_records_load_with_paths_relative_to_the_file(data_dir, monkeypatch):
    path = write_jsonl(data_dir, GOOD)
    monkeypatch.chdir("/")
    data = load_vl_dataset(str(path))
    assert len(data) == 3 and data.skipped == [] and data.skip_report() == ""
    video, image, text = data
    assert video.path == str(data_dir / "media" / "clip.mp4") and video.data_type == "video"
    assert image.path == str(data_dir / "media" / "frame.png") and image.data_type == "image"
    assert text.path is None and text.data_type is None
    assert video.extra == {"problem_id": 7, "data_source": "synthetic"}
    assert video.source == "train.jsonl:1"
    assert data.counts() == {"video": 1, "image": 1, "text": 1, "multiple choice": 1,
                             "numerical": 1, "free-form": 1}


def test_record_metadata_feeds_the_rewards(data_dir):
    data = load_vl_dataset(write_jsonl(data_dir, GOOD))
    md = [r.metadata() for r in data]
    out = vr.Accuracy()(["<answer>B</answer>", "<answer>3</answer>", "<answer>hi there</answer>"],
                        [None] * 3, md)
    assert out.tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert md[0]["problem_id"] == 7 and md[0]["options"][1] == "B. right"


BAD = [
    ("not json at all", "invalid_json", "invalid JSON"),
    ('["a list"]', "not_an_object", "expected a JSON object"),
    ({"problem": "", "solution": "A", "problem_type": "numerical"}, "bad_problem",
     "'problem' must be a non-empty string"),
    ({"problem": "q", "solution": "3", "problem_type": "multiple-choise", "options": ["a", "b"]},
     "bad_problem_type", "did you mean 'multiple choice'"),
    ({"problem": "q", "solution": "B", "problem_type": "multiple choice", "options": "A. x B. y"},
     "bad_options", "list of at least two"),
    ({"problem": "q", "solution": "E", "problem_type": "multiple choice",
      "options": ["A. x", "B. y"]},
     "bad_solution", "not all among the options"),
    ({"problem": "q", "solution": "maybe", "problem_type": "multiple choice",
      "options": ["A. x", "B. y"]}, "bad_solution", "not a list of option letters"),
    ({"problem": "q", "solution": "three", "problem_type": "numerical"}, "bad_solution",
     "not one finite number"),
    ({"problem": "q", "problem_type": "numerical"}, "bad_solution", "'solution' is missing"),
    ({"problem": "q", "solution": [6, 2], "problem_type": "temporal grounding"}, "bad_solution",
     "start <= end"),
    ({"problem": "q", "solution": "3", "problem_type": "numerical", "data_type": "audio",
      "path": "media/frame.png"}, "bad_data_type", "not 'image' or 'video'"),
    ({"problem": "q", "solution": "3", "problem_type": "numerical", "data_type": "video"},
     "bad_path", "needs a 'path'"),
    ({"problem": "q", "solution": "3", "problem_type": "numerical", "data_type": "video",
      "path": "media/nope.mp4"}, "missing_media", "not found"),
]


def test_malformed_lines_are_counted_skipped_and_named(data_dir):
    lines = [GOOD[0]] + [b[0] for b in BAD] + [GOOD[1]]
    data = load_vl_dataset(write_jsonl(data_dir, lines))
    assert len(data) == 2
    assert [s.reason for s in data.skipped] == [b[1] for b in BAD]
    for k, (skip, (_, _, message)) in enumerate(zip(data.skipped, BAD)):
        assert skip.source == f"train.jsonl:{k + 2}"
        assert message in skip.message and skip.message.startswith(skip.source)
    report = data.skip_report(max_lines=2)
    assert report.startswith(f"skipped {len(BAD)} of {len(BAD) + 2} records")
    assert "bad_solution: 5" in report and f"... and {len(BAD) - 2} more" in report


def test_on_error_raise_names_the_line_and_all_bad_files_raise(data_dir):
    path = write_jsonl(data_dir, [GOOD[0], BAD[5][0]])
    with pytest.raises(ValueError, match=r"train.jsonl:2: solution letters \['E'\]"):
        load_vl_dataset(path, on_error="raise")
    with pytest.raises(ValueError, match="no usable record"):
        load_vl_dataset(write_jsonl(data_dir, [BAD[0][0], BAD[2][0]], "bad.jsonl"))
    with pytest.raises(ValueError, match="on_error='ignore'"):
        load_vl_dataset(path, on_error="ignore")


def test_json_array_root_filters_and_limit(data_dir, tmp_path_factory):
    array = data_dir / "all.json"
    array.write_text(json.dumps(GOOD + [BAD[7][0]]))
    data = load_vl_dataset(array)
    assert len(data) == 3 and data.skipped[0].source == "all.json[3]"
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    moved = write_jsonl(elsewhere, GOOD[:2])
    assert load_vl_dataset(moved, root=str(data_dir))[0].path == str(data_dir / "media/clip.mp4")
    assert len(load_vl_dataset(moved, check_media=False)) == 2
    assert [r.problem_type for r in load_vl_dataset(array, problem_types=["Numerical"])] == [
        "numerical"]
    assert len(load_vl_dataset(array, limit=2)) == 2
    (data_dir / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_vl_dataset(data_dir / "broken.json")


def test_save_and_reload_round_trip(data_dir, tmp_path_factory):
    data = load_vl_dataset(write_jsonl(data_dir, GOOD))
    out = save_vl_dataset(list(data), data_dir / "copy.jsonl")
    first = json.loads(open(out).readline())
    assert first["path"] == os.path.join("media", "clip.mp4") and first["problem_id"] == 7
    again = load_vl_dataset(out)
    assert [r.metadata() for r in again] == [
        {**r.metadata(), "source": r.source.replace("train", "copy")} for r in data]


# ----------------------------------------------------------------------------- prompts

def test_video_r1_prompt_text_for_multiple_choice(data_dir):
    record = load_vl_dataset(write_jsonl(data_dir, GOOD))[0]
    assert format_question(record) == (
        "Which way does the red square move?\nOptions:\nA. left\nB. right\nC. up\nD. down\n"
        "Think it over the way a person would, in your own words, checking and questioning your "
        "steps as you go. Write your reasoning inside <think> </think> tags first, then the "
        "final answer inside <answer> </answer> tags. In <answer> </answer> give only the letter "
        "of the chosen option (for example A, B, C or D).")
    tw = format_question(record, "tw_grpo", hint="the square is not moving up")
    assert "letters separated by commas" in tw
    assert tw.endswith("\nHint: the square is not moving up")
    assert format_question(record, "plain").startswith("Which way does the red square move?\n")


def test_messages_in_qwen_vl_utils_format(data_dir):
    video, image, text = load_vl_dataset(write_jsonl(data_dir, GOOD))
    msgs = build_messages(video, system_prompt="You are helpful.", media_options={"fps": 2.0})
    assert msgs[0] == {"role": "system", "content": "You are helpful."}
    assert msgs[1]["role"] == "user"
    assert msgs[1]["content"][0] == {"type": "video", "video": video.path, "fps": 2.0}
    assert msgs[1]["content"][1] == {"type": "text", "text": format_question(video)}
    assert build_messages(image)[0]["content"][0] == {"type": "image", "image": image.path}
    assert build_messages(text) == [{"role": "user", "content": [
        {"type": "text", "text": format_question(text)}]}]
    frames = np.zeros((4, 28, 28, 3), np.uint8)
    assert build_messages(video, media=frames)[0]["content"][0]["video"] is frames


def test_custom_templates_and_unknown_template_error(data_dir):
    record = load_vl_dataset(write_jsonl(data_dir, GOOD))[1]
    mine = PromptTemplate("Q: {question}", {"numerical": " (a number)"})
    assert format_question(record, mine) == "Q: How many flashes? (a number)"
    with pytest.raises(ValueError, match="did you mean 'video_r1'"):
        format_question(record, "video_r2")
    assert set(PROMPT_TEMPLATES.names()) == {"plain", "tw_grpo", "video_r1"}


def test_messages_decode_through_qwen_vl_utils(tmp_path):
    from mmrl.video.synthetic import write_mp4
    import qwen_vl_utils
    frames = np.zeros((8, 56, 56, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(8)[:, None, None] * 30
    write_mp4(tmp_path / "v.mp4", frames, fps=4)
    record = parse_record({"problem": "Which colour?", "options": ["A. red", "B. blue"],
                           "solution": "A", "problem_type": "multiple choice",
                           "data_type": "video", "path": "v.mp4"}, "x", str(tmp_path))
    msgs = build_messages(record, media_options={"fps": 2.0})
    images, videos = qwen_vl_utils.process_vision_info(msgs)
    assert images is None and len(videos) == 1 and videos[0].shape[0] == 4  # 2 s at 2 fps
    # the frames are the file's, in order: round(linspace(0, 7, 4)) = [0, 2, 5, 7], red 30 t
    # (lossy H.264: within 5 of the written value; green and blue stay ~0)
    means = videos[0].float().mean(dim=(2, 3))          # [T, C, H, W] -> [T, C]
    assert torch.allclose(means[:, 0], torch.tensor([0.0, 60.0, 150.0, 210.0]), atol=5)
    assert means[:, 1:].abs().max() < 5


def test_fuzzed_records_are_skipped_never_raised(tmp_path):
    import random
    rng = random.Random(3)
    values = [None, "", " ", "A", "<answer>B</answer>", "3.5", "x\x00y", "é" * 5, 0, -1.5, True,
              [], ["A. x"], ["A. x", "B. y"], [1, 2], [6, 2], {"a": 1}, "video", "image",
              "multiple choice", "numerical", "OCR", "temporal grounding", "../" * 50 + "x.mp4"]
    keys = ["problem", "options", "solution", "problem_type", "data_type", "path", "hint"]
    lines = []
    for _ in range(600):
        if rng.random() < 0.1:
            lines.append(rng.choice(["{", "null", "42", '"text"', "[1, 2]", "{'a': 1}", "\ud800"]))
        else:
            lines.append({k: rng.choice(values) for k in keys if rng.random() < 0.8})
    lines.append({"problem": "q", "solution": "1", "problem_type": "numerical"})
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines),
                    encoding="utf-8", errors="surrogatepass")
    data = load_vl_dataset(path)
    assert len(data) + len(data.skipped) == len(lines) and len(data) >= 1
    assert {"invalid_json", "invalid_utf8", "not_an_object", "bad_solution",
            "bad_problem_type"} <= set(data.skip_counts())
    strict = vr.Accuracy(on_bad_label="raise")
    for r in data:   # every record that loads can be scored
        assert r.problem.strip() and strict.score_one("", r.metadata()) >= 0


def test_two_processes_writing_the_same_synthetic_task_leave_whole_files(tmp_path):
    """Ranks of one job write the synthetic task into the same folder at once; every file is
    written through a temporary name and os.replace, so the task reads back whole (the same
    records as one writer) and no temporary file is left behind."""
    import json
    import multiprocessing as mp

    from mmrl.video.synthetic_task import write_synthetic_task
    folder = str(tmp_path / "syn")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=write_synthetic_task, args=(folder, 6), kwargs={"seed": 3})
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = (tmp_path / "syn" / "train.jsonl").read_text().splitlines()
    assert [json.loads(line)["problem_id"] for line in lines] == list(range(6))
    assert not [f for f in (tmp_path / "syn").rglob("*") if ".tmp" in f.name]
    assert all((tmp_path / "syn" / json.loads(line)["path"]).stat().st_size > 0 for line in lines)
