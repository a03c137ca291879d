"""Advantages for the diffusion samplers, built on :func:`mmrl.algo.advantages.group_advantages`.

- :func:`prompt_advantages`: flow_grpo's per-prompt tracker with a global std (``batch_std`` with
  groups keyed by prompt text), for :func:`~mmrl.diffusion.sample_sde` batches.
- :func:`g2rpo_advantages`: G²RPO, group-normalized per (k, granularity)
  (:func:`g2rpo_granular_advantages`), summed over granularities.
- :func:`tree_advantages`: BranchGRPO / Dynamic-TreeRPO, node reward = mean of its leaves,
  normalized per depth within each tree.

All return advantages aligned with a trajectory's owners: transition m trains with
``adv[traj.owner[m]]``. Non-finite rewards (a scorer that failed on an image) are left out of
every mean and std and their rows get advantage 0, so one bad image neither poisons its group nor
stops the run; count them with ``(~torch.isfinite(rewards)).sum()`` for the logs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from mmrl.algo.advantages import group_advantages
from mmrl.diffusion.g2rpo import SingularTrajectory
from mmrl.diffusion.samplers import TreeTrajectory

Tensor = torch.Tensor


def _finite_group_advantages(values: Tensor, groups: Tensor, method: str, **kw) -> Tensor:
    """``group_advantages`` over the finite entries only; non-finite entries get 0."""
    ok = torch.isfinite(values)
    out = torch.zeros_like(values)
    if bool(ok.any()):
        out[ok] = group_advantages(values[ok], groups[ok], method, **kw)
    return out


def prompt_ids(prompts: Sequence[str]) -> Tensor:
    """``[B]`` group id per prompt text, numbered in order of first appearance."""
    seen: dict = {}
    return torch.tensor([seen.setdefault(p, len(seen)) for p in prompts], dtype=torch.long)


def prompt_advantages(rewards: Tensor, prompts: Union[Sequence[str], Tensor], *,
                      eps: float = 1e-4, adv_clip: Optional[float] = None) -> Tensor:
    """A_i = (r_i − mean_{prompt(i)}) / (std_batch + eps): flow_grpo's ``PerPromptStatTracker``
    with ``global_std=True`` (arXiv 2505.05470), i.e. the core's ``batch_std`` keyed by prompt.

    Differs from flow_grpo: the batch std is unbiased (ALGORITHMS.md), flow_grpo's ``np.std`` is
    not (a factor sqrt(B/(B−1)), 1 % at B = 48). Gather rewards across ranks before calling.

    Args:
        rewards: ``[B]`` float, finite.
        prompts: B prompt strings (equal text = same group) or a ``[B]`` integer group id tensor.
        eps: added to the std (1e-4 as flow_grpo). adv_clip: clamp to ±adv_clip (flow_grpo: 5).

    Returns:
        ``[B]`` advantages (a prompt whose rewards are all equal gets 0).
    """
    ids = prompts if isinstance(prompts, Tensor) else prompt_ids(prompts)
    if ids.shape[0] != rewards.shape[0]:
        raise ValueError(f"got {rewards.shape[0]} rewards but {ids.shape[0]} prompts; pass one "
                         f"prompt per sample")
    return _finite_group_advantages(rewards, ids.to(rewards.device), "batch_std", eps=eps,
                                    adv_clip=adv_clip)


def g2rpo_granular_advantages(rewards: Tensor, traj: SingularTrajectory, *, eps: float = 1e-8,
                              adv_clip: Optional[float] = None) -> Tensor:
    """A_{m,g} = (r_{m,g} − mean_{group,g}) / (std_{group,g} + eps): G²RPO's per-granularity
    advantages, before the sum over g (:func:`g2rpo_advantages`).

    G²RPO (arXiv 2510.01982) Eq. 11: each (prompt, k, g) group of N members is normalized on its
    own (unbiased std, eps 1e-8 as the authors' code). A non-finite reward (a scorer that failed)
    is left out of its group's mean and std and its own entry gets 0; a group left with one
    finite member gives it 0.

    Args:
        rewards: ``[M·G]`` in the trajectory's output order (o = m·G + g), or ``[M, G]``.
        traj: the :class:`SingularTrajectory` the rewards belong to.
        eps, adv_clip: as :func:`prompt_advantages` (the clip acts on each A_{m,g}).

    Returns:
        ``[M, G]`` (``.reshape(-1)`` gives output order).

    Raises:
        ValueError: a reward count other than M·G.
    """
    M, G = traj.group_ids.shape[0], len(traj.granularities)
    if rewards.numel() != M * G:
        raise ValueError(f"got {tuple(rewards.shape)} rewards for {M} members x {G} granularities;"
                         f" expected [{M * G}] in output order (or [{M}, {G}])")
    columns = rewards.reshape(M, G)  # output o = m·G + g -> [M, G]
    groups = traj.group_ids.to(rewards.device)
    adv = torch.stack([_finite_group_advantages(columns[:, g], groups, "grpo", eps=eps)
                       for g in range(G)], 1)  # G x [M] -> [M, G]
    return adv if adv_clip is None else adv.clamp(-adv_clip, adv_clip)


def g2rpo_advantages(rewards: Tensor, traj: SingularTrajectory, *, eps: float = 1e-8,
                     adv_clip: Optional[float] = None) -> Tensor:
    """A_m = Σ_g (r_{m,g} − mean_{group,g}) / (std_{group,g} + eps): G²RPO's integrated advantage.

    G²RPO (arXiv 2510.01982) Eq. 11: the sum over granularities of
    :func:`g2rpo_granular_advantages` (the core's ``normalize_then_sum`` with base ``grpo``, one
    column at a time so that a non-finite reward drops only its own (member, g) entry).

    Args:
        rewards: ``[M·G]`` in the trajectory's output order, or ``[M, G]``; may hold NaN / inf.
        traj: the :class:`SingularTrajectory` the rewards belong to.
        eps, adv_clip: as :func:`prompt_advantages` (the clip acts on the sum).

    Returns:
        ``[M]`` one advantage per member (= per trained transition, ``traj.owner`` is arange(M)).

    Raises:
        ValueError: a reward count other than M·G.
    """
    per_g = g2rpo_granular_advantages(rewards, traj, eps=eps)  # [M, G]
    adv = sum(per_g[:, g] for g in range(per_g.shape[1]))
    return adv if adv_clip is None else adv.clamp(-adv_clip, adv_clip)


def tree_node_rewards(leaf_rewards: Tensor, traj: TreeTrajectory) -> Tensor:
    """``[Nn]`` reward of every node = mean of the rewards of the leaves below it (a leaf: its own).

    Non-finite leaf rewards are left out; a node with no finite leaf gets NaN.

    Args:
        leaf_rewards: ``[B]`` reward of each output (``traj.leaves`` order).
        traj: the :class:`TreeTrajectory`.
    """
    if leaf_rewards.dim() != 1 or leaf_rewards.shape[0] != traj.leaves.shape[0]:
        raise ValueError(f"leaf_rewards has shape {tuple(leaf_rewards.shape)}; expected "
                         f"[{traj.leaves.shape[0]}] (one reward per leaf, in traj.leaves order)")
    r = leaf_rewards.float() if not leaf_rewards.is_floating_point() else leaf_rewards
    ok = torch.isfinite(r)
    r = torch.where(ok, r, torch.zeros_like(r))
    total = torch.zeros(traj.num_nodes, dtype=r.dtype, device=r.device)
    count = torch.zeros_like(total)
    node, parent = traj.leaves.to(r.device), traj.parent.to(r.device)
    alive = torch.ones_like(node, dtype=torch.bool)
    # Walk every leaf up to its root (as many hops as splits), adding it to each ancestor.
    while bool(alive.any()):
        total.index_add_(0, node[alive], r[alive])
        count.index_add_(0, node[alive], ok[alive].to(r.dtype))
        node = torch.where(alive, parent[node.clamp(min=0)], node)
        alive = alive & (node >= 0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, torch.nan))


def tree_advantages(leaf_rewards: Tensor, traj: TreeTrajectory, *, eps: float = 1e-4,
                    adv_clip: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Per-node advantages normalized per depth within each tree (BranchGRPO arXiv 2509.06040).

    A_n = (R_n − mean_{tree,depth}) / (std_{tree,depth} + eps) over the nodes of the same depth in
    the same tree, with R_n the mean of n's leaves (unbiased std; a depth with a single node, the
    root included, gets 0). Edge parent -> child and the child's own SDE steps train with A_child.

    Args:
        leaf_rewards: ``[B]`` per leaf. traj: its :class:`TreeTrajectory`.
        eps, adv_clip: as :func:`prompt_advantages`.

    Returns:
        ``(advantages [Nn], node_rewards [Nn])``; transition m uses ``advantages[traj.owner[m]]``.
        A node with no finite leaf reward has reward NaN and advantage 0.
    """
    node_r = tree_node_rewards(leaf_rewards, traj)
    depth, tree = traj.depth.to(node_r.device), traj.node_cond.to(node_r.device)
    group = tree * (int(depth.max()) + 1) + depth  # one group per (tree, depth)
    return _finite_group_advantages(node_r, group, "grpo", eps=eps, adv_clip=adv_clip), node_r
