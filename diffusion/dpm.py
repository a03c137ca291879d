"""DPM-Solver++ 2M in flow form, and MixGRPO's mixed sampler (ODE / SDE window / fast ODE).

Flow convention (ALGORITHMS-flow.md): x_σ = (1−σ)·x0 + σ·ε, v ≈ ε − x0, so the data prediction
is x̂0 = x − σ·v, α = 1 − σ and λ = log(α/σ). One DPM-Solver++ 2M step from s0 to t with the
previous data prediction at s1 (DPM-Solver++, arXiv 2211.01095, Alg. 2, midpoint form):

    h = λ_t − λ_s0,  r0 = (λ_s0 − λ_s1) / h,  D0 = x̂0(s0),  D1 = (x̂0(s0) − x̂0(s1)) / r0,
    x_t = (σ_t/σ_s0)·x − α_t·(e^{−h} − 1)·(D0 + ½·D1).

The first step (no history) and the final step (σ_t = 0) are first order, x_t = x + (σ_t − σ_s0)·v
(DDIM η = 0, the Euler step, which lands on x̂0 at σ_t = 0). A history point at σ = 1 (λ = −∞)
gives r0 = ∞ and D1 = 0, i.e. the first-order step, which is what the formula's limit is.

Sources: DiffusionNFT (NVlabs/DiffusionNFT @24af5554 : flow_grpo/diffusers_patch/solver.py,
``dpm_step``) and MixGRPO (Tencent-Hunyuan/MixGRPO @e5cdd6a4 : fastvideo/utils/sampling_utils.py,
``multistep_dpm_solver_second_order_update``), as ALGORITHMS-flow.md writes them.

:func:`sample_mixed` is MixGRPO's sampler (arXiv 2507.21802): steps before the SDE window are
Euler ODE, the window is SDE (stored and trained), and the steps after it ("post") use the ODE
solver ``euler`` or ``dpm2``, optionally on a compressed grid (:func:`post_sigmas`, MixGRPO-Flash).
With no SDE step it is a plain ODE sampler (DiffusionNFT's ``dpm2`` rollouts).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from mmrl.diffusion.samplers import (Trajectory, VelocityFn, _check_common, _check_steps,
                                     call_velocity, sample_sde)

Tensor = torch.Tensor
ODE_SOLVERS = ("euler", "dpm2")
"""The ODE solvers of :func:`sample_mixed` (``mmrl.diffusion.config.ODE_SOLVER_NAMES``)."""


def _lam(sigma: float) -> float:
    """λ = log((1−σ)/σ); −∞ at σ = 1, +∞ at σ = 0."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log((1.0 - sigma) / sigma)


def dpm2_step(x: Tensor, v: Tensor, sigma: float, sigma_next: float,
              prev: Optional[Tuple[float, Tensor]] = None) -> Tensor:
    """x at σ_next by one DPM-Solver++ 2M step (formula in the module docstring).

    Args:
        x: ``[B, *L]`` latent at σ (fp32 or fp64; computed in that dtype).
        v: ``[B, *L]`` velocity at (x, σ).
        sigma, sigma_next: σ_s0 > σ_t ≥ 0 as Python floats.
        prev: ``(σ_s1, x̂0(s1))``, the previous step's σ and data prediction; None = first step.

    Returns:
        ``[B, *L]``: first order when ``prev`` is None, σ_next = 0 or σ_s1 = 1; else second order.

    Raises:
        ValueError: σ_next ≥ σ, or σ_s1 ≤ σ.
    """
    if not 0.0 <= sigma_next < sigma <= 1.0:
        raise ValueError(f"sigma={sigma}, sigma_next={sigma_next}; expected 0 <= sigma_next < "
                         f"sigma <= 1 (a reverse-time step)")
    lam_s1 = None if prev is None else _lam(float(prev[0]))
    if prev is not None and float(prev[0]) <= sigma:
        raise ValueError(f"history sigma {prev[0]} <= current sigma {sigma}; expected the "
                         f"previous step's (larger) sigma")
    if prev is None or sigma_next == 0.0 or lam_s1 == -math.inf:
        return x + (sigma_next - sigma) * v
    d0 = x - sigma * v  # x̂0(s0)
    lam_s0, lam_t = _lam(sigma), _lam(sigma_next)
    h = lam_t - lam_s0
    r0 = (lam_s0 - lam_s1) / h
    d1 = (d0 - prev[1].to(d0)) / r0
    alpha_t = 1.0 - sigma_next
    return (sigma_next / sigma) * x - alpha_t * math.expm1(-h) * (d0 + 0.5 * d1)


