"""Preference losses as presets: one loss on the pair margin plus how each side is scored.

:class:`PrefSpec` holds every choice and hyper-parameter, each field declared once with
:func:`mmrl.fields.cfg`; :data:`PREF_PRESETS` names the published methods (DPO, IPO, cDPO,
robust DPO, SimPO, SPPO, TRPA, TGDPO, Diffusion-DPO); :func:`pref_problems` lists every problem
with a preset plus overrides at once, :func:`resolve_pref` returns the frozen spec. Like
:mod:`mmrl.algo.presets` this module imports no torch (validating a config must not load it):
the loss names and flags come from the live registry
(:data:`mmrl.algo.pref_losses.PREF_LOSSES`) once it is imported, else from the table of the
built-in entries below (tests/algo/test_preference.py checks that both agree).

Not built (no primary source reachable for their loss): SRPO (arXiv 2406.01660, self-improving
robust PO) and self-supervised preference optimization (arXiv 2409.17791, whose code
repository lijian16/SPO holds only a licence); see docs/algorithms.md.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from typing import Dict, List

from mmrl.algo.checks import _type_problems
from mmrl.fields import cfg, problems_error, range_problem
from mmrl.registry import Registry, did_you_mean

# Built-in losses and the flags the checks read: ``win`` which win rates the loss reads
# (None, "both": P̂_w and P̂_l, "chosen": P(y_w ≻ y_l)), ``smoothing`` whether it reads
# label_smoothing, ``margin`` whether it reads gamma_beta_ratio, ``needs_ref`` whether it
# regresses log-ratios to the reference (so reference_free cannot apply).
_BUILTIN_LOSSES = {
    "sigmoid": dict(win=None, smoothing=True, margin=True, needs_ref=False),
    "hinge": dict(win=None, smoothing=False, margin=True, needs_ref=False),
    "robust": dict(win=None, smoothing=True, margin=True, needs_ref=False),
    "ipo": dict(win=None, smoothing=False, margin=False, needs_ref=False),
    "sppo": dict(win="both", smoothing=False, margin=False, needs_ref=True),
    "sppo_single": dict(win="chosen", smoothing=False, margin=False, needs_ref=True),
}
_STATIC = Registry("preference loss")
for _name, _flags in _BUILTIN_LOSSES.items():
    _STATIC.register(_name, types.SimpleNamespace(**_flags))


def loss_registry() -> Registry:
    """The preference-loss registry: the live one (user entries included) once
    :mod:`mmrl.algo.pref_losses` is imported, else the torch-free table of built-in entries."""
    live = getattr(sys.modules.get("mmrl.algo.pref_losses"), "PREF_LOSSES", None)
    return live if live is not None else _STATIC


@dataclass(frozen=True)
class PrefSpec:
    """One preference loss: how each completion is scored and the loss on the two scores.

    A completion's score is s = Σ_t w_t·(logπ_t − logπ_ref,t) over its valid tokens / steps
    (the mean instead with ``length_normalize``; logπ alone with ``reference_free``; w_t = 1 unless
    ``token_guidance``). The loss reads β, the scores s_w (chosen) and s_l (rejected) of each pair.
    """

    loss: str = cfg("sigmoid", "Loss on the pair's scores: sigmoid (DPO), hinge (SLiC), robust "
                    "(rDPO), ipo, sppo, sppo_single (see docs/algorithms.md).",
                    source="mmrl.algo.pref_losses")
    beta: float = cfg(0.1, "beta: the scale of the margin (DPO's KL strength; IPO's tau; SPPO's "
                      "1/eta; SimPO's reward scale; Diffusion-DPO's beta).", above=0.0,
                      source="DPO arXiv 2305.18290 (0.1-0.5; TRL 0.1)")
    reference_free: bool = cfg(False, "Score with logpi alone, without a reference model "
                               "(SimPO); the sppo losses need the reference.",
                               source="SimPO arXiv 2405.14734")
    length_normalize: bool = cfg(False, "Score with the mean over the completion's valid tokens "
                                 "instead of the sum (SimPO; TRPA; TRL's ipo).",
                                 source="SimPO arXiv 2405.14734; TRPA arXiv 2504.04524")
    label_smoothing: float = cfg(0.0, "Probability eps that a pair's label is flipped: cDPO "
                                 "(loss sigmoid) and rDPO (loss robust); 0 = plain DPO.",
                                 minimum=0.0, below=0.5,
                                 source="cDPO (E. Mitchell, 2023); rDPO arXiv 2403.00409")
    gamma_beta_ratio: float = cfg(0.0, "SimPO's target margin as gamma/beta: the margin is "
                                  "s_w - s_l - gamma/beta (losses sigmoid, hinge, robust).",
                                  minimum=0.0, source="SimPO arXiv 2405.14734 (0.25; 0.1-0.8)")
    sft_weight: float = cfg(0.0, "Weight of the chosen completion's token-mean NLL added to each "
                            "pair's loss (SimPO's sft_weight).", minimum=0.0,
                            source="princeton-nlp/SimPO simpo_trainer.py (0)")
    token_guidance: bool = cfg(False, "TGDPO: weight each token's log-ratio by 1 + alpha*beta*d_t "
                               "(chosen) and 1 - alpha*beta*d_t (rejected), d_t = the guide "
                               "model's per-token log-ratio (chosen_guide / rejected_guide).",
                               source="TGDPO arXiv 2506.14574; dvlab-research/TGDPO")
    alpha: float = cfg(0.5, "TGDPO's guidance strength alpha (read with token_guidance).",
                       minimum=0.0, source="TGDPO examples/llama3_8b_instruct_tgdpo.yaml (0.5)")
    scaled_pairs: bool = cfg(False, "TRPA: multiply each pair's beta by pair_scale (kappa for "
                             "pairs whose better sample is at the best level, from "
                             "level_pairs); the call must then pass pair_scale.",
                             source="TRPA arXiv 2504.04524")
    kappa: float = cfg(2.5, "TRPA anisotropy kappa: the trainer passes it to level_pairs, which "
                       "returns it as the pair_scale of pairs anchored at the best level.",
                       above=0.0, source="TRPA main_TRPA.sh (2.5)")

    @property
    def needs_ref(self) -> bool:
        """True when the call needs the reference's log-probs (``chosen_ref``, ``rejected_ref``)."""
        return not self.reference_free

    @property
    def needs_win(self):
        """Which win rates the call needs: None, ``"both"`` (SPPO: chosen_win and rejected_win,
        from :func:`~mmrl.algo.preference.win_rates`) or ``"chosen"`` (sppo_single: chosen_win
        = P(y_w ≻ y_l))."""
        return loss_registry().get(self.loss).win

    @property
    def needs_guide(self) -> bool:
        """True when the call needs ``chosen_guide`` / ``rejected_guide`` [P, T] (TGDPO)."""
        return self.token_guidance

    @property
    def needs_pair_scale(self) -> bool:
        """True when the call needs ``pair_scale`` [P] (TRPA)."""
        return self.scaled_pairs


