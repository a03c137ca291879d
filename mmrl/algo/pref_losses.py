"""Preference losses on P pairs (chosen, rejected): the registry and :class:`PreferenceLoss`.

Contract: ``chosen_logp [P, Tc]``, ``rejected_logp [P, Tr]`` float (with gradient),
``chosen_mask``, ``rejected_mask`` bool (True = counts), the reference's ``[P, T]`` log-probs
(detached). For a language model T is the completion's tokens; for a flow model the scores are
Diffusion-DPO's −½·e (T = 1). Nothing here knows which.

Each completion gets a score s = Σ_t w_t·(logπ_t − logπ_ref,t) over its valid entries
(:func:`side_scores`), and an entry of :data:`PREF_LOSSES` maps the two scores of each pair to
its loss ``[P]``:

    fn(s_w [P], s_l [P], *, beta [P] or float, spec, chosen_win, rejected_win) -> loss [P]

``beta`` is spec.beta times TRPA's per-pair scale. Each entry carries the flags
:mod:`mmrl.algo.pref_presets` validates against (``win``, ``smoothing``, ``margin``,
``needs_ref``; that module's torch-free table repeats them, and a test checks both agree).
:class:`PreferenceLoss` adds SimPO's SFT term and returns Σ_pairs ℓ / num_pairs with detached
statistics.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from mmrl.algo.common import Tensor, entry
from mmrl.algo.pref_presets import resolve_pref
from mmrl.registry import Registry

__all__ = ["PREF_LOSSES", "PreferenceLoss", "side_scores"]

PREF_LOSSES: Registry = Registry("preference loss")


def _margin(s_w: Tensor, s_l: Tensor, beta, spec) -> Tensor:
    """z = β·(s_w − s_l − γ/β): SimPO's margin γ/β (0 for DPO)."""
    return beta * (s_w - s_l - spec.gamma_beta_ratio)


@entry(PREF_LOSSES, "sigmoid", win=None, smoothing=True, margin=True, needs_ref=False)
def sigmoid_loss(s_w: Tensor, s_l: Tensor, *, beta, spec, **_) -> Tensor:
    """−(1 − ε)·log σ(z) − ε·log σ(−z), z = β(s_w − s_l − γ/β).

    DPO (arXiv 2305.18290 Eq. 7; ε = 0), conservative DPO (ε > 0, eric-mitchell's
    preference_loss), SimPO (arXiv 2405.14734 Eq. 6; γ/β), TRPA (β per pair), TGDPO (guided
    scores), Diffusion-DPO (scores −½·e). ``logsigmoid`` is finite for any finite z.
    """
    z, eps = _margin(s_w, s_l, beta, spec), spec.label_smoothing
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@entry(PREF_LOSSES, "hinge", win=None, smoothing=False, margin=True, needs_ref=False)
def hinge_loss(s_w: Tensor, s_l: Tensor, *, beta, spec, **_) -> Tensor:
    """relu(1 − z), z = β(s_w − s_l − γ/β): SLiC (arXiv 2305.10425); SimPO's hinge option."""
    return torch.relu(1 - _margin(s_w, s_l, beta, spec))


@entry(PREF_LOSSES, "robust", win=None, smoothing=True, margin=True, needs_ref=False)
def robust_loss(s_w: Tensor, s_l: Tensor, *, beta, spec, **_) -> Tensor:
    """[(1 − ε)·ℓ(z) − ε·ℓ(−z)] / (1 − 2ε), ℓ(z) = −log σ(z): robust DPO (arXiv 2403.00409),
    an unbiased DPO loss when labels are flipped with probability ε < ½ (TRL loss_type robust)."""
    z, eps = _margin(s_w, s_l, beta, spec), spec.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@entry(PREF_LOSSES, "ipo", win=None, smoothing=False, margin=False, needs_ref=False)
def ipo_loss(s_w: Tensor, s_l: Tensor, *, beta, **_) -> Tensor:
    """(s_w − s_l − 1/(2β))²: IPO (arXiv 2310.12036 Eq. 17, β = τ)."""
    return (s_w - s_l - 1 / (2 * beta)) ** 2


