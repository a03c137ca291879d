"""One reverse-time step of a flow-matching sampler, with the log-probability of the transition.

Convention (ALGORITHMS.md, "Flow-matching SDE"): σ ∈ [0, 1], x_σ = (1−σ)·x0 + σ·ε, the model's
velocity v ≈ ε − x0, a schedule ``sigmas`` [T+1] going from σ_0 ≈ 1 down to σ_T = 0, and step i
moves x from σ_i to σ_{i+1} (dt = σ_{i+1} − σ_i < 0).

:func:`sde_step` both samples a transition and re-scores a stored one (``prev_sample=``), so the
log-probability used at sampling time and the one used in the loss come from the same code: that
is what makes the importance ratio exactly 1 before the first update. It works on latents of any
rank (``[B, C, H, W]`` images, ``[B, C, F, H, W]`` video, ``[B, L, D]`` packed FLUX tokens).

The stochastic kinds live in the registry :data:`SDE_KINDS` (``flow_grpo``, ``dance``, ``cps``);
the closed-form KL to a reference policy, :func:`sde_kl`, in two forms (:data:`SDE_KL_FORMS`:
the exact ``transition`` KL and flow_grpo's ``kl_loss``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

from mmrl.registry import Registry

Tensor = torch.Tensor
Generator = Union[None, torch.Generator, Sequence[torch.Generator]]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class SDEStepOutput:
    """Result of :func:`sde_step`.

    Attributes:
        prev_sample: ``[B, *L]`` the next latent x′ (at σ_{i+1}), in the compute dtype (≥ fp32).
            Store it as returned: re-scoring a rounded copy gives a different ``logp``.
        logp: ``[B]`` log-density of x′ under N(mean, std²), averaged over the non-batch dims
            (``cps``: −‖x′ − mean‖² averaged, constants dropped). 0 where ``std`` is 0.
        mean: ``[B, *L]`` the transition mean μ (carries the gradient of the velocity).
        std: ``[B]`` the transition's noise standard deviation (0 for a deterministic step).
        noise_scale: ``[B]`` the kind's noise coefficient, what flow_grpo's
            ``sde_step_with_logprob`` returns as ``std_dev_t`` (and its KL divides by): the
            diffusion coefficient s for ``flow_grpo`` and ``dance`` (std = s·sqrt(−dt)), std itself
            for ``cps``. 0 for a deterministic step.
    """

    prev_sample: Tensor
    logp: Tensor
    mean: Tensor
    std: Tensor
    noise_scale: Tensor


class SDEKind(NamedTuple):
    """One stochastic step kind. Every kind's mean is linear in (x, v): μ = c_x·x + c_v·v.

    ``coefs(sigma, sigma_next, a, sigma_1) -> (c_x, c_v, std, noise_scale)``, all per row
    (broadcast to x's rank), so a step costs two passes over the latent for the mean instead of one
    per term of the formula (``noise_scale``: see :class:`SDEStepOutput`); ``gaussian_logp``:
    True for a normalized Gaussian log-density, False for −‖x′ − μ‖² (constants dropped, usable
    only inside ratios).
    """

    coefs: Callable
    gaussian_logp: bool
    doc: str


SDE_KINDS: Registry[SDEKind] = Registry("sde kind")


def _drift_coefs(sigma, dt, s):
    # μ = x + [v + s²/(2σ)·(x + (1−σ)v)]·dt = x·(1 + c) + v·(dt + c·(1−σ)), c = s²·dt/(2σ)
    # (flow_grpo's own factored form).
    c = s * s * dt / (2.0 * sigma)
    return 1.0 + c, dt + c * (1.0 - sigma)


def _flow_grpo(sigma, sigma_next, a, sigma_1):
    dt = sigma_next - sigma
    # s = a·sqrt(σ/(1−σ)); at σ = 1 the ratio is infinite, flow_grpo uses σ_1 in the denominator.
    s = a * torch.sqrt(sigma / (1.0 - torch.where(sigma == 1.0, sigma_1, sigma)))
    return (*_drift_coefs(sigma, dt, s), s * torch.sqrt(-dt), s)


def _dance(sigma, sigma_next, a, sigma_1):
    dt = sigma_next - sigma
    # DanceGRPO's flux_step: the same drift with a constant diffusion coefficient s = η.
    return (*_drift_coefs(sigma, dt, a), a * torch.sqrt(-dt), a)


def _cps(sigma, sigma_next, a, sigma_1):
    # μ = (1−σ′)·x̂0 + sqrt(σ′² − std²)·x̂1 with x̂0 = x − σv, x̂1 = x + (1−σ)v, std = σ′·sin(aπ/2);
    # sqrt(σ′² − std²) = σ′·cos(aπ/2) exactly, and the cos form cannot go negative by rounding.
    c1 = sigma_next * torch.cos(a * (math.pi / 2))
    std = sigma_next * torch.sin(a * (math.pi / 2))
    return (1.0 - sigma_next) + c1, -sigma * (1.0 - sigma_next) + c1 * (1.0 - sigma), std, std


SDE_KINDS.register("flow_grpo", SDEKind(
    _flow_grpo, True, "Flow-GRPO (arXiv 2505.05470): s = a·sqrt(σ/(1−σ)), a = 0.7"))
SDE_KINDS.register("dance", SDEKind(
    _dance, True, "DanceGRPO (arXiv 2505.07818): constant s = η, η = 0.3 in the paper"))
SDE_KINDS.register("cps", SDEKind(
    _cps, False, "Coefficients-preserving (arXiv 2509.05952): std = σ′·sin(aπ/2), a = 0.8"))


def _rows(t: Tensor, ndim: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] for a latent of rank ``ndim`` (works for 4-D and 5-D alike)."""
    return t.reshape(-1, *([1] * (ndim - 1)))


def _check_step_index(i, sigmas: Tensor, batch: int) -> Tensor:
    num_steps = sigmas.shape[0] - 1
    if isinstance(i, bool) or isinstance(i, float) or (
            isinstance(i, Tensor) and i.is_floating_point()):
        raise TypeError(f"step index i={i!r} is a float; expected an int or a LongTensor[B] of "
                        f"step indices in [0, {num_steps - 1}]. If it is a timestep (1000·σ) or a "
                        f"sigma, pass its position in `sigmas` instead")
    # The range check reads the indices on the host: free for ints and CPU tensors (what the
    # samplers pass); a CUDA index tensor costs one sync.
    idx = torch.as_tensor(i, dtype=torch.long)
    if idx.dim() > 1 or (idx.dim() == 1 and idx.shape[0] != batch):
        raise ValueError(f"step index i has shape {tuple(idx.shape)}; expected an int or a "
                         f"LongTensor of shape [{batch}] (one step per row of x)")
    lo, hi = (int(i), int(i)) if isinstance(i, int) else (int(idx.min()), int(idx.max()))
    if lo < 0 or hi >= num_steps:
        hint = (" It looks like a timestep (1000·σ); pass the step's position in `sigmas`"
                if hi > num_steps else "")
        raise ValueError(f"step index out of range: got values in [{lo}, {hi}] for a schedule of "
                         f"{num_steps} steps (sigmas has {num_steps + 1} entries); expected "
                         f"0 <= i <= {num_steps - 1}.{hint}")
    idx = idx.to(sigmas.device)
    return idx.expand(batch) if idx.dim() == 0 else idx


def _check_inputs(x, v, sigmas, prev_sample, noise_level, kind):
    if not isinstance(x, Tensor) or not isinstance(v, Tensor):
        raise TypeError(f"x and v must be tensors; got {type(x).__name__} and {type(v).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected [B, *latent] (at least 2 dims)")
    if v.shape != x.shape:
        raise ValueError(f"velocity v has shape {tuple(v.shape)} but x has {tuple(x.shape)}; "
                         f"expected the same shape (did the model return a tuple or packed "
                         f"tokens?)")
    if prev_sample is not None and prev_sample.shape != x.shape:
        raise ValueError(f"prev_sample has shape {tuple(prev_sample.shape)} but x has "
                         f"{tuple(x.shape)}; pass the stored next latent of the same transition")
    if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.shape[0] < 2:
        shape = tuple(sigmas.shape) if isinstance(sigmas, Tensor) else type(sigmas).__name__
        raise ValueError(f"sigmas is {shape}; expected a 1-D tensor [T+1] from σ_0 ≈ 1 to σ_T = 0 "
                         f"(see mmrl.diffusion.flow_sigmas)")
    a = noise_level.detach() if isinstance(noise_level, Tensor) else torch.tensor(noise_level)
    if a.dim() > 1 or (a.dim() == 1 and a.shape[0] != x.shape[0]):
        raise ValueError(f"noise_level has shape {tuple(a.shape)}; expected a float or a tensor "
                         f"[{x.shape[0]}] (one level per row)")
    if bool((a < 0).any()) or (kind == "cps" and bool((a > 1).any())):
        top = "1 for 'cps'" if kind == "cps" else "inf"
        raise ValueError(f"noise_level {noise_level!r} is out of range; expected 0 <= level <= "
                         f"{top} (0 gives the deterministic Euler step)")
    return bool((a == 0).any())  # some rows take the exact Euler step


def _noise(shape, dtype, device, generator: Generator) -> Tensor:
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one "
                             f"generator per row or a single torch.Generator")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=dtype, device=device)
                          for g in generator])
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def sde_step(x: Tensor, v: Tensor, sigmas: Tensor, i, *, kind: str = "flow_grpo",
             noise_level: Union[float, Tensor] = 0.7, prev_sample: Optional[Tensor] = None,
             generator: Generator = None) -> SDEStepOutput:
    """x′ ~ N(μ(x, v), std²): one stochastic step from σ_i to σ_{i+1}, and log p(x′ | x).

    Formulas (ALGORITHMS.md "Flow-matching SDE"; Flow-GRPO arXiv 2505.05470 Eq. 9, DanceGRPO
    arXiv 2505.07818, CPS arXiv 2509.05952 Eq. 10):

    - ``flow_grpo``: s = a·sqrt(σ/(1−σ)); μ = x + [v + s²/(2σ)·(x + (1−σ)v)]·dt; std = s·sqrt(−dt).
    - ``dance``: the same with a constant s = a (the paper's η).
    - ``cps``: std = σ′·sin(aπ/2); μ = (1−σ′)(x − σv) + σ′cos(aπ/2)(x + (1−σ)v).

    ``logp`` is averaged (not summed) over the non-batch dims, which is why flow_grpo's clip range
    is 1e-4. ``noise_level = 0`` returns exactly the Euler step ``x + dt·v`` (bit-equal to
    diffusers' ``FlowMatchEulerDiscreteScheduler.step``) with ``std = 0`` and ``logp = 0``.

    Everything is computed in at least fp32: in bf16 the drift term s²/(2σ) reaches ~10³ near σ = 1
    and the squared residual of logp loses the 1e-4-scale differences the clipped ratio needs
    (flow_grpo reports bf16 overflow in the mean). float64 inputs stay float64.

    Args:
        x: ``[B, *L]`` current latent at σ_i, any rank.
        v: ``[B, *L]`` velocity predicted at (x, σ_i); gradients flow through it into ``mean``
            and ``logp``.
        sigmas: ``[T+1]`` the schedule (e.g. :func:`mmrl.diffusion.flow_sigmas`).
        i: step index, an int or a LongTensor ``[B]`` (rows at different steps in one batch).
        kind: a name in :data:`SDE_KINDS`.
        noise_level: a (``flow_grpo``: 0.7, ``dance``: η = 0.3, ``cps``: 0.8 recommended) or a
            tensor ``[B]`` of per-row levels (e.g. per tree depth).
        prev_sample: ``[B, *L]`` a stored next latent to re-score instead of sampling.
        generator: a ``torch.Generator`` or one per row, for the sampled noise.

    Returns:
        :class:`SDEStepOutput` (prev_sample, logp ``[B]``, mean, std ``[B]``).

    Raises:
        ValueError: unknown kind, mismatched shapes, step index out of range, negative noise level.
        TypeError: non-tensor inputs or a float step index.
    """
    spec = SDE_KINDS.get(kind)
    any_deterministic = _check_inputs(x, v, sigmas, prev_sample, noise_level, kind)
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, v = x.to(dtype), v.to(dtype)
    sig = sigmas.to(device=x.device, dtype=dtype)
    idx = _check_step_index(i, sig, x.shape[0])
    a_row = torch.as_tensor(noise_level, dtype=dtype, device=x.device).expand(x.shape[0])
    sigma, sigma_next, a = (_rows(t, x.dim()) for t in (sig[idx], sig[idx + 1], a_row))
    c_x, c_v, std, scale = spec.coefs(sigma, sigma_next, a, sig[1])
    mean = torch.addcmul(c_x * x, c_v, v)  # c_x·x + c_v·v
    if any_deterministic:  # rows at level 0 take exactly the Euler step
        deterministic = a == 0
        mean = torch.where(deterministic, x + (sigma_next - sigma) * v, mean)
        std = torch.where(deterministic, torch.zeros_like(std), std)
        scale = torch.where(deterministic, torch.zeros_like(scale), scale)
    if prev_sample is None:
        prev_sample = torch.addcmul(mean, std, _noise(x.shape, dtype, x.device, generator))
    else:
        prev_sample = prev_sample.to(dtype)
    # The stored sample is data, not a function of θ: no gradient through it. std is constant per
    # row, so the average over the non-batch dims is taken before dividing by 2·std².
    diff = (prev_sample.detach() - mean).flatten(1)  # [B, *L] -> [B, L]
    msq = torch.linalg.vecdot(diff, diff) / diff.shape[1]  # mean of squares per row
    std = std.reshape(-1)
    if spec.gaussian_logp:
        safe = torch.where(std > 0, std, torch.ones_like(std))
        logp = -msq / (2 * safe ** 2) - torch.log(safe) - _LOG_SQRT_2PI
        logp = torch.where(std > 0, logp, torch.zeros_like(logp))
    else:
        logp = -msq
    return SDEStepOutput(prev_sample, logp, mean, std, scale.reshape(-1))


