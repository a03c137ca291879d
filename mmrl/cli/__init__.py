"""The ``mmrl`` command: :func:`main` (the entry point, defined in :mod:`mmrl.cli.app`) and the
core commands (``train``, ``config``, ``algos``); domain packages add theirs as plugins (see
:mod:`mmrl.cli.app`). Importing it loads no torch."""
from mmrl.cli.app import (PLUGINS, USER_ERRORS, Parser, Plugin, build_parser, main,
                          report_user_error)

__all__ = ["PLUGINS", "USER_ERRORS", "Parser", "Plugin", "build_parser", "main",
           "report_user_error"]