@entry(PREF_LOSSES, "sppo", win="both", smoothing=False, margin=False, needs_ref=True)
def sppo_loss(s_w: Tensor, s_l: Tensor, *, beta, chosen_win, rejected_win, **_) -> Tensor:
    """½[(s_w − (P̂_w − ½)/β)² + (s_l − (P̂_l − ½)/β)²]: SPPO (arXiv 2405.00675; uclaml/SPPO
    sppo_loss), s the summed log-ratios to π_t, P̂ each completion's win rate in its group.
    P̂_w = 1, P̂_l = 0 is TRL's ``sppo_hard`` up to its missing ½."""
    target_w, target_l = (chosen_win - 0.5) / beta, (rejected_win - 0.5) / beta
    return 0.5 * ((s_w - target_w) ** 2 + (s_l - target_l) ** 2)


@entry(PREF_LOSSES, "sppo_single", win="chosen", smoothing=False, margin=False,
       needs_ref=True)
def sppo_single_loss(s_w: Tensor, s_l: Tensor, *, beta, chosen_win, **_) -> Tensor:
    """½[(s_w − (p − ½)/β)² + (s_l + (p − ½)/β)²], p = P(y_w ≻ y_l) (uclaml/SPPO sppo_single)."""
    target = (chosen_win - 0.5) / beta
    return 0.5 * ((s_w - target) ** 2 + (s_l + target) ** 2)


# ---------------------------------------------------------------- scores
def side_scores(logp: Tensor, mask: Tensor, ref: Optional[Tensor] = None,
                weights: Optional[Tensor] = None, length_normalize: bool = False) -> Tensor:
    """``[P]`` s = Σ_t w_t·(logp − ref)_t over ``mask`` (÷ the valid count with
    ``length_normalize``; an empty row scores 0). ``ref`` None: logp alone; ``weights`` None: 1.

    Padding may hold anything (-inf, NaN): it is selected away with ``where`` before any
    arithmetic, so neither the value nor the gradient sees it.
    """
    x = logp if ref is None else logp - ref.detach().to(logp.dtype)
    x = torch.where(mask, x, 0.0)
    if weights is not None:
        x = x * torch.where(mask, weights.detach().to(logp.dtype), 0.0)
    s = x.sum(-1)
    if length_normalize:
        s = s / mask.sum(-1).clamp(min=1).to(s.dtype)
    return s


def _guidance(guide: Tensor, mask: Tensor, sign: float, spec, dtype) -> Tensor:
    """TGDPO's token weights 1 ± α·β·d_t (d the guide model's log-ratio; 0 on padding)."""
    return 1 + sign * spec.alpha * spec.beta * torch.where(mask, guide.detach().to(dtype), 0.0)


def _count(num_pairs, P: int, like: Tensor) -> Tensor:
    n = P if num_pairs is None else num_pairs
    return torch.as_tensor(n, dtype=like.dtype, device=like.device).clamp(min=1)


# ---------------------------------------------------------------- checks
def _check_side(name: str, logp, mask, ref, needs_ref: bool) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name}_mask must be a bool tensor [P, T] (True = counts), got {got}; "
                        f"pass mask.bool()")
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2 or not logp.is_floating_point():
        got = (f"{logp.dtype} {tuple(logp.shape)}" if isinstance(logp, torch.Tensor)
               else type(logp).__name__)
        raise ValueError(f"{name}_logp must be float [P, T], got {got}; gather the "
                         f"completion's per-token log-probs (or a flow model's scores) into [P, T]")
    for what, t in ((f"{name}_mask", mask), (f"{name}_ref", ref)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{what} has shape {tuple(t.shape)} but {name}_logp has "
                             f"{tuple(logp.shape)}; expected the same [P, T]")
    if needs_ref and ref is None:
        raise ValueError(f"this preference loss scores log-ratios to the reference and needs "
                         f"{name}_ref [P, T]; pass the reference's log-probs (with_ref=True) "
                         f"or use a reference_free preset such as 'simpo'")
    if not needs_ref and ref is not None:
        raise ValueError(f"{name}_ref given but the preset is reference_free (it would be "
                         f"ignored); drop it or set reference_free=False")