# KL forms: which per-row std the closed-form Gaussian KL divides by (see sde_kl).
SDE_KL_FORMS: Registry[Callable[[SDEStepOutput], Tensor]] = Registry("flow KL form")
SDE_KL_FORMS.register("transition", lambda out: out.std)
SDE_KL_FORMS.register("flow_grpo", lambda out: out.noise_scale)


def sde_kl(out: SDEStepOutput, ref_mean: Tensor, form: str = "transition") -> Tensor:
    """``[B]`` ‖μ_θ − μ_ref‖² / (2·d²), the squared difference averaged over the latent dims.

    The KL to the reference policy (e.g. LoRA disabled) of one step from the same x, in closed
    form: both transitions are Gaussians with the same std, so only their means differ. ``out`` is
    the policy's :func:`sde_step` output, ``ref_mean`` the reference's mean for the same step,
    kind and noise level. ``form`` picks d:

    - ``transition``: d = ``out.std``, the exact KL(N(μ_θ, std²) ‖ N(μ_ref, std²)) per latent
      dimension (ALGORITHMS.md "Flow-matching SDE").
    - ``flow_grpo``: d = ``out.noise_scale``, flow_grpo's ``kl_loss`` (train_sd3.py:
      ``((prev_sample_mean − prev_sample_mean_ref)²).mean(dims) / (2·std_dev_t²)``). For the
      ``flow_grpo`` and ``dance`` kinds std = s·sqrt(−dt), so this is ``transition``·(−dt): with
      10 steps and shift 3, 1/25 to 1/3.7 of it, which is why flow_grpo's β (0.01, 0.04) only
      means the same thing in this form. For ``cps`` flow_grpo's std_dev_t is the transition std
      and the two forms are equal.

    Differs from flow_grpo: nothing for the ``flow_grpo`` and ``cps`` kinds (tested against a
    transcription of its code). flow_grpo has no ``dance`` kind (DanceGRPO has no KL term); the
    ``flow_grpo`` form uses its s = η.

    Args:
        out: the policy's :class:`SDEStepOutput` (``mean`` carries the gradient).
        ref_mean: ``[B, *L]`` the reference's transition mean (computed under ``no_grad``).
        form: a name in :data:`SDE_KL_FORMS`.

    Returns:
        ``[B]`` in the compute dtype (≥ fp32); 0 for rows with ``std = 0`` (deterministic steps
        carry no KL term; mask them out of the loss).

    Raises:
        ValueError: unknown form, mismatched shapes.
    """
    d = SDE_KL_FORMS.get(form)(out)
    mean = out.mean
    if mean.shape != ref_mean.shape:
        raise ValueError(f"out.mean has shape {tuple(mean.shape)} but ref_mean has "
                         f"{tuple(ref_mean.shape)}; pass the reference's mean of the same "
                         f"transitions (sde_step on the same x, step, kind and noise level)")
    dtype = torch.promote_types(mean.dtype, torch.float32)
    sq = ((mean.to(dtype) - ref_mean.to(dtype)) ** 2).flatten(1).mean(1)  # [B, *L] -> [B]
    d = d.to(dtype)
    safe = torch.where(d > 0, d, torch.ones_like(d))
    return torch.where(d > 0, sq / (2 * safe ** 2), torch.zeros_like(sq))


def euler_step(x: Tensor, v: Tensor, sigmas: Tensor, i) -> Tensor:
    """x + (σ_{i+1} − σ_i)·v: the deterministic (ODE) step, in at least fp32.

    Same value as ``sde_step(..., noise_level=0).prev_sample`` without computing the SDE terms.
    """
    _check_inputs(x, v, sigmas, None, 0.0, "flow_grpo")
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, v = x.to(dtype), v.to(dtype)
    sig = sigmas.to(device=x.device, dtype=dtype)
    idx = _check_step_index(i, sig, x.shape[0])
    return x + _rows(sig[idx + 1] - sig[idx], x.dim()) * v
