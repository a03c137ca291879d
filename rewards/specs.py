"""The scorer registry and text specs (``name:key=value``), read without torch: the names and
their modules (imported when a scorer is built, by :func:`mmrl.rewards.scorers.load`) and the
spec parser. ``mmrl config validate`` checks a job's reward spec through this module only."""
from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Tuple

from mmrl.registry import Registry

SCORERS: Registry = Registry("reward scorer")


def _lazy(module: str, attr: str, **fixed):
    """A factory importing ``mmrl.rewards.<module>`` on first use (heavy deps stay unloaded)."""
    def factory(**kwargs):
        import importlib
        cls = getattr(importlib.import_module(f"mmrl.rewards.{module}"), attr)
        return cls(**fixed, **kwargs)
    factory.target = (module, attr, fixed)
    return factory


SCORERS.register("pickscore", _lazy("clip_hf", "PickScore"))
SCORERS.register("clip_score", _lazy("clip_hf", "ClipScore"))
SCORERS.register("aesthetic", _lazy("clip_hf", "Aesthetic"))
SCORERS.register("hps_v2", _lazy("hps", "HPS", version="hps_v2"))
SCORERS.register("hps_v2.1", _lazy("hps", "HPS", version="hps_v2.1"))
SCORERS.register("imagereward", _lazy("imagereward", "ImageRewardScorer"))
SCORERS.register("jpeg_compressibility", _lazy("rules", "JpegCompressibility"))
SCORERS.register("brightness", _lazy("rules", "Brightness"))
SCORERS.register("color", _lazy("rules", "ColorTarget"))
SCORERS.register("prompt_color", _lazy("rules", "PromptColor"))
SCORERS.register("remote", _lazy("server", "RemoteScorer"))


_SPLIT_SPECS = re.compile(r",(?=\s*[A-Za-z_])")
_SPLIT_OPTS = re.compile(r":(?=[A-Za-z_]\w*=)")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """``"name:key=value:key=value"`` -> ``(name, {key: value})``; values parsed as JSON if they can.

    ``"hps_v2.1:path=/ckpt/HPS_v2.1_compressed.pt:batch_size=8"`` ->
    ``("hps_v2.1", {"path": "/ckpt/...", "batch_size": 8})``. A ``:`` only starts an option when a
    ``key=`` follows it, so URLs (``remote:url=http://127.0.0.1:8000``) pass through.
    """
    parts = _SPLIT_OPTS.split(spec.strip())
    name, opts = parts[0], {}
    if not name:
        raise ValueError(f"scorer spec {spec!r} has no name; expected NAME[:key=value...]")
    for part in parts[1:]:
        key, _, val = part.partition("=")
        opts[key] = _value(val)
    return name, opts


def parse_specs(text: str) -> List[Tuple[str, Dict[str, Any]]]:
    """``"a:k=v,b"`` -> ``[("a", {"k": v}), ("b", {})]`` (commas before a letter split specs)."""
    specs = [s for s in _SPLIT_SPECS.split(text) if s.strip()]
    if not specs:
        raise ValueError(f"no scorer in {text!r}; expected NAME[:key=value][,NAME...]")
    return [parse_spec(s) for s in specs]
