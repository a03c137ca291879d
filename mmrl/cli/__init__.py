"""The ``mmrl`` command: :func:`main` and the core commands (``train``, ``config``, ``algos``);
domain packages add theirs as plugins (see :mod:`mmrl.cli.main`). Importing it loads no torch."""
from mmrl.cli.main import PLUGINS, USER_ERRORS, Parser, build_parser, main, report_user_error

__all__ = ["PLUGINS", "USER_ERRORS", "Parser", "build_parser", "main", "report_user_error"]
