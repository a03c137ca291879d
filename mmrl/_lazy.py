"""Lazy re-exports for package ``__init__`` files (PEP 562): ``import mmrl`` and the CLI stay
light (no torch) until a name that needs it is used."""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Iterable, Tuple


def lazy_exports(package: str, table: Dict[str, Iterable[str]]
                 ) -> Tuple[Callable[[str], object], Callable[[], list], list]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` from ``{module: names}``; a module
    name starting with ``.`` is relative to ``package``."""
    where = {name: module for module, names in table.items() for name in names}

    def __getattr__(name: str):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        importlib.import_module(package).__dict__[name] = value  # next time: no lookup
        return value

    def __dir__():
        return sorted(set(importlib.import_module(package).__dict__) | set(where))

    return __getattr__, __dir__, sorted(where)
