"""One registry per axis: name -> implementation, with errors that teach.

A registry maps a name (the math it computes, e.g. ``clip_asym``) to a callable. Lookups of
unknown names raise ``ValueError`` listing the registered names and the closest match, so a typo
in a config is reported as "unknown objective 'sapo2' (registered: clip, reg, sapo); did you
mean 'sapo'?".
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


def did_you_mean(name: str, choices) -> str:
    """Return "; did you mean 'x'?" for the closest choice, or "" when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    """A named table of implementations for one axis (e.g. ``objective``).

    Args:
        axis: what the entries are, used in error messages ("advantage", "objective", ...).
    """

    def __init__(self, axis: str):
        self.axis = axis
        self._entries: Dict[str, T] = {}

    def register(self, name: str, obj: Optional[T] = None):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def _add(o: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.axis} '{name}' is already registered; pick another name")
            self._entries[name] = o
            return o

        return _add if obj is None else _add(obj)

    def get(self, name: str) -> T:
        """Return the entry for ``name``.

        Raises:
            ValueError: unknown name; the message lists the registered names and the closest one.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(self.unknown_message(name)) from None

    def unknown_message(self, name) -> str:
        names = ", ".join(sorted(self._entries))
        return (f"unknown {self.axis} {name!r} (registered: {names})"
                f"{did_you_mean(name, self._entries)}")

    def names(self) -> list:
        return sorted(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        return sorted(self._entries.items())

    def __repr__(self) -> str:
        return f"Registry({self.axis!r}, {self.names()})"


def registry_of(axis: str) -> Registry[Callable]:
    """A new registry of callables for ``axis``."""
    return Registry(axis)
