"""Helpers shared by the samplers: σ schedule, CFG, SDE windows, initial noise."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import torch

Tensor = torch.Tensor


def shift_sigmas(s, shift: float):
    """σ′ = shift·s / (1 + (shift − 1)·s): the SD3 / flow_grpo timestep shift (works on arrays)."""
    return shift * s / (1 + (shift - 1) * s)


def flow_sigmas(num_steps: int, shift: float = 3.0, *, num_train_timesteps: int = 1000) -> Tensor:
    """The flow-matching schedule ``[T+1]`` fp32, equal to diffusers'
    ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)`` (σ_T = 0 included).

    σ_t = shift(linspace(1, σ_min, T))_t with σ_min = shift(1/num_train_timesteps) (the scheduler
    builds its σ range from the shifted training grid, then shifts again). With T = 10 and
    shift 3: [1, .960, .913, .858, .790, .707, .602, .465, .278, .009, 0] — the SD3 / SD3.5 /
    flow_grpo sampling schedule.

    Args:
        num_steps: T ≥ 1 denoising steps.
        shift: the SD3 shift (3.0 for SD3/SD3.5; FLUX uses resolution-dependent shifting, pass
            its sigmas directly instead).
        num_train_timesteps: the scheduler's training grid (1000).

    Raises:
        ValueError: T < 1 or shift ≤ 0.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r}; expected an int >= 1 (e.g. 10 for training)")
    if shift <= 0:
        raise ValueError(f"shift={shift!r}; expected > 0 (SD3 uses 3.0, 1.0 means no shift)")
    # As diffusers: the training grid in fp32 torch, its last σ as a Python float.
    grid = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps,
                                        dtype=np.float32)[::-1].copy()) / num_train_timesteps
    grid = shift_sigmas(grid, shift)
    sigma_min, sigma_max = grid[-1].item(), grid[0].item()
    t = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps,
                    int(num_steps))
    s = shift_sigmas(t / num_train_timesteps, shift)
    return torch.cat([torch.from_numpy(s).to(torch.float32), torch.zeros(1)])


