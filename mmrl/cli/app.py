"""The ``mmrl`` command line.

Sub-commands live with the code they drive: the core adds ``train``, ``config`` and ``algos``;
each domain package adds its own through a module with ``add_commands(subparsers)`` listed in
:data:`PLUGINS` with its one-line help. A plugin module is imported only when its command is
run (``mmrl video --help`` imports the video CLI, ``mmrl --help`` none), so the command answers
at once, works without the optional extras, and a missing extra becomes one clear message
instead of a traceback. A command sets ``func`` (``args -> int``) with
``parser.set_defaults(func=...)``.

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
from typing import Iterable, NamedTuple, Optional, Sequence

class Plugin(NamedTuple):
    """A top-level command added by a module's ``add_commands(subparsers)``."""

    help: str  # the one line ``mmrl --help`` shows (the module's own parser says the same)
    module: str  # imported only when the command is run (or a full parser is built)
    extra: Optional[str]  # the pip extra it needs (None: the core's dependencies)


# The plugin commands, listed without importing them: ``mmrl --help`` and the core commands
# (train, config, algos; :mod:`mmrl.cli.core`) load no plugin and no torch.
PLUGINS = {
    "sim": Plugin("simulators (rollout budget strategies)", "mmrl.budget.sim_cli", None),
    "reward": Plugin("score, evaluate and serve reward models", "mmrl.rewards.cli",
                     "rewards"),
    "video": Plugin("inspect videos as mmrl feeds them to Video-LLMs", "mmrl.video.cli", "video"),
    "diffusion": Plugin("flow-matching text-to-image helpers (tiny demo pipeline, grids)",
                        "mmrl.diffusion.cli", "diffusion"),
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


def _add_plugin(sub, command: str, plugin: Plugin) -> None:
    """Import ``plugin.module`` and let it add its commands; a missing extra becomes a command
    that says how to install it."""
    try:
        mod = importlib.import_module(plugin.module)
    except ModuleNotFoundError as err:
        missing = f"{plugin.module} is not in this version of mmrl" if err.name == plugin.module \
            else f"{err.name} is missing"
        p = sub.add_parser(command, help=f"(needs mmrl[{plugin.extra or 'all'}]: {missing})")
        p.set_defaults(func=_missing_extra(command, plugin.extra or "all", err))
        return
    mod.add_commands(sub)


def requested_command(argv: Sequence[str]) -> Optional[str]:
    """The top-level command word in ``argv`` (the first that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(load: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The ``mmrl`` parser. ``load``: the plugin commands whose modules are imported to add
    their sub-commands and options (default: all of them); every other plugin command is listed
    by its one-line help only, so ``mmrl --help`` imports no plugin."""
    parser = Parser(
        prog="mmrl",
        description="Group-relative RL (GRPO, DAPO, GSPO, SAPO, Reg-GRPO, TW-GRPO, ...) for "
                    "video-language and flow-matching text-to-image models.",
        epilog="Run 'mmrl COMMAND --help' for the options of each command.")
    parser.add_argument("--version", action="version", version="mmrl 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from mmrl.cli import core
    core.add_commands(sub)
    load = set(PLUGINS) if load is None else set(load)
    for command, plugin in PLUGINS.items():
        if command in load:
            _add_plugin(sub, command, plugin)
        else:
            sub.add_parser(command, help=plugin.help)
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
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(load=[requested_command(argv)])
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
