"""``mmrl reward list|score|eval|serve|convert``: reward models from the command line.

A scorer is written ``NAME[:key=value[:key=value...]]``, several joined by commas, e.g.
``pickscore:path=/ckpt/PickScore_v1,hps_v2.1:path=/ckpt/HPS_v2.1_compressed.pt``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import signal
import sys
import threading
from typing import List

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

SPEC_HELP = ("scorer spec NAME[:key=value...], e.g. 'pickscore:path=/ckpt/PickScore_v1', "
             "'clip_score:variant=hessel', 'color:target=[1,0,0]'; see 'mmrl reward list'")


def _load_all(spec: str, args):
    """``{column name: scorer}`` for a comma-separated spec (device/dtype where taken)."""
    from mmrl.rewards.scorers import accepted_options, load, parse_specs
    out = {}
    for name, opts in parse_specs(spec):
        ok = accepted_options(name)
        for key in ("device", "dtype", "batch_size"):
            value = getattr(args, key, None)
            if value is not None and key in ok:
                opts.setdefault(key, value)
        opts.pop("weight", None)
        col, k = name, 2
        while col in out:
            col, k = f"{name}#{k}", k + 1
        print(f"loading {name} ...", file=sys.stderr, flush=True)
        out[col] = load(name, **opts)
    return out


def _add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--device", help="cuda, cuda:1, cpu ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="model precision "
                   "(default fp32)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="images per forward pass")


def _image_files(items: List[str]) -> List[str]:
    files = []
    for it in items:
        if os.path.isdir(it):
            files += sorted(os.path.join(it, f) for f in os.listdir(it)
                            if f.lower().endswith(IMAGE_EXTS))
        elif os.path.isfile(it):
            files.append(it)
        else:
            raise FileNotFoundError(f"--images {it!r} is neither a file nor a folder")
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) in {items}")
    return files


def _prompts(args, n: int, needed: bool) -> List[str]:
    if args.prompt is not None:
        return [args.prompt] * n
    if args.prompts is None:
        if needed:
            raise ValueError("this scorer reads prompts: pass --prompts FILE (one line per "
                             "image, or one line for all) or --prompt TEXT")
        return [""] * n
    with open(args.prompts) as f:
        lines = [ln.rstrip("\n") for ln in f if ln.strip()]
    if len(lines) == 1:
        return lines * n
    if len(lines) != n:
        raise ValueError(f"--prompts {args.prompts} has {len(lines)} lines for {n} images; "
                         f"give one line per image (in sorted file order) or a single line")
    return lines


def cmd_list(args) -> int:
    from mmrl.rewards.scorers import JUDGES, SCORERS, accepted_options, scorer_class
    for title, names in (("scorers (score one sample: --scorer NAME, diffusion.reward)", SCORERS),
                         ("pairwise judges (compare two: pref_winrate:judge=NAME, reward eval "
                          "--scorer NAME)", JUDGES)):
        print(title)
        for name in names:
            try:
                cls = scorer_class(name)
                doc = (cls.__doc__ or "").strip().splitlines()[0]
                opts = ", ".join(accepted_options(name))
            except ImportError as err:
                doc, opts = f"(unavailable: {err})", ""
            print(f"  {name:20s} {doc}\n  {'':20s} options: {opts}")
    return 0


def cmd_score(args) -> int:
    from PIL import Image
    scorers = _load_all(args.scorer, args)
    files = _image_files(args.images)
    needed = any(getattr(s, "uses_prompts", True) for s in scorers.values())
    prompts = _prompts(args, len(files), needed)
    columns = {}
    for col, scorer in scorers.items():
        values = []
        for start in range(0, len(files), 64):
            images = []
            for path in files[start:start + 64]:
                with Image.open(path) as im:
                    im.load()
                    images.append(im)
            values += scorer(images, prompts[start:start + 64]).detach().cpu().tolist()
            print(f"{col}: {min(start + 64, len(files))}/{len(files)} images", file=sys.stderr,
                  flush=True)
        columns[col] = values
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        w = csv.writer(out)
        w.writerow(["image", "prompt", *columns])
        for i, path in enumerate(files):
            w.writerow([path, prompts[i], *(f"{columns[c][i]:.6g}" for c in columns)])
    finally:
        if args.out:
            out.close()
            print(f"wrote {len(files)} rows to {args.out}", file=sys.stderr)
    return 0


def _eval_lines(name: str, rep) -> List[str]:
    """The printed summary of one scorer's report."""
    pct = lambda x: "n/a" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    if rep.get("protocol") == "videogen":
        out = []
        for dim, d in rep["dimensions"].items():
            lo, hi = d["ci95_without_ties"] or (float("nan"), float("nan"))
            col = "" if d["column"] is None else f" (column {d['column']})"
            line = (f"{name:20s} {dim:8s} w/o ties {pct(d['accuracy_without_ties'])} "
                    f"[{100 * lo:.2f}, {100 * hi:.2f}]  w/ ties {pct(d['accuracy_with_ties'])} "
                    f"(eps {d['tie_threshold']:.4g})  pairs {d['n_pairs']}, human ties "
                    f"{d['n_human_ties']}{col}")
            if d.get("accuracy_by_order"):
                o = d["accuracy_by_order"]
                line += f"  orders {pct(o['as_given'])} / {pct(o['swapped'])}"
            out.append(line)
        return out
    lo, hi = rep["ci95"]
    line = (f"{name:20s} accuracy {pct(rep['accuracy'])} [{100 * lo:.2f}, {100 * hi:.2f}] "
            f"({rep['protocol']})")
    if "n_equal" in rep:
        line += (f"  correct {rep['n_correct']}, equal {rep['n_equal']}, incorrect "
                 f"{rep['n_incorrect']} of {rep['n_pairs']} pairs")
    if "accuracy_by_order" in rep:
        o = rep["accuracy_by_order"]
        line += f"  as given {pct(o['as_given'])}, swapped {pct(o['swapped'])}"
    if "inversion_score" in rep:
        line += f"  inversion score {pct(rep['inversion_score'])}"
    if "tie_threshold" in rep:
        line += f"  tie threshold {rep['tie_threshold']:.4g} ({rep['tie_threshold_source']})"
    for key, label in (("mean_prob_best", "p(best)"), ("mean_prob_preferred", "p(chosen)")):
        if rep.get(key) is not None:
            line += f"  mean {label} {rep[key]:.4f}"
    return [line]