def cfg_combine(v_uncond: Tensor, v_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance v = v_u + w·(v_c − v_u) (w = 1 gives v_c; w = 4.5 for SD3.5-M).

    Raises:
        ValueError: mismatched shapes.
    """
    if v_uncond.shape != v_cond.shape:
        raise ValueError(f"v_uncond {tuple(v_uncond.shape)} and v_cond {tuple(v_cond.shape)} "
                         f"differ; pass the two halves of the same CFG batch")
    return v_uncond + scale * (v_cond - v_uncond)


def _check_window(num_steps: int, window: int) -> None:
    if not 1 <= window <= num_steps - 1:
        raise ValueError(f"window={window} for {num_steps} steps; expected 1 <= window <= "
                         f"{num_steps - 1} (the last step is always deterministic)")


def random_window(num_steps: int, window: int, *,
                  generator: Optional[torch.Generator] = None,
                  start_range: Optional[Sequence[int]] = None) -> List[int]:
    """W consecutive SDE steps at a uniformly random start in [r0, r1 − W] (Flow-GRPO-Fast).

    ``start_range`` = (r0, r1), Flow-GRPO-Fast's ``sde_window_range`` (its recommended SD3
    configs: (0, T//2)); default (0, T−1): any start that keeps the last step out. Steps outside
    the window are ODE (Euler); the last step is never in it.
    Differs from Flow-GRPO-Fast: r1 ≤ T−1 is required (its base range (0, 10) at T = 10 lets
    the window reach the last transition, σ_{T−1} -> 0, which mmrl keeps deterministic).

    Raises:
        ValueError: a window that does not fit, or a range outside [0, T−1] narrower than W.
    """
    _check_window(num_steps, window)
    r0, r1 = (0, num_steps - 1) if start_range is None else (int(v) for v in start_range)
    if not 0 <= r0 <= r1 - window or r1 > num_steps - 1:
        raise ValueError(f"start_range ({r0}, {r1}) for window={window} and {num_steps} steps; "
                         f"expected 0 <= r0 <= r1 - window and r1 <= {num_steps - 1} (the last "
                         f"step stays deterministic)")
    start = int(torch.randint(r0, r1 - window + 1, (1,), generator=generator))
    return list(range(start, start + window))


def sliding_window(num_steps: int, window: int, iteration: int, *, shift_every: int = 25,
                   stride: int = 1) -> List[int]:
    """MixGRPO's progressive window (arXiv 2507.21802): W = 4 steps starting at
    ``stride·(iteration // shift_every)``, moved by ``stride`` every ``shift_every`` iterations.

    Differs from paper: when the window would pass step T−2 it wraps back to 0 (the paper stops
    at the end of its schedule; wrapping keeps long runs training every step).
    """
    _check_window(num_steps, window)
    if shift_every < 1 or stride < 1 or iteration < 0:
        raise ValueError(f"shift_every={shift_every}, stride={stride}, iteration={iteration}; "
                         f"expected shift_every >= 1, stride >= 1, iteration >= 0")
    positions = num_steps - window  # valid starts 0 .. T-1-W
    start = (stride * (iteration // shift_every)) % positions
    return list(range(start, start + window))


def initial_noise(num_prompts: int, group_size: int, shape: Sequence[int], *, shared: bool = False,
                  generator: Optional[torch.Generator] = None, device=None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Initial latents ``[P·N, *shape]``, row p·N + j for member j of prompt p.

    ``shared=True`` gives every member of a group the same noise (DanceGRPO ``init_same_noise``):
    the group then differs only by the SDE noise, which lowers the advantage's variance.
    """
    if num_prompts < 1 or group_size < 1:
        raise ValueError(f"num_prompts={num_prompts}, group_size={group_size}; expected >= 1 each")
    n = num_prompts if shared else num_prompts * group_size
    z = torch.randn((n, *shape), generator=generator, dtype=dtype, device=device)
    return z.repeat_interleave(group_size, dim=0) if shared else z  # [P, *L] -> [P·N, *L]


WINDOW_SCHEDULES = ("sliding", "progressive", "decay", "exp_decay", "random")
"""MixGRPO's window schedules (``diffusion.sliding_schedule``); ``sliding`` is mmrl's original."""


def _dwell(schedule: str, cur: int, top: int, every: int, n_max: int, n_min: int, tau: float,
           k: float) -> int:
    """Iterations the window stays at start ``cur`` (MixGRPO GRPOTrainingStates)."""
    if schedule == "decay":
        return max(n_min, int(math.floor(n_max * (1 - cur / top) + n_min * cur / top)))
    if schedule == "exp_decay":
        return max(1, int(math.ceil(every * math.exp(-k * max(0.0, cur - tau)))))
    return every


def _advance(cur: int, stride: int, top: int, roll_back: bool) -> int:
    nxt = cur + stride
    return (0 if roll_back else top) if nxt > top else nxt


def window_start(schedule: str, iteration: int, num_steps: int, window: int, *,
                 every: int = 25, stride: int = 1, roll_back: bool = True, n_max: int = 10,
                 n_min: int = 1, tau: float = 13.0, k: float = 0.1) -> int:
    """The window start ``cur`` read at rollout ``iteration`` by MixGRPO's progressive schedules.

    MixGRPO (arXiv 2507.21802; Tencent-Hunyuan/MixGRPO @e5cdd6a4 grpo_states.py): ``cur`` starts
    at 0 and, after dwelling n(cur) iterations, moves by ``stride`` (prog_overlap_step; pass
    ``window`` for no overlap, 0 freezes it); past M = T − 2 it rolls back to 0 (``roll_back``)
    or stays at M. Dwell n(cur): ``progressive`` ``every``; ``decay``
    max(n_min, ⌊n_max·(1 − cur/M) + n_min·cur/M⌋); ``exp_decay`` ⌈every·exp(−k·max(0, cur − τ))⌉.
    A pure function of ``iteration`` (the path repeats with period one cycle, so the cost is
    one cycle, not ``iteration``): resuming at any iteration gives the same windows.

    Raises:
        ValueError: unknown or non-progressive schedule, bad numbers.
    """
    if schedule not in ("progressive", "decay", "exp_decay"):
        raise ValueError(f"schedule={schedule!r}; window_start covers progressive, decay and "
                         f"exp_decay (sliding: sliding_window; random: mix_window)")
    top = num_steps - 2
    if top < 1 or every < 1 or stride < 0 or iteration < 0 or n_min < 1 or n_max < n_min:
        raise ValueError(f"num_steps={num_steps}, every={every}, stride={stride}, iteration="
                         f"{iteration}, n_min={n_min}, n_max={n_max}; expected num_steps >= 3, "
                         f"every >= 1, stride >= 0, iteration >= 0, 1 <= n_min <= n_max")
    path, cur = [], 0  # (start, dwell) from 0 until it rolls back to 0 or stops moving
    while True:
        path.append((cur, _dwell(schedule, cur, top, every, n_max, n_min, tau, k)))
        nxt = _advance(cur, stride, top, roll_back)
        if nxt == cur or nxt == 0:
            break
        cur = nxt
    # rolled back to 0: the path repeats; stopped (at M, or stride 0): the last start stays
    left = iteration % sum(d for _, d in path) if nxt == 0 else iteration
    for start, dwell in path:
        if left < dwell:
            return start
        left -= dwell
    return path[-1][0]  # stopped at M (no roll back) or frozen (stride 0)


def mix_window(schedule: str, iteration: int, num_steps: int, window: int, *,
               generator: Optional[torch.Generator] = None, **params) -> List[int]:
    """The SDE steps of rollout ``iteration`` under one of :data:`WINDOW_SCHEDULES`.

    - ``sliding`` (mmrl's original, the default): :func:`sliding_window`, W steps, may reach
      step T − 2, wraps modulo T − W.
    - ``progressive`` / ``decay`` / ``exp_decay``: {cur, …, min(cur + W, M) − 1} with
      cur = :func:`window_start`, M = T − 2 (MixGRPO never trains steps ≥ T − 2).
    - ``random``: cur uniform in [0, M − W] every iteration, from ``generator`` (MixGRPO's is
      unseeded; the run's generator makes it resumable).

    Differs from MixGRPO: a window that would be empty (cur = M, reached without roll back)
    trains step M − 1, so every rollout has a trained step.

    Args:
        params: ``every`` (iters_per_group / sliding_shift_every), ``stride``, ``roll_back``,
            ``n_max``, ``n_min``, ``tau``, ``k`` (see :func:`window_start`).

    Raises:
        ValueError: unknown schedule, window too large for the schedule.
    """
    if schedule not in WINDOW_SCHEDULES:
        raise ValueError(f"unknown window schedule {schedule!r} (registered: "
                         f"{', '.join(WINDOW_SCHEDULES)})")
    if schedule == "sliding":
        return sliding_window(num_steps, window, iteration, shift_every=params.get("every", 25),
                              stride=params.get("stride", 1))
    top = num_steps - 2
    if not 1 <= window <= top:
        raise ValueError(f"window={window} for {num_steps} steps; MixGRPO's schedules train "
                         f"steps < T - 2, so expected 1 <= window <= {top}")
    if schedule == "random":
        cur = int(torch.randint(0, top - window + 1, (1,), generator=generator))
    else:
        cur = window_start(schedule, iteration, num_steps, window, **params)
    steps = list(range(cur, min(cur + window, top)))
    return steps or [top - 1]  # cur = M: MixGRPO's window is empty
