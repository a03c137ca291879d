"""The ``mmrl`` command line.

Sub-commands live with the code they drive: the core adds ``train``, ``config`` and ``algos``;
each domain package adds its own through a module with ``add_commands(subparsers)`` listed in
``PLUGINS`` (imported lazily, so ``mmrl --help`` works without the optional extras and a missing
extra becomes one clear message instead of a traceback). A command sets ``func`` (``args -> int``)
with ``parser.set_defaults(func=...)``.

Every parser in the tree is a :class:`Parser`: ``add_subparsers`` gives sub-parsers their
parent's class, so a plugin's ``add_parser`` calls need nothing special. Abbreviated long options
are off everywhere (``allow_abbrev=False``): ``--token`` must never be read as ``--token-env``.

Errors. :func:`main` turns a *user error* into one paragraph on stderr and exit status 2, with no
traceback: an exception of class ``ValueError`` (``ConfigError``, ``VideoError``, ... included),
``TypeError``, ``OSError`` (missing files, permissions, a full disk) or ``ImportError`` (a missing
extra). mmrl raises these classes only for problems a user can cause and names what was wrong
and how to fix it (STYLE.md); for those not raised as a :class:`mmrl.config.core.UserError` the
message also says where they were raised. Any other exception (``RuntimeError``, ``KeyError``,
``AttributeError``, ...) is a bug or an environment failure and keeps its traceback (exit 1).
``MMRL_TRACEBACK=1`` shows the traceback of every error. Ctrl-C outside training exits 130.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import Optional, Sequence

# module -> (the top-level commands it adds, the pip extra it needs)
PLUGINS = {
    "mmrl.cli.core": ((), None),
    "mmrl.budget.sim": (("sim",), None),
    "mmrl.rewards.cli": (("reward",), "rewards"),
    "mmrl.video.cli": (("video",), "video"),
    "mmrl.diffusion.cli": (("diffusion",), "diffusion"),
}


# Exceptions that report a user's mistake (see the module docstring); everything else is a bug.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with abbreviated long options off (``--tok`` is an error, not
    ``--token-env``). Sub-parsers made with ``add_subparsers().add_parser`` inherit the class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _missing_extra(command: str, extra: str, err: Exception):
    def run(_args) -> int:
        print(f"mmrl {command}: needs the optional dependencies of mmrl[{extra}] ({err}).\n"
              f"Install them with: pip install 'mmrl[{extra}]'", file=sys.stderr)
        return 2
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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


def _command_name(args) -> str:
    """``"mmrl config validate"``: the command words the user typed (for messages)."""
    words = ["mmrl", args.command or ""]
    for key in ("config_command", "video_command", "diffusion_command", "reward_command",
                "sim_command"):
        if getattr(args, key, None):
            words.append(getattr(args, key))
    return " ".join(w for w in words if w)


def _raised_at(err: BaseException) -> str:
    """``"mmrl/runner.py:85"``: where ``err`` was raised (the innermost frame), for a bug report."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return "?"
    parts = frames[-1].filename.replace(os.sep, "/").split("/")
    return f"{'/'.join(parts[-2:])}:{frames[-1].lineno}"


def report_user_error(command: str, err: BaseException, stream=None) -> None:
    """Print ``err`` as one paragraph: the command, the message and, for an exception that is not
    an mmrl ``UserError``, its class and where it was raised (a bug can hide behind a
    ``ValueError``; the location makes it findable)."""
    from mmrl.config.core import UserError
    stream = stream or sys.stderr
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text += f": {err.filename}"
    note = "" if isinstance(err, UserError) else \
        f"\n({type(err).__name__} raised at {_raised_at(err)}; set MMRL_TRACEBACK=1 for the " \
        f"traceback)"
    print(f"{command}: error: {text}{note}", file=stream, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``mmrl`` command line; returns the exit status (0 ok, 2 a user error, 130 Ctrl-C).

    User errors (see the module docstring) are printed without a traceback; other exceptions
    propagate (exit 1 with a traceback from the interpreter).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    if os.environ.get("MMRL_TRACEBACK", "") not in ("", "0"):
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        report_user_error(_command_name(args), err)
        return 2
    except KeyboardInterrupt:
        print(f"\n{_command_name(args)}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
