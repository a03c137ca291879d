"""Policy losses as four independent axes: ratio level x objective x aggregation (+ KL estimator).

Contract: ``logp, old_logp, ref_logp [B, T]`` float, ``mask [B, T]`` bool (True = counts),
``advantages [B]`` or ``[B, T]``. For video T is response tokens, for diffusion T is trained
denoising steps; nothing here knows which.

- :data:`RATIO_LEVELS` ``(logp, old_logp, mask) -> log_ratio`` of shape ``[B, T]`` (token levels)
  or ``[B, 1]`` (per-sequence levels, attribute ``per_sequence = True``). ``whole_sequence = True``
  marks levels that need all of a row's tokens in one call (the T axis must not be chunked).
- :data:`OBJECTIVES` ``(log_ratio, adv, *, spec, valid, group_ids) -> (loss, ratio, low, high)``:
  per-entry loss to minimize and the masks of the clipped, zero-gradient region.
- :data:`AGGREGATIONS` ``(loss, mask, *, num_tokens, num_seqs, seq_lens, max_len) -> scalar``
  (each entry reads the keywords it needs). ``num_tokens`` / ``num_seqs`` are the optimizer
  step's global counts, so micro-batch losses sum to the full-batch loss.
- :data:`KL_ESTIMATORS` ``x -> KL`` per token, ``x = logp − ref_logp`` (or the policy's ``kl``).

Log-ratios are clamped to ±20 before every ``exp``: exp(20) ≈ 4.9e8 keeps products finite in
fp32, and a ratio that far from 1 is either in a clipped/saturated region (zero gradient anyway)
or would give a ~1e8·|A| gradient no optimizer step should take; the clamp removes inf/NaN.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from mmrl.registry import Registry

RATIO_LEVELS: Registry[Callable] = Registry("ratio level")
OBJECTIVES: Registry[Callable] = Registry("objective")
AGGREGATIONS: Registry[Callable] = Registry("aggregation")
KL_ESTIMATORS: Registry[Callable] = Registry("KL estimator")

LOG_RATIO_CLAMP = 20.0
Tensor = torch.Tensor


def _entry(registry: Registry, name: str, **attrs):
    """Register under ``name`` and attach metadata the presets validate against."""
    def wrap(fn):
        for key, value in attrs.items():
            setattr(fn, key, value)
        return registry.register(name, fn)
    return wrap


def _masked_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    # where, not multiply: padding may hold -inf log-probs and 0 * inf would be NaN.
    return torch.where(mask, logp - old_logp, torch.zeros_like(logp))


def _num_tokens(mask: Tensor) -> Tensor:
    return mask.sum(-1, keepdim=True).to(torch.float32).clamp(min=1)  # [B, 1]; empty row -> 1


# ---------------------------------------------------------------- ratio levels
@_entry(RATIO_LEVELS, "token", per_sequence=False, whole_sequence=False)
def token_log_ratio(logp, old_logp, mask) -> Tensor:
    """x_i,t = logp − old_logp -> ``[B, T]`` (PPO / GRPO token ratio)."""
    return _masked_log_ratio(logp, old_logp, mask)


@_entry(RATIO_LEVELS, "sequence", per_sequence=True, whole_sequence=True)
def sequence_log_ratio(logp, old_logp, mask) -> Tensor:
    """log s_i = Σ_t m x / |o_i| -> ``[B, 1]`` (GSPO, arXiv 2507.18071 eq. 7)."""
    x = _masked_log_ratio(logp, old_logp, mask)
    return x.sum(-1, keepdim=True) / _num_tokens(mask).to(x.dtype)  # [B, T] -> [B, 1]


@_entry(RATIO_LEVELS, "sequence_token", per_sequence=False, whole_sequence=True)
def sequence_token_log_ratio(logp, old_logp, mask) -> Tensor:
    """log s_i,t = logp − sg(logp) + sg(log s_i) -> ``[B, T]`` (GSPO-token, 2507.18071 eq. 13).

    Same value as ``sequence`` on every token; the gradient flows per token.
    """
    seq = sequence_log_ratio(logp, old_logp, mask).detach()  # [B, 1]
    return _masked_log_ratio(logp, logp.detach(), mask) + seq  # [B, T]


@_entry(RATIO_LEVELS, "sequence_sum", per_sequence=True, whole_sequence=True)
def sequence_sum_log_ratio(logp, old_logp, mask) -> Tensor:
    """ℓr_i = Σ_t m x -> ``[B, 1]`` (Reg-GRPO's sequence log-ratio, arXiv 2506.07464)."""
    return _masked_log_ratio(logp, old_logp, mask).sum(-1, keepdim=True)


# ---------------------------------------------------------------- objectives
def _ratio(log_ratio: Tensor) -> Tensor:
    return torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


@_entry(OBJECTIVES, "clip", needs_groups=False, needs_per_sequence=False)
def clip_objective(log_ratio, adv, *, spec, valid=None, group_ids=None):
    """ℓ = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)·A); dual clip: ℓ = min(ℓ, −c·A) for A < 0.

    PPO (arXiv 1707.06347) with asymmetric ε (DAPO clip-higher, arXiv 2503.14476); dual clip
    per Ye et al. (arXiv 1912.09729) and verl ``clip_ratio_c``.
    Differs from ALGORITHMS.md: it writes the dual clip as max(ℓ_clip, −c·A); on a loss that
    would raise every A < 0 loss to at least c·|A| instead of bounding it, so mmrl takes the
    paper's (and verl's) cap: ℓ = min(ℓ_clip, −c·A) for A < 0.
    """
    ratio = _ratio(log_ratio)
    clipped = ratio.clamp(1.0 - spec.eps_low, 1.0 + spec.eps_high)
    loss = torch.maximum(-adv * ratio, -adv * clipped)
    high = (adv > 0) & (ratio > 1.0 + spec.eps_high)
    low = (adv < 0) & (ratio < 1.0 - spec.eps_low)
    if spec.dual_clip_c is not None:
        cap = -spec.dual_clip_c * adv  # constant in θ: zero gradient in the dual-clipped region
        dual = (adv < 0) & (loss > cap)
        loss = torch.where(dual, cap.expand_as(loss), loss)
        high = high | dual
    return loss, ratio, low, high


@_entry(OBJECTIVES, "sapo", needs_groups=False, needs_per_sequence=False)
def sapo_objective(log_ratio, adv, *, spec, valid=None, group_ids=None):
    """ℓ = −f_τ(ρ)·A, f_τ(ρ) = (4/τ)·sigmoid(τ(ρ−1)) (SAPO, arXiv 2511.20347).

    τ = τ_pos if A > 0 else τ_neg. f(1) = 2/τ and f′(1) = 1: at ρ = 1 the gradient is
    REINFORCE's. A soft gate has no zero-gradient region, so both clip fractions are 0.
    """
    ratio = _ratio(log_ratio)
    tau = torch.where(adv > 0, adv.new_tensor(spec.tau_pos), adv.new_tensor(spec.tau_neg))
    loss = -(4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0)) * adv
    none = torch.zeros_like(loss, dtype=torch.bool)
    return loss, ratio, none, none


