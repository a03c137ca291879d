"""The checks of an algorithm request (preset + overrides), as messages: types, ranges, axis
names, and combinations that cannot work. :func:`mmrl.algo.presets.algo_problems` runs them all
and reports every problem at once. Torch-free.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Dict, List

from mmrl.algo.axes import EMPTY_ROWS, STEP_ADVANTAGES, TOKEN_WEIGHTINGS, axis_registry
from mmrl.algo.spec import EXTRA_OVERRIDES, AlgoSpec
from mmrl.fields import range_problem
from mmrl.registry import did_you_mean

_FIELDS = {f.name: f for f in dataclasses.fields(AlgoSpec)}
_HINTS = typing.get_type_hints(AlgoSpec)
_AXES = ("advantage", "ratio_level", "objective", "aggregation", "kl", "multi_reward",
         "rollout_is", "off_policy_shaping")
_EXTRA_KEYS = tuple(EXTRA_OVERRIDES)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _value_type(key: str, hints: dict = _HINTS) -> type:
    """``str``, ``int`` or ``float``: the declared type of field ``key`` (None allowed aside)."""
    tp = hints[key]
    return next((a for a in typing.get_args(tp) if a is not type(None)), tp)


def _type_problems(values: dict, hints: dict = _HINTS) -> Dict[str, str]:
    """{key: problem} for overrides of the wrong type (per the field's declared type in
    ``hints``: AlgoSpec's, or another spec's such as :class:`mmrl.algo.pref_presets.PrefSpec`)."""
    problems = {}
    for key, v in values.items():
        tp = _value_type(key, hints)
        if v is None and typing.get_origin(hints[key]) is typing.Union:
            continue
        if tp is bool:
            if not isinstance(v, bool):
                problems[key] = f"{key} must be true or false, got {type(v).__name__} {v!r}"
        elif tp is str and not isinstance(v, str):
            problems[key] = f"{key} must be a name (str), got {type(v).__name__} {v!r}"
        elif tp is int and not (isinstance(v, int) and not isinstance(v, bool)):
            problems[key] = f"{key} must be an int, got {type(v).__name__} {v!r}"
        elif tp is not str and not _is_number(v):
            problems[key] = f"{key} must be a number, got {type(v).__name__} {v!r}"
        elif _is_number(v) and not math.isfinite(v):
            problems[key] = f"{key} must be finite, got {v!r}"
    return problems


def _range_problems(spec: AlgoSpec) -> List[str]:
    """Numbers outside their field's declared bounds (:func:`mmrl.fields.range_problem`), and
    values outside a field's declared ``choices`` list."""
    problems = [range_problem(f.name, getattr(spec, f.name), f.metadata) for f in _FIELDS.values()]
    for f in _FIELDS.values():
        choices = f.metadata.get("choices")
        if isinstance(choices, (list, tuple)) and getattr(spec, f.name) not in choices:
            problems.append(f"{f.name}: got {getattr(spec, f.name)!r}; expected one of "
                            f"{', '.join(map(str, choices))}"
                            f"{did_you_mean(str(getattr(spec, f.name)), list(choices))}")
    return [p for p in problems if p is not None]


def _axis_problems(spec: AlgoSpec) -> List[str]:
    problems = []
    for axis in _AXES:
        name, registry = getattr(spec, axis), axis_registry(axis)
        if not isinstance(name, str):
            continue
        if axis == "advantage" and name in axis_registry("multi_reward"):
            problems.append(f"advantage {name!r} combines reward columns; the advantage axis "
                            f"takes a single-reward estimator ({', '.join(registry.names())}) "
                            f"that the loop's multi-reward method uses as its base")
        elif name not in registry:
            problems.append(registry.unknown_message(name))
    if isinstance(spec.token_weighting, str) and spec.token_weighting not in TOKEN_WEIGHTINGS:
        hint = did_you_mean(spec.token_weighting, TOKEN_WEIGHTINGS)
        problems.append(f"unknown token_weighting {spec.token_weighting!r} (expected one of "
                        f"{', '.join(TOKEN_WEIGHTINGS)}){hint}")
    problems += _step_problems(spec)
    if isinstance(spec.empty_rows, str) and spec.empty_rows not in EMPTY_ROWS:
        hint = did_you_mean(spec.empty_rows, EMPTY_ROWS)
        problems.append(f"unknown empty_rows {spec.empty_rows!r} (expected one of "
                        f"{', '.join(EMPTY_ROWS)}){hint}")
    return problems


