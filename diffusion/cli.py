"""``mmrl diffusion ...``: helpers for the diffusion job (training itself is ``mmrl train``)."""
from __future__ import annotations

import argparse
import sys


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "diffusion", help="flow-matching text-to-image helpers (tiny demo pipeline, grids)",
        description="Helpers for the diffusion job. Train with: mmrl train "
                    "configs/diffusion/<recipe>.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="diffusion_command", metavar="SUBCOMMAND")
    tiny = sub.add_parser(
        "tiny-pipeline", help="write a tiny random SD3-architecture pipeline (the demo model)",
        description="Build a tiny, randomly initialised StableDiffusion3Pipeline from config "
                    "(no download) and save_pretrained it; the diffusion job loads it by path "
                    "like any SD3 checkpoint.",
        epilog="example:\n  mmrl diffusion tiny-pipeline runs/tiny-sd3\n"
               "  mmrl diffusion tiny-pipeline runs/tiny-sd3-linear --vae linear\n"
               "  mmrl train configs/demo/diffusion_tiny.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    tiny.add_argument("out_dir", help="directory to write (model_index.json + components)")
    tiny.add_argument("--size", type=int, default=16, help="image side in pixels (default 16)")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    tiny.add_argument("--vae", choices=("random", "linear"), default="random",
                      help="random: the tests' tiny VAE (default); linear: a decoder set to a "
                           "per-pixel linear latent -> RGB map, every colour reachable (the "
                           "prompt-following demo's)")
    tiny.add_argument("--overwrite", action="store_true",
                      help="rebuild even if the directory already holds a pipeline")
    tiny.set_defaults(func=_tiny)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def _tiny(args) -> int:
    from mmrl.diffusion.models.sd3 import save_tiny_sd3

    if args.size < 2:
        print(f"mmrl diffusion tiny-pipeline: --size {args.size}; expected >= 2",
              file=sys.stderr)
        return 2
    out = save_tiny_sd3(args.out_dir, size=args.size, seed=args.seed,
                        overwrite=args.overwrite, vae=args.vae)
    print(f"tiny SD3 pipeline in {out}")
    return 0
