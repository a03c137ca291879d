"""G²RPO singular stochastic sampling with multi-granularity completions (arXiv 2510.01982).

Per prompt: one ODE anchor trajectory from a shared initial noise. For each step k in a list, the
anchor latent x_k takes one SDE step per group member (the only stochastic, trained transition),
then every member finishes with the ODE on the schedule σ[0:k+2] ⊕ σ[k+2::g] for each
granularity g. The rewards of the (k, g) groups are normalized separately and summed over g
(:func:`mmrl.diffusion.g2rpo_advantages`), so the advantage of a step is attributed to that step
alone instead of being shared by the whole trajectory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mmrl.diffusion.samplers import (Trajectory, VelocityFn, _check_common, _StateStore,
                                     call_velocity, take_cond)
from mmrl.diffusion.sde import euler_step, sde_step

Tensor = torch.Tensor


@dataclass
class SingularTrajectory(Trajectory):
    """A :class:`Trajectory` of G²RPO singular sampling.

    Layout: transition (= group member) m = (k_pos·P + p)·N + n for step position k_pos in
    ``steps``, prompt p and member n; output o = m·G + g_pos for granularity position g_pos.

    Attributes:
        group_ids: ``[M]`` the group (k_pos·P + p) of each member.
        output_owner: ``[B]`` member m of each output (B = M·G).
        output_granularity: ``[B]`` the granularity g of each output.
        steps: the SDE steps k. granularities: the g values. group_size: N.
    """

    group_ids: Tensor = None
    output_owner: Tensor = None
    output_granularity: Tensor = None
    steps: tuple = ()
    granularities: tuple = ()
    group_size: int = 0


COMPLETION_ENDS = ("append_zero", "replace_last")


def completion_sigmas(sigmas: Tensor, k: int, g: int, end: str = "append_zero") -> Tensor:
    """σ[0:k+2] ⊕ σ[k+2::g], made to end at σ_T = 0 when the stride skips it.

    G²RPO's coarse completion after the SDE step at k (which lands on σ_{k+1}); g = 1 is the
    original schedule. ``end`` says what happens when σ[k+2::g] misses σ_T:

    - ``append_zero`` (mmrl's original): σ_T is appended (one more evaluation).
    - ``replace_last`` (the authors' code, bcmi/Granular-GRPO train_g2rpo_hps.py): the last σ is
      replaced by 0, so the image is x̂0 = x − σ·v of the last evaluated state (T = 16, odd k,
      g = 2: the grid ends at σ_15 and the image is x̂0 from σ_13).

    Raises:
        ValueError: g < 1 or an unknown ``end``.
    """
    if g < 1:
        raise ValueError(f"granularity {g}; expected an int >= 1 (1 = every step, 2 = every other)")
    if end not in COMPLETION_ENDS:
        raise ValueError(f"end={end!r}; expected one of {', '.join(COMPLETION_ENDS)}")
    out = torch.cat([sigmas[:k + 2], sigmas[k + 2::g]])
    if out[-1] == sigmas[-1]:
        return out
    if end == "append_zero":
        return torch.cat([out, sigmas[-1:]])
    return torch.cat([out[:-1], sigmas[-1:]])


@torch.no_grad()
def _anchor(velocity_fn, x, sigmas, cond, k_max: int, store: _StateStore):
    """ODE from the noise up to step k_max; the state and velocity at every step <= k_max."""
    states, vels, idx, nfe = [], [], [], 0
    for t in range(k_max + 1):
        v = call_velocity(velocity_fn, x, sigmas[t].expand(x.shape[0]).to(x), cond)
        nfe += x.shape[0]
        states.append(x)
        vels.append(v)
        idx.append(store.add(x))
        x = euler_step(x, v, sigmas, t)
    return states, vels, idx, nfe


@torch.no_grad()
def _complete(velocity_fn, x, sched: Tensor, start: int, cond):
    """ODE on ``sched`` from position ``start`` to its end; returns (x, nfe)."""
    nfe = 0
    for j in range(start, sched.shape[0] - 1):
        v = call_velocity(velocity_fn, x, sched[j].expand(x.shape[0]).to(x), cond)
        nfe += x.shape[0]
        x = euler_step(x, v, sched, j)
    return x, nfe


def sample_singular(velocity_fn: VelocityFn, noise: Tensor, sigmas: Tensor, cond=None, *,
                    group_size: int, steps: Sequence[int], granularities: Sequence[int] = (1,),
                    kind: str = "flow_grpo", noise_level: float = 0.7,
                    generator: Optional[torch.Generator] = None,
                    end: str = "append_zero") -> SingularTrajectory:
    """G²RPO singular stochastic sampling: ODE anchor, one SDE step at each k, ODE completions.

    The anchor's velocity at x_k is reused for the SDE step (all members start from the same x_k),
    so the SDE step costs no extra evaluation. Cost: P·(k_max+1) for the anchors plus, per k and
    g, P·N·(completion steps).

    Args:
        velocity_fn, sigmas, kind, noise_level, generator: as :func:`sample_sde`.
        noise: ``[P, *L]`` one initial noise per prompt (shared by its group, as the paper).
        cond: None or P rows.
        group_size: N members per (prompt, k).
        steps: the SDE steps k (distinct, in [0, T−2]; the paper uses early steps).
        granularities: completion strides g (G²RPO: [1, 2]).
        end: how a strided completion reaches σ = 0 (:func:`completion_sigmas`).

    Returns:
        :class:`SingularTrajectory` (layout in its docstring).

    Raises:
        ValueError: bad shapes, steps out of range or repeated, group_size < 1, granularity < 1.
    """
    _check_common(noise, sigmas, cond, kind)
    completion_sigmas(sigmas, 0, 1, end)  # an unknown end fails before any sampling
    num_steps = sigmas.shape[0] - 1
    ks = list(int(k) for k in steps)
    if not ks or len(set(ks)) != len(ks) or min(ks) < 0 or max(ks) > num_steps - 2:
        raise ValueError(f"steps={list(steps)}; expected distinct step indices in "
                         f"[0, {num_steps - 2}] (an SDE step needs at least one step after it)")
    grans = [int(g) for g in granularities]
    if group_size < 1 or not grans or any(g < 1 for g in grans):
        raise ValueError(f"group_size={group_size}, granularities={list(granularities)}; expected "
                         f"group_size >= 1 and granularities of ints >= 1 (e.g. [1, 2])")
    x0 = noise.to(torch.promote_types(noise.dtype, torch.float32))
    P, N, store = x0.shape[0], group_size, _StateStore()
    states, vels, anchor_idx, nfe = _anchor(velocity_fn, x0, sigmas, cond, max(ks), store)
    member_cond = torch.arange(P).repeat_interleave(N)  # [P·N]
    rows_cond = take_cond(cond, member_cond)
    src, dst, logp, finals = [], [], [], []
    for k in ks:
        x, v = states[k].repeat_interleave(N, 0), vels[k].repeat_interleave(N, 0)  # [P] -> [P·N]
        with torch.no_grad():
            out = sde_step(x, v, sigmas, k, kind=kind, noise_level=noise_level, generator=generator)
        src.append(anchor_idx[k].repeat_interleave(N))
        dst.append(store.add(out.prev_sample))
        logp.append(out.logp)
        per_g = []
        for g in grans:
            sched = completion_sigmas(sigmas, k, g, end)
            xg, spent = _complete(velocity_fn, out.prev_sample, sched, k + 1, rows_cond)
            per_g.append(xg)
            nfe += spent
        finals.append(torch.stack(per_g, 1))  # G x [P·N, *L] -> [P·N, G, *L]
    M = len(ks) * P * N
    final = torch.cat(finals).flatten(0, 1)  # [K·P·N, G, *L] -> [M·G, *L]
    cond_index = member_cond.repeat(len(ks))
    return SingularTrajectory(
        final=final, output_cond=cond_index.repeat_interleave(len(grans)),
        states=store.stacked(x0), src=torch.cat(src), dst=torch.cat(dst),
        step=torch.tensor(ks).repeat_interleave(P * N), noise_level=torch.full(
            (M,), float(noise_level)), logp=torch.cat(logp), owner=torch.arange(M),
        cond_index=cond_index, sigmas=sigmas, kind=kind, nfe=nfe,
        group_ids=torch.arange(len(ks) * P).repeat_interleave(N),
        output_owner=torch.arange(M).repeat_interleave(len(grans)),
        output_granularity=torch.tensor(grans).repeat(M), steps=tuple(ks),
        granularities=tuple(grans), group_size=N)
