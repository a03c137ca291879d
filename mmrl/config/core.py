"""Typed run configuration: YAML files + ``key=value`` overrides -> dataclasses, every problem at once.

A run config has three fixed sections and one per job::

    job: toy            # which trainer runs (registered in mmrl.config.jobs)
    algo: {...}         # AlgoConfig: a preset plus per-axis overrides
    train: {...}        # TrainConfig: the shared loop's knobs
    toy: {...}          # the job's own section, named after the job

Validation collects every unknown key (with a did-you-mean), wrong type, out-of-range value and
invalid combination, and raises one :class:`ConfigError` listing them all, each naming the key,
the value received and what was expected. Every field is declared once with :func:`mmrl.fields.cfg` (type, default, bounds, ``doc``,
``source``): the checks here and what ``mmrl config docs`` renders are derived from it.

Reading is defensive: a file that is not UTF-8 text, a directory, a YAML document nested too
deeply, one that names a key twice in a mapping, or one whose aliases expand to more than
:data:`MAX_ALIAS_NODES` nodes (a "billion laughs" bomb; reading is in :mod:`mmrl.config.yaml_safe`) is
one ``ConfigError``, decided while composing, before any Python object is built.
Values are quoted in messages at most :data:`MAX_SHOWN` characters long.
"""
from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from mmrl.fields import bounds_text, cfg  # noqa: F401  (cfg: the field declaration, re-exported)
from mmrl.registry import did_you_mean
from mmrl.config.yaml_safe import (MAX_ALIAS_NODES, AliasBudgetError, DuplicateKeyError,  # noqa: F401
                            Loader as _Loader)


MAX_SHOWN = 120
"""Longest quoted value in a problem message (longer ones are cut, with their length)."""


class UserError(ValueError):
    """A problem the user can fix (a config value, a missing file, bad data). The CLI prints the
    message alone, with no traceback, and exits 2 (see :mod:`mmrl.cli.app`). A ``ValueError``, so
    code that catches ``ValueError`` keeps working."""


