"""Policy losses as four independent axes: ratio level x objective x aggregation (+ KL estimator).

Contract: ``logp, old_logp, ref_logp [B, T]`` float, ``mask [B, T]`` bool (True = counts),
``advantages [B]`` or ``[B, T]``. For video T is response tokens, for diffusion T is trained
denoising steps; nothing here knows which.

Each axis is a registry in its own module, re-exported here:

- :data:`RATIO_LEVELS` (:mod:`mmrl.algo.ratios`) ``(logp, old_logp, mask) -> log_ratio``.
- :data:`OBJECTIVES` (:mod:`mmrl.algo.objectives`) ``(log_ratio, adv, *, spec, ...) ->
  (loss, ratio, low, high)``.
- :data:`AGGREGATIONS` (:mod:`mmrl.algo.aggregations`) ``(loss, mask, *, num_tokens, num_seqs,
  seq_lens, max_len) -> scalar``.
- :data:`KL_ESTIMATORS` (:mod:`mmrl.algo.kl`) ``x -> KL`` per token (optionally capped and
  bias-corrected by the ratio).
- :data:`ROLLOUT_CORRECTIONS` (:mod:`mmrl.algo.offpolicy`) importance weights π_old/π_rollout
  for a sampler that is not the trainer (they multiply the objective only).

:class:`PolicyLoss` composes them, plus an entropy bonus and a top-entropy token mask
(:mod:`mmrl.algo.entropy`); :mod:`mmrl.algo.common` holds the ±20 log-ratio clamp.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from mmrl.algo.aggregations import AGGREGATIONS
from mmrl.algo.common import Tensor, masked_log_ratio, masked_mean
from mmrl.algo.common import num_tokens as row_tokens
from mmrl.algo.kl import KL_ESTIMATORS, _kl, bias_corrected_kl, cap_kl, kl_penalty
from mmrl.algo.objectives import OBJECTIVES
from mmrl.algo.offpolicy import ROLLOUT_CORRECTIONS, correct_objective, shape_off_policy
from mmrl.algo.ratios import RATIO_LEVELS

OptTensor = Optional[Tensor]
Stats = Dict[str, Tensor]

__all__ = ["AGGREGATIONS", "KL_ESTIMATORS", "OBJECTIVES", "RATIO_LEVELS", "ROLLOUT_CORRECTIONS",
           "PolicyLoss", "kl_penalty", "policy_loss"]


# ---------------------------------------------------------------- the policy loss
def _check_inputs(spec, logp, old_logp, advantages, mask, ref_logp, token_weights, group_ids,
                  per_sequence: bool, kl=None, entropy=None, entropy_mask=None) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor [B, T] (True = counts), got {got}; "
                        f"pass mask.bool()")
    if logp.dim() != 2 or not logp.is_floating_point():
        raise ValueError(f"logp must be float [B, T], got {logp.dtype} {tuple(logp.shape)}; "
                         f"gather the sampled tokens' log-probs into [B, T]")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp),
                    ("token_weights", token_weights), ("kl", kl), ("entropy", entropy),
                    ("entropy_mask", entropy_mask)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but logp has "
                             f"{tuple(logp.shape)}; expected the same [B, T]")
    B = logp.shape[0]
    if advantages.shape not in ((B,), tuple(logp.shape)):
        raise ValueError(f"advantages have shape {tuple(advantages.shape)}; expected [B]=({B},) "
                         f"or [B, T]={tuple(logp.shape)}")
    if per_sequence and advantages.dim() != 1:
        raise ValueError(f"ratio level {spec.ratio_level!r} is per sequence and needs one "
                         f"advantage per sequence [B], got {tuple(advantages.shape)}; pass [B]")
    if spec.binary_rewards and advantages.dim() != 1:
        raise ValueError(f"objective {spec.objective!r} reads one reward r in {{0, 1}} per row "
                         f"[B]=({B},), got advantages {tuple(advantages.shape)}; pass the rows' "
                         f"rewards (advantage 'reward')")
    if per_sequence and token_weights is not None:
        raise ValueError(f"token_weights cannot weight the per-sequence ratio level "
                         f"{spec.ratio_level!r}; drop them or use a token-level preset")
    if spec.needs_token_weights and token_weights is None:
        raise ValueError("token_weighting 'tw' needs token_weights [B, T]; compute them per "
                         "group with mmrl.algo.token_weights.tw_token_weights")
    given = (ref_logp is not None) + (kl is not None)
    if given > 1 or (spec.beta > 0 and not given):
        got = "both" if given else "neither"
        raise ValueError(f"beta={spec.beta} needs ref_logp [B, T] (reference log-probs) or kl "
                         f"[B, T] (the policy's own KL), one of them; got {got}")
    _check_entropy(spec, entropy, entropy_mask)
    if OBJECTIVES.get(spec.objective).needs_groups:
        if group_ids is None or group_ids.shape != (B,):
            got = None if group_ids is None else tuple(group_ids.shape)
            raise ValueError(f"objective {spec.objective!r} needs group_ids [B]=({B},), got "
                             f"{got}; pass the same group ids used for the advantages")


def _check_entropy(spec, entropy: Optional[Tensor], entropy_mask: Optional[Tensor]) -> None:
    if spec.entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy_coef={spec.entropy_coef} needs entropy [B, T] (per-token "
                         f"entropy with gradient, mmrl.algo.entropy.logp_and_entropy); pass "
                         f"entropy= or set entropy_coef=0")
    if spec.top_entropy_quantile < 1 and entropy is None and entropy_mask is None:
        raise ValueError(f"top_entropy_quantile={spec.top_entropy_quantile} needs entropy_mask "
                         f"[B, T] (mmrl.algo.entropy.top_entropy_mask) or entropy [B, T] to "
                         f"compute it from this call's tokens; pass one")
    if entropy_mask is not None and not (spec.top_entropy_quantile < 1):
        raise ValueError("entropy_mask given but top_entropy_quantile is 1 (every token kept); "
                         "set top_entropy_quantile < 1 or drop entropy_mask")
    if entropy_mask is not None and entropy_mask.dtype != torch.bool:
        raise TypeError(f"entropy_mask must be a bool tensor [B, T], got {entropy_mask.dtype}; "
                        f"pass entropy_mask.bool()")


def _stats(loss, ratio, low, high, adv, valid, logp, old_logp, mask, kl_ref) -> Dict[str, Tensor]:
    with torch.no_grad():
        ratio = ratio.detach().expand(valid.shape)
        any_valid = valid.any()
        one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
        stats = {
            "loss": loss.detach(),
            "clipfrac_low": masked_mean(low.to(ratio.dtype), valid),
            "clipfrac_high": masked_mean(high.to(ratio.dtype), valid),
            "ratio_mean": torch.where(any_valid, masked_mean(ratio, valid), one),
            "ratio_min": torch.where(any_valid, torch.where(valid, ratio, torch.inf).amin(), one),
            "ratio_max": torch.where(any_valid, torch.where(valid, ratio, -torch.inf).amax(), one),
            "approx_kl": masked_mean(_kl(masked_log_ratio(logp.detach(), old_logp, mask),
                                          "k3"), mask),
            "adv_mean": masked_mean(adv.detach(), valid),
        }
        if kl_ref is not None:
            stats["kl_ref"] = masked_mean(kl_ref.detach(), mask)
    return stats


class PolicyLoss:
    """Scalar policy loss for one (micro-)batch, from a preset plus overrides.

    Names are resolved once here (``resolve_algo``); calling it only runs tensors.

    Args:
        algo: preset name (see ``mmrl.algo.presets.PRESETS``).
        **overrides: any ``AlgoSpec`` field (``eps_high=0.28``, ``beta=0.04``, ``max_len=...``).

    Raises:
        ValueError: every problem with the preset/overrides, listed at once.
    """

    def __init__(self, algo: str = "grpo", **overrides):
        from mmrl.algo.presets import resolve_algo  # local: presets imports this module's registries
        self.spec = resolve_algo(algo, **overrides)
        self._ratio = RATIO_LEVELS.get(self.spec.ratio_level)
        self._objective = OBJECTIVES.get(self.spec.objective)
        self._aggregate = AGGREGATIONS.get(self.spec.aggregation)
        from mmrl.algo.advantages import ADVANTAGES  # local, like resolve_algo above
        make = getattr(ADVANTAGES.get(self.spec.advantage), "make_state", None)
        self.adv_state = make(self.spec) if make else None  # e.g. RiskPO's tracked quantiles

    def __repr__(self) -> str:
        return f"PolicyLoss({self.spec!r})"

    def __call__(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logp: Optional[Tensor] = None, token_weights: Optional[Tensor] = None,
                 group_ids: Optional[Tensor] = None, num_tokens=None, num_seqs=None,
                 seq_lens=None, kl: Optional[Tensor] = None, generator=None,
                 rollout_logp: Optional[Tensor] = None, entropy: Optional[Tensor] = None,
                 entropy_mask: Optional[Tensor] = None, step_std: OptTensor = None,
                 mean_shift: OptTensor = None, step_gap: OptTensor = None,
                 off_policy: OptTensor = None) -> Tuple[Tensor, Stats]:
        """(loss, stats): the aggregated loss to minimize and detached statistics.

        Args:
            logp: ``[B, T]`` float, current policy log-probs (carries the gradient).
            old_logp: ``[B, T]`` behaviour-policy log-probs (detached here).
            advantages: ``[B]`` or ``[B, T]`` (per-sequence ratio levels need ``[B]``).
            mask: ``[B, T]`` bool, True = token/step counts.
            ref_logp: ``[B, T]`` reference log-probs; required when beta > 0.
            token_weights: ``[B, T]`` per-token weights w in Σ m w ℓ (TW-GRPO); detached.
            group_ids: ``[B]`` integer; required by ``reg``.
            num_tokens / num_seqs: global token / sequence counts of the optimizer step
                (numbers or 0-d tensors): the micro-batch losses then sum to the full-batch loss.
            seq_lens: ``[B]`` full row token counts (``seq_mean_token_mean`` over T chunks).
            kl: ``[B, T]`` the policy's own per-token KL (with gradient), instead of ``ref_logp``.
            generator: a torch.Generator for objectives that draw (``clip_cov``); None: global.
            rollout_logp, off_policy: ``[B, T]`` the sampler's log-probs (detached), ``[B]``
                bool rows sampled under another prompt (``Rollout.off_policy``): for rollout_is,
                off_policy_mask and off_policy_shaping (:mod:`mmrl.algo.offpolicy`).
            entropy, entropy_mask: ``[B, T]`` entropy (with gradient; bonus −c·agg(H)) and the
                bool top-entropy mask (default: from ``entropy``); neither touches KL or counts.
            step_std, mean_shift, step_gap: ``[B, T]`` a Gaussian denoising step's terms: its
                std and mean_d (μ_θ − μ_old)² (with gradient) for ratio level ``ratio_norm``,
                its σ gap −dt > 0 for ``step_reweight`` (divides the objective, not the KL).

        Returns:
            ``loss`` 0-d; ``stats`` detached 0-d tensors: loss, clipfrac_low/high (share of valid
            tokens, or sequences, in the clipped zero-gradient region; 0 for sapo/reg/gpg/vespo/
            kl_cov; cispo/cispo_cap: truncated weights; clip_cov: + the detached tokens in high),
            ratio_mean/min/max, approx_kl (k3 to old_logp), adv_mean, kl_ref (when ref given),
            entropy and entropy_kept (share of valid tokens the mask keeps) when they apply,
            the rollout correction's (:func:`mmrl.algo.offpolicy.correct_objective`).

        Raises:
            TypeError / ValueError: bad dtypes/shapes; missing ref_logp, group_ids, weights.
        """
        spec, per_seq = self.spec, self._ratio.per_sequence
        _check_inputs(spec, logp, old_logp, advantages, mask, ref_logp, token_weights,
                      group_ids, per_seq, kl, entropy, entropy_mask)
        logp, old_logp, adv = _prepare(logp, old_logp, advantages, mask)
        loss, log_ratio, valid, (ratio, low, high), corrections = self._policy_term(
            logp, old_logp, adv, advantages, mask, group_ids, generator,
            (rollout_logp, off_policy), dict(step_std=step_std, mean_shift=mean_shift), step_gap)
        keep = _entropy_keep(spec, entropy, entropy_mask, mask)  # top-entropy tokens only
        loss = loss if keep is None else torch.where(keep, loss, 0.0)
        kl_ref = _kl_to_ref(spec, logp, ref_logp, kl, mask, log_ratio)
        loss = _add_kl(spec, loss, kl_ref, mask, per_seq).expand(valid.shape)
        if token_weights is not None:
            loss = loss * torch.where(mask, token_weights.detach(), 0.0)
        total = self._total(loss, valid, entropy, keep, mask, per_seq, num_tokens=num_tokens,
                            num_seqs=num_seqs, seq_lens=seq_lens)
        stats = _stats(total, ratio, low, high, adv, valid, logp, old_logp, mask, kl_ref)
        return total, {**_entropy_stats(stats, entropy, keep, mask), **corrections}

    def _policy_term(self, logp, old_logp, adv, advantages, mask, group_ids, generator,
                     sampler, ratio_terms, step_gap):
        """``(loss, log_ratio, valid, (ratio, low, high), corrections)``: the objective of each
        entry times the rollout correction's weights, the off-policy rows' shaped instead
        (``sampler``: ``(rollout_logp, off_policy)``), divided by the step gaps
        (``step_reweight``); the KL is added after, unweighted."""
        rollout_logp, off_policy = sampler
        spec, per_seq = self.spec, self._ratio.per_sequence
        log_ratio = self._ratio(logp, old_logp, mask, **ratio_terms)  # [B, T] or [B, 1]
        valid = mask.any(-1, keepdim=True) if per_seq else mask  # [B, 1] or [B, T]
        loss, ratio, low, high = self._objective(log_ratio, adv, spec=spec, valid=valid,
                                                 group_ids=group_ids, logp=logp, mask=mask,
                                                 generator=generator)
        loss, corrections = correct_objective(spec, loss, logp, old_logp, rollout_logp,
                                              advantages, mask)  # weights the objective only
        loss, shaped = shape_off_policy(spec, loss, logp, rollout_logp, adv, mask, off_policy)
        corrections.update(shaped)
        loss = _step_reweight(spec, loss, step_gap, mask)  # the objective only, not the KL
        return loss, log_ratio, valid, (ratio, low, high), corrections

    def _total(self, loss: Tensor, valid: Tensor, entropy: Optional[Tensor],
               keep: Optional[Tensor], mask: Tensor, per_seq: bool, **counts) -> Tensor:
        """agg(loss) − entropy_coef·agg(H on the kept tokens), with the same counts."""
        spec = self.spec
        counts.update(max_len=spec.max_len, empty_rows=spec.empty_rows)
        total = self._aggregate(loss, valid, **counts)
        if spec.entropy_coef > 0:
            bonus = _entropy_term(entropy.to(loss.dtype), mask if keep is None else keep, mask,
                                  per_seq)
            total = total - spec.entropy_coef * self._aggregate(bonus, valid, **counts)
        return total


def _step_reweight(spec, loss: Tensor, step_gap: Optional[Tensor], mask: Tensor) -> Tensor:
    """ℓ_j / (−dt_j) where ``mask`` when ``step_reweight`` (GRPO-Guard, arXiv 2510.22319: the
    small late steps' gradients are scaled up to the early ones'); ``loss`` unchanged otherwise.

    Raises:
        ValueError: ``step_reweight`` without ``step_gap`` ``[B, T]``.
    """
    if not spec.step_reweight:
        return loss
    if not isinstance(step_gap, torch.Tensor) or step_gap.shape != mask.shape:
        got = tuple(step_gap.shape) if isinstance(step_gap, torch.Tensor) else None
        raise ValueError(f"step_reweight needs step_gap [B, T]={tuple(mask.shape)} (each step's "
                         f"sigma gap -dt > 0), got {got}; pass the policy's step terms or set "
                         f"step_reweight=False")
    gap = step_gap.detach().to(loss.dtype)  # > 0 on counted steps: the policy's (no host sync)
    return torch.where(mask, loss / torch.where(mask, gap, torch.ones_like(gap)), loss)


def _prepare(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor):
    """``(logp, old_logp, adv)`` in one float dtype; ``adv`` ``[B, 1]`` or masked ``[B, T]``."""
    if logp.dtype in (torch.float16, torch.bfloat16):
        logp = logp.float()  # bf16's 8-bit mantissa cannot resolve GSPO's 3e-4 clip range
    adv = advantages.detach().to(logp.dtype)
    # [B] -> [B, 1] (broadcast over T); padding of [B, T] advantages is zeroed so that
    # garbage there (NaN) cannot reach the gradient through 0 * NaN.
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else torch.where(mask, adv, 0.0)
    return logp, old_logp.detach().to(logp.dtype), adv


def _kl_to_ref(spec, logp: Tensor, ref_logp: Optional[Tensor], kl: Optional[Tensor],
               mask: Tensor, log_ratio: Tensor) -> Optional[Tensor]:
    """``[B, T]`` per-token KL to the reference (0 on padding): the policy's own ``kl``, or the
    spec's estimator on ``logp − ref_logp``; None when neither is given. It carries a gradient
    only when ``beta > 0`` (otherwise it is a statistic); then ``kl_cap`` clamps it and
    ``kl_bias_correction`` multiplies it by the ratio level's ratio (``log_ratio``)."""
    if ref_logp is None and kl is None:
        return None
    with torch.set_grad_enabled(torch.is_grad_enabled() and spec.beta > 0):
        if ref_logp is None:
            out = kl.to(logp.dtype)
        else:  # mask x *before* the estimator: exp of padding garbage would poison the backward
            out = _kl(masked_log_ratio(logp, ref_logp.detach(), mask), spec.kl)
        if spec.beta > 0:
            out = cap_kl(out, spec.kl_cap)
            out = bias_corrected_kl(out, log_ratio) if spec.kl_bias_correction else out
        return torch.where(mask, out, 0.0)


