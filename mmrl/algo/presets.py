"""Named algorithms as presets: one choice per axis plus hyper-parameters, never a code branch.

Each preset below carries its paper's arXiv id and key formula. :func:`resolve_algo` turns a
preset name plus keyword overrides into a frozen :class:`AlgoSpec`; :func:`algo_problems` lists
every problem with such a request at once (unknown names, wrong types, bad ranges, combinations
that cannot work), so a config error is reported in one go.

Every field of :class:`AlgoSpec` is declared once, with :func:`mmrl.fields.cfg` (type, default,
bounds, meaning, source); the config's ``algo:`` section is derived from these declarations. This
module imports no torch: the axis names and flags come from the registries once they are
imported, and from a table of the built-in entries before that (:func:`axis_registry`).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass
from typing import Dict, List, Optional

from mmrl.fields import cfg, range_problem
from mmrl.registry import Registry, did_you_mean

TOKEN_WEIGHTINGS = ("none", "tw")
EMPTY_ROWS = ("count", "skip")

# The built-in entries of each axis and the flags the checks read, without torch: validating a
# config (``mmrl config validate``) must not load it. The registries that hold the
# implementations (mmrl.algo.ratios, objectives, aggregations, kl, advantages) are used instead once they are
# imported, so entries a user registers count too; tests/config/test_algo_fields.py checks that
# this table equals the built-in registries.
_BUILTIN = {
    ("advantage", "mmrl.algo.advantages", "ADVANTAGES"): {
        n: {} for n in ("batch_std", "grpo", "mean_center", "ngrpo", "rloo")},
    ("multi-reward advantage", "mmrl.algo.advantages", "MULTI_REWARD"): {
        n: {} for n in ("normalize_then_sum", "sum_then_normalize")},
    ("ratio level", "mmrl.algo.ratios", "RATIO_LEVELS"): {
        "token": dict(per_sequence=False, whole_sequence=False),
        "sequence": dict(per_sequence=True, whole_sequence=True),
        "sequence_token": dict(per_sequence=False, whole_sequence=True),
        "sequence_sum": dict(per_sequence=True, whole_sequence=True)},
    ("objective", "mmrl.algo.objectives", "OBJECTIVES"): {
        "clip": dict(needs_groups=False, needs_per_sequence=False),
        "sapo": dict(needs_groups=False, needs_per_sequence=False),
        "reg": dict(needs_groups=True, needs_per_sequence=True)},
    ("aggregation", "mmrl.algo.aggregations", "AGGREGATIONS"): {
        "token_mean": dict(per_sequence=False, averages_rows=False),
        "seq_mean_token_mean": dict(per_sequence=False, averages_rows=True),
        "seq_mean_token_sum": dict(per_sequence=False, averages_rows=True),
        "fixed_norm": dict(per_sequence=False, averages_rows=True),
        "seq_mean": dict(per_sequence=True, averages_rows=True)},
    ("KL estimator", "mmrl.algo.kl", "KL_ESTIMATORS"): {n: {} for n in ("k1", "k2", "k3")},
}
_AXIS_OF = {"advantage": "ADVANTAGES", "multi_reward": "MULTI_REWARD",
            "ratio_level": "RATIO_LEVELS", "objective": "OBJECTIVES",
            "aggregation": "AGGREGATIONS", "kl": "KL_ESTIMATORS"}


def _static(axis: str, entries: dict) -> Registry:
    table: Registry = Registry(axis)
    for name, flags in entries.items():
        table.register(name, types.SimpleNamespace(**flags))
    return table


_STATIC = {key[2]: (key[1], _static(key[0], entries)) for key, entries in _BUILTIN.items()}


def axis_registry(axis: str) -> Registry:
    """The registry of ``axis`` (``"objective"``, ``"ratio_level"``, ...): the live one when its
    module is imported (user entries included), else the torch-free table of built-in entries
    (same names, flags and error messages)."""
    module, table = _STATIC[_AXIS_OF[axis]]
    live = getattr(sys.modules.get(module), _AXIS_OF[axis], None)
    return live if live is not None else table


def _axis_doc(axis: str) -> str:
    return ", ".join(_STATIC[_AXIS_OF[axis]][1].names())


@dataclass(frozen=True)
class AlgoSpec:
    """One choice per axis and every hyper-parameter of a policy-gradient algorithm.

    Each field is declared once, here (type, default, bounds, meaning, source): the checks of
    :func:`algo_problems`, the ``algo:`` config section (:class:`mmrl.config.schema.AlgoConfig`,
    one optional override per field) and its rows in docs/config.md are derived from it.
    """

    advantage: str = cfg("grpo", "Advantage estimator (single reward; with several reward "
                         "columns the base of algo.multi_reward): " + _axis_doc("advantage")
                         + ".", source="mmrl.algo.advantages")
    ratio_level: str = cfg("token", "Importance-ratio level: token, sequence (GSPO), "
                           "sequence_token (GSPO-token), sequence_sum (Reg-GRPO).",
                           source="GSPO arXiv 2507.18071")
    objective: str = cfg("clip", "Per-token objective: " + _axis_doc("objective") + ".",
                         source="mmrl.algo.objectives")
    aggregation: str = cfg("seq_mean_token_mean", "Loss aggregation: "
                           + _axis_doc("aggregation") + "; per-sequence ratio levels need "
                           "seq_mean.", source="Dr.GRPO arXiv 2503.20783; DAPO arXiv 2503.14476")
    kl: str = cfg("k3", "KL estimator to the reference policy, used when beta > 0: k1, k2, k3 "
                  "(the diffusion job refuses it: see diffusion.kl).",
                  source="Schulman, 'Approximating KL divergence' (2020)")
    token_weighting: str = cfg("none", "Token weighting: none, or tw (TW-GRPO weights from the "
                               "group's full-vocabulary log-probs).",
                               source="TW-GRPO arXiv 2505.24718")
    eps_low: float = cfg(0.2, "Lower clip range: ratio clipped at 1 - eps_low (eps_low >= 1 "
                         "would let the clip range reach ratio <= 0).", minimum=0.0, below=1.0,
                         source="PPO arXiv 1707.06347 (0.2); DAPO clip-higher")
    eps_high: float = cfg(0.2, "Upper clip range: ratio clipped at 1 + eps_high.", minimum=0.0,
                          source="DAPO arXiv 2503.14476 (0.28)")
    dual_clip_c: Optional[float] = cfg(None, "Dual-clip constant c (> 1) bounding the loss for "
                                       "negative advantages (objective clip); null disables.",
                                       above=1.0,
                                       source="Dual-clip PPO arXiv 1912.09729; verl clip_ratio_c")
    tau_pos: float = cfg(1.0, "SAPO temperature for positive advantages.", above=0.0,
                         source="SAPO arXiv 2511.20347 (1.0)")
    tau_neg: float = cfg(1.05, "SAPO temperature for non-positive advantages.", above=0.0,
                         source="SAPO arXiv 2511.20347 (1.05)")
    eps_reg: float = cfg(1.0, "Reg-GRPO scale: predicted advantage = eps_reg * (centered "
                         "sequence log-ratio).", above=0.0,
                         source="DeepVideo-R1 arXiv 2506.07464 (1.0)")
    beta: float = cfg(0.0, "KL coefficient to the reference policy (0 = no reference model "
                      "needed).", minimum=0.0, source="GRPO (0.04); most recent recipes 0")
    max_len: Optional[int] = cfg(None, "Constant L_max of fixed_norm aggregation (the maximum "
                                 "completion length / trained steps).", minimum=1,
                                 source="Dr.GRPO arXiv 2503.20783")
    r_max: float = cfg(1.0, "NGRPO virtual sample's reward (the maximum reward).",
                       source="NGRPO arXiv 2509.18851 (1.0)")
    adv_eps: float = cfg(1e-4, "Epsilon added to the std in advantage normalization.",
                         minimum=0.0, source="1e-4 (flow_grpo, TRL)")
    adv_clip: Optional[float] = cfg(None, "Clip advantages to +-adv_clip; null disables.",
                                    above=0.0, source="flow_grpo (5)")
    tw_alpha: float = cfg(1.7, "TW-GRPO maximum token weight alpha (1 = uniform weights, as "
                          "plain GRPO; below 1 weights high-divergence tokens down).",
                          minimum=0.0, source="TW-GRPO arXiv 2505.24718 (1.7)")
    kl_cap: Optional[float] = cfg(None, "Clamp the per-token KL term (beta > 0) to [-kl_cap, "
                                  "kl_cap]; the gradient is 0 where it binds. verl clamps its "
                                  "k3 (low_var_kl) at 10; null disables.", above=0.0,
                                  source="verl kl_penalty low_var_kl (10)")
    kl_bias_correction: bool = cfg(False, "Multiply the per-token KL term by the importance "
                                   "ratio (not detached; s_i for per-sequence ratio levels): "
                                   "an unbiased KL estimate for samples from the old policy. "
                                   "TRL use_bias_correction_kl (its default is true).",
                                   source="DeepSeek-V3.2 arXiv 2512.02556; TRL 1.16")
    entropy_coef: float = cfg(0.0, "Entropy bonus: loss -= entropy_coef * agg(H), the "
                              "temperature-scaled token entropy aggregated like the policy "
                              "term (verl entropy_coeff). Needs a policy with per-token "
                              "entropies (the VLM policy; refused for diffusion).", minimum=0.0,
                              source="verl entropy_coeff; TRL entropy_coef (0)")
    top_entropy_quantile: float = cfg(1.0, "Train only the tokens whose entropy (at the "
                                      "update's start) is in the top quantile of the optimizer "
                                      "mini-batch's valid tokens, all ranks together; 1 keeps "
                                      "all, 0 only the maximum. Masks the policy term and the "
                                      "entropy bonus, not KL or normalizers.",
                                      minimum=0.0, maximum=1.0,
                                      source="arXiv 2506.01939 (0.2); TRL top_entropy_quantile")
    empty_rows: str = cfg("count", "Rows with no valid token in the sequence-averaging "
                          "aggregations (seq_mean_token_mean, seq_mean_token_sum, seq_mean, "
                          "fixed_norm): count (mmrl: they add 0 and count in the row total) or "
                          "skip (verl: divide by the non-empty rows).",
                          source="verl agg_loss (skip)")

    @property
    def sequence_level(self) -> bool:
        """True when the ratio is computed from whole sequences (GSPO, GSPO-token, Reg-GRPO).

        Then every row's T tokens must reach the loss in one call: do not chunk the T axis.
        """
        return axis_registry("ratio_level").get(self.ratio_level).whole_sequence

    @property
    def per_sequence_loss(self) -> bool:
        """True when the loss is one value per sequence (``[B, 1]``, aggregated by ``seq_mean``)."""
        return axis_registry("ratio_level").get(self.ratio_level).per_sequence

    @property
    def needs_groups(self) -> bool:
        """True when the loss itself needs ``group_ids`` (``reg``)."""
        return axis_registry("objective").get(self.objective).needs_groups

    @property
    def needs_ref(self) -> bool:
        """True when ``ref_logp`` is required (beta > 0)."""
        return self.beta > 0

    @property
    def needs_token_weights(self) -> bool:
        return self.token_weighting == "tw"

    @property
    def needs_entropy(self) -> bool:
        """True when the loss reads per-token entropies (entropy bonus or top-entropy mask)."""
        return self.entropy_coef > 0 or self.top_entropy_quantile < 1


EXTRA_OVERRIDES = {
    "length_normalize": (Optional[bool], cfg(
        None, "Reg-GRPO: use the length-normalized sequence log-ratio (the same as "
        "ratio_level=sequence; false: sequence_sum).", source="DeepVideo-R1 arXiv 2506.07464")),
}
"""Overrides that are not :class:`AlgoSpec` fields: ``name -> (type, field)``; each maps onto
fields (see :func:`algo_problems`)."""


PRESETS: Dict[str, AlgoSpec] = {
    # GRPO, arXiv 2402.03300: A = (r − mean)/(std + eps); −min(ρA, clip(ρ, 0.8, 1.2)A);
    # mean over sequences of the mean over tokens.
    "grpo": AlgoSpec(),
    # Dr.GRPO, arXiv 2503.20783: A = r − mean; Σ_i,t ℓ / (B·L_max). Needs max_len.
    "dr_grpo": AlgoSpec(advantage="mean_center", aggregation="fixed_norm"),
    # DAPO, arXiv 2503.14476: clip-higher ε 0.2 / 0.28; token-level mean Σ ℓ / Σ |o_i|.
    "dapo": AlgoSpec(eps_high=0.28, aggregation="token_mean"),
    # GSPO, arXiv 2507.18071: s_i = exp(mean_t x); −min(s A, clip(s, 1−3e-4, 1+4e-4) A).
    "gspo": AlgoSpec(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4, aggregation="seq_mean"),
    # GSPO-token, arXiv 2507.18071 eq. 13: log s_i,t = logp − sg(logp) + sg(log s_i).
    "gspo_token": AlgoSpec(ratio_level="sequence_token", eps_low=3e-4, eps_high=4e-4),
    # SAPO, arXiv 2511.20347: −(4/τ)·sigmoid(τ(ρ − 1))·A, τ 1.0 (A > 0) / 1.05.
    "sapo": AlgoSpec(objective="sapo"),
    # Reg-GRPO (DeepVideo-R1), arXiv 2506.07464: (A_i − ε(ℓr_i − mean_g ℓr))², ℓr = Σ_t x.
    # Override length_normalize=True to use ℓr = mean_t x (ratio_level "sequence").
    "reg_grpo": AlgoSpec(ratio_level="sequence_sum", objective="reg", aggregation="seq_mean"),
    # TW-GRPO, arXiv 2505.24718: token_mean of w_t·ℓ, w from group KL to the mean (α 1.7).
    "tw_grpo": AlgoSpec(eps_high=0.28, aggregation="token_mean", token_weighting="tw"),
    # NGRPO, arXiv 2509.18851: stats over the group + one virtual reward r_max; clip 0.16 / 0.24.
    "ngrpo": AlgoSpec(advantage="ngrpo", eps_low=0.16, eps_high=0.24, aggregation="token_mean"),
    # Lite-PPO, arXiv 2508.08221: group mean, batch std; token-level mean.
    "lite_ppo": AlgoSpec(advantage="batch_std", aggregation="token_mean"),
}

_FIELDS = {f.name: f for f in dataclasses.fields(AlgoSpec)}
_HINTS = typing.get_type_hints(AlgoSpec)
_AXES = ("advantage", "ratio_level", "objective", "aggregation", "kl")
_EXTRA_KEYS = tuple(EXTRA_OVERRIDES)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _value_type(key: str) -> type:
    """``str``, ``int`` or ``float``: the declared type of field ``key`` (None allowed aside)."""
    tp = _HINTS[key]
    return next((a for a in typing.get_args(tp) if a is not type(None)), tp)


def _type_problems(values: dict) -> Dict[str, str]:
    """{key: problem} for overrides of the wrong type (per the field's declared type)."""
    problems = {}
    for key, v in values.items():
        tp = _value_type(key)
        if v is None and typing.get_origin(_HINTS[key]) is typing.Union:
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
    """Numbers outside their field's declared bounds (:func:`mmrl.fields.range_problem`)."""
    problems = [range_problem(f.name, getattr(spec, f.name), f.metadata) for f in _FIELDS.values()]
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
    if isinstance(spec.empty_rows, str) and spec.empty_rows not in EMPTY_ROWS:
        hint = did_you_mean(spec.empty_rows, EMPTY_ROWS)
        problems.append(f"unknown empty_rows {spec.empty_rows!r} (expected one of "
                        f"{', '.join(EMPTY_ROWS)}){hint}")
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
    if spec.dual_clip_c is not None and spec.objective != "clip":
        problems.append(f"dual_clip_c only applies to objective 'clip', got objective "
                        f"{spec.objective!r}; drop dual_clip_c")
    return problems + _kl_entropy_problems(spec, per_seq)


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


def algo_problems(name: str, **overrides) -> List[str]:
    """Every problem with preset ``name`` plus ``overrides``, as messages; [] when valid.

    Checks the preset name (with did-you-mean), override keys, axis names (via the registries),
    types, ranges and combinations (per-sequence ratio vs token aggregation, ``reg`` without a
    sequence ratio, ``fixed_norm`` without ``max_len``, ``tw`` with a sequence level, ...).
    ``length_normalize`` (bool) maps to ratio_level ``sequence`` (True) / ``sequence_sum`` (False).
    """
    problems: List[str] = []
    if not isinstance(name, str) or name not in PRESETS:
        problems.append(f"unknown preset {name!r} (registered: {', '.join(sorted(PRESETS))})"
                        f"{did_you_mean(name, PRESETS)}")
        base = AlgoSpec()
    else:
        base = PRESETS[name]
    unknown = [k for k in overrides if k not in _FIELDS and k not in _EXTRA_KEYS]
    for k in unknown:
        problems.append(f"unknown override {k!r} (known: {', '.join(sorted(_FIELDS))}, "
                        f"length_normalize){did_you_mean(k, list(_FIELDS) + list(_EXTRA_KEYS))}")
    overrides = {k: v for k, v in overrides.items() if k not in unknown}
    overrides = _apply_length_normalize(base, overrides, problems)
    type_problems = _type_problems(overrides)
    problems += list(type_problems.values())
    # Keep checking the rest with the preset's value in place of each ill-typed override.
    spec = dataclasses.replace(base, **{k: v for k, v in overrides.items()
                                        if k not in type_problems})
    return problems + _axis_problems(spec) + _range_problems(spec) + _combination_problems(spec)


def resolve_algo(name: str, **overrides) -> AlgoSpec:
    """The :class:`AlgoSpec` of preset ``name`` with ``overrides`` applied.

    Args:
        name: a key of :data:`PRESETS`.
        **overrides: ``AlgoSpec`` fields, plus ``length_normalize`` (bool) for Reg-GRPO.

    Returns:
        a frozen, validated ``AlgoSpec``.

    Raises:
        ValueError: listing every problem found by :func:`algo_problems`.
    """
    problems = algo_problems(name, **overrides)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(f"invalid algorithm {name!r} with overrides {overrides!r}: "
                         f"{len(problems)} problem(s):\n{lines}")
    fixed = _apply_length_normalize(PRESETS[name], overrides, [])
    return dataclasses.replace(PRESETS[name], **fixed)
