"""The ``mmrl`` command: :func:`mmrl.cli.main.main` (the entry point) and the core commands
(``train``, ``config``, ``algos``); domain packages add theirs as plugins (see
:mod:`mmrl.cli.main`). Importing it loads no torch. ``main`` is not re-exported here: the name
is the submodule ``mmrl.cli.main``."""
from mmrl.cli.main import PLUGINS, USER_ERRORS, Parser, Plugin, build_parser, report_user_error

__all__ = ["PLUGINS", "USER_ERRORS", "Parser", "Plugin", "build_parser", "report_user_error"]
