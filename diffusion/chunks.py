"""One rollout from the chunks of a round (``train.reward_chunks``, :mod:`mmrl.train.async_reward`):
the diffusion policy's ``concat_rollouts``.

A chunk's rollout keeps its trajectory whole in ``data["trajectory"]`` (shared by its rows,
indexed by ``data["index"]``); the generic :func:`mmrl.train.rollout.concat_rollouts` would keep
the first chunk's only. Here the trajectories are merged (states, transitions and cond rows
stacked; the indices into them shifted by the preceding chunks' sizes), so every row re-scores
exactly the transitions it was sampled with. The matching objectives' rollouts (``x0``,
``prompt_row`` into the prompts' ``cond``) get their cond rows stacked the same way.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, List, Sequence

import torch
import torch.nn.functional as F

from mmrl.diffusion.samplers import Trajectory, _cond_rows
from mmrl.train.rollout import Rollout, concat_rollouts

__all__ = ["concat_diffusion_rollouts"]


def _cat_cond(conds: Sequence[Any]):
    """Cond rows stacked (None, a tensor, or a tuple/list/dict of tensors of one layout)."""
    first = conds[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        width = max(c.shape[1] for c in conds) if first.dim() > 1 else None
        if width is not None and any(c.shape[1] != width for c in conds):
            raise ValueError(f"chunk prompt embeddings have {[c.shape[1] for c in conds]} tokens; "
                             f"the chunks of a round must encode to one length (set "
                             f"diffusion.max_sequence_length) or use train.reward_chunks=1")
        return torch.cat(list(conds))
    if isinstance(first, dict):
        return {k: _cat_cond([c[k] for c in conds]) for k in first}
    return type(first)(_cat_cond([c[i] for c in conds]) for i in range(len(first)))


def _offsets(sizes: Sequence[int]) -> List[int]:
    return torch.tensor([0] + list(sizes[:-1])).cumsum(0).tolist()


def merge_trajectories(trajs: Sequence[Trajectory], conds: Sequence[Any]):
    """``(trajectory, cond, transition offsets, owner offsets)`` of the chunks' trajectories."""
    if type(trajs[0]) is not Trajectory:
        raise ValueError(f"cannot merge {type(trajs[0]).__name__} rollouts (tree / singular "
                         f"sampling); set train.reward_chunks=1")
    if any(not torch.equal(t.sigmas, trajs[0].sigmas) for t in trajs):
        raise ValueError("the chunks of a round were sampled on different sigma grids")
    rows = _offsets([_cond_rows(c) or t.final.shape[0] for t, c in zip(trajs, conds)])
    states = _offsets([t.states.shape[0] for t in trajs])
    moves = _offsets([t.num_transitions for t in trajs])
    owners = _offsets([t.final.shape[0] for t in trajs])
    shift = {"src": states, "dst": states, "owner": owners, "output_cond": rows,
             "cond_index": rows}
    merged = {}
    for f in fields(Trajectory):
        vals = [getattr(t, f.name) for t in trajs]
        if f.name in ("sigmas", "kind"):
            merged[f.name] = vals[0]
        elif f.name == "nfe":
            merged[f.name] = sum(int(v) for v in vals)
        elif f.name == "means" and any(v is None for v in vals):
            merged[f.name] = None
        else:
            off = shift.get(f.name, [0] * len(vals))
            merged[f.name] = torch.cat([v + o if o else v for v, o in zip(vals, off)])
    return Trajectory(**merged), _cat_cond(conds), moves, owners


def concat_diffusion_rollouts(parts: Sequence[Rollout], shared_cls) -> Rollout:
    """The chunks' rollouts as one (rows in chunk order); ``shared_cls`` wraps the merged
    ``(trajectory, cond)`` as the policy stores it."""
    if len(parts) == 1:
        return parts[0]
    if "trajectory" in parts[0].data:  # log-prob (grpo) rollouts
        shared = [p.data["trajectory"] for p in parts]
        traj, cond, moves, owners = merge_trajectories([s.traj for s in shared],
                                                       [s.cond for s in shared])
        K = max(p.mask.shape[1] for p in parts)
        index = torch.cat([F.pad(p.data["index"] + m, (0, K - p.mask.shape[1]))
                           for p, m in zip(parts, moves)])
        final = torch.cat([torch.where(p.data["final_row"] >= 0, p.data["final_row"] + o, -1)
                           for p, o in zip(parts, owners)])
        data = {"index": index, "final_row": final, "trajectory": shared_cls(traj, cond)}
    else:  # matching rollouts: x0 rows, prompt_row into the prompts' cond
        rows = _offsets([_cond_rows(p.data["cond"]) for p in parts])
        data = {"x0": torch.cat([p.data["x0"] for p in parts]),
                "prompt_row": torch.cat([p.data["prompt_row"] + o for p, o in zip(parts, rows)]),
                "cond": _cat_cond([p.data["cond"] for p in parts])}
    plain = [replace(p, data={}) for p in parts]  # rows, mask, logp, counts: the generic join
    out = concat_rollouts(plain)
    out.data = data
    return out