def post_sigmas(sigmas: Tensor, last: int, compression: float) -> Tensor:
    """σ[0..last] ⊕ the post grid: MixGRPO-Flash's compressed schedule after the SDE window.

    n = ⌊max((T − last)·c, 1)⌋ points, post grid = shift_s(linspace(u*, 0, n)) with
    u* = 1 − (last+1)/T (its first point is σ_{last+1}), so n − 1 ODE steps replace T − 1 − last.
    The shift s is the one through σ_{last+1}: s = σ(1−u*)/(u*(1−σ)); for a schedule
    σ_j = shift_s(1 − j/T) (MixGRPO's, FLUX's) this is MixGRPO's grid exactly.

    Differs from MixGRPO: n is at least 2 (MixGRPO's n = 1 leaves the image at σ_{last+1}).
    SD3's grid is shift_3 of linspace(1, u_min, T) ⊕ 0, not of 1 − j/T, so the s through
    σ_{last+1} is 2.0–2.9 there (lower for later windows): still a grid from σ_{last+1} to 0,
    denser near 0 than a uniform one, but not shift_3's.

    Args:
        sigmas: ``[T+1]`` the schedule. last: the last SDE step (0 <= last <= T − 2).
        compression: c in (0, 1] (MixGRPO-Flash 0.4, Flash* 0.2).

    Returns:
        ``[last + 1 + n]`` fp32, ending at 0.

    Raises:
        ValueError: last or compression out of range.
    """
    T = sigmas.shape[0] - 1
    if not 0 <= last <= T - 2:
        raise ValueError(f"last={last}; expected the last SDE step in [0, {T - 2}] of a "
                         f"{T}-step schedule")
    if not 0.0 < compression <= 1.0:
        raise ValueError(f"compression={compression}; expected 0 < c <= 1 (MixGRPO-Flash: 0.4)")
    n = max(int(math.floor(max((T - last) * compression, 1.0))), 2)
    u_star = 1.0 - (last + 1) / T
    s_first = float(sigmas[last + 1])
    shift = s_first * (1.0 - u_star) / (u_star * (1.0 - s_first))
    u = torch.linspace(u_star, 0.0, n, dtype=torch.float64)
    grid = shift * u / (1.0 + (shift - 1.0) * u)
    grid[0] = s_first  # exactly the window's landing point
    return torch.cat([sigmas[:last + 1].to(torch.float32), grid.to(torch.float32)])


class _Recorder:
    """Wraps a velocity function; keeps (σ, x̂0 = x − σ·v) of its latest call (the history)."""

    def __init__(self, velocity_fn: VelocityFn):
        self.velocity_fn, self.last = velocity_fn, None

    def __call__(self, x: Tensor, sigma: Tensor, cond) -> Tensor:
        v = self.velocity_fn(x, sigma, cond)
        if isinstance(v, Tensor) and v.shape == x.shape:
            s = float(sigma.reshape(-1)[0]) if sigma.numel() else 0.0
            self.last = (s, x - s * v.to(x))
        return v


