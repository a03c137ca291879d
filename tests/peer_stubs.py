"""Stub packages for importing a peer's code whose import chain names packages its math never
runs (stdlib only: usable in a subprocess before anything else is imported).

:class:`StubFinder` answers every import of the given names (and their submodules) with a
:class:`StubModule`: a package whose every public attribute is a :class:`Placeholder` subclass,
created on first access. ``presets`` gives a stub module fixed attributes (e.g. a function the
peer calls at import or load time)."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import types
from typing import Any, Dict, Mapping, Optional, Sequence


class Placeholder:
    """What a stubbed module's attributes are: a class that stores keywords and answers ``get``."""

    def __init__(self, *args, **kwargs):
        self.__dict__.update(kwargs)

    def get(self, key, default=None):
        return getattr(self, key, default)


class StubModule(types.ModuleType):
    """A package whose every public attribute is a (cached) placeholder class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (Placeholder,), {"__module__": self.__name__})
        setattr(self, name, cls)
        return cls


class StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Put first on ``sys.meta_path``: ``names`` (and their submodules) import as stubs."""

    def __init__(self, names: Sequence[str],
                 presets: Optional[Mapping[str, Dict[str, Any]]] = None):
        self.names, self.presets = tuple(names), dict(presets or {})

    def find_spec(self, name, path=None, target=None):
        if any(name == n or name.startswith(n + ".") for n in self.names):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = StubModule(spec.name)
        module.__path__ = []
        for key, value in self.presets.get(spec.name, {}).items():
            setattr(module, key, value)
        return module

    def exec_module(self, module):
        pass
