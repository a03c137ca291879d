"""Rollout / training mismatch correction: importance weights from the sampler's log-probs, and
TRL's off-policy sequence mask.

When the rollouts come from another engine or precision than the training forward (a bf16
sampler, a future vLLM engine, stale rollouts), the trainer's θ_old log-probs ``old_logp`` and the
sampler's ``rollout_logp`` differ. The policy gradient is an expectation under π_old but the
samples come from μ (the sampler), so each sample's objective term is reweighted by π_old/μ:

    d_t = old_logp_t − rollout_logp_t   (0 on padding; NaN → 0, i.e. ratio 1, as TRL)

:data:`ROLLOUT_CORRECTIONS` ``(d, mask, *, low, high) -> (weights, out_of_range)``: weights
``[B, T]`` (token modes) or ``[B, 1]`` (sequence modes), detached; ``out_of_range`` marks the
entries truncated or masked. Flags: ``per_sequence`` (one weight per row: the T axis must not be
chunked), ``needs_rollout_logp`` (False only for ``none``).

Names and formulas are TRL 1.16's ``vllm_importance_sampling_mode`` (C_min = ``low``, C_max =
``high``). verl 0.9's ``algorithm.rollout_correction`` maps onto them:

- verl ``rollout_is: token`` with a float threshold u (TIS) = ``token_truncate``, high = u,
  low = None; ``rollout_is: sequence`` with u = ``sequence_truncate``.
- verl string threshold ``"l_u"`` (IcePop: zero outside [l, u]) = ``token_mask`` /
  ``sequence_mask`` with low = l, high = u.
- verl's ``rollout_is_batch_normalize`` (w / mean w), its rejection sampling ``rollout_rs``
  (which rewrites the response mask) and its ``bypass_mode`` (old_logp := rollout_logp, no
  weights) have no equivalent here.

:func:`off_policy_mask` is TRL's ``off_policy_mask_threshold`` (DeepSeek-V3.2, arXiv 2512.02556,
Eq. 9): a negative-advantage row whose sampler drifted from the current policy by more than δ
(mean per-token log-ratio) is dropped from the objective.

Weights multiply the per-token objective only: never the KL term, never the normalizers of the
aggregation (a masked token still counts in ``num_tokens``), as TRL and verl do.

:data:`OFF_POLICY_SHAPINGS` ``(r, mask, gamma) -> r̃`` and :func:`shape_off_policy` are Guide's
off-policy ratio shaping (arXiv 2506.13923; vaskar-open-source-research/guide_rl
``core_algos.compute_policy_loss``, ``gamma_strategy``): rows flagged ``Rollout.off_policy``
(sampled under a hinted prompt, trained for the plain one) get the loss −A·r̃_t with
r_t = π_θ(o_t|q, o_<t) / π_sampler(o_t|q, h, o_<t), unclipped, in place of the objective; the
other rows are untouched. Flag ``whole_rows``: γ is read from the row's tokens (no T chunks).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from mmrl.algo.common import LOG_RATIO_CLAMP, Tensor, entry, masked_mean
from mmrl.registry import Registry

__all__ = ["OFF_POLICY_SHAPINGS", "ROLLOUT_CORRECTIONS", "correct_objective", "off_policy_mask",
           "rollout_log_ratio", "rollout_weights", "shape_off_policy"]

ROLLOUT_CORRECTIONS: Registry[Callable] = Registry("rollout correction")
OFF_POLICY_SHAPINGS: Registry[Callable] = Registry("off-policy shaping")


def rollout_log_ratio(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> Tensor:
    """d = old_logp − rollout_logp ``[B, T]`` (detached): 0 on padding, NaN → 0, ±inf → ±20.

    A NaN is a token the sampler could not score (TRL: vLLM's missing logprob): ratio 1, no
    correction. An infinite difference (a token the sampler gave probability 0) is clamped to
    the ±20 bound every ratio uses (:data:`mmrl.algo.common.LOG_RATIO_CLAMP`).
    """
    d = (old_logp.detach() - rollout_logp.detach().to(old_logp.dtype))
    d = torch.nan_to_num(d, nan=0.0, posinf=LOG_RATIO_CLAMP, neginf=-LOG_RATIO_CLAMP)
    return torch.where(mask, d, torch.zeros_like(d))  # where: padding may hold -inf or NaN


def _ratio(log_w: Tensor) -> Tensor:
    # ±20 before exp, as verl's SAFETY_BOUND: exp(20) ≈ 4.9e8 stays finite in fp32.
    return torch.exp(log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _outside(w: Tensor, low: Optional[float], high: Optional[float]) -> Tensor:
    out = torch.zeros_like(w, dtype=torch.bool)
    if low is not None:
        out |= w < low
    if high is not None:
        out |= w > high
    return out


def _truncate(w: Tensor, low, high) -> Tuple[Tensor, Tensor]:
    if low is None and high is None:  # plain IS (TRL refuses truncation without a bound)
        return w, _outside(w, low, high)
    return w.clamp(min=low, max=high), _outside(w, low, high)


def _mask(w: Tensor, low, high) -> Tuple[Tensor, Tensor]:
    out = _outside(w, low, high)
    return torch.where(out, torch.zeros_like(w), w), out


@entry(ROLLOUT_CORRECTIONS, "none", per_sequence=False, needs_rollout_logp=False)
def no_correction(d, mask, *, low=None, high=None):
    """w = 1: no correction (the sampler is assumed to be π_old)."""
    return torch.ones_like(d[:, :1]), torch.zeros_like(d[:, :1], dtype=torch.bool)


@entry(ROLLOUT_CORRECTIONS, "token_truncate", per_sequence=False, needs_rollout_logp=True)
def token_truncate(d, mask, *, low=None, high=None):
    """w_t = clamp(exp(d_t), C_min, C_max) ``[B, T]`` (truncated IS, TIS; TRL token_truncate).

    verl ``rollout_is: token`` with a float threshold is this with C_min = None. Biased for
    sequence-level rewards (it corrects each token's marginal only); low variance.
    Differs from TRL: exp of d clamped to ±20 first (TRL exponentiates the raw d).
    """
    return _truncate(_ratio(d), low, high)


@entry(ROLLOUT_CORRECTIONS, "token_mask", per_sequence=False, needs_rollout_logp=True)
def token_mask(d, mask, *, low=None, high=None):
    """w_t = exp(d_t) if C_min ≤ exp(d_t) ≤ C_max else 0 ``[B, T]`` (masked IS, MIS / IcePop).

    verl ``rollout_is: token`` with threshold ``"l_u"`` is this with C_min = l, C_max = u.
    Differs from TRL: exp of d clamped to ±20 first.
    """
    return _mask(_ratio(d), low, high)


@entry(ROLLOUT_CORRECTIONS, "sequence_truncate", per_sequence=True, needs_rollout_logp=True)
def sequence_truncate(d, mask, *, low=None, high=None):
    """w_i = clamp(exp(Σ_t d_t), C_min, C_max) ``[B, 1]`` (sequence TIS; TRL sequence_truncate).

    verl ``rollout_is: sequence`` with a float threshold is this with C_min = None. Unbiased
    when no weight reaches the bounds (the ratio of the whole sequence's probabilities).
    Differs from TRL: the sum is clamped to ±20 before exp (as verl).
    """
    return _truncate(_ratio(d.sum(-1, keepdim=True)), low, high)  # [B, T] -> [B, 1]


@entry(ROLLOUT_CORRECTIONS, "sequence_mask", per_sequence=True, needs_rollout_logp=True)
def sequence_mask(d, mask, *, low=None, high=None):
    """w_i = exp(Σ_t d_t) if C_min ≤ w_i ≤ C_max else 0 ``[B, 1]`` (sequence MIS; TRL's default).

    verl ``rollout_is: sequence`` with threshold ``"l_u"`` is this with C_min = l, C_max = u.
    Differs from TRL: the sum is clamped to ±20 before exp (as verl).
    """
    return _mask(_ratio(d.sum(-1, keepdim=True)), low, high)  # [B, T] -> [B, 1]


@torch.no_grad()
def rollout_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *,
                    mode: str = "sequence_mask", low: Optional[float] = None,
                    high: Optional[float] = 3.0) -> Tuple[Tensor, Tensor]:
    """``(w, out_of_range)``: the detached importance weights π_old/μ of correction ``mode``.

    Args:
        old_logp: ``[B, T]`` the trainer's θ_old log-probs of the sampled tokens / steps.
        rollout_logp: ``[B, T]`` the sampler's log-probs of the same (``Rollout.rollout_logp``).
        mask: ``[B, T]`` bool, True = counts.
        mode: a name in :data:`ROLLOUT_CORRECTIONS`.
        low, high: C_min / C_max (None = unbounded on that side).

    Returns:
        ``w`` ``[B, T]`` (token modes) or ``[B, 1]`` (sequence modes; ``none`` gives ``[B, 1]``
        ones) and the bool mask of the entries truncated or masked, same shape.

    Raises:
        ValueError: unknown ``mode``; shapes that differ.
    """
    fn = ROLLOUT_CORRECTIONS.get(mode)
    if rollout_logp.shape != old_logp.shape or mask.shape != old_logp.shape:
        raise ValueError(f"rollout_logp {tuple(rollout_logp.shape)}, old_logp "
                         f"{tuple(old_logp.shape)} and mask {tuple(mask.shape)} must have the "
                         f"same [B, T]; pass the sampler's log-probs of the same rows and steps")
    return fn(rollout_log_ratio(old_logp, rollout_logp, mask), mask, low=low, high=high)


@torch.no_grad()
def off_policy_mask(advantages: Tensor, logp: Tensor, sample_logp: Tensor, mask: Tensor,
                    threshold: float) -> Tensor:
    """M_i = 0 if A_i < 0 and D_i > δ else 1 ``[B, 1]`` (TRL ``off_policy_mask_threshold``).

    D_i = Σ_t m (sample_logp − sg(logp)) / max(Σ_t m, 1), NaN terms → 0: the mean per-token
    log-ratio of the sampling policy to the current one (a k1 estimate of KL(μ‖π_θ)).
    DeepSeek-V3.2 (arXiv 2512.02556) Eq. 9. TRL recomputes it every micro-batch with the current
    logp, and so does :class:`mmrl.algo.losses.PolicyLoss`; ``sample_logp`` is the rollout's
    log-probs when the policy reports them, else ``old_logp`` (TRL's fallback).

    Args:
        advantages: ``[B]`` one advantage per row.
        logp: ``[B, T]`` current log-probs (detached here).
        sample_logp: ``[B, T]`` the sampling policy's log-probs.
        mask: ``[B, T]`` bool.
        threshold: δ (TRL docs suggest 0.5).

    Returns:
        ``[B, 1]`` float in {0, 1}, the dtype of ``logp``.
    """
    kl = torch.nan_to_num(sample_logp.detach().to(logp.dtype) - logp.detach(), nan=0.0)
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    mean_kl = kl.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1).to(kl.dtype)
    adv = advantages.detach().reshape(-1, 1)  # [B] -> [B, 1]
    return ((adv >= 0) | (mean_kl <= threshold)).to(logp.dtype)


def correct_objective(spec, loss: Tensor, logp: Tensor, old_logp: Tensor,
                      rollout_logp: Optional[Tensor], advantages: Tensor,
                      mask: Tensor) -> Tuple[Tensor, dict]:
    """``(loss·w·M, stats)``: the per-entry objective ``loss`` (``[B, T]`` or ``[B, 1]``) times
    the rollout correction's weights w (``spec.rollout_is``) and the off-policy sequence mask M
    (``spec.off_policy_mask``), with their detached statistics. Called by
    :class:`mmrl.algo.losses.PolicyLoss` before the KL term is added.

    Args:
        spec: the resolved :class:`mmrl.algo.presets.AlgoSpec`.
        loss: the objective's per-entry loss.
        logp, old_logp: ``[B, T]`` current (with gradient; read detached) and θ_old log-probs.
        rollout_logp: ``[B, T]`` the sampler's log-probs, or None (not reported).
        advantages: ``[B]`` or ``[B, T]`` as given to the loss.
        mask: ``[B, T]`` bool.

    Returns:
        the corrected loss and stats: ``rollout_weight_mean`` (mean weight over the valid
        tokens, or rows for sequence modes), ``rollout_clipfrac`` (share truncated or masked),
        ``rollout_logp_diff`` (mean |old_logp − rollout_logp| over valid tokens) when
        ``rollout_logp`` is given; ``off_policy_masked`` (share of rows masked) with the mask.

    Raises:
        ValueError: ``rollout_is`` set without ``rollout_logp``; shapes that differ;
            ``off_policy_mask`` with per-token advantages.
    """
    stats = {}
    if rollout_logp is None and spec.needs_rollout_logp:
        raise ValueError(f"rollout_is={spec.rollout_is!r} needs rollout_logp [B, T] (the "
                         f"sampler's log-probs of the sampled tokens), got None; pass "
                         f"rollout_logp=, use a policy whose rollouts report Rollout.rollout_logp "
                         f"(Capabilities(rollout_logp=True)), or set rollout_is=none")
    if rollout_logp is not None:
        w, out = rollout_weights(old_logp, rollout_logp, mask, mode=spec.rollout_is,
                                 low=spec.rollout_is_min, high=spec.rollout_is_max)
        loss = loss * w.to(loss.dtype)
        where = mask if w.shape == mask.shape else mask.any(-1, keepdim=True)  # tokens or rows
        stats["rollout_weight_mean"] = masked_mean(w.detach(), where)
        stats["rollout_clipfrac"] = masked_mean(out.to(w.dtype), where)
        stats["rollout_logp_diff"] = masked_mean(
            rollout_log_ratio(old_logp, rollout_logp, mask).abs(), mask)
    if spec.off_policy_mask is not None:
        if advantages.dim() != 1:
            raise ValueError(f"off_policy_mask needs one advantage per sequence [B], got "
                             f"{tuple(advantages.shape)}; pass [B] advantages or drop "
                             f"off_policy_mask")
        keep = off_policy_mask(advantages, logp, old_logp if rollout_logp is None
                               else rollout_logp, mask, spec.off_policy_mask)  # [B, 1]
        loss = loss * keep
        rows = mask.any(-1, keepdim=True)
        stats["off_policy_masked"] = masked_mean((1.0 - keep).detach(), rows)
    return loss, stats


@entry(OFF_POLICY_SHAPINGS, "none", whole_rows=False)
def no_shaping(r: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """No shaping: flagged rows keep the objective (and the rollout correction's weights)."""
    return r


@entry(OFF_POLICY_SHAPINGS, "percentile", whole_rows=True)
def percentile_shaping(r: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """r̃_t = r_t / (r_t + γ_i), γ_i = sg(max(Q_gamma(r over row i's valid tokens), 1e-4)).

    Guide's recipe (``gamma_strategy=percentile``, ``gamma_value=0.9``). Its micro-batch is one
    row (``ppo_micro_batch_size_per_gpu=1``), so its quantile is a row's: here always per row,
    over the valid tokens (the code's tensor also holds the row's padding positions). Linear
    interpolation, as ``torch.quantile``.
    """
    nan = torch.full_like(r, float("nan"))
    q = torch.nanquantile(torch.where(mask, r.detach(), nan), gamma, dim=-1, keepdim=True)
    q = torch.nan_to_num(q, nan=1.0).clamp(min=1e-4)  # a row without tokens: any γ (no loss)
    return r / (r + q)


@entry(OFF_POLICY_SHAPINGS, "constant", whole_rows=False)
def constant_shaping(r: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """r̃_t = r_t / (r_t + γ), γ fixed (guide_rl ``gamma_strategy=constant``)."""
    return r / (r + gamma)


@entry(OFF_POLICY_SHAPINGS, "power", whole_rows=False)
def power_shaping(r: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """r̃_t = r_t^γ (guide_rl ``gamma_strategy=power``)."""
    return r.pow(gamma)


def shape_off_policy(spec, loss: Tensor, logp: Tensor, rollout_logp: Optional[Tensor],
                     adv: Tensor, mask: Tensor,
                     off_policy: Optional[Tensor]) -> Tuple[Tensor, dict]:
    """``(loss', stats)``: on the rows flagged ``off_policy`` the per-token loss becomes
    −A·r̃_t (``spec.off_policy_shaping``; r_t = exp(logp_t − rollout_logp_t), ±20 in the log,
    unclipped, no rollout-correction weight: r already divides by the sampler); other rows
    keep ``loss``. Stats: ``off_policy_rows`` (share of rows flagged), ``off_policy_ratio``
    (mean r̃ over their valid tokens).

    Args:
        spec: the resolved AlgoSpec.
        loss: ``[B, T]`` the corrected per-token objective.
        logp: ``[B, T]`` current log-probs (with gradient).
        rollout_logp: ``[B, T]`` the sampler's log-probs (those of the hinted prompt).
        adv: ``[B, 1]`` or ``[B, T]`` advantages (detached).
        mask: ``[B, T]`` bool.
        off_policy: ``[B]`` bool, or None (no row flagged).

    Raises:
        ValueError: flags without ``rollout_logp``, or not ``[B]``; a per-sequence loss.
    """
    if spec.off_policy_shaping == "none" or off_policy is None:
        return loss, {}
    if off_policy.shape != mask.shape[:1]:
        raise ValueError(f"off_policy must be [B]=({mask.shape[0]},) bool (one flag per row), "
                         f"got {tuple(off_policy.shape)}")
    if rollout_logp is None or loss.shape != mask.shape:
        raise ValueError(f"off_policy_shaping={spec.off_policy_shaping!r} needs rollout_logp "
                         f"[B, T] and a per-token loss [B, T]={tuple(mask.shape)}, got "
                         f"rollout_logp={None if rollout_logp is None else 'given'}, loss "
                         f"{tuple(loss.shape)}; use ratio_level token and a policy that reports "
                         f"Rollout.rollout_logp")
    rows = off_policy.to(mask.device).bool().reshape(-1, 1)  # [B, 1]
    log_r = torch.where(mask, logp - rollout_logp.detach().to(logp.dtype), 0.0)
    r = torch.exp(log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    shaped = OFF_POLICY_SHAPINGS.get(spec.off_policy_shaping)(r, mask, spec.off_policy_gamma)
    out = torch.where(rows, -adv * shaped, loss)
    stats = {"off_policy_rows": rows.to(loss.dtype).mean().detach(),
             "off_policy_ratio": masked_mean(shaped.detach(), rows & mask)}  # 0 when none
    return out, stats