def cmd_eval(args) -> int:
    from mmrl.rewards.evaluate import bar_chart, check_options, evaluate
    check_options(args.format, args.protocol, args.tie_threshold, args.probs)  # before loading
    scorers = _load_all(args.scorer, args)
    report = evaluate(scorers, args.data, args.format, image_root=args.image_root,
                      tie_threshold=args.tie_threshold, n_boot=args.bootstrap, seed=args.seed,
                      progress=not args.quiet, protocol=args.protocol, probs=args.probs)
    if args.format == "hpdv3":
        print(f"HPDv3 {report['mode']} file, {report['n_records']} items")
    for name, rep in report["scorers"].items():
        print("\n".join(_eval_lines(name, rep)))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "report.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}", file=sys.stderr)
        if len(report["scorers"]) > 1:
            print(f"wrote {bar_chart(report, os.path.join(args.out, 'accuracy.png'))}",
                  file=sys.stderr)
    return 0


def _serve_token(args):
    """``(token or None, how it was chosen)`` for ``serve``; ``(new token, None)`` when the
    token is generated (its file is named after the bound port, known once the server binds)."""
    from mmrl.rewards.server import TOKEN_ENV, read_token_file, write_token_file
    if args.no_token:
        return None, "no token: any local process may score"
    if args.token is not None:
        if not args.token.strip():
            raise ValueError("--token ''; expected a non-empty secret (or --no-token)")
        print("warning: --token is visible to every user of this machine (ps, /proc); prefer "
              "--token-file PATH or $" + TOKEN_ENV, file=sys.stderr)
        return args.token, "token from --token"
    if args.token_file is not None:
        if os.path.exists(args.token_file):
            return read_token_file(args.token_file), f"token from {args.token_file}"
        token = secrets.token_urlsafe(32)
        write_token_file(args.token_file, token)
        return token, f"new token written to {args.token_file} (mode 0600)"
    env = args.token_env or TOKEN_ENV
    if os.environ.get(env):
        return os.environ[env], f"token from ${env}"
    if args.token_env is not None:
        raise ValueError(f"--token-env {env}: the variable is unset or empty; export it, or "
                         f"drop --token-env to have a token generated")
    return secrets.token_urlsafe(32), None