@_entry(OBJECTIVES, "reg", needs_groups=True, needs_per_sequence=True)
def reg_objective(log_ratio, adv, *, spec, valid=None, group_ids=None):
    """ℓ_i = (A_i − Â_i)², Â_i = ε_reg·(ℓr_i − mean_g ℓr) (Reg-GRPO, arXiv 2506.07464).

    From the KL-regularized optimum π* ∝ π_old·exp(A/ε): ε·log(π*/π_old) = A − ε·log Z, and the
    group mean removes log Z. No clipping, no min. ``log_ratio`` is ``[B, 1]`` (``sequence_sum``,
    or ``sequence`` for ``length_normalize=True``); rows with an empty mask (``valid`` False)
    are left out of the group mean. Whole groups must be in the same call.
    Unconfirmed against the paper: only its abstract was reachable when this was written; the
    formula is ALGORITHMS.md's (the paper may also scale Â by the group std of ℓr).
    """
    lr = log_ratio[:, 0]  # [B, 1] -> [B]
    w = torch.ones_like(lr) if valid is None else valid[:, 0].to(lr.dtype)
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    zeros = torch.zeros(uniq.numel(), dtype=lr.dtype, device=lr.device)
    mean = zeros.index_add(0, inv, lr * w) / zeros.index_add(0, inv, w).clamp(min=1)  # [G]
    pred = spec.eps_reg * (lr - mean[inv])  # [B]
    loss = (adv[:, 0] - pred).pow(2).unsqueeze(-1)  # [B, 1]
    none = torch.zeros_like(loss, dtype=torch.bool)
    return loss, _ratio(log_ratio), none, none


