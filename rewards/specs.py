"""The scorer registry and text specs (``name:key=value``), read without torch: the names and
their modules (imported when a scorer is built, by :func:`mmrl.rewards.scorers.load`) and the
spec parser. ``mmrl config validate`` checks a job's reward spec through this module only."""
from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
SCORERS.register("hpsv3", _lazy("hpsv3", "HPSv3"))
SCORERS.register("jpeg_compressibility", _lazy("rules", "JpegCompressibility"))
SCORERS.register("brightness", _lazy("rules", "Brightness"))
SCORERS.register("color", _lazy("rules", "ColorTarget"))
SCORERS.register("prompt_color", _lazy("rules", "PromptColor"))
SCORERS.register("remote", _lazy("server", "RemoteScorer"))
SCORERS.register("remote_video", _lazy("server", "RemoteVideoScorer"))
SCORERS.register("frames", _lazy("video", "FrameScorer"))
SCORERS.register("motion_direction", _lazy("video_rules", "MotionDirection"))
SCORERS.register("flicker", _lazy("video_rules", "Flicker"))
SCORERS.register("brightness_trend", _lazy("video_rules", "BrightnessTrend"))
SCORERS.register("pref_winrate", _lazy("pairwise", "PrefWinRate"))
SCORERS.register("vlm_judge", _lazy("vlm_judge", "VLMJudge"))
SCORERS.register("videoreward", _lazy("videoreward", "VideoReward"))

JUDGES: Registry = Registry("pairwise judge")
"""Pairwise judges: ``judge.compare(a, b, prompts) -> Tensor[n]`` = P(a preferred), the inner
judge of ``pref_winrate`` (:mod:`mmrl.rewards.pairwise`); ``mmrl.rewards.load`` builds them too
(``mmrl reward eval`` judges pairs with them)."""
JUDGES.register("bradley_terry", _lazy("pairwise", "BradleyTerryJudge"))
JUDGES.register("vlm_pair", _lazy("vlm_judge", "VLMPairJudge"))
JUDGES.register("vlm_pair_video", _lazy("vlm_judge", "VLMVideoPairJudge"))
JUDGES.register("remote_judge", _lazy("server", "RemoteJudge"))

VIDEO_SCORERS = frozenset({"frames", "motion_direction", "flicker", "brightness_trend",
                           "videoreward", "remote_video"})
"""Registered names whose class scores videos ``[B, F, 3, H, W]`` (``media = "video"``; a test
keeps this equal to the classes), read without torch by the job's media check."""
FRAME_REDUCES = ("mean", "min", "max", "frame")
"""``mmrl.rewards.video.REDUCES``."""


VIDEO_JUDGES = frozenset({"vlm_pair_video"})
"""Registered judges whose ``compare`` takes videos ``[n, F, 3, H, W]`` (``media = "video"``);
``bradley_terry`` follows its scorer."""
GROUPWISE_SCORERS = frozenset({"pref_winrate"})
"""Registered names whose class scores a group's samples together (``groupwise = True``)."""


def media_of(name: str, options: Optional[Dict[str, Any]] = None) -> str:
    """``"video"`` for a registered video scorer, else ``"image"``; ``pref_winrate`` and the
    ``bradley_terry`` judge follow their inner judge / scorer named in ``options``."""
    options = options or {}
    if name == "pref_winrate":
        return media_of(str(options.get("judge")), options)
    if name == "bradley_terry":
        return media_of(str(options.get("scorer")))
    return "video" if name in VIDEO_SCORERS or name in VIDEO_JUDGES else "image"


def pref_problems(options: Dict[str, Any]) -> List[str]:
    """Problems of ``pref_winrate``'s options found without torch: ``judge`` names a registered
    pairwise judge (:data:`JUDGES`, or a scorer registered with ``compare``), the schedule and
    mode options have their types, and ``bradley_terry``'s ``scorer`` is a pointwise scorer.
    ``judge`` may also be a judge object (with ``compare``), from Python."""
    from mmrl.registry import did_you_mean
    out, judge = [], options.get("judge")
    if not isinstance(judge, str) and callable(getattr(judge, "compare", None)):
        pass  # a judge object (Python API)
    elif not isinstance(judge, str) or not judge:
        out.append(f"pref_winrate: judge={judge!r}; name the pairwise judge, e.g. "
                   f"pref_winrate:judge=vlm_pair:path=DIR or "
                   f"pref_winrate:judge=bradley_terry:scorer=pickscore")
    elif judge not in JUDGES and judge not in SCORERS:
        out.append(f"pref_winrate: unknown judge {judge!r} (registered: "
                   f"{', '.join(JUDGES.names())}){did_you_mean(judge, JUDGES.names())}")
    elif judge == "bradley_terry":
        inner = options.get("scorer")
        if not isinstance(inner, str) or inner not in SCORERS or inner in GROUPWISE_SCORERS:
            out.append(f"pref_winrate: judge=bradley_terry needs scorer=NAME, a registered "
                       f"pointwise scorer (e.g. scorer=pickscore); got scorer={inner!r}")
    k = options.get("opponents")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        out.append(f"pref_winrate: opponents={k!r}; expected a positive int (each sample meets "
                   f"that many others) or leave it out for all pairs")
    for key in ("both_orders", "hard"):
        if key in options and not isinstance(options[key], bool):
            out.append(f"pref_winrate: {key}={options[key]!r}; expected true or false")
    d = options.get("decimals")
    if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 0):
        out.append(f"pref_winrate: decimals={d!r}; expected a non-negative int (3: Pref-GRPO's "
                   f"rounding) or leave it out")
    n = options.get("pairs_per_call", 64)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        out.append(f"pref_winrate: pairs_per_call={n!r}; expected a positive int")
    return out


