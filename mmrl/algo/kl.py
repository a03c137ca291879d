"""KL estimators to the reference policy, per token, ``x = logp − ref_logp``."""
from __future__ import annotations

from typing import Callable

import torch

from mmrl.algo.common import LOG_RATIO_CLAMP, Tensor
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