def _step_problems(spec: AlgoSpec) -> List[str]:
    """``step_advantage``: a known name, a GiGPO mode, and a token-level loss (its advantages
    are ``[B, T]``)."""
    problems = []
    for key, value, known in (("step_advantage", spec.step_advantage, STEP_ADVANTAGES),
                              ("gigpo_mode", spec.gigpo_mode, ("mean_std_norm", "mean_norm"))):
        if isinstance(value, str) and value not in known:
            problems.append(f"unknown {key} {value!r} (expected one of {', '.join(known)})"
                            f"{did_you_mean(value, list(known))}")
    if spec.step_advantage in STEP_ADVANTAGES and spec.needs_steps and (
            spec.ratio_level in axis_registry("ratio_level")
            and axis_registry("ratio_level").get(spec.ratio_level).per_sequence
            or spec.objective in axis_registry("objective")
            and axis_registry("objective").get(spec.objective).binary_rewards):
        problems.append(f"step_advantage {spec.step_advantage!r} gives token advantages [B, T]; "
                        f"ratio_level {spec.ratio_level!r} / objective {spec.objective!r} read "
                        f"one value per row: use ratio_level token and another objective")
    return problems


def _combination_problems(spec: AlgoSpec) -> List[str]:
    levels, aggregations, objectives = (axis_registry(a) for a in
                                        ("ratio_level", "aggregation", "objective"))
    if not (spec.ratio_level in levels and spec.aggregation in aggregations
            and spec.objective in objectives):
        return []  # already reported as unknown names
    problems = []
    per_seq = levels.get(spec.ratio_level).per_sequence
    if per_seq and not aggregations.get(spec.aggregation).per_sequence:
        problems.append(f"ratio_level {spec.ratio_level!r} gives one loss per sequence but "
                        f"aggregation {spec.aggregation!r} averages tokens; use aggregation "
                        f"'seq_mean'")
    if not per_seq and aggregations.get(spec.aggregation).per_sequence:
        problems.append(f"aggregation {spec.aggregation!r} needs a per-sequence ratio level "
                        f"(sequence, sequence_sum), got {spec.ratio_level!r}; use a token "
                        f"aggregation such as 'token_mean'")
    if objectives.get(spec.objective).needs_per_sequence and not per_seq:
        problems.append(f"objective {spec.objective!r} regresses one value per sequence and "
                        f"needs ratio_level 'sequence_sum' or 'sequence', got {spec.ratio_level!r}")
    if spec.aggregation == "fixed_norm" and spec.max_len is None:
        problems.append("aggregation 'fixed_norm' needs max_len (the max completion length "
                        "L_max); pass max_len=<int>")
    if spec.token_weighting == "tw" and per_seq:
        problems.append(f"token_weighting 'tw' weights tokens but ratio_level "
                        f"{spec.ratio_level!r} is per sequence; use a token-level ratio")
    if spec.step_reweight is True and per_seq:
        problems.append(f"step_reweight weights each denoising step but ratio_level "
                        f"{spec.ratio_level!r} gives one loss per sequence; use a token-level "
                        f"ratio (token, ratio_norm)")
    if spec.dual_clip_c is not None and spec.objective != "clip":
        problems.append(f"dual_clip_c only applies to objective 'clip', got objective "
                        f"{spec.objective!r}; drop dual_clip_c")
    return (problems + _objective_problems(spec, per_seq)
            + _rollout_correction_problems(spec, per_seq) + _kl_entropy_problems(spec, per_seq))


def _objective_problems(spec: AlgoSpec, per_seq: bool) -> List[str]:
    """Combinations of the objectives added after the first three (CISPO, Clip/KL-Cov, VESPO,
    GPG, TRL's delta)."""
    problems = []
    if axis_registry("objective").get(spec.objective).needs_token_ratio and per_seq:
        problems.append(f"objective {spec.objective!r} weights each token's log-prob and needs a "
                        f"token ratio level, got per-sequence {spec.ratio_level!r}; use "
                        f"ratio_level 'token' (or 'sequence_token' for a sequence ratio)")
    if spec.delta is not None and spec.objective != "clip":
        problems.append(f"delta only applies to objective 'clip', got objective "
                        f"{spec.objective!r}; drop delta")
    if spec.delta is not None and spec.dual_clip_c is not None:
        problems.append(f"delta={spec.delta} and dual_clip_c={spec.dual_clip_c} both cap the "
                        f"A < 0 loss (they coincide when delta = c >= 1 + eps_high); pass one")
    if _is_number(spec.clip_cov_lb) and _is_number(spec.clip_cov_ub) \
            and spec.clip_cov_lb >= spec.clip_cov_ub:
        problems.append(f"clip_cov_lb={spec.clip_cov_lb} must be below clip_cov_ub="
                        f"{spec.clip_cov_ub} (candidates satisfy lb < Cov < ub); lower lb or "
                        f"raise ub")
    return problems


