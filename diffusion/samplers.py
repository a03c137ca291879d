"""Samplers over a velocity function, returning trajectories the trainer can re-score.

A velocity function is ``velocity_fn(x, sigma, cond) -> v`` with ``x [R, *L]`` fp32 latents,
``sigma [R]`` the current σ of each row and ``cond`` None or the conditioning rows of x (a tensor,
or a tuple / dict of tensors such as SD3's ``(prompt_embeds, pooled)``, each indexed on its first
dim). CFG, dtype casts and timestep scaling (t = 1000·σ) are the function's business.

Every sampler returns a :class:`Trajectory`: a flat list of M stochastic (trainable) transitions
``states[src] -> states[dst]`` at ``step`` with the ``logp`` they were sampled with, the row of the
advantage vector each one trains with (``owner``), the final latents to decode, and ``nfe``: the
number of per-sample model evaluations spent (Σ of rows over velocity_fn calls; a CFG velocity_fn
that runs the model on 2 rows per sample costs 2× that). :func:`rescore` recomputes the
transitions' log-probs with the current weights: before any update it returns the stored ``logp``.

- :func:`sample_sde`: every row its own trajectory; SDE on ``sde_steps`` (default all but the last,
  as flow_grpo), ODE elsewhere. Windows: :func:`~mmrl.diffusion.random_window` (Flow-GRPO-Fast),
  :func:`~mmrl.diffusion.sliding_window` (MixGRPO).
- :func:`sample_tree`: BranchGRPO / Dynamic-TreeRPO tree sampling (returns :class:`TreeTrajectory`).
- :func:`mmrl.diffusion.sample_singular`: G²RPO singular stochastic sampling (module ``g2rpo``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from mmrl.diffusion.sde import SDE_KINDS, SDEStepOutput, euler_step, sde_step

Tensor = torch.Tensor
VelocityFn = Callable[[Tensor, Tensor, object], Tensor]


@dataclass
class Trajectory:
    """What a sampler produced, and what the trainer needs to re-score it.

    Attributes:
        final: ``[B, *L]`` final latents (σ = 0), to decode and reward.
        output_cond: ``[B]`` the cond row (prompt) of each output.
        states: ``[S, *L]`` fp32, every latent a stochastic transition starts or ends at.
        src, dst: ``[M]`` indices into ``states``: transition m goes ``states[src[m]] ->
            states[dst[m]]``.
        step: ``[M]`` step index i of each transition (σ_i -> σ_{i+1}).
        noise_level: ``[M]`` the noise level it was sampled with.
        logp: ``[M]`` its log-probability at sampling time (old_logp for the ratio).
        owner: ``[M]`` the row of the advantage vector it trains with (``sample_sde``: the output
            row; ``sample_tree``: the node; ``sample_singular``: the group member).
        cond_index: ``[M]`` the cond row to pass to velocity_fn when re-scoring.
        sigmas: ``[T+1]`` the schedule. kind: the SDE kind. nfe: per-sample model evaluations.
        means: ``[M, *L]`` fp32 each transition's mean μ at sampling (GRPO-Guard's μ_old), when
            sampled with ``keep_means=True``; else None.
    """

    final: Tensor
    output_cond: Tensor
    states: Tensor
    src: Tensor
    dst: Tensor
    step: Tensor
    noise_level: Tensor
    logp: Tensor
    owner: Tensor
    cond_index: Tensor
    sigmas: Tensor
    kind: str
    nfe: int
    means: Optional[Tensor] = None

    @property
    def num_transitions(self) -> int:
        return int(self.step.shape[0])

    def per_owner(self, num_owners: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Transitions laid out by owner for the core's ``[B, T]`` contract.

        Returns:
            ``(index, logp, mask)``, each ``[O, K]`` with K the most transitions of one owner:
            ``index`` into the transition list (0 where padded), ``logp`` (0 where padded) and
            ``mask`` (True where a transition exists), transitions in sampling order.
        """
        num = int(self.owner.max()) + 1 if num_owners is None else num_owners
        order = torch.sort(self.owner, stable=True).indices  # [M] grouped by owner, time order kept
        counts = torch.bincount(self.owner, minlength=num)  # [O]
        width = int(counts.max()) if counts.numel() else 0
        start = torch.cumsum(counts, 0) - counts  # [O]
        own = self.owner[order]
        col = torch.arange(order.shape[0]) - start[own]  # position within its owner
        index = torch.zeros(num, width, dtype=torch.long)
        mask = torch.zeros(num, width, dtype=torch.bool)
        index[own, col], mask[own, col] = order, True
        return index, torch.where(mask, self.logp[index], torch.zeros(())), mask


