"""``mmrl video ...`` commands: look at what slow-fast encoding does to a video.

``mmrl video inspect VIDEO [--out sheet.png]`` prints one row per sampled frame (time, slow/fast,
similarity to the latest slow frame, tokens) and a summary against uniform sampling, and can write
a contact sheet PNG with slow frames framed in red and fast frames in blue.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List

SLOW_COLOR = (220, 40, 40)
FAST_COLOR = (40, 110, 230)

EPILOG = """examples:
  mmrl video inspect clip.mp4
  mmrl video inspect clip.mp4 --out sheet.png --threshold 0.95
  mmrl video inspect clip.mp4 --start 10 --end 40 --token-budget 16384 --json
  mmrl video inspect frames/*.jpg --fps 1     (a list of images is read as one video)

exit status: 0 on success, 2 when the video cannot be used (the message says why)."""


def add_commands(subparsers) -> None:
    """Add ``mmrl video inspect`` to the top-level ``mmrl`` parser's subparsers."""
    video = subparsers.add_parser(
        "video", help="inspect videos as mmrl feeds them to Video-LLMs",
        description="Video inputs for Video-LLM RL (decoding, Keye-VL 1.5 slow-fast encoding).",
        epilog="Run 'mmrl video inspect --help' for options.")
    video.set_defaults(func=lambda _args: (video.print_help(), 0)[1])
    sub = video.add_subparsers(dest="video_command", metavar="COMMAND")
    p = sub.add_parser(
        "inspect", help="table of slow/fast frames and a contact sheet",
        description="Decode VIDEO at --fps (qwen-vl-utils sampling), run the Keye-VL 1.5 "
                    "slow-fast plan and print one row per frame: time, slow/fast, similarity "
                    "to the latest slow frame, tokens. Token counts are per frame, 28x28 px each "
                    "(Qwen2.5-VL merges frame pairs, so its LLM sees about half).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", nargs="+", metavar="VIDEO",
                   help="a video file, or several image files read as frames")
    p.add_argument("--out", metavar="PNG", help="write a contact sheet (slow: red, fast: blue)")
    p.add_argument("--fps", type=float, default=2.0, help="frames sampled per second (2.0)")
    p.add_argument("--max-frames", type=int, default=None, help="at most this many frames (768)")
    p.add_argument("--start", type=float, default=None, help="start time in seconds")
    p.add_argument("--end", type=float, default=None, help="end time in seconds")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="similarity below which a frame is slow (code 0.9, paper 0.95)")
    p.add_argument("--patch-cos", type=float, default=0.7, help="patch cosine for 'similar' (0.7)")
    p.add_argument("--fast-ratio", type=float, default=0.3, help="fast/slow token ratio (0.3)")
    p.add_argument("--token-budget", type=int, default=65536, help="visual tokens (65536)")
    p.add_argument("--min-tokens", type=int, default=48, help="tokens per frame, minimum (48)")
    p.add_argument("--max-tokens", type=int, default=768, help="tokens per frame, maximum (768)")
    p.add_argument("--columns", type=int, default=8, help="contact sheet columns (8)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=inspect_command)


def inspect_command(args) -> int:
    """Run ``mmrl video inspect``; returns the exit status."""
    from .io import VideoError, read_video
    from .qwen_inputs import uniform_size
    from .slow_fast import slow_fast_plan

    problem = _out_problem(args.out) if args.out else None
    if problem:  # before decoding: a long decode must not end in an unwritable path
        print(f"mmrl video inspect: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    source = args.video[0] if len(args.video) == 1 else list(args.video)
    t0 = time.perf_counter()
    try:
        clip = read_video(source, fps=args.fps, max_frames=args.max_frames, start=args.start,
                          end=args.end)
        t1 = time.perf_counter()
        print(f"decoded {clip.num_frames} frames {clip.frames.shape[2]}x{clip.frames.shape[1]} "
              f"in {t1 - t0:.2f}s; planning...", file=sys.stderr)
        plan = slow_fast_plan(clip.frames, timestamps=clip.timestamps, threshold=args.threshold,
                              patch_cos=args.patch_cos, fast_ratio=args.fast_ratio,
                              token_budget=args.token_budget, min_tokens=args.min_tokens,
                              max_tokens=args.max_tokens)
    except (VideoError, ValueError) as err:
        print(f"mmrl video inspect: {err}", file=sys.stderr)
        return 2
    t2 = time.perf_counter()
    uh, uw = uniform_size(clip.frames.shape[1], clip.frames.shape[2], clip.num_frames)
    report = _report(clip, plan, uniform_tokens=clip.num_frames * (uh // 28) * (uw // 28),
                     decode_s=t1 - t0, plan_s=t2 - t1)
    print(json.dumps(report, indent=1) if args.json else _table(report))
    if args.out:
        _contact_sheet(clip, plan, args.out, args.columns)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _out_problem(out: str) -> str:
    """What keeps the contact sheet from being written to ``out`` ("" when nothing does)."""
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        return "is a directory; expected an image file path such as sheet.png"
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist; create it first (mkdir -p {folder})"
    if not os.access(folder, os.W_OK):
        return f"the folder {folder} is not writable"
    if os.path.splitext(out)[1].lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        return "expected a .png, .jpg, .webp or .bmp file name"
    return ""


def _report(clip, plan, uniform_tokens: int, decode_s: float, plan_s: float) -> dict:
    tokens = plan.tokens_per_frame.tolist()
    frames = [dict(index=i, time=round(float(plan.timestamps[i]), 3),
                   type="slow" if k == 0 else "fast", similarity=round(float(s), 4),
                   tokens=int(tok))
              for i, (k, s, tok) in enumerate(zip(plan.frame_types.tolist(),
                                                  plan.similarity.tolist(), tokens))]
    return dict(video=clip.path, native_fps=round(clip.fps, 3),
                sample_fps=round(clip.sample_fps, 3), frames=frames, num_slow=plan.num_slow,
                num_fast=plan.num_fast, slow_hw=list(plan.slow_hw), fast_hw=list(plan.fast_hw),
                total_tokens=plan.total_tokens, token_budget=plan.token_budget,
                uniform_tokens=uniform_tokens, decode_s=round(decode_s, 4),
                plan_s=round(plan_s, 4))


def _table(r: dict) -> str:
    lines = [f"{'frame':>5}  {'time':>8}  {'type':<4}  {'similarity':>10}  {'tokens':>6}"]
    for f in r["frames"]:
        lines.append(f"{f['index']:>5}  {f['time']:>7.2f}s  {f['type']:<4}  "
                     f"{f['similarity']:>10.3f}  {f['tokens']:>6}")
    lines.append(
        f"\n{r['video']}: {len(r['frames'])} frames at {r['sample_fps']} fps "
        f"(native {r['native_fps']}); {r['num_slow']} slow at {r['slow_hw'][1]}x"
        f"{r['slow_hw'][0]}, {r['num_fast']} fast at {r['fast_hw'][1]}x{r['fast_hw'][0]}; "
        f"{r['total_tokens']} tokens of {r['token_budget']} (uniform qwen-vl-utils: "
        f"{r['uniform_tokens']}); decode {r['decode_s']:.2f}s, plan {r['plan_s']:.2f}s")
    return "\n".join(lines)


def _contact_sheet(clip, plan, out: str, columns: int, thumb_w: int = 160) -> None:
    """A grid of thumbnails framed red (slow) or blue (fast), captioned time/type/similarity."""
    from PIL import Image, ImageDraw
    frames = clip.frames.numpy()
    t, h, w, _ = frames.shape
    thumb_h = max(1, round(thumb_w * h / w))
    cell_w, cell_h, border = thumb_w + 8, thumb_h + 22, 4
    cols = max(1, min(columns, t))
    rows = (t + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    kinds: List[int] = plan.frame_types.tolist()
    for i in range(t):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        color = SLOW_COLOR if kinds[i] == 0 else FAST_COLOR
        draw.rectangle([x, y, x + cell_w - 1, y + thumb_h + 2 * border - 1], fill=color)
        sheet.paste(Image.fromarray(frames[i]).resize((thumb_w, thumb_h)), (x + border, y + border))
        label = (f"{plan.timestamps[i]:.1f}s {'SLOW' if kinds[i] == 0 else 'fast'} "
                 f"{float(plan.similarity[i]):.2f}")
        draw.text((x + border, y + thumb_h + 2 * border + 1), label, fill=color)
    sheet.save(out)
