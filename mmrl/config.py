"""Typed run configuration: YAML files + ``key=value`` overrides -> dataclasses, every problem at once.

A run config has three fixed sections and one per job::

    job: toy            # which trainer runs (registered in mmrl.jobs)
    algo: {...}         # AlgoConfig: a preset plus per-axis overrides
    train: {...}        # TrainConfig: the shared loop's knobs
    toy: {...}          # the job's own section, named after the job

Validation collects every unknown key (with a did-you-mean), wrong type, out-of-range value and
invalid combination, and raises one :class:`ConfigError` listing them all, each naming the key,
the value received and what was expected. Every field carries ``doc``/``source`` metadata, which
``mmrl config docs`` renders and a test checks.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from mmrl.registry import did_you_mean


class ConfigError(ValueError):
    """A config with problems; ``.problems`` lists every one of them."""

    def __init__(self, problems: Sequence[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n{lines}")


def cfg(default: Any = MISSING, doc: str = "", *, source: str = "", choices: Any = None,
        minimum: Optional[float] = None, maximum: Optional[float] = None,
        default_factory: Any = MISSING):
    """A documented dataclass field.

    Args:
        doc: what the field means (shown by ``mmrl config docs`` and ``config show``).
        source: the paper/code the default comes from (e.g. "arXiv 2402.03300").
        choices: allowed values: a list, or a zero-argument callable returning one (for
            registries filled at import time).
        minimum, maximum: inclusive bounds for numbers.
    """
    meta = {"doc": doc, "source": source, "choices": choices, "min": minimum, "max": maximum}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# PyYAML (YAML 1.1) reads "1e-4" as a string; accept the scientific forms people write.
class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?\.?\d*(?:[eE][-+]?\d+)$|^[-+]?\d[\d_]*\.\d*$|"
               r"^[-+]?\.\d+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def parse_value(text: str) -> Any:
    """Parse one override value the way YAML would (``1e-4`` -> float, ``null`` -> None)."""
    return yaml.load(text, Loader=_Loader) if text.strip() else ""


def load_yaml(path) -> Dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError([f"file not found: {p} (pass a path to a YAML config, e.g. "
                           f"configs/demo/toy.yaml)"], str(p))
    try:
        data = yaml.load(p.read_text(), Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError([f"not valid YAML: {err}"], str(p)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level is {type(data).__name__}; expected a mapping of "
                           f"sections (job:, algo:, train:, ...)"], str(p))
    return data


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> List[str]:
    """Apply ``a.b.c=value`` strings to ``data`` in place; returns problems (malformed items)."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
            continue
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
            if not isinstance(node[part], dict):
                problems.append(f"override {item!r}: {part} is not a section")
                break
            node = node[part]
        else:
            node[parts[-1]] = parse_value(text)
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
            problems.append(f"{key}: got {value!r}; expected a section (mapping)")
            return tp()
        return build(tp, value, key, problems)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: got {value!r} ({type(value).__name__}); expected "
                            f"{_type_name(tp)}")
            return value
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            problems.append(f"{key}: got {value!r}; expected {_type_name(tp)}")
            return value
        inner = typing.get_args(tp)[1]
        return {str(k): _coerce(v, inner, f"{key}.{k}", problems) for k, v in value.items()}
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(tp, lambda v: True)
    if not ok(value):
        problems.append(f"{key}: got {value!r} ({type(value).__name__}); expected {_type_name(tp)}")
        return value
    return float(value) if tp is float else value


def _check_meta(value, f: dataclasses.Field, key: str, problems: List[str]):
    meta = f.metadata
    choices = meta.get("choices")
    if choices is not None and value is not None:
        allowed = list(choices() if callable(choices) else choices)
        if value not in allowed:
            problems.append(f"{key}: got {value!r}; expected one of {', '.join(map(str, allowed))}"
                            f"{did_you_mean(value, allowed)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            problems.append(f"{key}: got {value!r}; expected a value >= {lo}")
        if hi is not None and value > hi:
            problems.append(f"{key}: got {value!r}; expected a value <= {hi}")


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
            own.append(f"{prefix + '.' if prefix else ''}{key}: unknown key "
                       f"(known: {', '.join(names)}){did_you_mean(key, names)}")
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
        own.extend(f"{prefix}.{p}" if prefix else p for p in obj.problems())
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
    """Rows ``(key, type, default, doc, source)`` for every field of ``cls``, nested included."""
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
        rows.append((key, _type_name(tp), default, f.metadata.get("doc", ""),
                     f.metadata.get("source", "")))
    return rows


Validator = Callable[[Any], List[str]]