# ---------------------------------------------------------------- aggregations
def _den(given, default: Tensor) -> Tensor:
    """A global normalizer passed in (number / 0-d tensor) or the local one."""
    return default if given is None else torch.as_tensor(given).to(default)


@_entry(AGGREGATIONS, "token_mean", per_sequence=False)
def token_mean(loss, mask, *, num_tokens=None, **_):
    """Σ_i,t m ℓ / Σ_i,t m, over the *global* batch when ``num_tokens`` is given (DAPO)."""
    local = mask.sum().to(loss.dtype).clamp(min=1)
    return torch.where(mask, loss, 0.0).sum() / _den(num_tokens, local)


@_entry(AGGREGATIONS, "seq_mean_token_mean", per_sequence=False)
def seq_mean_token_mean(loss, mask, *, num_seqs=None, seq_lens=None, **_):
    """mean_i (Σ_t m ℓ / |o_i|) (original GRPO). |o_i| = ``seq_lens`` when the T axis is chunked.

    The mean is over all B rows (``num_seqs`` when global): an empty row contributes 0.
    """
    row_len = torch.as_tensor(mask.sum(-1) if seq_lens is None else seq_lens).to(loss)  # [B]
    per_row = torch.where(mask, loss, 0.0).sum(-1) / row_len.clamp(min=1)  # [B, T] -> [B]
    return per_row.sum() / _den(num_seqs, loss.new_tensor(float(mask.shape[0])).clamp(min=1))


@_entry(AGGREGATIONS, "seq_mean_token_sum", per_sequence=False)
def seq_mean_token_sum(loss, mask, *, num_seqs=None, **_):
    """mean_i Σ_t m ℓ."""
    den = _den(num_seqs, loss.new_tensor(float(mask.shape[0])).clamp(min=1))
    return torch.where(mask, loss, 0.0).sum() / den


@_entry(AGGREGATIONS, "fixed_norm", per_sequence=False)
def fixed_norm(loss, mask, *, num_seqs=None, max_len=None, **_):
    """Σ_i,t m ℓ / (B · L_max), L_max a constant (Dr.GRPO, arXiv 2503.20783)."""
    if max_len is None:
        raise ValueError("aggregation 'fixed_norm' needs max_len (the max completion length); "
                         "pass max_len=<int> to PolicyLoss / resolve_algo")
    den = _den(num_seqs, loss.new_tensor(float(mask.shape[0])).clamp(min=1)) * max_len
    return torch.where(mask, loss, 0.0).sum() / den


@_entry(AGGREGATIONS, "seq_mean", per_sequence=True)
def seq_mean(loss, mask, *, num_seqs=None, **_):
    """mean_i ℓ_i over per-sequence losses ``[B, 1]``; ``mask [B, 1]`` marks non-empty rows."""
    den = _den(num_seqs, loss.new_tensor(float(mask.shape[0])).clamp(min=1))
    return torch.where(mask, loss, 0.0).sum() / den


