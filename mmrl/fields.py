"""A documented, bounded dataclass field, declared once (:func:`cfg`), and the checks derived
from it. It sits at the bottom of the core (stdlib only) so that every layer can declare fields
with it: the algorithm's hyper-parameters in :mod:`mmrl.algo.presets`, the run config's sections
in :mod:`mmrl.config.schema`. Validation messages and ``docs/config.md`` are derived from the
metadata, so a bound is written in one place only.
"""
from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any, Mapping, Optional

BOUND_KEYS = ("min", "max", "above", "below")
"""Metadata keys of the bounds: inclusive ``min``/``max``, exclusive ``above``/``below``."""


def cfg(default: Any = MISSING, doc: str = "", *, source: str = "", choices: Any = None,
        minimum: Optional[float] = None, maximum: Optional[float] = None,
        above: Optional[float] = None, below: Optional[float] = None, check: bool = True,
        default_factory: Any = MISSING):
    """A documented dataclass field.

    Args:
        doc: what the field means (shown by ``mmrl config docs`` and ``config show``).
        source: the paper/code the default comes from (e.g. "arXiv 2402.03300").
        choices: allowed values: a list, or a zero-argument callable returning one (for
            registries filled at import time).
        minimum, maximum: inclusive bounds for numbers.
        above, below: exclusive bounds for numbers (``above=0``: the value must be > 0).
        check: False when another checker owns the choices and bounds (the ``algo`` section's
            overrides are checked by :func:`mmrl.algo.presets.algo_problems`, with its
            messages); they are still documented.
    """
    meta = {"doc": doc, "source": source, "choices": choices, "min": minimum, "max": maximum,
            "above": above, "below": below, "check": check}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _num(x: float) -> str:
    return f"{x:g}"


def bounds_text(name: str, meta: Mapping[str, Any]) -> str:
    """The allowed range as math, e.g. ``"0 <= eps_low < 1"`` or ``"tau_pos > 0"``; "" when the
    field has no bounds."""
    lo = (f"{_num(meta['min'])} <= " if meta.get("min") is not None else
          f"{_num(meta['above'])} < " if meta.get("above") is not None else "")
    hi = (f" <= {_num(meta['max'])}" if meta.get("max") is not None else
          f" < {_num(meta['below'])}" if meta.get("below") is not None else "")
    if not lo and not hi:
        return ""
    if lo and not hi:  # "x >= 0" reads better than "0 <= x"
        op = ">=" if meta.get("min") is not None else ">"
        return f"{name} {op} {lo.split(' ')[0]}"
    return f"{lo}{name}{hi}"


def in_bounds(value: float, meta: Mapping[str, Any]) -> bool:
    """True when the number ``value`` lies within the field's bounds."""
    lo, hi, above, below = (meta.get(k) for k in BOUND_KEYS)
    return not ((lo is not None and value < lo) or (hi is not None and value > hi)
                or (above is not None and value <= above)
                or (below is not None and value >= below))


def range_problem(name: str, value: Any, meta: Mapping[str, Any]) -> Optional[str]:
    """``"eps_low=1.0 is out of range; expected 0 <= eps_low < 1"`` for a number outside the
    field's bounds; None when it is inside (or not a number)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or in_bounds(value, meta):
        return None
    return f"{name}={value!r} is out of range; expected {bounds_text(name, meta)}"


def problems_error(what: str, problems: "list[str]") -> ValueError:
    """One ``ValueError`` listing every problem of a request, as the resolvers raise it:
    ``"{what}: N problem(s):"`` then one ``  - problem`` line each."""
    lines = "\n".join(f"  - {p}" for p in problems)
    return ValueError(f"{what}: {len(problems)} problem(s):\n{lines}")

