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
SCORERS.register("frames", _lazy("video", "FrameScorer"))
SCORERS.register("motion_direction", _lazy("video_rules", "MotionDirection"))
SCORERS.register("flicker", _lazy("video_rules", "Flicker"))
SCORERS.register("brightness_trend", _lazy("video_rules", "BrightnessTrend"))

VIDEO_SCORERS = frozenset({"frames", "motion_direction", "flicker", "brightness_trend"})
"""Registered names whose class scores videos ``[B, F, 3, H, W]`` (``media = "video"``; a test
keeps this equal to the classes), read without torch by the job's media check."""
FRAME_REDUCES = ("mean", "min", "max", "frame")
"""``mmrl.rewards.video.REDUCES``."""


def media_of(name: str) -> str:
    """``"video"`` for a registered video scorer, else ``"image"``."""
    return "video" if name in VIDEO_SCORERS else "image"


def frames_problems(options: Dict[str, Any]) -> List[str]:
    """Problems of the ``frames`` scorer's options found without torch: ``scorer`` names a
    registered image scorer, ``reduce`` is known, at most one frame sampling, ``frame`` exactly
    with ``reduce=frame``."""
    out, inner = [], options.get("scorer")
    if not isinstance(inner, str) or not inner:
        out.append(f"frames: scorer={inner!r}; name the image scorer to lift, e.g. "
                   f"frames:scorer=pickscore:reduce=mean")
    elif inner not in SCORERS:
        from mmrl.registry import did_you_mean
        out.append(f"frames: unknown scorer {inner!r} (registered: "
                   f"{', '.join(n for n in SCORERS.names() if n not in VIDEO_SCORERS)})"
                   f"{did_you_mean(inner, SCORERS.names())}")
    elif inner in VIDEO_SCORERS:
        out.append(f"frames: scorer={inner!r} already scores videos; use it directly "
                   f"(frames lifts image scorers)")
    reduce = options.get("reduce", "mean")
    if reduce not in FRAME_REDUCES:
        out.append(f"frames: reduce={reduce!r}; expected one of {', '.join(FRAME_REDUCES)}")
    sampling = [k for k in ("num", "indices", "every") if options.get(k) is not None]
    if len(sampling) > 1:
        out.append(f"frames: got {' and '.join(sampling)}; pick one way to sample frames "
                   f"(num=N uniformly spaced, indices=[...] or every=k)")
    frame = options.get("frame")
    if reduce == "frame" and (isinstance(frame, bool) or not isinstance(frame, int)):
        out.append(f"frames: reduce=frame needs frame=INDEX (e.g. frame=-1 for the last); got "
                   f"frame={frame!r}")
    if reduce == "frame" and sampling:
        out.append(f"frames: reduce=frame scores frame {frame} alone; drop {', '.join(sampling)}")
    if reduce != "frame" and frame is not None:
        out.append(f"frames: frame={frame!r} is read with reduce=frame only; set reduce=frame "
                   f"or drop frame")
    return out


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