# ---------------------------------------------------------------- KL
@KL_ESTIMATORS.register("k1")
def kl_k1(x: Tensor) -> Tensor:
    """k1 = x (Schulman 2020, "Approximating KL divergence")."""
    return x


@KL_ESTIMATORS.register("k2")
def kl_k2(x: Tensor) -> Tensor:
    """k2 = ½x² (Schulman 2020; low variance, biased)."""
    return 0.5 * x * x


@KL_ESTIMATORS.register("k3")
def kl_k3(x: Tensor) -> Tensor:
    """k3 = exp(−x) + x − 1 ≥ 0 (GRPO, arXiv 2402.03300 eq. 4)."""
    return torch.exp(-x) + x - 1.0


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL estimate KL(π‖π_ref) ``[B, T]`` with x = logp − ref_logp clamped to ±20.

    Args:
        logp, ref_logp: ``[B, T]`` float log-probs of the sampled tokens.
        kind: ``k1`` | ``k2`` | ``k3`` (see :data:`KL_ESTIMATORS`).

    Returns:
        ``[B, T]`` per-token estimate (unmasked; callers mask).

    Raises:
        ValueError: unknown ``kind`` or shape mismatch.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ; "
                         f"pass both as [B, T] for the same tokens")
    return _kl(logp - ref_logp, kind)


def _kl(x: Tensor, kind: str) -> Tensor:
    # Clamp: exp(−x) overflows for x < −88 in fp32; ±20 keeps every estimator finite.
    return KL_ESTIMATORS.get(kind)(x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


# ---------------------------------------------------------------- the policy loss
def _check_inputs(spec, logp, old_logp, advantages, mask, ref_logp, token_weights, group_ids,
                  per_sequence: bool, kl=None) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor [B, T] (True = counts), got {got}; "
                        f"pass mask.bool()")
    if logp.dim() != 2 or not logp.is_floating_point():
        raise ValueError(f"logp must be float [B, T], got {logp.dtype} {tuple(logp.shape)}; "
                         f"gather the sampled tokens' log-probs into [B, T]")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp),
                    ("token_weights", token_weights), ("kl", kl)):
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
    if OBJECTIVES.get(spec.objective).needs_groups:
        if group_ids is None or group_ids.shape != (B,):
            got = None if group_ids is None else tuple(group_ids.shape)
            raise ValueError(f"objective {spec.objective!r} needs group_ids [B]=({B},), got "
                             f"{got}; pass the same group ids used for the advantages")


def _masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    x = x.expand(valid.shape)
    return torch.where(valid, x, 0.0).sum() / valid.sum().clamp(min=1)