def build_server(args):
    """``(server, banner, generated token file or None)`` for parsed ``serve`` arguments.

    Without --token, --token-file, --no-token or the token variable, a random token is written
    to :func:`mmrl.rewards.server.default_token_file` (0600), where ``load("remote")`` on this
    machine finds it; the caller deletes that file when the server stops.
    """
    from mmrl.rewards.server import RewardServer, default_token_file, write_token_file
    scorers = _load_all(args.scorer, args)
    if len(scorers) != 1:
        raise ValueError(f"serve takes one scorer; got {list(scorers)} (start one server each)")
    token, auth = _serve_token(args)
    server = RewardServer(next(iter(scorers.values())), host=args.host, port=args.port,
                          token=token, max_request_bytes=int(_limit(args.max_request_mb) * 2**20),
                          max_batch=_limit(args.max_batch),
                          max_image_pixels=_limit(args.max_image_pixels),
                          max_request_pixels=_limit(args.max_request_pixels),
                          max_video_frames=_limit(args.max_video_frames),
                          max_connections=_limit(args.max_connections),
                          max_active=_limit(args.max_active),
                          batching=not args.no_batching,
                          batch_window_ms=_limit(args.batch_window_ms),
                          allowed_hosts=args.allow_host, log=not args.quiet)
    path = None
    if auth is None:
        path = default_token_file(server.port)
        try:
            write_token_file(path, token)
        except OSError:
            server.stop()
            raise
        auth = f"new token in {path} (mode 0600; load('remote') on this machine reads it)"
    return server, f"serving {args.scorer} on {server.url} ({auth}; Ctrl-C to stop)", path


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, docker stop) ends the server like Ctrl-C


