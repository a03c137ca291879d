"""The ``mmrl`` command line.

Sub-commands live with the code they drive: the core adds ``train``, ``config`` and ``algos``;
each domain package adds its own through a module with ``add_commands(subparsers)`` listed in
``PLUGINS`` (imported lazily, so ``mmrl --help`` works without the optional extras and a missing
extra becomes one clear message instead of a traceback). A command sets ``func`` (``args -> int``)
with ``parser.set_defaults(func=...)``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# module -> (the top-level commands it adds, the pip extra it needs)
PLUGINS = {
    "mmrl.core_cli": ((), None),
    "mmrl.sim": (("sim",), None),
    "mmrl.rewards.cli": (("reward",), "rewards"),
    "mmrl.video.cli": (("video",), "video"),
    "mmrl.diffusion.cli": (("diffusion",), "diffusion"),
}


def _missing_extra(command: str, extra: str, err: Exception):
    def run(_args) -> int:
        print(f"mmrl {command}: needs the optional dependencies of mmrl[{extra}] ({err}).\n"
              f"Install them with: pip install 'mmrl[{extra}]'", file=sys.stderr)
        return 2
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmrl",
        description="Group-relative RL (GRPO, DAPO, GSPO, SAPO, Reg-GRPO, TW-GRPO, ...) for "
                    "video-language and flow-matching text-to-image models.",
        epilog="Run 'mmrl COMMAND --help' for the options of each command.")
    parser.add_argument("--version", action="version", version="mmrl 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, (commands, extra) in PLUGINS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name == module:  # the plugin is not written yet: nothing to add
                continue
            for cmd in commands:
                p = sub.add_parser(cmd, help=f"(needs mmrl[{extra}]: {err.name} is missing)")
                p.set_defaults(func=_missing_extra(cmd, extra or "all", err))
            continue
        mod.add_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
