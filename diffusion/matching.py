"""The diffusion side of the weighted matching objectives (DiffusionNFT, AWM):
``diffusion.objective: nft | awm`` builds a :class:`MatchingDiffusionPolicy` instead of the log-prob policy.

Rollouts. The deterministic ODE sampler on the run's σ grid (``diffusion.num_steps``), no
log-probs, with the old copy's weights (DiffusionNFT) or the current ones (AWM,
``matching.rollout_policy``); only each sample's final clean latent x0 and its prompt are kept
(plus the decoded image for the reward). Guidance at sampling is ``diffusion.guidance_scale``
(the recipes use 1.0, CFG-free as DiffusionNFT and AWM's "no_cfg" configs); the solver is
``diffusion.ode_solver`` (:func:`ode_rollout`: Euler, or DPM-Solver++ 2M as DiffusionNFT samples).

Training terms (``match_terms``): row i's K times index the same σ grid (t = σ_j); one fresh
ε per (row, time) from the plan's seed (a CPU generator, so runs are reproducible on any device);
x_t = (1 − t)·x0 + t·ε, target ε − x0; v_θ with gradient, v_old (the old / EMA copy, swapped in
for a no-grad forward) and v_ref (the base model: LoRA disabled or the frozen copy), all under
:meth:`FlowAdapter.unguided` (the model's own conditional prediction, CFG-free training).

The old / EMA copy θ_old starts equal to θ and is soft-updated once per step after the optimizer
(``match_after_update``: θ_old ← η·θ_old + (1 − η)·θ, η from the preset's schedule at the count of
optimizer steps so far, as DiffusionNFT's ``return_decay(global_step)``). It is kept as a copy of
the trainable tensors (LoRA: the adapter's; full: the transformer's) and travels in the
checkpoint's weights under ``matching_old.``; the step count is extra state. So resume is exact.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict

import torch

from mmrl.algo.match_presets import MatchSpec, resolve_match
from mmrl.algo.matching import MatchTerms, soft_update_, soft_update_decay
from mmrl.diffusion.config import DiffusionConfig
from mmrl.diffusion.dpm import sample_mixed
from mmrl.diffusion.policy import DiffusionGroupPolicy
from mmrl.diffusion.samplers import sample_sde, take_cond
from mmrl.train.rollout import Rollout

OLD_PREFIX = "matching_old."
"""Key prefix of the old / EMA copy's tensors in the policy's ``state_dict``."""


def ode_rollout(flow, noise: torch.Tensor, sigmas: torch.Tensor, cond, solver: str = "euler"):
    """``(x0 [B, *L], nfe)``: the deterministic sampler with ``solver`` (``diffusion.ode_solver``):
    ``euler`` (:func:`~mmrl.diffusion.sample_sde` without SDE steps) or ``dpm2`` (DPM-Solver++ 2M,
    :func:`~mmrl.diffusion.dpm.sample_mixed` without SDE steps: DiffusionNFT's rollout solver)."""
    if solver == "euler":
        traj = sample_sde(flow, noise, sigmas, cond, sde_steps=[])
    else:
        traj = sample_mixed(flow, noise, sigmas, cond, solver=solver)
    return traj.final, int(traj.nfe)


class MatchingDiffusionPolicy(DiffusionGroupPolicy):
    """:class:`~mmrl.diffusion.policy.DiffusionGroupPolicy` trained with a weighted matching loss
    (``Capabilities(matching=True)``): ODE rollouts, :class:`MatchTerms` on forward-noised
    samples, an old / EMA copy with its soft update.

    Args:
        flow, c, adv_eps, adv_clip, reward_weights: as the base class.

    Raises:
        ValueError: ``c.objective`` is not a matching preset, or its overrides are invalid.
    """

    def __init__(self, flow, c: DiffusionConfig, **kwargs):
        super().__init__(flow, c, **kwargs)
        self.spec: MatchSpec = resolve_match(c.objective, **c.matching)
        self.capabilities = dataclasses.replace(
            self.capabilities, matching=True, own_kl=False, row_advantages=False,
            rollout_logp=False, preference=False, fsdp=False, why_not={
                **self.capabilities.why_not,
                "rollout_logp": f"objective={c.objective} rolls out with the ODE sampler, "
                                f"which has no log-probs"})
        self.advantages = None
        self.old: Dict[str, torch.Tensor] = self._current() if self.spec.needs_old else {}
        self.old_steps = 0  # optimizer steps so far: the soft update's schedule position

    # ---------------------------------------------------------------- state
    def _trainable(self) -> Dict[str, torch.nn.Parameter]:
        return {k: p for k, p in self.flow.transformer.named_parameters() if p.requires_grad}

    def _current(self) -> Dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self._trainable().items()}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The trainable weights and the old / EMA copy (keys prefixed ``matching_old.``)."""
        return {**super().state_dict(), **{OLD_PREFIX + k: v for k, v in self.old.items()}}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Load :meth:`state_dict`'s tensors; without an old copy (a grpo checkpoint, a
        ``final.pt`` of another objective) the old copy restarts equal to the weights."""
        super().load_state_dict({k: v for k, v in state.items() if not k.startswith(OLD_PREFIX)})
        if self.spec.needs_old:
            old = {k[len(OLD_PREFIX):]: v for k, v in state.items() if k.startswith(OLD_PREFIX)}
            current = self._current()
            self.old = {k: old[k].to(v).clone() if k in old else v for k, v in current.items()}

    def extra_state(self) -> Dict[str, int]:
        """The rollout counter and the soft update's step count."""
        return {**super().extra_state(), "matching_updates": int(self.old_steps)}

    def load_extra_state(self, extras: Dict[str, Any]) -> None:
        super().load_extra_state(extras)
        self.old_steps = int(extras.get("matching_updates", 0))

    # ---------------------------------------------------------------- rollout
    def _rollout_sde(self, prompts, metadata, counts, generator) -> Rollout:
        """ODE rollouts of ``counts[p]`` samples per prompt: rows = samples, ``mask [B, 1]``,
        ``data``: ``x0 [B, *L]``, ``prompt_row [B]`` and the prompts' ``cond`` (shared)."""
        P, n = len(prompts), torch.tensor(counts)
        rows = torch.arange(P).repeat_interleave(n)  # [B] prompt of each sample
        noise = self.noise(P if self.c.shared_noise else int(n.sum()), generator)
        if self.c.shared_noise:  # [P, *L] -> [B, *L]
            noise = noise.repeat_interleave(n.to(noise.device), 0)
        cond = self.flow.encode_prompt(prompts)
        weights = self._old_weights() if self.spec.rollout_policy == "old" else \
            contextlib.nullcontext()
        with weights:  # DiffusionNFT samples with the old adapter
            x0, nfe = ode_rollout(self.flow, noise, self.sigmas, take_cond(cond, rows),
                                  self.c.ode_solver)
        self.last_nfe = nfe
        images = self.flow.decode(x0).cpu()
        B = len(rows)
        return Rollout(list(images), [prompts[i] for i in rows.tolist()],
                       [metadata[i] for i in rows.tolist()], rows.clone(),
                       torch.ones(B, 1, dtype=torch.bool),
                       {"x0": x0.float(), "prompt_row": rows.clone(), "cond": cond}, nfe=nfe)

    # ---------------------------------------------------------------- matching hooks
    def match_spec(self) -> MatchSpec:
        """The resolved matching preset (``diffusion.objective`` + ``diffusion.matching``)."""
        return self.spec

    def match_grid_size(self) -> int:
        """T: the training times index σ_0 .. σ_{T−1} of the rollout grid (σ_T = 0 excluded)."""
        return int(self.c.num_steps)

    def match_terms(self, rollout: Rollout, rows: torch.Tensor, times: torch.Tensor,
                    seeds: torch.Tensor) -> MatchTerms:
        """:class:`MatchTerms` of ``rows`` at grid indices ``times [b, K]`` with noise from
        ``seeds [b, K]``; ``v`` carries the gradient."""
        b, K = times.shape
        device = self.flow.device
        x0 = rollout.data["x0"][rows.to(rollout.data["x0"].device)].to(device)  # [b, *L]
        x0 = x0.repeat_interleave(K, 0)  # [b, *L] -> [b·K, *L], row-major (row, time)
        eps = torch.stack([torch.randn(self.latent, generator=torch.Generator().manual_seed(
            int(s))) for s in seeds.flatten().tolist()]).to(device)  # [b·K, *L]
        sigma = self.sigmas.to(device)[times.flatten().to(device)]  # [b·K]
        s = sigma.reshape(-1, *[1] * len(self.latent))
        x_t = (1 - s) * x0 + s * eps
        prompt = rollout.data["prompt_row"][rows].repeat_interleave(K)  # [b·K]
        cond = take_cond(rollout.data["cond"], prompt)
        with self.flow.unguided():
            v_old = v_ref = None
            if self.spec.reads_old:  # before the gradient forward: the swap moves the weights
                with torch.no_grad(), self._old_weights():
                    v_old = self.flow(x_t, sigma, cond).float()
            if self.spec.needs_ref:
                v_ref = self.flow.reference(x_t, sigma, cond).float()
            v = self.flow(x_t, sigma, cond).float()
        shape = (b, K, *self.latent)
        return MatchTerms(v.reshape(shape), (eps - x0).reshape(shape), sigma.reshape(b, K),
                          torch.ones(b, K, dtype=torch.bool, device=device),
                          None if v_old is None else v_old.reshape(shape),
                          None if v_ref is None else v_ref.reshape(shape))

    @contextlib.contextmanager
    def _old_weights(self):
        """Within the block the trainable parameters hold the old copy: their storages are
        swapped with the copy's (no copy of the weights), and swapped back after. Only where no
        autograd graph holds the parameters (before the gradient forward)."""
        params = self._trainable()

        def swap():
            for k, p in params.items():
                p.data, self.old[k] = self.old[k], p.data

        swap()
        try:
            yield
        finally:
            swap()

    def match_after_update(self, optimizer_steps: int) -> None:
        """Count ``optimizer_steps`` and soft-update the old copy: θ_old ← η·θ_old + (1 − η)·θ,
        η = the schedule at the new count (DiffusionNFT: after the epoch's optimizer steps)."""
        self.old_steps += int(optimizer_steps)
        if self.spec.needs_old:
            soft_update_(self.old, self._current(),
                         soft_update_decay(self.spec.old_decay, self.old_steps))


def matching_policy_class(c: DiffusionConfig):
    """The policy class of ``c.objective``: the log-prob policy for grpo, else this one."""
    return DiffusionGroupPolicy if c.objective == "grpo" else MatchingDiffusionPolicy

