"""KL estimators to the reference policy, per token, ``x = logp − ref_logp``, and the two
options that shape the KL term: a cap (verl's ``low_var_kl`` clamp) and TRL's bias correction
by the importance ratio."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from mmrl.algo.common import LOG_RATIO_CLAMP, Tensor, ratio
from mmrl.registry import Registry

KL_ESTIMATORS: Registry[Callable] = Registry("KL estimator")


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


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3",
               cap: Optional[float] = None) -> Tensor:
    """Per-token KL estimate KL(π‖π_ref) ``[B, T]`` with x = logp − ref_logp clamped to ±20.

    With ``cap``: clamp(KL, −cap, cap) (verl ``low_var_kl`` caps k3 at 10; its gradient is 0
    where the cap binds).

    Args:
        logp, ref_logp: ``[B, T]`` float log-probs of the sampled tokens.
        kind: ``k1`` | ``k2`` | ``k3`` (see :data:`KL_ESTIMATORS`).
        cap: a bound > 0 on |KL|, or None.

    Returns:
        ``[B, T]`` per-token estimate (unmasked; callers mask).

    Raises:
        ValueError: unknown ``kind`` or shape mismatch.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ; "
                         f"pass both as [B, T] for the same tokens")
    return cap_kl(_kl(logp - ref_logp, kind), cap)


def cap_kl(kl: Tensor, cap: Optional[float]) -> Tensor:
    """clamp(KL, −cap, cap); ``kl`` unchanged when ``cap`` is None.

    verl ``kl_penalty`` (``low_var_kl``/``k3``) clamps k3 to [−10, 10]: a token whose policy
    log-prob fell ~12 nats below the reference's no longer dominates the loss. Differs from
    verl: mmrl applies the cap to any estimator (and to a policy's own KL) when asked, verl
    always and only to k3.

    Raises:
        ValueError: ``cap`` ≤ 0.
    """
    if cap is None:
        return kl
    if not cap > 0:
        raise ValueError(f"kl_cap={cap!r}; expected a number > 0 (verl uses 10) or None")
    return kl.clamp(-cap, cap)


def bias_corrected_kl(kl: Tensor, log_ratio: Tensor) -> Tensor:
    """ρ·KL ``[B, T]``, ρ = exp(clamp(log_ratio, ±20)), *not* detached (TRL
    ``use_bias_correction_kl``; DeepSeek-V3.2, arXiv 2512.02556).

    The tokens were sampled from π_old, so E_old[ρ·KL_t] estimates the KL under the current
    policy; ρ keeps its gradient, which changes the KL gradient even where ρ = 1 (there
    ∇(ρ·k3) = (k3 + 1 − exp(−x))·∇logp instead of k3's (1 − exp(−x))·∇logp, x = logp − ref).
    ``log_ratio`` is the ratio level's: ``[B, T]`` per token, ``[B, 1]`` for a per-sequence
    level (s_i broadcast, as TRL at sequence level; unbiased only per token; for
    ``sequence_sum``, Reg-GRPO's level, the whole-sequence ratio exp(Σ_t x)).
    Differs from TRL: the ratio is clamped at exp(±20) (mmrl's ratio everywhere).

    Args:
        kl: ``[B, T]`` per-token KL (with gradient).
        log_ratio: ``[B, T]`` or ``[B, 1]`` log importance ratio (with gradient).
    """
    return ratio(log_ratio).to(kl.dtype) * kl


def _kl(x: Tensor, kind: str) -> Tensor:
    # Clamp: exp(−x) overflows for x < −88 in fp32; ±20 keeps every estimator finite.
    return KL_ESTIMATORS.get(kind)(x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
