"""Qwen2.5-VL inputs: grids, token counts, fps and mRoPE positions on a padded batch of videos."""
import numpy as np
import pytest
import torch

from mmrl.video import (SkipCounter, VideoError, build_qwen_video_inputs, qwen25_position_ids,
                        read_video)

SMALL = dict(max_tokens=24, min_tokens=8)  # 112x168 frames: slow 4x6 = 24 tokens, fast 2x3 = 6


@pytest.fixture(scope="module")
def tiny_model(tiny_qwen_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen_dir).eval()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from mmrl.video import synthetic as S
    d = tmp_path_factory.mktemp("qwen_videos")
    return {"cuts": S.write_mp4(d / "cuts.mp4", S.scene_cuts([6, 5, 3], 112, 168), 2.0),
            "static": S.write_mp4(d / "static.mp4", S.scene_cuts([40], 112, 168), 10.0),
            "pan": S.write_mp4(d / "pan.mp4", S.slow_pan(9, 112, 168, 6), 2.0)}


def conv(*videos, text="What happens?"):
    return [{"role": "user", "content": [*({"type": "video", "video": v} for v in videos),
                                         {"type": "text", "text": text}]}]


def test_padded_batch_grids_tokens_fps(tiny_processor, videos):
    batch = build_qwen_video_inputs([conv(videos["cuts"]), conv(videos["static"]),
                                     conv(videos["pan"])], tiny_processor, **SMALL)
    x = batch.inputs
    assert batch.kept == [0, 1, 2] and batch.skipped == {}
    entries = [e for es in batch.entries for e in es]
    # cuts at frames 0, 6, 11: runs slow[0] fast[1:6] slow[6] fast[7:11] slow[11] fast[12:14]
    assert [(e.kind, e.num_real) for e in batch.entries[0]] == [
        ("slow", 1), ("fast", 5), ("slow", 1), ("fast", 4), ("slow", 1), ("fast", 2)]
    assert [(e.kind, e.num_real) for e in batch.entries[1]] == [("slow", 1), ("fast", 7)]
    # every run padded to an even count; grid = (n/2, h/14, w/14)
    assert x["video_grid_thw"].tolist() == [list(e.grid_thw()) for e in entries]
    assert [e.frames.shape[0] for e in batch.entries[0]] == [2, 6, 2, 4, 2, 2]
    assert batch.entries[0][0].grid_thw() == (1, 8, 12) and batch.entries[0][1].grid_thw() == (3, 4, 6)
    # <|video_pad|> count per row = Σ t·h·w/4 of its entries; pixel rows = Σ t·h·w
    vid = tiny_processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    for row, es in enumerate(batch.entries):
        assert int((x["input_ids"][row] == vid).sum()) == sum(e.num_tokens() for e in es)
    assert x["pixel_values_videos"].shape[0] == int(x["video_grid_thw"].prod(1).sum())
    # the fps actually sampled: 2 fps file at 2 fps -> 1 s per temporal grid; static 10 fps file,
    # 40 frames -> 8 frames at [0, 6, 11, 17, 22, 28, 33, 39]; the fast run 6..39 spans 3.3 s
    # with 6 gaps -> 1.818 fps; a single-frame run takes the clip's 8 / 40 · 10 = 2.0 fps
    np.testing.assert_allclose(x["second_per_grid_ts"].numpy()[:6], 1.0, rtol=1e-6)
    assert batch.entries[1][1].fps == pytest.approx(6 / 3.3)
    assert batch.entries[1][0].fps == pytest.approx(2.0)
    np.testing.assert_allclose(x["second_per_grid_ts"].numpy(), [2 / e.fps for e in entries],
                               rtol=1e-6)
    # left padding: the shortest row starts with padding
    lengths = x["attention_mask"].sum(1)
    assert lengths.max() == x["input_ids"].shape[1] and lengths.min() < lengths.max()
    assert int(x["attention_mask"][lengths.argmin(), 0]) == 0


