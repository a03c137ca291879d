"""``mmrl diffusion ...``: helpers for the diffusion job (training itself is ``mmrl train``)."""
from __future__ import annotations

import argparse
import sys

from mmrl.diffusion.models import FAMILIES
from mmrl.registry import did_you_mean


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "diffusion", help="flow-matching text-to-image helpers (tiny demo pipeline, grids)",
        description="Helpers for the diffusion job. Train with: mmrl train "
                    "configs/diffusion/<recipe>.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="diffusion_command", metavar="SUBCOMMAND")
    tiny = sub.add_parser(
        "tiny-pipeline", help="write a tiny random pipeline of a family (the demo models)",
        description="Build a tiny, randomly initialised pipeline of a flow family (default "
                    "sd3: a StableDiffusion3Pipeline; wan: a WanPipeline making videos) from "
                    "config (no download) and save_pretrained it; the diffusion job loads it "
                    "by path like any checkpoint of that family.",
        epilog="examples:\n  mmrl diffusion tiny-pipeline runs/tiny-sd3-demo --demo\n"
               "  mmrl train configs/demo/diffusion_tiny.yaml\n"
               "  mmrl diffusion tiny-pipeline runs/tiny-wan --family wan --size 32 --demo\n"
               "  mmrl train configs/demo/diffusion_video_tiny.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    tiny.add_argument("out_dir", help="directory to write (model_index.json + components)")
    tiny.add_argument("--family", default="sd3",
                      help=f"flow family (one of: {', '.join(FAMILIES)}; default sd3)")
    tiny.add_argument("--size", type=int, default=16, help="image side in pixels (default 16)")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    tiny.add_argument("--demo", action="store_true",
                      help="the demos' pipeline: sd3, a VAE decoder set to a per-pixel linear "
                           "latent -> RGB map (every colour reachable); wan (9 frames), a VAE "
                           "decoding latent channel 0 to a smooth grey video and one "
                           "transformer token per video")
    tiny.add_argument("--overwrite", action="store_true",
                      help="rebuild even if the directory already holds a pipeline")
    tiny.set_defaults(func=_tiny)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def _tiny(args) -> int:
    from mmrl.diffusion.models import adapter_class

    if args.size < 2:
        print(f"mmrl diffusion tiny-pipeline: --size {args.size}; expected >= 2",
              file=sys.stderr)
        return 2
    if args.family not in FAMILIES:
        print(f"mmrl diffusion tiny-pipeline: --family {args.family!r}; expected one of "
              f"{', '.join(FAMILIES)}{did_you_mean(args.family, FAMILIES)}", file=sys.stderr)
        return 2
    if args.demo and args.family not in ("sd3", "wan"):
        print(f"mmrl diffusion tiny-pipeline: --demo with --family {args.family}; the demos' "
              f"pipelines are sd3 and wan: drop --demo or use one of them", file=sys.stderr)
        return 2
    if args.demo and args.family == "wan" and args.size % 8:
        print(f"mmrl diffusion tiny-pipeline: --demo --size {args.size}; expected a multiple "
              f"of 8 (e.g. 32)", file=sys.stderr)
        return 2
    options = {"demo": True} if args.demo else {}
    out = adapter_class(args.family).build_tiny(args.out_dir, size=args.size, seed=args.seed,
                                                overwrite=args.overwrite, **options)
    print(f"tiny {args.family} pipeline in {out}")
    return 0
