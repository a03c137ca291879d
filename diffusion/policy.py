"""The generic flow-matching :class:`~mmrl.train.policy.GroupPolicy` of the diffusion job, over a
flow adapter (:mod:`mmrl.diffusion.models`): the samplers, the log-probs of stored transitions,
the closed-form KL to the reference, and the advantage hooks of the samplers whose training rows
are not the reward rows. Nothing here knows a family.

Training rows and T. For the SDE samplers (``full``, ``window``, ``sliding``) a row is an image
and T its trained (stochastic) denoising steps. For ``singular`` (G²RPO) a row is a group member
(one SDE step, its images at every granularity are the reward rows) and for ``tree``
(BranchGRPO / Dynamic-TreeRPO) a row is a tree node (its incoming edge and its own SDE steps);
their advantages come from the loop's ``advantages`` hook. ``logp(rows, t0, t1)`` re-scores the
stored transitions of those rows and steps, so splitting T (``train.t_chunk``) or the rows
(``train.micro_batch_size``) never changes the gradient.

Preference (``Capabilities(preference=True)``): ``pair_scores`` gives Diffusion-DPO's scores
−½·e of sample pairs (:mod:`mmrl.diffusion.dpo`), from a pair rollout of image files
(``pair_rollout``) or from a sampled rollout's final latents (online pairs).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mmrl.diffusion.advantages import (g2rpo_advantages, g2rpo_granular_advantages,
                                       tree_advantages)
from mmrl.diffusion.config import ENTROPY_REFUSAL, DiffusionConfig
from mmrl.diffusion.dpo import check_pair_records, denoising_error, pair_noise, read_pair_images
from mmrl.diffusion.g2rpo import sample_singular
from mmrl.diffusion.guard import STEP_TERMS_REFUSAL, step_terms, timestep_subset
from mmrl.diffusion.samplers import rescore, sample_sde, sample_tree, take_cond
from mmrl.diffusion.dpm import sample_mixed
from mmrl.diffusion.schedule import mix_window, random_window
from mmrl.diffusion.sde import SDE_KL_FORMS, sde_kl
from mmrl.train.policy import Capabilities, GroupPolicy, StepTerms
from mmrl.train.preference import PrefScores
from mmrl.train.rollout import Rollout

LEGACY_COUNTER_KEY = "mmrl_rollout_iteration"
"""Where checkpoints written before ``Capabilities(extra_state=True)`` kept the rollout counter
(in the weights); the runner turns it into ``{"rollout_iteration": n}`` on resume
(:mod:`mmrl.train.state`)."""


class DiffusionGroupPolicy(GroupPolicy):
    """:class:`mmrl.train.policy.GroupPolicy` over a flow adapter (``flow``, any family).

    Args:
        flow: a :class:`~mmrl.diffusion.models.base.FlowAdapter` built for ``c.height x
            c.width`` (velocity, ``encode_prompt``, ``decode``, ``reference``, ``sigmas``).
        c: the job's config section.
        adv_eps, adv_clip: the preset's advantage epsilon / clip (tree and singular hooks).
        reward_weights: reward column weights (tree and singular hooks).
        keep_means: store each transition's mean at sampling, for GRPO-Guard's step terms
            (:meth:`logp_and_step_terms`; the job sets it when the algorithm needs them).

    Attributes:
        iteration: rollout rounds so far (positions MixGRPO's window; checkpointed as
            ``extra_state()``).
        last_nfe: per-sample model evaluations the last rollout spent (the samplers' ``nfe``).
        evaluator, eval_every: the periodic ODE evaluation, run at the start of a rollout.
    """

    def __init__(self, flow, c: DiffusionConfig, *, adv_eps: float = 1e-4,
                 adv_clip: Optional[float] = None,
                 reward_weights: Optional[Dict[str, float]] = None, keep_means: bool = False):
        self.flow, self.c, self.keep_means = flow, c, keep_means
        self.adv_eps, self.adv_clip = adv_eps, adv_clip
        self.reward_weights = dict(reward_weights or {})
        # checks the resolution and the frame count
        self.latent = tuple(flow.latent_shape(c.height, c.width, c.frames or None))
        self.sigmas = flow.sigmas(c.num_steps)
        self.eval_sigmas = flow.sigmas(c.eval_num_steps)
        self.iteration = 0  # rollout rounds so far (MixGRPO's window position; checkpointed)
        self.evaluator: Optional[Callable[[int], Dict[str, Any]]] = None
        self.eval_every = 0
        self.last_nfe = 0
        # one initial noise per group: its samples must be drawn on one rank (data parallel);
        # tree / singular sampling train rows that are not the rewarded samples
        self.capabilities = Capabilities(
            own_kl=True, row_advantages=c.sampler in ("singular", "tree"),
            whole_groups=c.shared_noise, export=True, fsdp=True, extra_state=True,
            rollout_logp=True, preference=True, step_terms=keep_means and c.kind != "cps",
            concat_rollouts=c.sampler not in ("singular", "tree"),
            chunked_rollout=c.sampler not in ("singular", "tree"),
            why_not={"entropy": ENTROPY_REFUSAL, "step_terms": STEP_TERMS_REFUSAL})
        # The loop's advantages hook exists only where training rows are not reward rows.
        self.advantages = {"singular": self._singular_advantages,
                           "tree": self._tree_advantages}.get(c.sampler)
        SDE_KL_FORMS.get(c.kl)  # an unknown form fails here, before any sampling

    # ---------------------------------------------------------------- GroupPolicy plumbing
    def parameters(self):
        return self.flow.trainable_parameters()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The trainable weights (LoRA adapter or transformer); the rollout counter is
        :meth:`extra_state`."""
        return self.flow.trainable_state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Load the trainable weights (what :meth:`state_dict` returns)."""
        self.flow.load_trainable_state_dict(state)

    def extra_state(self) -> Dict[str, int]:
        """The state that is not weights: ``{"rollout_iteration": n}``."""
        return {"rollout_iteration": int(self.iteration)}

    def load_extra_state(self, extras: Dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""
        self.iteration = int(extras.get("rollout_iteration", 0))

    def export_pretrained(self, path: str, merge_lora: bool = False, state_dict=None) -> str:
        """The trained pipeline (or LoRA file) in diffusers format; ``state_dict``: full weights
        to write instead of the live (FSDP-sharded) ones."""
        return self.flow.export(path, merge_lora=merge_lora, state_dict=state_dict)

    def apply_fsdp(self) -> torch.nn.Module:
        """FSDP2 for full fine-tuning: each transformer block is a unit, the transformer the
        root (``train.parallel=fsdp``). Rollouts run with the weights gathered (the runner's
        ``gathered_parameters``); the log-prob passes call the transformer, whose hooks gather
        and reduce-scatter."""
        from torch.distributed.fsdp import fully_shard
        if self.flow.finetune != "full":
            raise ValueError(f"train.parallel=fsdp shards full fine-tuning; diffusion.finetune="
                             f"{self.flow.finetune!r}: use train.parallel=ddp (a LoRA adapter "
                             f"is small enough to replicate)")
        for block in self.flow.fsdp_blocks():
            fully_shard(block)
        fully_shard(self.flow.transformer)
        return self.flow.transformer

    def noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[n, *latent]`` fp32 standard normal on the policy's device (drawn on the CPU)."""
        return torch.randn((n, *self.latent), generator=generator).to(self.flow.device)

    def _device_generator(self, generator: torch.Generator) -> torch.Generator:
        # The loop's generator lives on the CPU; the SDE noise is drawn on the latents' device
        # from a generator seeded by it, so runs stay reproducible and resumable on any device.
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        return torch.Generator(self.flow.device).manual_seed(seed)

    # ---------------------------------------------------------------- rollout
    def rollout(self, prompts: Sequence[str], metadata: Sequence[Dict[str, Any]],
                group_size, generator: torch.Generator) -> Rollout:
        """Sample with log-probs; images are decoded for the reward (called under no_grad)."""
        self._maybe_evaluate()
        counts = [group_size] * len(prompts) if isinstance(group_size, int) else list(group_size)
        sample = {"singular": self._rollout_singular, "tree": self._rollout_tree}.get(
            self.c.sampler, self._rollout_sde)
        rollout = sample(list(prompts), list(metadata), counts, generator)
        self.iteration += 1
        return rollout

    def _maybe_evaluate(self) -> None:
        if self.evaluator is not None and self.eval_every and \
                self.iteration % self.eval_every == 0:
            self.evaluator(self.iteration)

    def rollout_chunks(self, prompts, metadata, counts, generator, bounds):
        """One rollout round in chunks ``bounds`` (``train.reward_chunks``): the evaluation
        runs once, the round's SDE window is drawn once and shared by the chunks, the rollout
        counter advances once; each chunk draws its own noise, in order."""
        self._maybe_evaluate()
        kw = {} if self.capabilities.matching else {"steps": self._sde_steps(generator)}
        for a, b in bounds:
            yield self._rollout_sde(list(prompts[a:b]), list(metadata[a:b]), list(counts[a:b]),
                                    generator, **kw)
        self.iteration += 1

    def concat_rollouts(self, parts: Sequence[Rollout]) -> Rollout:
        """The chunks of a round as one rollout, trajectories merged
        (:func:`mmrl.diffusion.chunks.concat_diffusion_rollouts`)."""
        from mmrl.diffusion.chunks import concat_diffusion_rollouts
        return concat_diffusion_rollouts(parts, _Shared)

    def _sde_steps(self, generator) -> List[int]:
        c, T = self.c, self.c.num_steps
        if c.sampler == "window":
            return random_window(T, c.window, generator=generator, start_range=c.window_range)
        if c.sampler == "sliding":
            return mix_window(c.sliding_schedule, self.iteration, T, c.window, generator=generator,
                              **self._window_params())
        return list(range(T - 1))

    def _window_params(self) -> Dict[str, Any]:
        c = self.c
        if c.sliding_schedule == "sliding":
            return {"every": c.sliding_shift_every, "stride": c.sliding_stride}
        return {"every": c.sliding_shift_every, "stride": c.sliding_stride,
                "roll_back": c.sliding_roll_back, "n_max": c.sliding_decay_max,
                "n_min": c.sliding_decay_min, "tau": c.sliding_exp_tau, "k": c.sliding_exp_k}

    def _rollout_sde(self, prompts, metadata, counts, generator, steps=None) -> Rollout:
        P, n = len(prompts), torch.tensor(counts)
        rows = torch.arange(P).repeat_interleave(n)  # [B] prompt of each sample
        steps = self._sde_steps(generator) if steps is None else steps
        noise = self.noise(P if self.c.shared_noise else int(n.sum()), generator)
        if self.c.shared_noise:  # [P, *L] -> [B, *L]
            noise = noise.repeat_interleave(n.to(noise.device), 0)
        cond = take_cond(self.flow.encode_prompt(prompts), rows)
        kw = dict(sde_steps=steps, kind=self.c.kind, noise_level=self.c.noise_level,
                  generator=self._device_generator(generator))
        if self.c.ode_solver == "euler" and self.c.ode_compression is None:
            traj = sample_sde(self.flow, noise, self.sigmas, cond, keep_means=self.keep_means,
                              **kw)
        else:  # MixGRPO(-Flash): the ODE after the window by ode_solver, maybe regridded
            traj = sample_mixed(self.flow, noise, self.sigmas, cond, solver=self.c.ode_solver,
                                compression=self.c.ode_compression, **kw)
        index, _, mask = traj.per_owner(len(rows))  # [B, K]
        if self.c.timestep_fraction < 1:  # DanceGRPO: a random subset per sample, [B, K] -> [B, k]
            index, mask = timestep_subset(index, mask, self.c.timestep_fraction, generator)
        return self._pack(traj, cond, rows, index, mask, rows, prompts, metadata)

    def _rollout_singular(self, prompts, metadata, counts, generator) -> Rollout:
        N, c = self._equal_counts(counts), self.c
        cond = self.flow.encode_prompt(prompts)
        traj = sample_singular(self.flow, self.noise(len(prompts), generator), self.sigmas, cond,
                               group_size=N, steps=c.singular_steps,
                               granularities=c.granularities, kind=c.kind,
                               noise_level=c.noise_level,
                               generator=self._device_generator(generator), end=c.singular_end)
        G, per_k = len(traj.granularities), len(prompts) * N  # members per SDE step k
        if c.singular_rows == "member":  # one row per member, trained with Σ_g A_{m,g}
            index = torch.arange(traj.num_transitions)[:, None]  # [M, 1]
            rollout = self._pack(traj, cond, traj.cond_index, index,
                                 torch.ones(index.shape, dtype=torch.bool), traj.output_cond,
                                 prompts, metadata)
            rollout.reward_group_ids = traj.output_cond.clone()
            rollout.data["final_row"] = torch.arange(traj.num_transitions) * G
        else:
            # One training row per reward row (member m, granularity g), each owning m's
            # transition and trained with the (k, prompt, g) group's advantage A_{m,g}:
            # Σ_g A_{m,g}·∇logp_m is G²RPO's integrated advantage times ∇logp_m.
            index = traj.output_owner[:, None]  # [M·G, 1]
            rollout = self._pack(traj, cond, traj.output_cond, index,
                                 torch.ones(index.shape, dtype=torch.bool), traj.output_cond,
                                 prompts, metadata)
        if c.singular_cadence == "per_step":  # mini-batch j = the rows of the j-th k
            rollout.mini_batch = index[:, 0] // per_k
        return rollout

    def _rollout_tree(self, prompts, metadata, counts, generator) -> Rollout:
        leaves = self.c.tree_branching ** len(self.c.tree_split_steps)
        if self._equal_counts(counts) != leaves:
            raise ValueError(f"group size {counts[0]} but the tree gives {leaves} leaves per "
                             f"prompt; set train.group_size={leaves}")
        cond = self.flow.encode_prompt(prompts)
        traj = sample_tree(self.flow, self.noise(len(prompts), generator), self.sigmas, cond,
                           split_steps=self.c.tree_split_steps, branching=self.c.tree_branching,
                           noise_levels=(self.c.tree_noise_levels if self.c.tree_noise_levels
                                         is not None else self.c.noise_level),
                           sde_steps=self.c.tree_sde_steps, kind=self.c.kind,
                           generator=self._device_generator(generator), keep_means=self.keep_means)
        index, _, mask = traj.per_owner(traj.num_nodes)  # [Nn, K]
        # Rows: the leaves first, in output order (row i < B is reward row i), then inner nodes.
        inner = torch.ones(traj.num_nodes, dtype=torch.bool)
        inner[traj.leaves] = False
        order = torch.cat([traj.leaves, inner.nonzero().flatten()])  # [Nn] node of each row
        rollout = self._pack(traj, cond, traj.node_cond[order], index[order], mask[order],
                             traj.output_cond, prompts, metadata)
        rollout.data["node_of_row"] = order
        return rollout

    def _equal_counts(self, counts) -> int:
        if len(set(counts)) != 1:
            raise ValueError(f"sampler={self.c.sampler} needs the same group size for every "
                             f"prompt; got {sorted(set(counts))} (use "
                             f"train.rollout_allocation=fixed)")
        return int(counts[0])

    def _pack(self, traj, cond, row_prompt, index, mask, out_prompt, prompts, metadata):
        """A :class:`Rollout`: training rows = trajectory owners, samples = decoded outputs;
        ``rollout_logp`` = each row's transitions' log-probs at sampling time (the SDE step's
        Gaussian density, the one :meth:`logp` re-scores)."""
        self.last_nfe = traj.nfe
        images = self.flow.decode(traj.final).cpu()  # [B_out, 3, H, W] in [0, 1]
        pick = out_prompt.tolist()
        sampled = traj.logp.detach().float().cpu()[index]  # [M] -> [rows, K]
        # Row r < B_out is output r for every sampler (tree leaves come first); the row's output
        # (-1: an inner tree node) follows select(), so pair_scores finds its final latent.
        final_row = torch.arange(len(index))
        final_row[len(images):] = -1
        return Rollout(list(images), [prompts[i] for i in pick], [metadata[i] for i in pick],
                       row_prompt.clone(), mask, {"index": index, "final_row": final_row,
                                                  "trajectory": _Shared(traj, cond)},
                       nfe=int(traj.nfe), rollout_logp=torch.where(mask, sampled, 0.0))

    # ---------------------------------------------------------------- scoring
    def _rescore(self, velocity_fn, rollout: Rollout, rows, t0: int, t1: int):
        """``(out, mask)``: the :class:`SDEStepOutput` of the stored transitions of ``rows`` and
        steps ``[t0, t1)`` where ``mask [b, t]`` is True (``out`` None when there are none)."""
        shared = rollout.data["trajectory"]
        index = rollout.data["index"][rows, t0:t1]  # [b, t] transition ids
        mask = rollout.mask[rows, t0:t1]
        if not bool(mask.any()):
            return None, mask
        return rescore(shared.traj, velocity_fn, shared.cond, index=index[mask]), mask

    def _scatter(self, values: Optional[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """``[m] -> [b, t]`` at the mask's True entries, 0 elsewhere (keeps the gradient)."""
        out = torch.zeros(mask.shape, device=self.flow.device)
        return out if values is None else out.masked_scatter(mask.to(out.device), values.float())

    def logp(self, rollout: Rollout, rows: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """``[len(rows), t1 − t0]`` log-probs of the stored transitions, with gradient (0 where
        the mask is False)."""
        out, mask = self._rescore(self.flow, rollout, rows, t0, t1)
        return self._scatter(None if out is None else out.logp, mask)

    @torch.no_grad()
    def ref_logp(self, rollout: Rollout, rows: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """The same under the reference policy (base weights). The loop's KL term does not use
        it: :meth:`logp_and_kl` gives the closed form instead."""
        out, mask = self._rescore(self.flow.reference, rollout, rows, t0, t1)
        return self._scatter(None if out is None else out.logp, mask)

    def logp_and_kl(self, rollout: Rollout, rows: torch.Tensor, t0: int,
                    t1: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(logp, kl)``, each ``[len(rows), t1 − t0]`` with gradient: :meth:`logp` and the
        closed-form KL of the same transitions to the reference, ``sde_kl(out, ref.mean,
        diffusion.kl)`` (the loop's hook when beta > 0; 0 where the mask is False).

        The reference mean is computed here, from the same stored x, step and noise level, as
        flow_grpo does per training step (one extra no-grad forward per transition and epoch).
        """
        out, mask = self._rescore(self.flow, rollout, rows, t0, t1)
        if out is None:
            return self._scatter(None, mask), self._scatter(None, mask)
        ref, _ = self._rescore(self.flow.reference, rollout, rows, t0, t1)  # no_grad inside
        return (self._scatter(out.logp, mask),
                self._scatter(sde_kl(out, ref.mean.detach(), self.c.kl), mask))

    def logp_and_step_terms(self, rollout: Rollout, rows: torch.Tensor, t0: int, t1: int,
                            with_kl: bool = False) -> Tuple[torch.Tensor, StepTerms]:
        """``(logp, StepTerms)``, each ``[len(rows), t1 − t0]`` (0 where the mask is False):
        :meth:`logp`, GRPO-Guard's step terms (:func:`mmrl.diffusion.guard.step_terms`) and,
        with ``with_kl``, :meth:`logp_and_kl`'s KL, from one forward."""
        out, mask = self._rescore(self.flow, rollout, rows, t0, t1)
        if out is None:
            zero = self._scatter(None, mask)
            return zero, StepTerms(zero, zero, zero, zero if with_kl else None)
        shared = rollout.data["trajectory"]
        index = rollout.data["index"][rows, t0:t1][mask]
        std, shift, gap = (self._scatter(v, mask) for v in step_terms(shared.traj, out, index))
        kl = None
        if with_kl:
            ref, _ = self._rescore(self.flow.reference, rollout, rows, t0, t1)  # no_grad inside
            kl = self._scatter(sde_kl(out, ref.mean.detach(), self.c.kl), mask)
        return self._scatter(out.logp, mask), StepTerms(std, shift, gap, kl)

    # ---------------------------------------------------------------- preference
    def pair_rollout(self, records: Sequence[Dict[str, Any]]):
        """``(Rollout, chosen_rows, rejected_rows)`` of pair records ``{"prompt", "chosen":
        image path, "rejected": image path}``: the images fitted to the run's resolution and
        VAE-encoded (posterior mean) into ``data["x0"]``; rows 0..K−1 chosen, K..2K−1 rejected,
        group id = the pair. Records with an unreadable image are left out, counted in
        ``Rollout.skipped["unreadable_image"]``.

        Raises:
            ValueError: a record without the three string fields.
        """
        check_pair_records(records)
        kept, images, skipped = read_pair_images(records, self.c.height, self.c.width)
        K, chunk = len(kept), self.c.eval_batch_size
        with torch.no_grad():  # [2K, 3, H, W] -> [2K, *L], eval_batch_size images per call
            x0 = torch.cat([self.flow.encode_images(images[i:i + chunk])
                            for i in range(0, 2 * K, chunk)]) if K else \
                torch.zeros((0, *self.latent), device=self.flow.device)
        meta = [dict(records[i], role=role) for role in ("chosen", "rejected") for i in kept]
        rollout = Rollout(list(images), [m["prompt"] for m in meta], meta,
                          torch.arange(K).repeat(2), torch.ones(2 * K, 1, dtype=torch.bool),
                          {"x0": x0}, skipped=skipped)
        return rollout, torch.arange(K), torch.arange(K, 2 * K)

    def pair_scores(self, rollout: Rollout, chosen_rows: torch.Tensor,
                    rejected_rows: torch.Tensor, generator: torch.Generator,
                    with_ref: bool) -> PrefScores:
        """Diffusion-DPO's scores −½·e ``[P, 1]`` of the pairs' clean latents
        (:mod:`mmrl.diffusion.dpo`): one σ (logit-normal(0, 1) on the scheduler's training
        grid, ``flow.training_sigmas()``) and one ε per pair from ``generator``, shared by its
        two images; the unguided velocity (SD3: no CFG; FLUX: embedded guidance kept). The
        reference (``with_ref``) is the adapter disabled (LoRA) or the frozen copy (full),
        without gradient.

        Rows are samples: a pair rollout's (:meth:`pair_rollout`), or an ordinary rollout's
        whose final latents (σ = 0, any sampler) are the images; for online pairs from groups.
        """
        if chosen_rows.shape != rejected_rows.shape or chosen_rows.dim() != 1:
            raise ValueError(f"chosen_rows {tuple(chosen_rows.shape)} and rejected_rows "
                             f"{tuple(rejected_rows.shape)}; expected two [P] index tensors")
        P, device = int(chosen_rows.shape[0]), self.flow.device
        if P == 0:  # no pair on this rank: empty scores, no forward
            none = torch.zeros(0, 1, device=device)
            mask = torch.zeros(0, 1, dtype=torch.bool, device=device)
            return PrefScores(none, none, mask, mask, *(none, none) if with_ref else ())
        rows = torch.cat([chosen_rows, rejected_rows]).cpu()  # [2P]: chosen, then rejected
        x0 = self._clean_latents(rollout, rows).to(device)
        sigma, eps = pair_noise(P, self.latent, self.flow.training_sigmas(), generator)
        # the pair's two images share σ and ε: [P] -> [2P], [P, *L] -> [2P, *L]
        sigma, eps = sigma.repeat(2).to(device), eps.repeat(2, *[1] * len(self.latent)).to(device)
        cond = self.flow.encode_prompt([rollout.prompts[i] for i in rows.tolist()])
        with self.flow.unguided():
            score = -0.5 * denoising_error(self.flow, x0, eps, sigma, cond)  # [2P]
            ref = (-0.5 * denoising_error(self.flow.reference, x0, eps, sigma, cond).detach()
                   if with_ref else None)  # the reference forwards under no_grad
        mask = torch.ones(P, 1, dtype=torch.bool, device=device)
        score = score.reshape(2, P, 1)  # [2P] -> [2, P, 1]: chosen, rejected
        refs = () if ref is None else tuple(ref.reshape(2, P, 1))
        return PrefScores(score[0], score[1], mask, mask.clone(), *refs)

    def _clean_latents(self, rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
        """``[len(rows), *L]`` fp32: a pair rollout's encoded images, or a sampled rollout's
        final latents.

        Raises:
            ValueError: a row that is no sample (an inner tree node).
        """
        if "x0" in rollout.data:
            x0 = rollout.data["x0"]
            return x0[rows.to(x0.device)].float()
        out = rollout.data["final_row"][rows]
        if bool((out < 0).any()):
            raise ValueError(f"rows {rows[out < 0].tolist()} are inner tree nodes, not samples; "
                             f"pair rows index the rollout's samples (rewarded rows)")
        final = rollout.data["trajectory"].traj.final
        return final[out.to(final.device)].float()

    # ---------------------------------------------------------------- advantage hooks
    def _rewards(self, rewards) -> torch.Tensor:
        return rewards.weighted_sum(self.reward_weights)  # [B_out], NaN where a reward failed

    def _singular_advantages(self, rollout: Rollout, rewards) -> torch.Tensor:
        """G²RPO's advantages in row order (arXiv 2510.01982 Eq. 11; one group per
        (k, prompt, g), :func:`~mmrl.diffusion.advantages.g2rpo_granular_advantages`).

        ``singular_rows=granularity``: ``[M·G]`` A_{m,g}, each clamped to ±adv_clip. Member m's
        transition appears in G rows, so the summed gradient at ratio 1 is Σ_g A_{m,g}·∇logp_m.
        Differs from paper: the PPO clip acts on each (m, g) row (identical while the update is
        on-policy) and the normalizer counts M·G rows instead of M.
        ``singular_rows=member``: ``[M]`` clamp(Σ_g A_{m,g}, ±adv_clip), the authors' code.
        A NaN/inf reward gives its own (m, g) entry 0.
        """
        traj = rollout.data["trajectory"].traj
        total = self._rewards(rewards).float()
        if self.c.singular_rows == "member":
            return g2rpo_advantages(total, traj, eps=self.adv_eps, adv_clip=self.adv_clip)
        adv = g2rpo_granular_advantages(total, traj, eps=self.adv_eps, adv_clip=self.adv_clip)
        return adv.reshape(-1)  # [M, G] -> [M·G], output o = m·G + g

    def _tree_advantages(self, rollout: Rollout, rewards) -> torch.Tensor:
        """Per-node advantages (BranchGRPO: node reward = mean of its leaves, normalized per
        tree and depth), in row order; a node without a finite leaf reward gets 0."""
        adv = tree_advantages(self._rewards(rewards), rollout.data["trajectory"].traj,
                              eps=self.adv_eps, adv_clip=self.adv_clip)[0]
        return adv[rollout.data["node_of_row"]]

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def sample_ode(self, prompts: Sequence[str], noise: torch.Tensor) -> torch.Tensor:
        """Images ``[P, 3, H, W]`` from the deterministic ODE sampler on the eval schedule."""
        flow = self.flow
        with flow.guidance(self.c.eval_guidance_scale):
            traj = sample_sde(flow, noise, self.eval_sigmas, flow.encode_prompt(list(prompts)),
                              sde_steps=[])
        return flow.decode(traj.final).cpu()


class _Shared:
    """The rollout's trajectory and cond: shared by every row (never sliced by ``select``)."""

    def __init__(self, traj, cond):
        self.traj, self.cond = traj, cond