def test_timestamps_in_text_follow_the_runs(tiny_processor, videos):
    batch = build_qwen_video_inputs([conv(videos["cuts"])], tiny_processor, **SMALL)
    text = batch.texts[0]
    stamps = ["<0.0s>", "<0.5s>", "<3.0s>", "<3.5s>", "<5.5s>", "<6.0s>"]
    assert [text.index(s) for s in stamps] == sorted(text.index(s) for s in stamps)
    assert text.count("<|video_pad|>") == 6
    assert text.index("<3.0s><|vision_start|><|video_pad|>") > 0


def _oracle(ids, grids, secs, video_id, tps=4, merge=2):
    """The Qwen2.5-VL release's rule, one token at a time (slow and obvious)."""
    out, nxt, g, i = [], 0, 0, 0
    while i < len(ids):
        if ids[i] != video_id:
            out.append((nxt, nxt, nxt))
            nxt, i = nxt + 1, i + 1
            continue
        t, h, w = grids[g]
        block = [(nxt + int(a * secs[g] * tps), nxt + b, nxt + c)
                 for a in range(t) for b in range(h // merge) for c in range(w // merge)]
        out += block
        nxt = max(max(p) for p in block) + 1
        i, g = i + len(block), g + 1
    return out


def test_position_ids_against_transformers_get_rope_index(tiny_processor, tiny_model, videos):
    batch = build_qwen_video_inputs([conv(videos["cuts"]), conv(videos["static"]),
                                     conv(videos["pan"])], tiny_processor, **SMALL)
    x, cfg = batch.inputs, tiny_model.config
    tf_pos, tf_delta = tiny_model.model.get_rope_index(
        x["input_ids"], x["mm_token_type_ids"], video_grid_thw=x["video_grid_thw"],
        second_per_grid_ts=x["second_per_grid_ts"], attention_mask=x["attention_mask"])
    ours, delta = qwen25_position_ids(
        x["input_ids"], x["attention_mask"], x["video_grid_thw"], x["second_per_grid_ts"],
        video_token_id=cfg.video_token_id, tokens_per_second=cfg.vision_config.tokens_per_second)
    grids, secs, g = x["video_grid_thw"].tolist(), x["second_per_grid_ts"].tolist(), 0
    for row in range(3):
        keep = x["attention_mask"][row].bool()
        ids = x["input_ids"][row][keep].tolist()
        n = len(batch.entries[row])
        expect = torch.tensor(_oracle(ids, grids[g:g + n], secs[g:g + n], cfg.video_token_id)).T
        g += n
        assert torch.equal(ours[:, row, keep], expect)
        assert int(delta[row]) == int(expect.max()) + 1 - len(ids)
        vis = torch.tensor(ids) == cfg.video_token_id
        tf = tf_pos[:, row, keep]
        # inside each video block transformers agrees with the release (offsets from block start)
        edges = torch.diff(torch.cat([torch.tensor([0]), vis.int(), torch.tensor([0])]))
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        for s, e in zip(starts.tolist(), ends.tolist()):
            assert torch.equal(tf[:, s:e] - tf[1, s], expect[:, s:e] - expect[1, s])
        # ...and everything agrees up to the end of the first video with several temporal grids
        first_multi = next(i for i, gr in enumerate(grids[g - n:g]) if gr[0] > 1)
        cut = int(ends[first_multi])
        assert torch.equal(tf[:, :cut], expect[:, :cut])
        assert int(tf[0, cut]) < int(expect[0, cut])  # then transformers restarts text too early
    # transformers 5.24 resumes text at start + max(h, w)/2 after a multi-grid video, so text
    # re-uses the video's temporal positions; the release resumes after the largest position
    assert not torch.equal(tf_pos[:, x["attention_mask"].bool()], ours[:, x["attention_mask"].bool()])


def test_hand_worked_positions():
    # 2 text tokens, a video of grid (2, 4, 6) at 1 s per grid, tokens_per_second 4, 1 text token
    v = 9
    ids = torch.tensor([[1, 2] + [v] * 12 + [3]])
    pos, delta = qwen25_position_ids(ids, None, torch.tensor([[2, 4, 6]]), torch.tensor([1.0]),
                                     video_token_id=v, tokens_per_second=4)
    t = [2] * 6 + [6] * 6                    # start 2; second grid at 2 + 1·4
    h = [2, 2, 2, 3, 3, 3] * 2
    w = [2, 3, 4] * 4
    assert pos[0, 0].tolist() == [0, 1] + t + [7]   # text resumes at max(6, 3, 4) + 1
    assert pos[1, 0].tolist() == [0, 1] + h + [7]
    assert pos[2, 0].tolist() == [0, 1] + w + [7]
    assert delta.tolist() == [[8 - 15]]


def test_hand_worked_positions_qwen2_left_padded():
    # Qwen2-VL: time advances 1 per temporal grid (no second_per_grid_ts); row 0 is left-padded
    # by 2 and padding reads 1 on every axis (as transformers' get_rope_index writes it).
    from mmrl.video import qwen2_position_ids
    v = 9
    ids = torch.tensor([[0, 0, 1] + [v] * 12 + [3], [1, 2, 3] + [v] * 12 + [4]])
    mask = torch.tensor([[0, 0] + [1] * 14, [1] * 16])
    grid = torch.tensor([[2, 4, 6], [2, 4, 6]])
    pos, delta = qwen2_position_ids(ids, mask, grid, video_token_id=v)
    t, h, w = [1] * 6 + [2] * 6, [1, 1, 1, 2, 2, 2] * 2, [1, 2, 3] * 4  # start 1: after 1 token
    assert pos[:, 0].tolist() == [[1, 1, 0] + t + [4], [1, 1, 0] + h + [4], [1, 1, 0] + w + [4]]
    t, h, w = [i + 2 for i in t], [i + 2 for i in h], [i + 2 for i in w]  # start 3
    assert pos[:, 1].tolist() == [[0, 1, 2] + t + [6], [0, 1, 2] + h + [6], [0, 1, 2] + w + [6]]
    assert delta.tolist() == [[5 - 14], [7 - 16]]


def test_model_runs_on_the_batch_with_our_positions(tiny_processor, tiny_model, videos):
    batch = build_qwen_video_inputs([conv(videos["cuts"]), conv(videos["pan"])], tiny_processor,
                                    **SMALL)
    x, cfg = batch.inputs, tiny_model.config
    pos, _ = qwen25_position_ids(x["input_ids"], x["attention_mask"], x["video_grid_thw"],
                                 x["second_per_grid_ts"], video_token_id=cfg.video_token_id,
                                 tokens_per_second=cfg.vision_config.tokens_per_second)
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    out = tiny_model(**x, position_ids=pos, labels=labels)
    assert out.logits.shape[:2] == x["input_ids"].shape and torch.isfinite(out.loss)
    out.loss.backward()  # gradients reach the vision tower through every video entry
    grad = tiny_model.model.visual.patch_embed.proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    tiny_model.zero_grad(set_to_none=True)


def test_uniform_mode_equals_qwen_vl_utils(tiny_processor, videos):
    from qwen_vl_utils import process_vision_info
    messages = conv(videos["cuts"])
    batch = build_qwen_video_inputs([messages], tiny_processor, mode="uniform")
    _, vids, _ = process_vision_info([messages], return_video_kwargs=True,
                                     return_video_metadata=True)
    frames, meta = zip(*vids)
    text = tiny_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = tiny_processor(text=[text], videos=list(frames), video_metadata=list(meta),
                         do_sample_frames=False, cap_pixels_per_frame=False, return_tensors="pt",
                         size={"shortest_edge": 128 * 784, "longest_edge": 768 * 784})
    x = batch.inputs
    assert torch.equal(x["input_ids"], ref["input_ids"])
    assert torch.equal(x["video_grid_thw"], ref["video_grid_thw"])
    # 112x168 raised to 128 tokens: beta = 2.309 -> ceil to 280x392 = 10 x 14 = 140 tokens/frame
    assert x["video_grid_thw"].tolist() == [[7, 20, 28]]
    np.testing.assert_allclose(x["second_per_grid_ts"], ref["second_per_grid_ts"], rtol=1e-6)
    # same pixels up to our uint8 rounding after the bicubic resize (1/255 / CLIP std ≈ 0.015)
    assert (x["pixel_values_videos"] - ref["pixel_values_videos"]).abs().max() < 0.04
    # ...and before the processor our resized uint8 frames are exactly qwen-vl-utils' frames
    ours = batch.entries[0][0].frames.permute(0, 3, 1, 2).float()  # [n, h, w, 3] -> [n, 3, h, w]
    assert torch.equal(ours, frames[0])


def test_uniform_size_total_token_bound():
    # 1024 frames: 0.9 · 128000 tokens · 2 / 1024 = 225 tokens a frame = 176400 px (15 x 15)
    from mmrl.video.qwen_inputs import uniform_size
    assert uniform_size(448, 448, 1024) == (420, 420)
    assert uniform_size(720, 1280, 1024) == (308, 560)  # 11 x 20 = 220 <= 225 tokens
    assert uniform_size(720, 1280, 16) == (560, 1008)  # few frames: 768 tokens a frame bind


def test_odd_frame_count_is_padded_with_the_last_frame(tiny_processor):
    colors = [10, 120, 250]  # three flat frames: the resize keeps each value exactly
    frames = torch.tensor(colors, dtype=torch.uint8)[:, None, None, None].expand(3, 56, 56, 3)
    batch = build_qwen_video_inputs([conv(frames.clone())], tiny_processor, mode="uniform")
    entry = batch.entries[0][0]
    assert entry.num_real == 3 and entry.frames.shape[0] == 4
    assert [int(f.float().mean()) for f in entry.frames] == colors + [250]


def test_bad_videos_are_skipped_and_counted(tiny_processor, videos, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    counter = SkipCounter()
    convs = [conv(str(tmp_path / "missing.mp4")), conv(videos["cuts"]), conv(str(bad))]
    batch = build_qwen_video_inputs(convs, tiny_processor, counter=counter, **SMALL)
    assert batch.kept == [1] and batch.skipped == {0: "missing", 2: "corrupt"}
    assert batch.inputs["input_ids"].shape[0] == 1 and counter.total == 2
    empty = build_qwen_video_inputs(convs[:1], tiny_processor, counter=counter, **SMALL)
    assert empty.inputs is None and empty.kept == [] and counter.total == 3
    over = build_qwen_video_inputs([conv(videos["cuts"])], tiny_processor, token_budget=50,
                                  counter=counter, **SMALL)
    assert over.skipped == {0: "over_budget"} and counter.by_reason["over_budget"] == 1
    with pytest.raises(VideoError, match="missing.mp4'.*file not found"):
        build_qwen_video_inputs(convs, tiny_processor, on_error="raise")
    with pytest.raises(ValueError, match="mode='fast' is not one of slow_fast, uniform"):
        build_qwen_video_inputs(convs, tiny_processor, mode="fast")


def test_two_videos_in_one_conversation_and_frames_input(tiny_processor, videos):
    clip = read_video(videos["pan"])
    frames = clip.frames.permute(0, 3, 1, 2).float()      # qwen-vl-utils layout
    batch = build_qwen_video_inputs([conv(videos["cuts"], frames)], tiny_processor, **SMALL)
    n_cuts = len(build_qwen_video_inputs([conv(videos["cuts"])], tiny_processor,
                                         **SMALL).entries[0])
    assert len(batch.plans[0]) == 2 and len(batch.entries[0]) > n_cuts
    assert batch.texts[0].count("<|video_pad|>") == len(batch.entries[0])
    assert batch.inputs["video_grid_thw"].shape[0] == len(batch.entries[0])


def test_text_only_conversation(tiny_processor):
    batch = build_qwen_video_inputs([[{"role": "user", "content": "hi"}]], tiny_processor)
    assert batch.kept == [0] and batch.entries == [[]] and "pixel_values_videos" not in batch.inputs
    assert tiny_processor.decode(batch.inputs["input_ids"][0]).startswith("<|im_start|>user\nhi")
