"""Float64 that is float64 all the way, for exactness tests of the VLM policy.

transformers' RMSNorm layers (Qwen2, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision's Qwen2) cast their
input to float32 and back, even for a float64 model, so two computations that differ only in
summation order (e.g. the shared-prefix forward, which sums a group's gradients into one prompt
instead of G copies) then differ at float32 precision (~1e-7 relative) rather than float64's.
:func:`exact_float64` casts the model to float64 and gives each RMSNorm a forward of the same
formula without the cast, so equal math shows as ~1e-15.
"""
from __future__ import annotations

import types

import torch


def _rms_norm(self, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def exact_float64(model) -> int:
    """Cast ``model`` to float64 in place and patch its RMSNorm modules (by class name) to
    compute in the input's dtype; returns how many were patched (> 0 for every supported
    family: a test that patched nothing would not be testing float64)."""
    model.double()
    n = 0
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm") and getattr(m, "weight", None) is not None:
            m.forward = types.MethodType(_rms_norm, m)
            n += 1
    return n