@torch.no_grad()
def solve_ode(velocity_fn: VelocityFn, x: Tensor, sigmas: Tensor, cond=None, *,
              solver: str = "dpm2", start: int = 0,
              history: Optional[Tuple[float, Tensor]] = None) -> Tuple[Tensor, int]:
    """``(x at σ_T, nfe)``: the ODE from position ``start`` of ``sigmas`` to its end.

    Args:
        velocity_fn, cond: as :func:`~mmrl.diffusion.sample_sde`.
        x: ``[B, *L]`` the latent at ``sigmas[start]``.
        sigmas: ``[S]`` a schedule (ending at 0 for a clean image).
        solver: ``euler`` or ``dpm2`` (:func:`dpm2_step`).
        history: ``(σ, x̂0)`` of the step before ``start`` (MixGRPO: the window's last step).

    Returns:
        The final latent (≥ fp32) and the per-sample evaluations spent, B·(S − 1 − start).

    Raises:
        ValueError: unknown solver.
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r} (registered: {', '.join(ODE_SOLVERS)})")
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    sig = [float(s) for s in sigmas.tolist()]
    nfe = 0
    for j in range(start, len(sig) - 1):
        v = call_velocity(velocity_fn, x, sigmas[j].expand(x.shape[0]).to(x), cond).to(x)
        nfe += x.shape[0]
        if solver == "euler":
            x = x + (sig[j + 1] - sig[j]) * v
            continue
        d0 = x - sig[j] * v
        x = dpm2_step(x, v, sig[j], sig[j + 1], history)
        history = (sig[j], d0)
    return x, nfe


def sample_mixed(velocity_fn: VelocityFn, noise: Tensor, sigmas: Tensor, cond=None, *,
                 sde_steps: Sequence[int] = (), solver: str = "dpm2",
                 compression: Optional[float] = None, kind: str = "flow_grpo",
                 noise_level: float = 0.7,
                 generator: Optional[torch.Generator] = None) -> Trajectory:
    """MixGRPO's sampler: Euler ODE before the window, SDE on ``sde_steps``, ``solver`` after.

    MixGRPO (arXiv 2507.21802) / MixGRPO-Flash: with ``last = max(sde_steps)`` the steps
    0 … last run as :func:`~mmrl.diffusion.sample_sde` does (Euler outside ``sde_steps``); the
    data predictions x̂0 of all of them enter the multistep history, and the steps after ``last``
    ("post") use ``solver`` on ``sigmas`` or, with ``compression`` c, on
    :func:`post_sigmas`. No ``sde_steps``: the whole schedule is post (an ODE sampler; with
    ``dpm2``, DiffusionNFT's rollout solver).

    Args:
        velocity_fn, noise, cond, kind, noise_level, generator: as :func:`sample_sde`.
        sigmas: ``[T+1]`` the schedule.
        sde_steps: the SDE (trained) steps; the post part starts after the largest.
        solver: ``euler`` or ``dpm2``. compression: None (keep the schedule) or c in (0, 1].

    Returns:
        :class:`~mmrl.diffusion.Trajectory` whose ``sigmas`` is the schedule used (the SDE
        steps keep their indices, so :func:`~mmrl.diffusion.rescore` works unchanged);
        ``nfe = B·(last + 1 + post steps)``.

    Raises:
        ValueError: bad shapes, steps out of range, unknown solver, compression without SDE
            steps or out of range.
    """
    _check_common(noise, sigmas, cond, kind)
    num_steps = sigmas.shape[0] - 1
    steps = _check_steps(sde_steps, num_steps, "sde_steps")
    if solver not in ODE_SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r} (registered: {', '.join(ODE_SOLVERS)})")
    if compression is not None and not steps:
        raise ValueError(f"compression={compression} needs SDE steps (it shortens the grid after "
                         f"the window); pass sde_steps or compression=None")
    if not steps:
        x, nfe = solve_ode(velocity_fn, noise, sigmas, cond, solver=solver)
        return _ode_trajectory(x, sigmas, kind, nfe, noise.device)
    last = steps[-1]
    sched = sigmas if compression is None else post_sigmas(sigmas, last, compression)
    rec = _Recorder(velocity_fn)
    head = sample_sde(rec, noise, sched[:last + 2], cond, sde_steps=steps, kind=kind,
                      noise_level=noise_level, generator=generator)
    history = rec.last if solver == "dpm2" else None
    x, nfe = solve_ode(velocity_fn, head.final, sched, cond, solver=solver, start=last + 1,
                       history=history)
    head.final, head.sigmas, head.nfe = x, sched, head.nfe + nfe
    return head


def _ode_trajectory(final: Tensor, sigmas: Tensor, kind: str, nfe: int, device) -> Trajectory:
    """A :class:`Trajectory` without transitions (an ODE sample)."""
    B = final.shape[0]
    none = torch.zeros(0, dtype=torch.long)
    empty = torch.zeros(0, dtype=torch.float32)
    return Trajectory(final=final, output_cond=torch.arange(B), states=final.new_zeros(
        (0, *final.shape[1:])), src=none, dst=none, step=none, noise_level=empty, logp=empty,
        owner=none, cond_index=none, sigmas=sigmas, kind=kind, nfe=nfe)