def cmd_serve(args) -> int:
    server, banner, path = build_server(args)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # before the banner a client waits for
    try:  # an interrupt right after the banner still removes the token and exits 0
        print(banner, flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if path is not None and os.path.exists(path):
            os.remove(path)
    return 0


def cmd_convert(args) -> int:
    from mmrl.rewards.convert import convert
    n = convert(args.dataset, args.source, args.out, image_dir=args.image_dir, limit=args.limit)
    print(f"wrote {n} records to {args.out}")
    return 0


def _guarded(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except (ValueError, TypeError, ImportError, OSError, ConnectionError) as err:
            print(f"mmrl reward {args.reward_command}: {err}", file=sys.stderr)
            return 2
    return run


EPILOG = """examples:
  mmrl reward list
  mmrl reward score --scorer pickscore:path=/ckpt/PickScore_v1 --images out/ \\
      --prompts prompts.txt --out scores.csv
  mmrl reward eval --data /data/hpdv2/test.jsonl --format ranked --out reports/hpdv2 \\
      --scorer hps_v2.1:path=/ckpt/HPS_v2.1_compressed.pt,pickscore:path=/ckpt/PickScore_v1
  mmrl reward eval --data /data/HPDv3/test.json --format hpdv3 --scorer hpsv3:path=/ckpt/HPSv3
  mmrl reward eval --data /data/VideoGen-RewardBench/videogen-rewardbench.csv --format videogen \\
      --scorer videoreward:path=/ckpt/VideoReward
  mmrl reward serve imagereward:path=/ckpt/ImageReward --port 8765 --token-file ~/.rm.token
  mmrl reward convert hpdv2 /data/HPDv2/test.json --out /data/HPDv2/test.jsonl
"""


FMT = argparse.RawDescriptionHelpFormatter


def add_commands(subparsers) -> None:
    """Add ``mmrl reward ...`` to the top-level ``mmrl`` parser."""
    top = subparsers.add_parser("reward", help="score, evaluate and serve reward models",
                                description="Reward models: PickScore, HPS v2/v2.1, HPSv3, "
                                "ImageReward, CLIP score, aesthetic, VideoReward, VLM judges "
                                "(pointwise, and pairwise for Pref-GRPO win rates), video and "
                                "rule rewards.",
                                epilog=EPILOG, formatter_class=FMT, allow_abbrev=False)
    sub = top.add_subparsers(dest="reward_command", metavar="SUBCOMMAND")
    top.set_defaults(func=lambda a: (top.print_help(), 2)[1])
    p = sub.add_parser("list", help="registered scorers and pairwise judges, their options",
                       allow_abbrev=False)
    p.set_defaults(func=_guarded(cmd_list))
    _add_score(sub)
    _add_eval(sub)
    _add_serve(sub)
    _add_convert(sub)


def _add_score(sub):
    p = sub.add_parser("score", help="score images with prompts, write a CSV",
                       description="Score image files; prompts come one line per image (sorted "
                       "file order) or one line for all.", epilog=EPILOG, formatter_class=FMT,
                       allow_abbrev=False)
    p.add_argument("--scorer", required=True, help=SPEC_HELP + "; several: comma-separated")
    p.add_argument("--images", nargs="+", required=True, help="a folder and/or image files")
    p.add_argument("--prompts", help="text file: one prompt per image or a single line")
    p.add_argument("--prompt", help="one prompt for every image (instead of --prompts)")
    p.add_argument("--out", help="CSV to write (default: stdout)")
    _add_model_args(p)
    p.set_defaults(func=_guarded(cmd_score))


def _add_eval(sub):
    from mmrl.rewards.eval_data import FORMATS
    from mmrl.rewards.evaluate import RANKED_PROTOCOLS
    p = sub.add_parser("eval", help="pairwise accuracy on preference data",
                       description="Evaluate scorers (or pairwise judges) on preference data "
                       "with the published protocols (pairs: Pick-a-Pic tie threshold + half "
                       "credit; ranked: ImageRewardDB pair accuracy and HPDv2 inversion score; "
                       "hpdv3: HPDv3's test.json, pair or ranking items, as hpsv3's "
                       "evaluate.py; videogen: VideoGen-RewardBench accuracy without and with "
                       "ties per VQ/MQ/TA/Overall), with bootstrap 95%% intervals, a JSON "
                       "report and a bar chart.",
                       epilog=EPILOG, formatter_class=FMT, allow_abbrev=False)
    p.add_argument("--scorer", required=True, help=SPEC_HELP + "; several: comma-separated")
    p.add_argument("--data", required=True, help="the data file: JSONL (pairs, ranked), "
                   "HPDv3's test.json (hpdv3), VideoGen-RewardBench's CSV (videogen); see "
                   "docs/rewards.md")
    p.add_argument("--format", required=True, choices=list(FORMATS))
    p.add_argument("--out", help="folder for report.json (+ accuracy.png for several scorers)")
    p.add_argument("--image-root", help="folder image and video paths are relative to "
                   "(default: the data file's folder)")
    p.add_argument("--tie-threshold", type=float, help="pairs: fixed tau instead of tuning it "
                   "on the validation split")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default "
                   "1000; 0 disables)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--protocol", default="pairwise_pooled",
                   choices=list(RANKED_PROTOCOLS),
                   help="ranked: how pair accuracies combine: pooled over all lists (default; "
                   "ImageReward paper) or the mean of per-list accuracies (hpsv2's evaluation, "
                   "the HPS v2 paper's ImageRewardDB numbers); both are in report.json")
    p.add_argument("--probs", action="store_true", help="also report the mean softmax "
                   "probability of the human's choice over each prompt's candidates (meaningful "
                   "for logits, e.g. pickscore with normalize=none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_model_args(p)
    p.set_defaults(func=_guarded(cmd_eval))


class _ServerDefault:
    """A default of ``mmrl reward serve`` read from :mod:`mmrl.rewards.server` when first needed
    (its ``--help`` or a run): importing the server loads torch, which ``mmrl reward --help``
    and the other reward commands must not wait for."""

    def __init__(self, name: str, scale: float = 1.0):
        self.name, self.scale = name, scale

    def value(self):
        from mmrl.rewards import server
        value = getattr(server, self.name)
        return value / self.scale if self.scale != 1.0 else value

    def __int__(self) -> int:  # argparse's "%(default)d" in the help
        return int(self.value())

    def __float__(self) -> float:  # "%(default)g"
        return float(self.value())


def _limit(value):
    """An option's value, with a :class:`_ServerDefault` read from the server."""
    return value.value() if isinstance(value, _ServerDefault) else value


def _add_serve(sub):
    p = sub.add_parser("serve", help="serve one scorer over HTTP (for clashing dependencies)",
                       description="Serve a scorer over HTTP on loopback; train with "
                       "load('remote', url=...). A token is required by default: from "
                       "--token-file, $MMRL_REWARD_TOKEN, or generated into a 0600 file the "
                       "remote scorer on this machine reads. See docs/rewards.md.",
                       epilog=EPILOG, formatter_class=FMT, allow_abbrev=False)
    p.add_argument("scorer", help=SPEC_HELP)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; "
                   "any other address needs a token)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free)")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token-file", help="file holding the shared token; created with a new "
                      "random token (mode 0600) when missing")
    auth.add_argument("--token", help="the shared token itself; visible to other users in ps: "
                      "prefer --token-file or the environment variable")
    auth.add_argument("--no-token", action="store_true", help="serve without a token "
                      "(loopback only; any local user or process can then score)")
    p.add_argument("--token-env", help="environment variable holding the token (default "
                   "MMRL_REWARD_TOKEN, mmrl.rewards.server.TOKEN_ENV; when unset, a token is "
                   "generated into ~/.cache/mmrl/reward-HOST-PORT.token)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a host name clients may use in the URL besides IP addresses and "
                   "localhost (repeatable); other names get 403 (DNS rebinding)")
    p.add_argument("--max-request-mb", type=float, default=_ServerDefault("MAX_REQUEST_BYTES", 2**20),
                   help="request body limit in MiB (default %(default)g)")
    p.add_argument("--max-batch", type=int, default=_ServerDefault("MAX_BATCH"),
                   help="images, videos or pairs per request, and per merged model call "
                   "(default %(default)d)")
    p.add_argument("--max-image-pixels", type=int, default=_ServerDefault("MAX_IMAGE_PIXELS"),
                   help="pixels per image, checked before decoding (default %(default)d)")
    p.add_argument("--max-request-pixels", type=int, default=_ServerDefault("MAX_REQUEST_PIXELS"),
                   help="pixels per request, checked before decoding (default %(default)d)")
    p.add_argument("--max-video-frames", type=int, default=_ServerDefault("MAX_VIDEO_FRAMES"),
                   help="frames per video (video scorers), checked before decoding (default "
                   "%(default)d)")
    p.add_argument("--batch-window-ms", type=float, default=_ServerDefault("BATCH_WINDOW_MS"),
                   help="hold a batch open this many ms after its oldest request (default "
                   "%(default)g: no wait; requests pending together still go in one model call "
                   "of at most --max-batch items)")
    p.add_argument("--no-batching", action="store_true",
                   help="score each request alone in its own thread (one model call at a time)")
    p.add_argument("--max-connections", type=int, default=_ServerDefault("MAX_CONNECTIONS"),
                   help="open connections; more get 503 (default %(default)d)")
    p.add_argument("--max-active", type=int, default=_ServerDefault("MAX_ACTIVE"),
                   help="requests read, decoded, batched and scored at once (so also the most "
                   "requests one batch merges); bounds memory (default %(default)d)")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    _add_model_args(p)
    p.set_defaults(func=_guarded(cmd_serve))


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert HPDv2 / ImageRewardDB / Pick-a-Pic to JSONL",
                       epilog=EPILOG, formatter_class=FMT, allow_abbrev=False)
    p.add_argument("dataset", choices=["hpdv2", "imagerewarddb", "pickapic"])
    p.add_argument("source", help="test.json (hpdv2, imagerewarddb) or parquet file/folder/glob "
                   "(pickapic)")
    p.add_argument("--out", required=True, help="JSONL to write")
    p.add_argument("--image-dir", help="ranked sets: folder of the images (default: next to "
                   "test.json)")
    p.add_argument("--limit", type=int, help="pickapic: convert at most this many pairs")
    p.set_defaults(func=_guarded(cmd_convert))