def _rollout_correction_problems(spec: AlgoSpec, per_seq: bool) -> List[str]:
    corrections = axis_registry("rollout_is")
    if spec.rollout_is not in corrections:
        return []  # already reported as an unknown name
    problems = []
    lo, hi = spec.rollout_is_min, spec.rollout_is_max
    if _is_number(lo) and _is_number(hi) and lo >= hi:
        problems.append(f"rollout_is_min={lo!r} must be below rollout_is_max={hi!r}; lower "
                        f"rollout_is_min or raise rollout_is_max")
    if per_seq and not corrections.get(spec.rollout_is).per_sequence and \
            corrections.get(spec.rollout_is).needs_rollout_logp:
        problems.append(f"rollout_is {spec.rollout_is!r} weights tokens but ratio_level "
                        f"{spec.ratio_level!r} gives one loss per sequence; use "
                        f"sequence_truncate or sequence_mask")
    return problems + _shaping_problems(spec, per_seq)


def _shaping_problems(spec: AlgoSpec, per_seq: bool) -> List[str]:
    """Guide's shaping replaces per-token losses; percentile's gamma is a quantile."""
    if spec.off_policy_shaping in ("none", None) or \
            spec.off_policy_shaping not in axis_registry("off_policy_shaping"):
        return []
    problems = []
    if per_seq:
        problems.append(f"off_policy_shaping {spec.off_policy_shaping!r} replaces each token's "
                        f"loss of the hinted rows, but ratio_level {spec.ratio_level!r} gives "
                        f"one loss per sequence; use ratio_level token")
    if spec.off_policy_shaping == "percentile" and _is_number(spec.off_policy_gamma) and \
            not spec.off_policy_gamma <= 1:
        problems.append(f"off_policy_gamma={spec.off_policy_gamma!r} is the quantile of "
                        f"off_policy_shaping 'percentile' and must be in (0, 1] (Guide: 0.9)")
    return problems


def _kl_entropy_problems(spec: AlgoSpec, per_seq: bool) -> List[str]:
    """Options that would be silently ignored: KL options without a KL term, a top-entropy
    mask on a per-sequence loss, ``empty_rows: skip`` with an aggregation that counts tokens."""
    problems = []
    for key, on in (("kl_cap", _is_number(spec.kl_cap) and spec.kl_cap > 0),  # else: range
                    ("kl_bias_correction", spec.kl_bias_correction is True)):
        if on and not spec.beta > 0:
            problems.append(f"{key} shapes the KL term, which beta={spec.beta} leaves out; set "
                            f"beta > 0 or drop {key}")
    if per_seq and spec.top_entropy_quantile < 1:
        problems.append(f"top_entropy_quantile={spec.top_entropy_quantile} masks tokens but "
                        f"ratio_level {spec.ratio_level!r} gives one loss per sequence; use a "
                        f"token-level ratio (token, sequence_token) or top_entropy_quantile=1")
    aggregation = axis_registry("aggregation").get(spec.aggregation)
    if spec.empty_rows == "skip" and not aggregation.averages_rows:
        problems.append(f"empty_rows='skip' changes how rows are counted, and aggregation "
                        f"{spec.aggregation!r} counts tokens (an empty row adds nothing to it); "
                        f"drop empty_rows or use a sequence-mean aggregation")
    return problems


def _apply_length_normalize(base: AlgoSpec, overrides: dict, problems: List[str]) -> dict:
    if "length_normalize" not in overrides:
        return overrides
    overrides = dict(overrides)
    flag = overrides.pop("length_normalize")
    level = overrides.get("ratio_level", base.ratio_level)
    if not isinstance(flag, bool):
        problems.append(f"length_normalize must be True or False, got {flag!r}")
    elif level not in ("sequence", "sequence_sum"):
        problems.append(f"length_normalize applies to a sequence log-ratio (reg_grpo, gspo); "
                        f"got ratio_level {level!r}; drop length_normalize")
    elif "ratio_level" in overrides and level != ("sequence" if flag else "sequence_sum"):
        problems.append(f"length_normalize={flag} contradicts ratio_level={level!r}; "
                        f"pass only one of them")
    else:
        overrides["ratio_level"] = "sequence" if flag else "sequence_sum"
    return overrides
