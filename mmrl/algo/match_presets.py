"""Weighted-matching objectives as presets: DiffusionNFT and AWM (torch-free).

:class:`MatchSpec` holds every choice and hyper-parameter of a matching objective (the loss of
:data:`mmrl.algo.matching.MATCHING_LOSSES`, its hyper-parameters, the old / EMA model's soft
update and how training times are drawn), each field declared once with :func:`mmrl.fields.cfg`;
:data:`MATCH_PRESETS` names the published methods; :func:`match_problems` lists every problem of
a preset plus overrides at once, :func:`resolve_match` returns the frozen spec. Like
:mod:`mmrl.algo.pref_presets` this imports no torch, so ``mmrl config validate`` stays light (the
name tables below are kept equal to the torch module's by tests/algo/test_matching.py).

Defaults and sources: ../shared/ALGORITHMS-flow.md, docs/diffusion_train.md.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Dict, List

from mmrl.algo.checks import _type_problems
from mmrl.fields import cfg, problems_error, range_problem
from mmrl.registry import did_you_mean

LOSS_READS: Dict[str, tuple] = {
    "nft": ("beta", "adv_clip_max", "adv_mode", "kl_coef"),
    "awm": ("weighting", "ghuber_p", "adv_clip_max", "adv_max", "clip_range", "kl_coef",
            "kl_form", "old_coef"),
}
"""The MatchSpec fields each loss of ``MATCHING_LOSSES`` reads (its keyword arguments)."""
SOFT_UPDATE_NAMES = ("none", "nft_ramp", "nft_delayed", "awm_kl_ema")
TIME_DRAW_NAMES = ("rollout_grid", "stratified", "stratified_wo_init")
AWM_WEIGHTING_NAMES = ("uniform", "t", "t**2", "huber", "ghuber")
NFT_ADV_MODE_NAMES = ("all", "positive_only", "negative_only", "one_only", "binary")
_TIME_READS = {"rollout_grid": ("time_fraction",),
               "stratified": ("num_times", "time_max_fraction"),
               "stratified_wo_init": ("num_times", "time_max_fraction")}


@dataclass(frozen=True)
class MatchSpec:
    """One weighted-matching objective: the loss on (v_θ, ε − x0, t) terms, its old model and
    its training times."""

    loss: str = cfg("nft", "Matching loss: nft (DiffusionNFT) or awm (Advantage Weighted "
                    "Matching).", choices=list(LOSS_READS), source="mmrl.algo.matching")
    beta: float = cfg(1.0, "nft: beta of the implicit policies v+ = b*v + (1-b)*v_old, "
                      "v- = (1+b)*v_old - b*v.", above=0.0,
                      source="DiffusionNFT config/nft.py (1.0; 0.1 ocr / multi_reward)")
    adv_clip_max: float = cfg(5.0, "C: advantages clipped to [-C, C] (nft: r = clip(A)/C/2 + "
                              "1/2; awm: A' = clip(A)/C * adv_max).", above=0.0,
                              source="DiffusionNFT, AWM (5)")
    adv_mode: str = cfg("all", "nft: advantage variant (all, positive_only, negative_only, "
                        "one_only, binary).", choices=list(NFT_ADV_MODE_NAMES),
                        source="DiffusionNFT train.adv_mode (all)")
    adv_max: float = cfg(1.0, "awm: A' = clip(A, +-C)/C * adv_max.", above=0.0,
                         source="AWM advantage_max (1)")
    weighting: str = cfg("ghuber", "awm: phi(e)*w(t) of the matching error e: uniform, t, t**2, "
                         "huber, ghuber.", choices=list(AWM_WEIGHTING_NAMES),
                         source="AWM train_sd3_awm.py (ghuber)")
    ghuber_p: float = cfg(0.25, "awm: p of ghuber, ((e + 1e-10)^p - 1e-10^p) * t / p.",
                          above=0.0, source="AWM (0.25)")
    clip_range: float = cfg(1.0, "awm: PPO clip epsilon of the ratio (on-policy: never acts).",
                            above=0.0, source="AWM clip_range (1.0)")
    kl_coef: float = cfg(1e-4, "lambda_KL: weight of mean_d (v - v_ref)^2, v_ref = the base "
                         "model (LoRA disabled / frozen copy); 0 skips the reference forward.",
                         minimum=0.0, source="DiffusionNFT train.beta (1e-4); AWM pickscore "
                         "(1e-4; geneval 1e-3, ocr 3e-3)")
    kl_form: str = cfg("uniform", "awm: uniform, or elbo (divided by 2 s_t^2, s_t = "
                       "0.7 sqrt(t / (1 - min(t, 0.99)))).", choices=["uniform", "elbo"],
                       source="AWM (uniform)")
    old_coef: float = cfg(0.0, "awm: weight of mean_d (v - v_old)^2 toward the soft-updated "
                          "copy (AWM's kl_ema adapter, ema_beta).", minimum=0.0,
                          source="AWM ema_beta (1)")
    old_decay: str = cfg("nft_ramp", "Soft update of the old / EMA copy once per step, "
                         "theta_old <- eta*theta_old + (1 - eta)*theta: none (eta 0), nft_ramp "
                         "min(0.001 s, 0.5), nft_delayed (0 before s=75, then min(0.0075 (s-75),"
                         " 0.999)), awm_kl_ema min(0.3, 0.001 s).",
                         choices=list(SOFT_UPDATE_NAMES),
                         source="DiffusionNFT return_decay (type 1); AWM kl_ema")
    rollout_policy: str = cfg("old", "Which weights sample the rollouts: old (the soft-updated "
                              "copy, DiffusionNFT's 'old' adapter) or current (AWM).",
                              choices=["old", "current"],
                              source="DiffusionNFT train_nft_sd3.py; AWM train_sd3_awm.py")
    times: str = cfg("rollout_grid", "Training times: rollout_grid (per row a random subset of "
                     "the rollout's sigma grid, DiffusionNFT), stratified / stratified_wo_init "
                     "(AWM discrete / discrete_wo_init).", choices=list(TIME_DRAW_NAMES),
                     source="DiffusionNFT timestep_fraction; AWM time_type")
    time_fraction: float = cfg(0.99, "rollout_grid: K = floor(T * fraction) times per row.",
                               above=0.0, maximum=1.0,
                               source="DiffusionNFT timestep_fraction (0.99)")
    num_times: int = cfg(6, "stratified: K strata (times per row).", minimum=1,
                         source="AWM (6)")
    time_max_fraction: float = cfg(0.9, "stratified: strata span indices up to "
                                   "floor(T * max_fraction).", above=0.0, maximum=1.0,
                                   source="AWM (0.9)")

    def loss_kwargs(self) -> Dict[str, typing.Any]:
        """The keyword arguments of the loss function: the fields it reads, by name."""
        return {k: getattr(self, k) for k in LOSS_READS[self.loss]}

    @property
    def needs_old(self) -> bool:
        """True when an old / EMA copy is kept: the loss reads its velocity (``MatchTerms.v_old``)
        or the rollouts sample with it."""
        return self.loss == "nft" or self.old_coef > 0 or self.rollout_policy == "old"

    @property
    def reads_old(self) -> bool:
        """True when the loss reads the old copy's velocity ``MatchTerms.v_old``."""
        return self.loss == "nft" or self.old_coef > 0

    @property
    def needs_ref(self) -> bool:
        """True when the loss reads the reference velocity (``MatchTerms.v_ref``)."""
        return self.kl_coef > 0