def _check_optional(spec, P: int, chosen_shape, rejected_shape, chosen_win, rejected_win,
                    chosen_guide, rejected_guide, pair_scale) -> None:
    """Each optional input is given exactly when the spec reads it, with its shape."""
    win = spec.needs_win
    wanted = {"chosen_win": ((P,), win is not None), "rejected_win": ((P,), win == "both"),
              "chosen_guide": (chosen_shape, spec.needs_guide),
              "rejected_guide": (rejected_shape, spec.needs_guide),
              "pair_scale": ((P,), spec.needs_pair_scale)}
    given = {"chosen_win": chosen_win, "rejected_win": rejected_win,
             "chosen_guide": chosen_guide, "rejected_guide": rejected_guide,
             "pair_scale": pair_scale}
    for key, (shape, needed) in wanted.items():
        value = given[key]
        if needed and value is None:
            raise ValueError(f"loss {spec.loss!r} with this spec needs {key} {list(shape)}; "
                             f"pass it (win rates: win_rates / σ(s_w − s_l); guides: the guide "
                             f"model's per-token log-ratio; pair_scale: level_pairs)")
        if not needed and value is not None:
            raise ValueError(f"{key} given but this spec does not read it (loss "
                             f"{spec.loss!r}, token_guidance={spec.token_guidance}, "
                             f"scaled_pairs={spec.scaled_pairs}); drop it")
        if value is not None and tuple(value.shape) != tuple(shape):
            raise ValueError(f"{key} has shape {tuple(value.shape)}; expected {tuple(shape)}")


def _check_call(spec, chosen_logp, rejected_logp, chosen_mask, rejected_mask, chosen_ref,
                rejected_ref, **optional) -> int:
    """Every check of :meth:`PreferenceLoss.__call__`; returns P."""
    _check_side("chosen", chosen_logp, chosen_mask, chosen_ref, spec.needs_ref)
    _check_side("rejected", rejected_logp, rejected_mask, rejected_ref, spec.needs_ref)
    P = chosen_logp.shape[0]
    if rejected_logp.shape[0] != P:
        raise ValueError(f"chosen_logp has {P} pairs but rejected_logp "
                         f"{rejected_logp.shape[0]}; row p of each must be pair p")
    _check_optional(spec, P, tuple(chosen_logp.shape), tuple(rejected_logp.shape), **optional)
    return P


