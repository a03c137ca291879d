"""GRPO-Guard's per-step terms and DanceGRPO's random subset of trained steps.

- :func:`step_terms`: what the core's ratio level ``ratio_norm`` and ``step_reweight`` read
  (:class:`mmrl.train.policy.StepTerms`) for re-scored transitions: the transition std s_j, the
  mean shift mean_d (μ_θ − μ_old)² against the mean stored at sampling (``Trajectory.means``),
  and the σ gap −dt_j = σ_j − σ_{j+1}. GRPO-Guard, arXiv 2510.22319; as flow_grpo's
  scripts/train_sd3_GRPO_Guard.py computes them (ALGORITHMS-flow.md "GRPO-Guard").
- :func:`timestep_subset`: DanceGRPO's ``timestep_fraction`` (arXiv 2505.07818;
  fastvideo/train_grpo_flux.py): every sample trains an independent random subset of
  ⌊K·fraction⌋ of its K SDE transitions.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from mmrl.diffusion.samplers import Trajectory
from mmrl.diffusion.sde import SDEStepOutput

Tensor = torch.Tensor
STEP_TERMS_REFUSAL = ("the policy gives GRPO-Guard's step terms only when built with "
                      "keep_means=True (the job does so when the algorithm needs them) and for "
                      "a Gaussian step kind (flow_grpo, dance; not cps)")


def step_terms(traj: Trajectory, out: SDEStepOutput, index: Tensor) -> Tuple[Tensor, Tensor,
                                                                               Tensor]:
    """``(step_std, mean_shift, step_gap)``, each ``[m]``, of the re-scored transitions ``index``.

    ``step_std`` = ``out.std`` (s_j = σ̄_j·sqrt(−dt_j) for the flow_grpo and dance kinds);
    ``mean_shift`` = mean_d (out.mean − μ_old)² with μ_old = ``traj.means[index]`` (carries
    the gradient of ``out.mean``); ``step_gap`` = σ_j − σ_{j+1} > 0. μ_old is the sampling
    weights' mean, so the loss's ``old_logp`` must be those weights' too: the loop's is (the
    detached logp on-policy, or scored before the update's first optimizer step).

    Args:
        traj: a trajectory sampled with ``keep_means=True``.
        out: :func:`~mmrl.diffusion.samplers.rescore` of ``traj``'s transitions ``index``.
        index: ``[m]`` transition ids.

    Raises:
        ValueError: the trajectory has no stored means, or its kind's log-prob is not a
            normalized Gaussian (``cps``), for which RatioNorm's identity does not hold.
    """
    if traj.means is None:
        raise ValueError("GRPO-Guard's step terms need the transition means stored at sampling "
                         "(Trajectory.means); sample with keep_means=True (the diffusion job does "
                         "when algo.ratio_level=ratio_norm or algo.step_reweight, for the full, "
                         "window, sliding and tree samplers; singular does not store them)")
    if traj.kind == "cps":
        raise ValueError("ratio_norm needs a Gaussian log-density (kinds flow_grpo, dance); "
                         "the cps kind's log-prob drops the 1/(2·std²) factor; use "
                         "diffusion.kind=flow_grpo")
    index = torch.as_tensor(index)
    mean_old = traj.means[index].to(out.mean)
    shift = (out.mean - mean_old).flatten(1).pow(2).mean(1)  # [m, *L] -> [m]
    steps = traj.step[index]
    sig = traj.sigmas.to(out.mean.device, torch.float64)
    gap = (sig[steps] - sig[steps + 1]).to(out.mean.dtype)  # −dt_j > 0
    return out.std, shift, gap


def timestep_subset(index: Tensor, mask: Tensor, fraction: float,
                    generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """``(index, mask)`` ``[B, k]``: each row's random ⌊K·fraction⌋ of its K columns, in time order.

    DanceGRPO draws one ``torch.randperm`` of the trained transitions per sample and trains its
    first ⌊(T−1)·timestep_fraction⌋; here row b draws ``torch.randperm(K, generator=generator)``
    (rows in order, from the run's generator: resumable, and each rank draws for its own
    samples from its own stream, as it draws their noise). The kept columns are sorted, so the
    transitions stay in sampling order.

    Args:
        index, mask: ``[B, K]`` from :meth:`Trajectory.per_owner` (every row full).
        fraction: in (0, 1]; ⌊K·fraction⌋ must be at least 1.
        generator: the CPU generator of the rollout.

    Raises:
        ValueError: a fraction outside (0, 1] or one that keeps no step.
    """
    B, K = index.shape
    k = math.floor(K * fraction)
    if not 0 < fraction <= 1 or k < 1:
        raise ValueError(f"timestep_fraction={fraction} keeps floor({K}·{fraction}) = {k} of {K} "
                         f"steps; expected a fraction in (0, 1] that keeps at least 1")
    perms = [torch.randperm(K, generator=generator) for _ in range(B)]
    keep = (torch.stack(perms)[:, :k] if B else torch.zeros(0, k, dtype=torch.long)).sort(1)[0]
    return index.gather(1, keep), mask.gather(1, keep)  # [B, K] -> [B, k]