def _stats(loss, ratio, low, high, adv, valid, logp, old_logp, mask, kl_ref) -> Dict[str, Tensor]:
    with torch.no_grad():
        ratio = ratio.detach().expand(valid.shape)
        any_valid = valid.any()
        one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
        stats = {
            "loss": loss.detach(),
            "clipfrac_low": _masked_mean(low.to(ratio.dtype), valid),
            "clipfrac_high": _masked_mean(high.to(ratio.dtype), valid),
            "ratio_mean": torch.where(any_valid, _masked_mean(ratio, valid), one),
            "ratio_min": torch.where(any_valid, torch.where(valid, ratio, torch.inf).amin(), one),
            "ratio_max": torch.where(any_valid, torch.where(valid, ratio, -torch.inf).amax(), one),
            "approx_kl": _masked_mean(_kl(_masked_log_ratio(logp.detach(), old_logp, mask),
                                          "k3"), mask),
            "adv_mean": _masked_mean(adv.detach(), valid),
        }
        if kl_ref is not None:
            stats["kl_ref"] = _masked_mean(kl_ref.detach(), mask)
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

    def __repr__(self) -> str:
        return f"PolicyLoss({self.spec!r})"

    def __call__(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logp: Optional[Tensor] = None, token_weights: Optional[Tensor] = None,
                 group_ids: Optional[Tensor] = None, num_tokens=None, num_seqs=None,
                 seq_lens=None, kl: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
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
            seq_lens: ``[B]`` full per-row token counts for ``seq_mean_token_mean`` when the T
                axis is split into chunks (other aggregations do not need it).
            kl: ``[B, T]`` the policy's own per-token KL (with gradient), instead of ``ref_logp``.

        Returns:
            ``loss`` 0-d; ``stats`` detached 0-d tensors: loss, clipfrac_low/high (share of valid
            tokens, or sequences, in the clipped zero-gradient region; 0 for sapo/reg),
            ratio_mean/min/max, approx_kl (k3 to old_logp), adv_mean, kl_ref (when ref given).

        Raises:
            TypeError / ValueError: bad dtypes/shapes; missing ref_logp, group_ids or weights.
        """
        spec, per_seq = self.spec, self._ratio.per_sequence
        _check_inputs(spec, logp, old_logp, advantages, mask, ref_logp, token_weights,
                      group_ids, per_seq, kl)
        if logp.dtype in (torch.float16, torch.bfloat16):
            logp = logp.float()  # bf16's 8-bit mantissa cannot resolve GSPO's 3e-4 clip range
        old_logp = old_logp.detach().to(logp.dtype)
        log_ratio = self._ratio(logp, old_logp, mask)  # [B, T] or [B, 1]
        valid = mask.any(-1, keepdim=True) if per_seq else mask  # [B, 1] or [B, T]
        adv = advantages.detach().to(logp.dtype)
        # [B] -> [B, 1] (broadcast over T); padding of [B, T] advantages is zeroed so that
        # garbage there (NaN) cannot reach the gradient through 0 * NaN.
        adv = adv.unsqueeze(-1) if adv.dim() == 1 else torch.where(mask, adv, 0.0)
        loss, ratio, low, high = self._objective(log_ratio, adv, spec=spec, valid=valid,
                                                 group_ids=group_ids)
        kl_ref = None if kl is None else torch.where(mask, kl.to(logp.dtype), 0.0)
        if ref_logp is not None:
            # Mask x *before* the estimator: exp of padding garbage would poison the backward.
            with torch.set_grad_enabled(torch.is_grad_enabled() and spec.beta > 0):  # stat only
                kl_ref = torch.where(mask, _kl(_masked_log_ratio(logp, ref_logp.detach(), mask),
                                               spec.kl), 0.0)
        if kl_ref is not None and spec.beta > 0:  # sequence-level objectives: token-mean KL
            loss = loss + spec.beta * (kl_ref.sum(-1, keepdim=True) / _num_tokens(mask).to(
                kl_ref.dtype) if per_seq else kl_ref)
        loss = loss.expand(valid.shape)
        if token_weights is not None:
            loss = loss * torch.where(mask, token_weights.detach(), 0.0)
        total = self._aggregate(loss, valid, num_tokens=num_tokens, num_seqs=num_seqs,
                                seq_lens=seq_lens, max_len=spec.max_len)
        return total, _stats(total, ratio, low, high, adv, valid, logp, old_logp, mask, kl_ref)


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                algo: str = "grpo", ref_logp: Optional[Tensor] = None,
                token_weights: Optional[Tensor] = None, group_ids: Optional[Tensor] = None,
                num_tokens=None, num_seqs=None, seq_lens=None,
                **overrides) -> Tuple[Tensor, Dict[str, Tensor]]:
    """(loss, stats) of ``PolicyLoss(algo, **overrides)`` on these tensors (functional form).

    Args / Returns / Raises: as :meth:`PolicyLoss.__call__` and :class:`PolicyLoss`.
    """
    return PolicyLoss(algo, **overrides)(
        logp, old_logp, advantages, mask, ref_logp=ref_logp, token_weights=token_weights,
        group_ids=group_ids, num_tokens=num_tokens, num_seqs=num_seqs, seq_lens=seq_lens)