# ---------------------------------------------------------------- the loss
class PreferenceLoss:
    """Σ_pairs ℓ_p / num_pairs for one (micro-)batch of pairs, from a preset plus overrides.

    Names are resolved once here (:func:`~mmrl.algo.pref_presets.resolve_pref`); calling it
    only runs tensors.

    Args:
        preset: a key of :data:`~mmrl.algo.pref_presets.PREF_PRESETS` (dpo, ipo, cdpo,
            robust_dpo, simpo, sppo, sppo_single, trpa, tgdpo, diffusion_dpo).
        **overrides: any :class:`~mmrl.algo.pref_presets.PrefSpec` field.

    Raises:
        ValueError: every problem with the preset/overrides, listed at once.
    """

    def __init__(self, preset: str = "dpo", **overrides):
        self.spec = resolve_pref(preset, **overrides)
        self._loss = PREF_LOSSES.get(self.spec.loss)

    def __repr__(self) -> str:
        return f"PreferenceLoss({self.spec!r})"

    def __call__(self, chosen_logp: Tensor, rejected_logp: Tensor, chosen_mask: Tensor,
                 rejected_mask: Tensor, *, chosen_ref: Optional[Tensor] = None,
                 rejected_ref: Optional[Tensor] = None, num_pairs=None,
                 chosen_win: Optional[Tensor] = None, rejected_win: Optional[Tensor] = None,
                 chosen_guide: Optional[Tensor] = None, rejected_guide: Optional[Tensor] = None,
                 pair_scale: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """(loss, stats) of P pairs; row p of every chosen_* / rejected_* tensor is pair p.

        Args:
            chosen_logp, rejected_logp: ``[P, Tc]``, ``[P, Tr]`` float, with gradient.
            chosen_mask, rejected_mask: the same shapes, bool, True = counts.
            chosen_ref, rejected_ref: the reference's ``[P, T]`` (detached here); required
                unless the spec is reference_free, refused when it is.
            num_pairs: the optimizer step's global pair count (number or 0-d tensor): the
                micro-batch and rank losses then sum to the whole step's; default this call's P.
            chosen_win, rejected_win: ``[P]`` SPPO's win rates P̂ (:func:`win_rates`); for
                sppo_single ``chosen_win`` = P(y_w ≻ y_l) alone.
            chosen_guide, rejected_guide: ``[P, T]`` TGDPO's guide log-ratios
                d_t = logπ_r − logπ_ref (detached).
            pair_scale: ``[P]`` TRPA's β multiplier per pair (:func:`level_pairs`).

        Returns:
            ``loss`` 0-d; ``stats`` detached 0-d tensors, each Σ over this call's pairs /
            num_pairs like the loss (so micro-batch stats add up to the step's means): loss,
            reward_chosen / reward_rejected (β·s, the implicit rewards β·Σ(logπ − logπ_ref)
            or the loss's own scores), reward_margin, reward_accuracy (share of pairs with
            s_w > s_l), and sft (the chosen token-mean NLL) when sft_weight > 0.

        Raises:
            TypeError / ValueError: bad dtypes or shapes; an input the spec needs is missing,
            or one it does not read is given.
        """
        spec = self.spec
        P = _check_call(spec, chosen_logp, rejected_logp, chosen_mask, rejected_mask,
                        chosen_ref, rejected_ref, chosen_win=chosen_win,
                        rejected_win=rejected_win, chosen_guide=chosen_guide,
                        rejected_guide=rejected_guide, pair_scale=pair_scale)
        # Half precision cannot sum hundreds of log-probs to a useful margin: score in fp32.
        dtype = torch.float32 if chosen_logp.dtype in (torch.float16, torch.bfloat16) \
            else chosen_logp.dtype
        s_w = self._score(chosen_logp.to(dtype), chosen_mask, chosen_ref, chosen_guide, 1.0)
        s_l = self._score(rejected_logp.to(dtype), rejected_mask, rejected_ref, rejected_guide,
                          -1.0)
        beta = spec.beta if pair_scale is None else spec.beta * pair_scale.detach().to(dtype)
        wins = {k: None if v is None else v.detach().to(dtype)
                for k, v in (("chosen_win", chosen_win), ("rejected_win", rejected_win))}
        per_pair = self._loss(s_w, s_l, beta=beta, spec=spec, **wins)  # [P]
        nll = None
        if spec.sft_weight > 0:  # SimPO's SFT term: the chosen completion's token-mean NLL
            nll = -side_scores(chosen_logp.to(dtype), chosen_mask, length_normalize=True)
            per_pair = per_pair + spec.sft_weight * nll
        n = _count(num_pairs, P, per_pair)
        loss = per_pair.sum() / n
        return loss, _stats(loss, s_w, s_l, spec.beta, n, nll)

    def _score(self, logp: Tensor, mask: Tensor, ref: Optional[Tensor],
               guide: Optional[Tensor], sign: float) -> Tensor:
        """``[P]`` one side's scores (:func:`side_scores`; TGDPO's weights 1 ± αβ·d_t)."""
        spec = self.spec
        weights = None if guide is None else _guidance(guide, mask, sign, spec, logp.dtype)
        return side_scores(logp, mask, ref, weights, spec.length_normalize)


def _stats(loss: Tensor, s_w: Tensor, s_l: Tensor, beta: float, n: Tensor,
           nll: Optional[Tensor]) -> Dict[str, Tensor]:
    with torch.no_grad():
        r_w, r_l = beta * s_w.detach(), beta * s_l.detach()
        stats = {"loss": loss.detach(), "reward_chosen": r_w.sum() / n,
                 "reward_rejected": r_l.sum() / n, "reward_margin": (r_w - r_l).sum() / n,
                 "reward_accuracy": (r_w > r_l).to(r_w.dtype).sum() / n}
        if nll is not None:
            stats["sft"] = nll.detach().sum() / n
    return stats