def sample_frames(num_frames: int, num: Optional[int] = None,
                  indices: Optional[Sequence[int]] = None,
                  every: Optional[int] = None) -> List[int]:
    """The frame indices the ``frames`` lift scores, in order: all (no option), ``num``
    uniformly spaced with the first and the last included (``round(i * (F - 1) / (num - 1))``;
    num = 1: the first), ``indices`` (negative counts from the end) or every ``every``-th from
    the first. Torch-free, so ``mmrl config validate`` checks a job's sampling against its
    ``diffusion.frames`` with the same rule.

    Raises:
        ValueError: more than one option, num outside [1, F], an index out of range, an empty
            index list, or a non-positive every.
    """
    _check_sampling(num_frames, num, indices, every)
    F = num_frames
    if num is not None:
        num = int(num)
        return [0] if num == 1 else [round(i * (F - 1) / (num - 1)) for i in range(num)]
    if indices is not None:
        return [int(i) % F for i in indices]
    return list(range(0, F, int(every or 1)))


def _check_sampling(F: Optional[int], num, indices, every) -> None:
    """:func:`sample_frames`' checks without building the list; ``F`` None: the job's frame
    count is unknown (the bounds that need it are skipped)."""
    given = [k for k, v in (("num", num), ("indices", indices), ("every", every)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"frames: got {' and '.join(given)}; pick one way to sample frames "
                         f"(num=N uniformly spaced, indices=[...] or every=k)")
    if num is not None and not (isinstance(num, int) and 1 <= num <= (F or num)):
        upto = f" but the videos have {F} frames; expected 1 <= num <= {F}" if F else \
            "; expected a positive number of frames"
        raise ValueError(f"frames: num={num!r}{upto}")
    if indices is not None:
        ok = isinstance(indices, (list, tuple)) and indices and all(
            isinstance(i, int) and (F is None or -F <= i < F) for i in indices)
        if not ok:
            span = f" in [-{F}, {F - 1}] for videos of {F} frames" if F else " (ints)"
            raise ValueError(f"frames: indices={indices!r}; expected a non-empty list of "
                             f"indices{span}")
    if every is not None and not (isinstance(every, int) and every >= 1):
        raise ValueError(f"frames: every={every!r}; expected a positive step")


def frames_problems(options: Dict[str, Any], num_frames: Optional[int] = None) -> List[str]:
    """Problems of the ``frames`` scorer's options found without torch: ``scorer`` names a
    registered image scorer, ``reduce`` is known, the frame sampling is valid
    (:func:`sample_frames`' rule; against ``num_frames`` when the job's frame count is known),
    ``frame`` exactly with ``reduce=frame``."""
    out, inner = [], options.get("scorer")
    if not isinstance(inner, str) or not inner:
        out.append(f"frames: scorer={inner!r}; name the image scorer to lift, e.g. "
                   f"frames:scorer=pickscore:reduce=mean")
    elif inner not in SCORERS:
        from mmrl.registry import did_you_mean
        lifts = [n for n in SCORERS.names() if n not in VIDEO_SCORERS | GROUPWISE_SCORERS]
        out.append(f"frames: unknown scorer {inner!r} (registered: {', '.join(lifts)})"
                   f"{did_you_mean(inner, SCORERS.names())}")
    elif inner in VIDEO_SCORERS:
        out.append(f"frames: scorer={inner!r} already scores videos; use it directly "
                   f"(frames lifts image scorers)")
    elif inner in GROUPWISE_SCORERS:
        out.append(f"frames: scorer={inner!r} compares a group's samples, not frames; give "
                   f"{inner} a video judge instead (e.g. judge=bradley_terry:scorer=flicker)")
    reduce = options.get("reduce", "mean")
    if reduce not in FRAME_REDUCES:
        out.append(f"frames: reduce={reduce!r}; expected one of {', '.join(FRAME_REDUCES)}")
    sampling = [k for k in ("num", "indices", "every") if options.get(k) is not None]
    try:
        _check_sampling(num_frames or None, options.get("num"), options.get("indices"),
                        options.get("every"))
    except ValueError as err:
        out.append(str(err))
    frame = options.get("frame")
    if reduce == "frame" and num_frames and isinstance(frame, int) and \
            not -num_frames <= frame < num_frames:
        out.append(f"frames: frame={frame} but the videos have {num_frames} frames; expected an "
                   f"index in [-{num_frames}, {num_frames - 1}] (-1: the last)")
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