MATCH_PRESETS: Dict[str, MatchSpec] = {
    # DiffusionNFT, arXiv 2509.16117 (NVlabs/DiffusionNFT config/nft.py sd3_pickscore):
    # β 1, C 5, λ_KL 1e-4, decay type 1, 99 % of the rollout grid per sample.
    "nft": MatchSpec(),
    # AWM, arXiv 2509.25050 (scxue/advantage_weighted_matching pickscore_sd3_no_cfg_1node):
    # ghuber p 0.25, exp_first clip 1, λ_KL 1e-4, ema_beta 1 with kl_ema, "discrete" times K 6.
    "awm": MatchSpec(loss="awm", old_coef=1.0, old_decay="awm_kl_ema", times="stratified",
                     rollout_policy="current"),
}

_FIELDS = {f.name: f for f in dataclasses.fields(MatchSpec)}
_HINTS = typing.get_type_hints(MatchSpec)


def match_problems(name: str, **overrides) -> List[str]:
    """Every problem with matching preset ``name`` plus ``overrides``; [] when valid: the
    name, override keys, types, ranges and choices, and overrides the chosen loss or time draw
    does not read."""
    problems: List[str] = []
    if not isinstance(name, str) or name not in MATCH_PRESETS:
        problems.append(f"unknown matching preset {name!r} (registered: "
                        f"{', '.join(sorted(MATCH_PRESETS))}){did_you_mean(name, MATCH_PRESETS)}")
        base = MatchSpec()
    else:
        base = MATCH_PRESETS[name]
    unknown = [k for k in overrides if k not in _FIELDS]
    problems += [f"unknown matching override {k!r} (known: {', '.join(sorted(_FIELDS))})"
                 f"{did_you_mean(k, _FIELDS)}" for k in unknown]
    known = {k: v for k, v in overrides.items() if k not in unknown}
    type_problems = _type_problems(known, _HINTS)
    problems += list(type_problems.values())
    spec = dataclasses.replace(base, **{k: v for k, v in known.items() if k not in type_problems})
    for f, field in _FIELDS.items():
        value, choices = getattr(spec, f), field.metadata.get("choices")
        if choices is not None and value not in choices:
            problems.append(f"{f}={value!r}; expected one of {', '.join(map(str, choices))}")
        else:
            problems.append(range_problem(f, value, field.metadata))
    problems = [p for p in problems if p is not None]
    if spec.loss in LOSS_READS and spec.times in _TIME_READS:
        reads = set(LOSS_READS[spec.loss]) | set(_TIME_READS[spec.times]) | {
            "loss", "old_decay", "times", "rollout_policy"}
        problems += [f"{k}={known[k]!r} is not read by loss {spec.loss!r} with times "
                     f"{spec.times!r}; drop it" for k in known if k not in reads]
    return problems


def resolve_match(name: str, **overrides) -> MatchSpec:
    """The :class:`MatchSpec` of preset ``name`` with ``overrides`` applied.

    Raises:
        ValueError: listing every problem found by :func:`match_problems`.
    """
    problems = match_problems(name, **overrides)
    if problems:
        raise problems_error(f"invalid matching objective {name!r} with overrides "
                             f"{overrides!r}", problems)
    return dataclasses.replace(MATCH_PRESETS[name], **overrides)
