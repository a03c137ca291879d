"""Named algorithms as presets: one choice per axis plus hyper-parameters, never a code branch.

Each preset below carries its paper's arXiv id and key formula. :func:`resolve_algo` turns a
preset name plus keyword overrides into a frozen :class:`AlgoSpec`; :func:`algo_problems` lists
every problem with such a request at once (unknown names, wrong types, bad ranges, combinations
that cannot work), so a config error is reported in one go.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

from mmrl.algo.advantages import ADVANTAGES, MULTI_REWARD
from mmrl.algo.losses import AGGREGATIONS, KL_ESTIMATORS, OBJECTIVES, RATIO_LEVELS
from mmrl.registry import did_you_mean

TOKEN_WEIGHTINGS = ("none", "tw")


@dataclass(frozen=True)
class AlgoSpec:
    """One choice per axis and every hyper-parameter of a policy-gradient algorithm.

    Attributes:
        advantage: name in ``ADVANTAGES`` (single-reward: ``grpo``, ``mean_center``, ...); with
            several reward columns it is the ``base`` of ``group_advantages``' multi-reward method.
        ratio_level: name in ``RATIO_LEVELS``: ``token``, ``sequence`` (GSPO), ``sequence_token``
            (GSPO-token), ``sequence_sum`` (Reg-GRPO).
        objective: name in ``OBJECTIVES``: ``clip``, ``sapo``, ``reg``.
        aggregation: name in ``AGGREGATIONS``; per-sequence ratio levels need ``seq_mean``.
        kl: name in ``KL_ESTIMATORS`` (``k1``, ``k2``, ``k3``), used when ``beta > 0``.
        token_weighting: ``none`` or ``tw`` (TW-GRPO weights passed as ``token_weights``).
        eps_low, eps_high: clip range ``[1 − eps_low, 1 + eps_high]`` (``clip``).
        dual_clip_c: dual-clip bound c > 1 for A < 0 (``clip``); None = off.
        tau_pos, tau_neg: SAPO temperatures for A > 0 / A ≤ 0.
        eps_reg: Reg-GRPO scale ε in Â = ε·(ℓr − mean_g ℓr).
        beta: KL coefficient to the reference policy (0 = no reference needed).
        max_len: L_max of ``fixed_norm`` (max completion length or trained steps).
        r_max: virtual reward of ``ngrpo``.
        adv_eps: eps added to the std in advantages.
        adv_clip: clamp advantages to ±adv_clip; None = off.
        tw_alpha: TW-GRPO α (1 = uniform weights).
    """

    advantage: str = "grpo"
    ratio_level: str = "token"
    objective: str = "clip"
    aggregation: str = "seq_mean_token_mean"
    kl: str = "k3"
    token_weighting: str = "none"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip_c: Optional[float] = None
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    eps_reg: float = 1.0
    beta: float = 0.0
    max_len: Optional[int] = None
    r_max: float = 1.0
    adv_eps: float = 1e-4
    adv_clip: Optional[float] = None
    tw_alpha: float = 1.7

    @property
    def sequence_level(self) -> bool:
        """True when the ratio is computed from whole sequences (GSPO, GSPO-token, Reg-GRPO).

        Then every row's T tokens must reach the loss in one call: do not chunk the T axis.
        """
        return RATIO_LEVELS.get(self.ratio_level).whole_sequence

    @property
    def per_sequence_loss(self) -> bool:
        """True when the loss is one value per sequence (``[B, 1]``, aggregated by ``seq_mean``)."""
        return RATIO_LEVELS.get(self.ratio_level).per_sequence

    @property
    def needs_groups(self) -> bool:
        """True when the loss itself needs ``group_ids`` (``reg``)."""
        return OBJECTIVES.get(self.objective).needs_groups

    @property
    def needs_ref(self) -> bool:
        """True when ``ref_logp`` is required (beta > 0)."""
        return self.beta > 0

    @property
    def needs_token_weights(self) -> bool:
        return self.token_weighting == "tw"


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
_AXES = {"advantage": ADVANTAGES, "ratio_level": RATIO_LEVELS, "objective": OBJECTIVES,
         "aggregation": AGGREGATIONS, "kl": KL_ESTIMATORS}
_EXTRA_KEYS = ("length_normalize",)
# (field, lower bound, bound allowed?) for the numeric hyper-parameters.
_RANGES = [("eps_low", 0.0, True), ("eps_high", 0.0, True), ("tau_pos", 0.0, False),
           ("tau_neg", 0.0, False), ("eps_reg", 0.0, False), ("beta", 0.0, True),
           ("adv_eps", 0.0, True), ("tw_alpha", 0.0, True), ("adv_clip", 0.0, False),
           ("dual_clip_c", 1.0, False), ("max_len", 0, False)]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_problems(values: dict) -> Dict[str, str]:
    """{key: problem} for overrides of the wrong type."""
    problems = {}
    for key, v in values.items():
        if _FIELDS[key].default is None and v is None:
            continue
        if isinstance(_FIELDS[key].default, str) and not isinstance(v, str):
            problems[key] = f"{key} must be a name (str), got {type(v).__name__} {v!r}"
        elif key == "max_len" and not (isinstance(v, int) and not isinstance(v, bool)):
            problems[key] = f"max_len must be an int (max completion length), got {v!r}"
        elif not isinstance(_FIELDS[key].default, str) and not _is_number(v):
            problems[key] = f"{key} must be a number, got {type(v).__name__} {v!r}"
        elif _is_number(v) and not math.isfinite(v):
            problems[key] = f"{key} must be finite, got {v!r}"
    return problems


def _range_problems(spec: AlgoSpec) -> List[str]:
    problems = []
    for key, low, inclusive in _RANGES:
        v = getattr(spec, key)
        if v is None or not _is_number(v):
            continue
        if (v < low) if inclusive else (v <= low):
            problems.append(f"{key}={v!r} is out of range; expected {key} "
                            f"{'>=' if inclusive else '>'} {low}")
    if _is_number(spec.eps_low) and spec.eps_low >= 1:
        problems.append(f"eps_low={spec.eps_low!r} would let the clip range reach ρ ≤ 0; "
                        f"expected 0 <= eps_low < 1")
    return problems


def _axis_problems(spec: AlgoSpec) -> List[str]:
    problems = []
    for axis, registry in _AXES.items():
        name = getattr(spec, axis)
        if not isinstance(name, str):
            continue
        if axis == "advantage" and name in MULTI_REWARD:
            problems.append(f"advantage {name!r} combines reward columns; the advantage axis "
                            f"takes a single-reward estimator ({', '.join(ADVANTAGES.names())}) "
                            f"that the loop's multi-reward method uses as its base")
        elif name not in registry:
            problems.append(registry.unknown_message(name))
    if isinstance(spec.token_weighting, str) and spec.token_weighting not in TOKEN_WEIGHTINGS:
        hint = did_you_mean(spec.token_weighting, TOKEN_WEIGHTINGS)
        problems.append(f"unknown token_weighting {spec.token_weighting!r} (expected one of "
                        f"{', '.join(TOKEN_WEIGHTINGS)}){hint}")
    return problems


def _combination_problems(spec: AlgoSpec) -> List[str]:
    if not (spec.ratio_level in RATIO_LEVELS and spec.aggregation in AGGREGATIONS
            and spec.objective in OBJECTIVES):
        return []  # already reported as unknown names
    problems = []
    per_seq = RATIO_LEVELS.get(spec.ratio_level).per_sequence
    if per_seq and not AGGREGATIONS.get(spec.aggregation).per_sequence:
        problems.append(f"ratio_level {spec.ratio_level!r} gives one loss per sequence but "
                        f"aggregation {spec.aggregation!r} averages tokens; use aggregation "
                        f"'seq_mean'")
    if not per_seq and AGGREGATIONS.get(spec.aggregation).per_sequence:
        problems.append(f"aggregation {spec.aggregation!r} needs a per-sequence ratio level "
                        f"(sequence, sequence_sum), got {spec.ratio_level!r}; use a token "
                        f"aggregation such as 'token_mean'")
    if OBJECTIVES.get(spec.objective).needs_per_sequence and not per_seq:
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