def _add_kl(spec, loss: Tensor, kl_ref: Optional[Tensor], mask: Tensor, per_seq: bool) -> Tensor:
    """``loss + beta·KL``; per-sequence objectives (``[B, 1]``) add the row's token-mean KL."""
    if kl_ref is None or spec.beta <= 0:
        return loss
    if per_seq:
        return loss + spec.beta * kl_ref.sum(-1, keepdim=True) / row_tokens(mask).to(kl_ref.dtype)
    return loss + spec.beta * kl_ref


def _entropy_keep(spec, entropy: Optional[Tensor], entropy_mask: Optional[Tensor],
                  mask: Tensor) -> Optional[Tensor]:
    """``[B, T]`` bool: the tokens the top-entropy mask keeps (within ``mask``); None when
    ``top_entropy_quantile`` is 1."""
    if not spec.top_entropy_quantile < 1:
        return None
    if entropy_mask is not None:
        return entropy_mask & mask
    from mmrl.algo.entropy import top_entropy_mask
    return top_entropy_mask(entropy.detach(), mask, spec.top_entropy_quantile)


def _entropy_term(entropy: Tensor, keep: Tensor, mask: Tensor, per_seq: bool) -> Tensor:
    """The per-entry entropy the bonus aggregates: H on the kept tokens ``[B, T]``, or each
    row's token mean ``[B, 1]`` for a per-sequence loss (as :func:`_add_kl` does for KL)."""
    h = torch.where(keep, entropy, 0.0)
    if per_seq:
        return h.sum(-1, keepdim=True) / row_tokens(mask).to(h.dtype)
    return h