class ConfigError(UserError):
    """A config with problems; ``.problems`` lists every one of them."""

    def __init__(self, problems: Sequence[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n{lines}")


def show(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` in at most about ``limit`` characters: reprlib bounds the work on a huge
    nested value too, so a giant value can never make a giant message."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 12
    text = r.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def parse_value(text: str) -> Any:
    """Parse one override value the way YAML would (``1e-4`` -> float, ``null`` -> None).

    Raises:
        ConfigError: text that is not a YAML value (e.g. ``[1, 2``), or an alias bomb.
    """
    if not text.strip():
        return ""
    try:
        return yaml.load(text, Loader=_Loader)
    except (yaml.YAMLError, RecursionError) as err:
        if isinstance(err, (AliasBudgetError, DuplicateKeyError)):
            raise ConfigError([str(err)], "override") from None
        detail = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError([f"value {show(text, 60)} is not a YAML value ({detail}); quote a "
                           f"string, write a list as [a, b]"], "override") from None


def load_yaml(path) -> Dict[str, Any]:
    """The mapping in a YAML config file.

    Raises:
        ConfigError: no such file, a directory, unreadable, not UTF-8 text, not valid YAML,
            aliases past :data:`MAX_ALIAS_NODES` or cyclic, nested too deeply, or a top level
            that is not a mapping.
    """
    p = Path(path)
    fix = "pass a path to a YAML config file, e.g. configs/demo/toy.yaml"
    if not p.exists():
        raise ConfigError([f"file not found: {p} ({fix})"], str(p))
    if p.is_dir():
        raise ConfigError([f"{p} is a directory; {fix}"], str(p))
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise ConfigError([f"cannot read {p}: {err.strerror or err}"], str(p)) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError([f"not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); "
                           f"is it a binary file? {fix}"], str(p)) from None
    return parse_yaml(text, str(p))


def parse_yaml(text: str, source: str = "config") -> Dict[str, Any]:
    """Parse config ``text`` (see :func:`load_yaml` for what is refused)."""
    loader = None
    try:
        loader = _Loader(text)  # the reader refuses control characters here already
        loader.name = source  # error marks name the file, not "<unicode string>"
        data = loader.get_single_data()
    except (AliasBudgetError, DuplicateKeyError) as err:
        raise ConfigError([str(err)], source) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"not valid YAML: {str(err)[:600]}"], source) from None
    except RecursionError:
        raise ConfigError(["nested too deeply to be a config (Python's recursion limit); "
                           "a config is a few levels of sections and values"], source) from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level is {type(data).__name__}; expected a mapping of "
                           f"sections (job:, algo:, train:, ...)"], source)
    return data


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> List[str]:
    """Apply ``a.b.c=value`` strings to ``data`` in place; returns problems (malformed items)."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {show(item)}: expected key=value, e.g. train.lr=1e-4")
            continue
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            problems.append(f"override {show(item)}: empty key part in {key!r}; expected "
                            f"section.field=value, e.g. train.lr=1e-4")
            continue
        try:
            value = parse_value(text)
        except ConfigError as err:
            problems.append(f"override {show(key)}: {err.problems[0]}")
            continue
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
            if not isinstance(node[part], dict):
                problems.append(f"override {show(item)}: {part} is not a section")
                break
            node = node[part]
        else:
            node[parts[-1]] = value
    return problems


# ---------------------------------------------------------------------------- type checking
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return f"mapping to {_type_name(typing.get_args(tp)[1])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str, problems: List[str]):
    """Check ``value`` against type ``tp``; return the (lightly coerced) value."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, problems)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: got {show(value)}; expected a section (mapping)")
            return tp()
        return build(tp, value, key, problems)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: got {show(value)} ({type(value).__name__}); expected "
                            f"{_type_name(tp)}")
            return value
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            problems.append(f"{key}: got {show(value)}; expected {_type_name(tp)}")
            return value
        inner = typing.get_args(tp)[1]
        return {str(k): _coerce(v, inner, f"{key}.{k}", problems) for k, v in value.items()}
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(tp, lambda v: True)
    if not ok(value):
        problems.append(f"{key}: got {show(value)} ({type(value).__name__}); expected "
                        f"{_type_name(tp)}")
        return value
    if tp is float:
        try:
            value = float(value)
        except OverflowError:  # an int too big for a float
            problems.append(f"{key}: got {show(value)}; expected a float (at most ~1.8e308)")
            return value
        if not math.isfinite(value):
            problems.append(f"{key}: got {value}; expected a finite number (nan and inf are "
                            f"never usable settings)")
    return value


def _check_meta(value, f: dataclasses.Field, key: str, problems: List[str]):
    meta = f.metadata
    if not meta.get("check", True):  # another checker owns this field's choices and bounds
        return
    choices = meta.get("choices")
    if choices is not None and value is not None:
        allowed = list(choices() if callable(choices) else choices)
        if not isinstance(value, typing.Hashable) or value not in allowed:
            hint = did_you_mean(value, allowed) if isinstance(value, str) else ""
            problems.append(f"{key}: got {show(value)}; expected one of "
                            f"{', '.join(map(str, allowed))}{hint}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            problems.append(f"{key}: got {show(value)}; expected a value >= {lo}")
        if hi is not None and value > hi:
            problems.append(f"{key}: got {show(value)}; expected a value <= {hi}")
        above, below = meta.get("above"), meta.get("below")
        if above is not None and value <= above:
            problems.append(f"{key}: got {show(value)}; expected a value > {above}")
        if below is not None and value >= below:
            problems.append(f"{key}: got {show(value)}; expected a value < {below}")


def build(cls, data: Dict[str, Any], prefix: str = "", problems: Optional[List[str]] = None):
    """Build dataclass ``cls`` from ``data``, appending every problem to ``problems``.

    Unknown keys, wrong types, choices and bounds are checked here; a dataclass may add
    cross-field checks with a ``problems(self) -> list[str]`` method (keys relative to it).
    """
    own = problems if problems is not None else []
    first = len(own)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            hint = did_you_mean(key, names) if isinstance(key, str) else ""
            name = key if isinstance(key, str) and len(key) <= MAX_SHOWN else show(key)
            own.append(f"{prefix + '.' if prefix else ''}{name}: unknown key "
                       f"(known: {', '.join(names)}){hint}")
    kwargs = {}
    for f in fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            before = len(own)
            value = _coerce(data[f.name], hints[f.name], key, own)
            if len(own) == before:
                _check_meta(value, f, key, own)
            kwargs[f.name] = value
    obj = cls(**kwargs)
    # Cross-field checks only make sense once every field of this section has the right type.
    if hasattr(obj, "problems") and len(own) == first:
        names = {f.name for f in fields(cls)}
        for p in obj.problems():  # "field ..." reads as "section.field ...", the rest "section: ..."
            head = re.match(r"[A-Za-z_]\w*", p)
            sep = "." if head and head.group(0) in names else ": "
            own.append(f"{prefix}{sep}{p}" if prefix else p)
    if problems is None and own:
        raise ConfigError(own, cls.__name__)
    return obj


def to_dict(obj) -> Any:
    """A dataclass tree as plain python (for YAML/JSON)."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def field_docs(cls, prefix: str = "") -> List[Tuple[str, str, Any, str, str]]:
    """Rows ``(key, type, default, doc, source)`` for every field of ``cls``, nested included;
    the type names the field's bounds too (``float; eps_low >= 0``)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if is_dataclass(tp):
            rows.extend(field_docs(tp, key))
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        bounds = bounds_text(f.name, f.metadata)
        rows.append((key, _type_name(tp) + (f"; {bounds}" if bounds else ""), default,
                     f.metadata.get("doc", ""),
                     f.metadata.get("source", "")))
    return rows


Validator = Callable[[Any], List[str]]