PREF_PRESETS: Dict[str, PrefSpec] = {
    # DPO, arXiv 2305.18290 Eq. 7: −log σ(β·h), h = Σ(logπ − logπ_ref)_w − Σ(logπ − logπ_ref)_l.
    # β has no default in the authors' code (0.1–0.5 per its docstring); TRL's 0.1.
    "dpo": PrefSpec(),
    # IPO, arXiv 2310.12036 Eq. 17 as the DPO authors' code writes it: (h − 1/(2β))², summed
    # log-ratios. TRL's ipo divides each side by its token count: length_normalize=True.
    "ipo": PrefSpec(loss="ipo"),
    # Conservative DPO (E. Mitchell's cDPO note; eric-mitchell/direct-preference-optimization):
    # −(1−ε)·log σ(βh) − ε·log σ(−βh). ε has no published default; 0.1 as rDPO's recommendation.
    "cdpo": PrefSpec(label_smoothing=0.1),
    # Robust DPO, arXiv 2403.00409 (TRL loss_type robust): [(1−ε)ℓ(βh) − εℓ(−βh)]/(1 − 2ε),
    # ℓ(z) = −log σ(z): unbiased under labels flipped with probability ε (0.1 per TRL's docs).
    "robust_dpo": PrefSpec(loss="robust", label_smoothing=0.1),
    # SimPO, arXiv 2405.14734 (princeton-nlp/SimPO): no reference, token means ā:
    # −log σ(β·(ā_w − ā_l − γ/β)); config defaults β 2.0, γ/β 0.25, sft_weight 0.
    "simpo": PrefSpec(reference_free=True, length_normalize=True, beta=2.0,
                      gamma_beta_ratio=0.25),
    # SPPO, arXiv 2405.00675 (uclaml/SPPO sppo_loss): ½[(r_w − (P̂_w − ½)/β)² + (r_l −
    # (P̂_l − ½)/β)²], r = Σ(logπ − logπ_t), P̂ the group win rates (win_rates); β 1e-3.
    "sppo": PrefSpec(loss="sppo", beta=1e-3),
    # SPPO single: targets ±(P(y_w ≻ y_l) − ½)/β from the pair's own win probability.
    "sppo_single": PrefSpec(loss="sppo_single", beta=1e-3),
    # TRPA, arXiv 2504.04524 (compute_pairwise_policy_loss): −log σ(s·β·(Δ_i − Δ_j)), Δ the
    # token-mean log-ratio to the frozen reference, s = κ (2.5) for pairs anchored at level 1.
    "trpa": PrefSpec(length_normalize=True, scaled_pairs=True),
    # TGDPO, arXiv 2506.14574 (dvlab-research/TGDPO dpo_loss): −log σ(Σ β(1 + αβd_w)u_w −
    # Σ β(1 − αβd_l)u_l), u the token log-ratios, d the guide model's; β 0.1, α 0.5.
    "tgdpo": PrefSpec(token_guidance=True),
    # Diffusion-DPO, arXiv 2311.12908, in flow_grpo's flow-matching form (train_sd3_dpo.py):
    # DPO on the scores −½·e (e the velocity MSE per pair, policy and reference); β 100 (SD3.5-M).
    "diffusion_dpo": PrefSpec(beta=100.0),
}