@dataclass
class TreeTrajectory(Trajectory):
    """A :class:`Trajectory` whose owners are tree nodes.

    Attributes:
        parent: ``[Nn]`` parent node (−1 for a root). depth: ``[Nn]`` number of splits above it.
        node_cond: ``[Nn]`` cond row (prompt / tree) of each node.
        leaves: ``[B]`` node id of each output (row of ``final``).
    """

    parent: Tensor = None
    depth: Tensor = None
    node_cond: Tensor = None
    leaves: Tensor = None

    @property
    def num_nodes(self) -> int:
        return int(self.parent.shape[0])


def take_cond(cond, index: Tensor):
    """Rows ``index`` of cond (None, a tensor, or a tuple/list/dict of tensors)."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond[index.to(cond.device)]
    if isinstance(cond, Mapping):
        return {k: take_cond(c, index) for k, c in cond.items()}
    if isinstance(cond, (tuple, list)):
        return type(cond)(take_cond(c, index) for c in cond)
    raise TypeError(f"cond is {type(cond).__name__}; expected None, a tensor, or a tuple/list/dict "
                    f"of tensors whose first dim indexes the prompts")


def _cond_rows(cond) -> Optional[int]:
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond.shape[0]
    first = next(iter(cond.values() if isinstance(cond, Mapping) else cond))
    return _cond_rows(first)


def call_velocity(velocity_fn: VelocityFn, x: Tensor, sigma: Tensor, cond) -> Tensor:
    """``velocity_fn(x, sigma, cond)`` with its output checked (same shape as x)."""
    v = velocity_fn(x, sigma, cond)
    if not isinstance(v, Tensor) or v.shape != x.shape:
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"velocity_fn returned {got} for x of shape {tuple(x.shape)}; expected a "
                         f"tensor of the same shape (unpack the model's output, e.g. out.sample)")
    return v


class _StateStore:
    """Appends latents chunk by chunk; hands out their global indices."""

    def __init__(self):
        self.chunks: List[Tensor] = []
        self.count = 0

    def add(self, x: Tensor) -> Tensor:
        idx = torch.arange(self.count, self.count + x.shape[0])
        self.chunks.append(x.detach())
        self.count += x.shape[0]
        return idx

    def stacked(self, like: Tensor) -> Tensor:
        return torch.cat(self.chunks) if self.chunks else like.new_zeros((0, *like.shape[1:]))


def _levels(noise_levels, num_depths: int) -> List[float]:
    if isinstance(noise_levels, (int, float)):
        return [float(noise_levels)] * num_depths
    levels = [float(a) for a in noise_levels]
    if len(levels) != num_depths:
        raise ValueError(f"got {len(levels)} noise levels for {num_depths} depths (splits + 1); "
                         f"pass one level per depth or a single float")
    return levels


def _check_common(noise: Tensor, sigmas: Tensor, cond, kind: str) -> None:
    SDE_KINDS.get(kind)
    if not isinstance(noise, Tensor) or noise.dim() < 2:
        raise ValueError(f"noise must be a tensor [R, *latent]; got "
                         f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise)}")
    if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.shape[0] < 2:
        raise ValueError("sigmas must be a 1-D tensor [T+1] (see mmrl.diffusion.flow_sigmas)")
    rows = _cond_rows(cond)
    if rows is not None and rows != noise.shape[0]:
        raise ValueError(f"cond has {rows} rows but noise has {noise.shape[0]}; expected one cond "
                         f"row per noise row (repeat the prompt embeddings per sample)")


def _check_steps(steps, num_steps: int, what: str) -> List[int]:
    steps = sorted({int(s) for s in steps})
    if steps and (steps[0] < 0 or steps[-1] > num_steps - 1):
        raise ValueError(f"{what} {steps} out of range; expected step indices in "
                         f"[0, {num_steps - 1}] for a {num_steps}-step schedule")
    return steps


@torch.no_grad()
def _rollout(velocity_fn, noise, sigmas, cond, *, splits: Dict[int, int], sde_steps, levels,
             kind, generator, keep_means: bool = False) -> TreeTrajectory:
    """The engine: roots = noise rows; split steps branch; SDE on sde_steps; ODE elsewhere."""
    x = noise.to(torch.promote_types(noise.dtype, torch.float32))
    num_roots = x.shape[0]
    node = torch.arange(num_roots)  # [A] node of each alive row
    parent, depth = [torch.full((num_roots,), -1)], [torch.zeros(num_roots, dtype=torch.long)]
    node_cond = [torch.arange(num_roots)]
    num_nodes, nfe, store, cur = num_roots, 0, _StateStore(), None
    rec: Dict[str, List[Tensor]] = {k: [] for k in ("src", "dst", "step", "a", "logp", "owner")}
    all_depth, all_cond = depth[0], node_cond[0]
    means: List[Tensor] = []
    for t in range(sigmas.shape[0] - 1):
        rows = x.shape[0]
        v = call_velocity(velocity_fn, x, sigmas[t].expand(rows).to(x),
                          take_cond(cond, all_cond[node]))
        nfe += rows
        if t not in splits and t not in sde_steps:
            x, cur = euler_step(x, v, sigmas, t), None
            continue
        src = store.add(x) if cur is None else cur
        owner, b = node, splits.get(t, 1)
        if b > 1:  # every alive node branches into b children: [A] -> [A·b]
            x, v, src = (z.repeat_interleave(b, 0) for z in (x, v, src))
            owner = torch.arange(num_nodes, num_nodes + rows * b)
            parent.append(node.repeat_interleave(b))
            depth.append(all_depth[node].repeat_interleave(b) + 1)
            node_cond.append(all_cond[node].repeat_interleave(b))
            num_nodes += rows * b
        a = torch.tensor(levels, dtype=x.dtype)[all_depth[node]]  # the stepping node's depth
        a = a.repeat_interleave(b) if b > 1 else a
        out = sde_step(x, v, sigmas, t, kind=kind, noise_level=a, generator=generator)
        x, cur = out.prev_sample, store.add(out.prev_sample)
        if keep_means:  # GRPO-Guard's μ_old, [A, *L] per step
            means.append(out.mean.detach())
        for k, val in zip(rec, (src, cur, torch.full_like(src, t), a, out.logp, owner)):
            rec[k].append(val)
        node = owner
        all_depth, all_cond = torch.cat(depth), torch.cat(node_cond)
    cat = {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.float32 if k in ("a", "logp")
                                                  else torch.long) for k, v in rec.items()}
    return TreeTrajectory(
        final=x, output_cond=all_cond[node], states=store.stacked(x), src=cat["src"],
        dst=cat["dst"], step=cat["step"], noise_level=cat["a"], logp=cat["logp"],
        owner=cat["owner"], cond_index=all_cond[cat["owner"]], sigmas=sigmas, kind=kind, nfe=nfe,
        parent=torch.cat(parent), depth=all_depth, node_cond=all_cond, leaves=node,
        means=(torch.cat(means) if means else x.new_zeros((0, *x.shape[1:]))) if keep_means
        else None)


def sample_sde(velocity_fn: VelocityFn, noise: Tensor, sigmas: Tensor, cond=None, *,
               sde_steps: Optional[Sequence[int]] = None, kind: str = "flow_grpo",
               noise_level: float = 0.7, generator: Optional[torch.Generator] = None,
               keep_means: bool = False) -> Trajectory:
    """B independent trajectories from ``noise``: SDE on ``sde_steps``, ODE (Euler) elsewhere.

    Flow-GRPO (arXiv 2505.05470) samples every step but the last with the SDE (the default);
    Flow-GRPO-Fast and MixGRPO (arXiv 2507.21802) pass a window (:func:`random_window`,
    :func:`sliding_window`); ``sde_steps=[]`` is the deterministic ODE sampler used for evaluation.

    Args:
        velocity_fn: ``(x [R, *L], sigma [R], cond rows) -> v [R, *L]``.
        noise: ``[B, *L]`` initial latents (see :func:`initial_noise` for shared group noise).
        sigmas: ``[T+1]`` schedule. cond: None or B rows (tensor / tuple / dict of tensors).
        sde_steps: step indices sampled with the SDE (and trained); default ``range(T−1)``.
        kind, noise_level: passed to :func:`sde_step`.
        generator: for the SDE noise.
        keep_means: store each transition's mean (``Trajectory.means``, GRPO-Guard).

    Returns:
        :class:`Trajectory` with ``owner`` = output row; ``nfe = B·T``; transitions in order
        (step, row), so ``per_owner()`` gives ``[B, len(sde_steps)]``.

    Raises:
        ValueError: bad shapes, steps out of range, unknown kind.
    """
    _check_common(noise, sigmas, cond, kind)
    num_steps = sigmas.shape[0] - 1
    steps = range(num_steps - 1) if sde_steps is None else sde_steps
    steps = _check_steps(steps, num_steps, "sde_steps")
    tree = _rollout(velocity_fn, noise, sigmas, cond, splits={}, sde_steps=set(steps),
                    levels=[float(noise_level)], kind=kind, generator=generator,
                    keep_means=keep_means)
    return Trajectory(**{k: getattr(tree, k) for k in Trajectory.__dataclass_fields__})


def sample_tree(velocity_fn: VelocityFn, noise: Tensor, sigmas: Tensor, cond=None, *,
                split_steps: Sequence[int], branching: Union[int, Sequence[int]] = 2,
                noise_levels: Union[float, Sequence[float]] = 0.7,
                sde_steps: Optional[Sequence[int]] = None, kind: str = "flow_grpo",
                generator: Optional[torch.Generator] = None,
                keep_means: bool = False) -> TreeTrajectory:
    """One tree per noise row: at each split step every alive node branches into b children.

    BranchGRPO (arXiv 2509.06040) / Dynamic-TreeRPO: a shared prefix is computed once, then at
    split step s each of the A alive nodes is evaluated once and its SDE step is drawn b times with
    independent noise, giving b children (edges parent -> child, each trained with the child's
    advantage, see :func:`tree_advantages`). Steps in ``sde_steps`` that are not splits are single
    SDE steps owned by the node; other steps are ODE. The cost is Σ_t (nodes alive at t), far
    below (leaves · T) for independent trajectories when splits come late.

    Args:
        velocity_fn, sigmas, kind, generator: as :func:`sample_sde`.
        noise: ``[P, *L]`` one root per prompt. cond: None or P rows.
        split_steps: step indices where every alive node branches (distinct, in [0, T−1]).
        branching: children per split (one int, or one per split step).
        noise_levels: a float, or one level per depth (len(split_steps) + 1); a step taken by a
            node at depth d (a split out of it included) uses level d.
        sde_steps: non-split steps sampled with the SDE; default none (ODE outside the splits,
            the Dynamic-TreeRPO window setting); pass ``range(T−1)`` for all-SDE (BranchGRPO).
        keep_means: store each transition's mean (``Trajectory.means``, GRPO-Guard).

    Returns:
        :class:`TreeTrajectory`: ``leaves`` are ``P·Π b`` outputs ordered tree by tree, each
        tree's leaves in depth-first order.

    Raises:
        ValueError: bad shapes, steps out of range, branching < 2, wrong number of levels.
    """
    _check_common(noise, sigmas, cond, kind)
    num_steps = sigmas.shape[0] - 1
    splits_sorted = _check_steps(split_steps, num_steps, "split_steps")
    if len(splits_sorted) != len(list(split_steps)):
        raise ValueError(f"split_steps {list(split_steps)} has repeats; pass distinct step indices")
    fan = [int(branching)] * len(splits_sorted) if isinstance(branching, int) else list(branching)
    if len(fan) != len(splits_sorted) or any(b < 2 for b in fan):
        raise ValueError(f"branching={branching!r} for {len(splits_sorted)} split steps; expected "
                         f"an int >= 2 or one int >= 2 per split step")
    steps = _check_steps(sde_steps or [], num_steps, "sde_steps")
    return _rollout(velocity_fn, noise, sigmas, cond, splits=dict(zip(splits_sorted, fan)),
                    sde_steps=set(steps), levels=_levels(noise_levels, len(fan) + 1), kind=kind,
                    generator=generator, keep_means=keep_means)


def rescore(traj: Trajectory, velocity_fn: VelocityFn, cond=None, *,
            index: Optional[Tensor] = None, kind: Optional[str] = None) -> SDEStepOutput:
    """Recompute the log-prob of stored transitions under the current velocity_fn.

    Runs with gradients enabled (call it inside ``torch.no_grad()`` for the reference policy).
    Transitions that leave the same state (tree siblings, G²RPO group members) share one
    velocity evaluation. With the sampling-time weights it returns ``traj.logp`` — bit for bit
    when the model sees the same rows per call as during sampling (e.g. one step's transitions
    per call); otherwise up to the model's batch-composition rounding (~1e-7).

    Args:
        traj: a sampler's :class:`Trajectory`.
        velocity_fn: the policy's (or reference's) velocity function.
        cond: the same cond the sampler got (rows are picked with ``traj.cond_index``).
        index: ``[m]`` transitions to re-score (a micro-batch); default all M.
        kind: defaults to ``traj.kind``.

    Returns:
        :class:`SDEStepOutput` for the selected transitions (logp ``[m]``, mean, std ``[m]``).
    """
    idx = torch.arange(traj.num_transitions) if index is None else torch.as_tensor(index)
    # Transitions leaving the same state (tree siblings, G²RPO members) share one evaluation:
    # [m] -> [u] unique start states, and back with inv.
    src_u, inv = torch.unique(traj.src[idx], return_inverse=True)
    pos = torch.zeros_like(src_u).scatter_reduce(0, inv, torch.arange(idx.shape[0]), "amin",
                                                 include_self=False)  # first row of each state
    first = idx[pos]
    x_u = traj.states[src_u]
    v_u = call_velocity(velocity_fn, x_u, traj.sigmas.to(x_u)[traj.step[first]],
                        take_cond(cond, traj.cond_index[first]))
    return sde_step(x_u[inv], v_u[inv], traj.sigmas, traj.step[idx], kind=kind or traj.kind,
                    noise_level=traj.noise_level[idx], prev_sample=traj.states[traj.dst[idx]])