def _entropy_stats(stats: Dict[str, Tensor], entropy: Optional[Tensor], keep: Optional[Tensor],
                   mask: Tensor) -> Dict[str, Tensor]:
    with torch.no_grad():
        if entropy is not None:
            stats["entropy"] = masked_mean(entropy.detach().float(), mask)
        if keep is not None:
            stats["entropy_kept"] = masked_mean(keep.float(), mask)
    return stats


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                algo: str = "grpo", ref_logp: Optional[Tensor] = None,
                token_weights: Optional[Tensor] = None, group_ids: Optional[Tensor] = None,
                num_tokens=None, num_seqs=None, seq_lens=None,
                generator: Optional[torch.Generator] = None,
                rollout_logp: Optional[Tensor] = None, entropy: Optional[Tensor] = None,
                entropy_mask: Optional[Tensor] = None, step_std: Optional[Tensor] = None,
                mean_shift: Optional[Tensor] = None, step_gap: Optional[Tensor] = None,
                off_policy: Optional[Tensor] = None,
                **overrides) -> Tuple[Tensor, Dict[str, Tensor]]:
    """(loss, stats) of ``PolicyLoss(algo, **overrides)`` on these tensors (functional form).

    Args / Returns / Raises: as :meth:`PolicyLoss.__call__` and :class:`PolicyLoss`.
    """
    return PolicyLoss(algo, **overrides)(
        logp, old_logp, advantages, mask, ref_logp=ref_logp, token_weights=token_weights,
        group_ids=group_ids, num_tokens=num_tokens, num_seqs=num_seqs, seq_lens=seq_lens,
        generator=generator, rollout_logp=rollout_logp, entropy=entropy,
        entropy_mask=entropy_mask, step_std=step_std, mean_shift=mean_shift, step_gap=step_gap,
        off_policy=off_policy)