_FIELDS = {f.name: f for f in dataclasses.fields(PrefSpec)}
_HINTS = typing.get_type_hints(PrefSpec)


def _combination_problems(spec: PrefSpec) -> List[str]:
    losses = loss_registry()
    if not isinstance(spec.loss, str) or spec.loss not in losses:
        return [losses.unknown_message(spec.loss)]
    flags, name, problems = losses.get(spec.loss), spec.loss, []
    if spec.label_smoothing and not flags.smoothing:
        problems.append(f"label_smoothing={spec.label_smoothing} is read by losses sigmoid and "
                        f"robust, not {name!r}; drop label_smoothing")
    if spec.gamma_beta_ratio and not flags.margin:
        problems.append(f"gamma_beta_ratio={spec.gamma_beta_ratio} shifts the margin of losses "
                        f"sigmoid, hinge and robust, not {name!r}; drop gamma_beta_ratio")
    if flags.needs_ref and spec.reference_free:
        problems.append(f"loss {name!r} regresses log-ratios to the reference and cannot be "
                        f"reference_free; drop reference_free")
    if spec.token_guidance and spec.reference_free:
        problems.append("token_guidance weights the log-ratios to the reference; it cannot be "
                        "reference_free")
    if flags.win is not None and (spec.token_guidance or spec.scaled_pairs):
        problems.append(f"loss {name!r} regresses each side to its own target; token_guidance "
                        f"and scaled_pairs apply to a pair margin; drop them")
    return problems


def pref_problems(name: str, **overrides) -> List[str]:
    """Every problem with preference preset ``name`` plus ``overrides``, as messages; [] when
    valid: the preset name, override keys, types, ranges and combinations (a field the chosen
    loss does not read, reference_free with a loss that needs the reference, ...)."""
    problems: List[str] = []
    if not isinstance(name, str) or name not in PREF_PRESETS:
        problems.append(f"unknown preference preset {name!r} (registered: "
                        f"{', '.join(sorted(PREF_PRESETS))}){did_you_mean(name, PREF_PRESETS)}")
        base = PrefSpec()
    else:
        base = PREF_PRESETS[name]
    unknown = [k for k in overrides if k not in _FIELDS]
    for k in unknown:
        problems.append(f"unknown preference override {k!r} (known: {', '.join(sorted(_FIELDS))})"
                        f"{did_you_mean(k, _FIELDS)}")
    known = {k: v for k, v in overrides.items() if k not in unknown}
    type_problems = _type_problems(known, _HINTS)
    problems += list(type_problems.values())
    spec = dataclasses.replace(base, **{k: v for k, v in known.items() if k not in type_problems})
    ranges = [range_problem(f, getattr(spec, f), field.metadata) for f, field in _FIELDS.items()]
    return problems + [p for p in ranges if p is not None] + _combination_problems(spec)


def resolve_pref(name: str, **overrides) -> PrefSpec:
    """The :class:`PrefSpec` of preset ``name`` (a key of :data:`PREF_PRESETS`) with
    ``overrides`` (any PrefSpec field) applied.

    Raises:
        ValueError: listing every problem found by :func:`pref_problems`.
    """
    problems = pref_problems(name, **overrides)
    if problems:
        raise problems_error(f"invalid preference loss {name!r} with overrides {overrides!r}",
                             problems)
    return dataclasses.replace(PREF_PRESETS[name], **overrides)
