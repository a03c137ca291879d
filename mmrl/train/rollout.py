"""What a policy's rollout holds: :class:`Rollout` (B sampled completions and what is needed to
re-score them) and :func:`concat_rollouts` (several rollouts as one)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["Rollout", "concat_off_policy", "concat_rollout_logp", "concat_rollouts"]


@dataclass
class Rollout:
    """B sampled completions (G groups of N) and what is needed to re-score them.

    Attributes:
        samples: B outputs handed to the reward (strings, images, ...).
        prompts: B prompts (a group's samples repeat their prompt).
        metadata: B dicts (ground truth etc.).
        group_ids: ``[B]`` long, equal for samples of the same prompt.
        mask: ``[B, T]`` bool, True where a token / trained step counts.
        data: policy payload; tensors / lists with leading dim B are sliced by :meth:`select`.
        skipped: inputs the policy could not use in this rollout, counted by reason (e.g.
            ``{"corrupt": 2}`` for unreadable videos); a run whose steps end up with no sample
            names them when it stops.
        row_keep: ``[B]`` bool, or None (every row counts). Rows set False stay in the rollout
            but count as no sequence in the loss's normalizer (their mask is all False too): FSDP
            keeps rows whose reward failed so every rank runs the same forwards.
        nfe: model evaluations the rollout spent, counted per sample row (a flow sampler's
            ``Trajectory.nfe``); 0 when the policy does not count them. The runner reports the
            sum over ranks as ``nfe`` and ``nfe_per_sec``. A cost: :meth:`select` keeps it.
        rollout_logp: ``[B, T]`` float, the sampler's log-probs of what it sampled (tokens, or
            SDE transitions), under the distribution the policy's ``logp`` scores (0 on
            padding); None when the policy does not report them. The rollout correction
            (``algo.rollout_is``, :mod:`mmrl.algo.offpolicy`) weights by π_old/π_rollout.
            Rows follow :meth:`select`; :func:`concat_rollouts` right-pads it like ``mask``.
        mini_batch: ``[B]`` long, or None (the loop draws random mini-batches). A fixed
            partition: with ``train.num_mini_batches = K`` the update's mini-batch j is the rows
            labelled j, stepped in order j = 0 … K−1 (G²RPO's optimizer step per SDE step).
        off_policy: ``[B]`` bool, or None (no row): True for a row sampled under another prompt
            than the one it is trained for (Guide's hinted rows, retargeted to the plain prompt;
            ``rollout_logp`` then holds the hinted prompt's log-probs). ``algo.off_policy_shaping``
            shapes these rows' ratio (:func:`mmrl.algo.offpolicy.shape_off_policy`).
    """

    samples: List[Any]
    prompts: List[Any]
    metadata: List[Dict[str, Any]]
    group_ids: torch.Tensor
    mask: torch.Tensor
    data: Dict[str, Any] = field(default_factory=dict)
    # Group id of each *sample* (reward row) when training rows are not the reward rows
    # (policies with an ``advantages`` hook); None = the same as ``group_ids``.
    reward_group_ids: Optional[torch.Tensor] = None
    skipped: Dict[str, int] = field(default_factory=dict)
    row_keep: Optional[torch.Tensor] = None
    nfe: int = 0
    rollout_logp: Optional[torch.Tensor] = None
    mini_batch: Optional[torch.Tensor] = None
    off_policy: Optional[torch.Tensor] = None

    @property
    def sample_group_ids(self) -> torch.Tensor:
        """``[len(samples)]`` group ids of the rewarded samples: ``reward_group_ids``, or else
        the first ``len(samples)`` training rows' (reward rows laid out first, e.g. tree leaves)."""
        if self.reward_group_ids is not None:
            return self.reward_group_ids
        return self.group_ids[:len(self.samples)]

    def __len__(self) -> int:
        """Training rows (``mask.shape[0]``); equal to ``len(samples)`` unless the policy
        trains rows that are not reward rows (tree edges, see ``GroupPolicy.advantages``)."""
        return int(self.mask.shape[0])

    def fixed_mini_batches(self, k: int) -> Optional[List[torch.Tensor]]:
        """The rows of each of ``k`` mini-batches (label order) when ``mini_batch`` fixes them,
        else None.

        Raises:
            ValueError: a label outside ``0 .. k-1``.
        """
        labels = self.mini_batch
        if labels is None:
            return None
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(f"the rollout fixes mini-batches {sorted(set(labels.tolist()))} but "
                             f"train.num_mini_batches={k}; set it to the policy's count")
        return [(labels == j).nonzero().flatten() for j in range(k)]

    def select(self, rows: torch.Tensor) -> "Rollout":
        """The rollout restricted to ``rows`` (a ``[B]`` bool mask or a LongTensor of indices)."""
        idx = rows.nonzero().flatten() if rows.dtype == torch.bool else rows
        pick = idx.tolist()
        data = {k: _take(v, idx, pick, len(self)) for k, v in self.data.items()}
        return Rollout([self.samples[i] for i in pick], [self.prompts[i] for i in pick],
                       [self.metadata[i] for i in pick], self.group_ids[idx], self.mask[idx],
                       data, skipped=dict(self.skipped),
                       row_keep=None if self.row_keep is None else self.row_keep[idx],
                       nfe=self.nfe, rollout_logp=None if self.rollout_logp is None
                       else self.rollout_logp[idx.to(self.rollout_logp.device)],
                       mini_batch=None if self.mini_batch is None else self.mini_batch[idx],
                       off_policy=None if self.off_policy is None else self.off_policy[idx])

    def sampler_terms(self, rows: torch.Tensor, t0: int, t1: int,
                      like: torch.Tensor) -> Dict[str, Any]:
        """The loss's sampler inputs for ``rows`` and steps ``[t0, t1)``: ``rollout_logp`` (in
        ``like``'s dtype and device, or None) and, when rows are flagged, ``off_policy``."""
        out: Dict[str, Any] = {"rollout_logp": None if self.rollout_logp is None
                               else self.rollout_logp[rows, t0:t1].to(like)}
        if self.off_policy is not None:
            out["off_policy"] = self.off_policy[rows].to(like.device)
        return out


def _take(value, idx, pick, n):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[idx.to(value.device)]
    if isinstance(value, list) and len(value) == n:
        return [value[i] for i in pick]
    return value  # shared across samples (e.g. one prompt embedding table)


def concat_rollouts(parts: Sequence[Any]) -> Any:
    """One rollout from several (dynamic sampling's tries): rows stacked; ``mask`` and 2-D+
    ``data`` tensors right-padded along dim 1 to the longest. Policies whose payload needs
    something else (left padding, ...) provide ``policy.concat_rollouts``."""
    if len(parts) == 1:
        return parts[0]
    T = max(p.mask.shape[1] for p in parts)
    mask = torch.cat([F.pad(p.mask, (0, T - p.mask.shape[1])) for p in parts])
    data = {}
    for k, v in parts[0].data.items():
        vals = [p.data[k] for p in parts]
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == len(parts[0]):
            if v.dim() >= 2:
                L = max(x.shape[1] for x in vals)
                vals = [F.pad(x, (0, 0) * (x.dim() - 2) + (0, L - x.shape[1])) for x in vals]
            data[k] = torch.cat(vals)
        elif isinstance(v, list) and len(v) == len(parts[0]):
            data[k] = [x for val in vals for x in val]
        else:
            data[k] = v
    skipped: Dict[str, int] = {}
    for p in parts:
        for reason, n in p.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    keep = None
    if any(p.row_keep is not None for p in parts):  # a part without one keeps every row
        keep = torch.cat([p.row_keep if p.row_keep is not None else
                          torch.ones(len(p), dtype=torch.bool) for p in parts])
    return Rollout([x for p in parts for x in p.samples], [x for p in parts for x in p.prompts],
                   [x for p in parts for x in p.metadata],
                   torch.cat([p.group_ids for p in parts]), mask, data, skipped=skipped,
                   row_keep=keep, nfe=sum(p.nfe for p in parts),
                   rollout_logp=concat_rollout_logp(parts, T),
                   mini_batch=None if any(p.mini_batch is None for p in parts)
                   else torch.cat([p.mini_batch for p in parts]),
                   off_policy=concat_off_policy(parts))


def concat_rollout_logp(parts: Sequence[Any], T: int) -> Optional[torch.Tensor]:
    """The parts' ``rollout_logp`` stacked, right-padded with 0 to ``T``; None unless every part
    has one (a part without would leave rows the correction cannot weight)."""
    if any(p.rollout_logp is None for p in parts):
        return None
    return torch.cat([F.pad(p.rollout_logp, (0, T - p.rollout_logp.shape[1])) for p in parts])


def concat_off_policy(parts: Sequence[Any]) -> Optional[torch.Tensor]:
    """The parts' ``off_policy`` flags stacked (False for the rows of a part without); None when
    no part has any."""
    if all(getattr(p, "off_policy", None) is None for p in parts):
        return None
    return torch.cat([p.off_policy.bool() if p.off_policy is not None
                      else torch.zeros(len(p), dtype=torch.bool) for p in parts])
