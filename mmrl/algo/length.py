"""Length and thinking-mode rewards of a group: ``correct [B]`` (bool), per-row lengths or exit
positions, ``group_ids [B]`` -> one reward column ``[B]`` to add to (or put in place of) the
task's accuracy before the advantages.

- :func:`kimi_length_reward`: Kimi k1.5's length reward (arXiv 2501.12599 §2.3.3),
  λ_i = 0.5 − (L_i − min_g L)/(max_g L − min_g L); λ for correct rows, min(0, λ) for wrong ones.
- :func:`switched_length_reward`: GRPO-λ (arXiv 2505.18086, *unconfirmed*): the length reward
  only in groups whose accuracy reaches a threshold, plain 0/1 elsewhere.
- :func:`serial_decay_reward`: S-GRPO's decaying reward (arXiv 2505.07686, *unconfirmed*):
  correct rows ordered by exit position get decay^k (k = earlier correct rows), wrong rows 0.
- :func:`mode_reward`: KAT-V1 / Step-SRPO's mode supervision as mmrl reads its abstract
  (arXiv 2507.08297, *unconfirmed*): 1 for rows in the group's more accurate mode.

Every function is vectorized over groups (``index_add_`` / ``scatter_reduce``), returns float32
and never reads back to the host. A size-1 group is defined (it is its own min and max).
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["kimi_length_reward", "switched_length_reward", "serial_decay_reward",
           "mode_reward", "group_accuracy"]


def _check(correct: torch.Tensor, values: torch.Tensor, group_ids: torch.Tensor,
           what: str) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """``(inverse group index [B], values as float [B], G)`` after shape/dtype checks."""
    if not isinstance(correct, torch.Tensor) or correct.dtype != torch.bool:
        raise TypeError(f"correct must be a bool tensor [B], got "
                        f"{getattr(correct, 'dtype', type(correct).__name__)}; pass "
                        f"(accuracy >= threshold)")
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}; pass "
                        f"group_ids.long()")
    if not (correct.dim() == values.dim() == group_ids.dim() == 1
            and len(correct) == len(values) == len(group_ids)):
        raise ValueError(f"shapes correct {tuple(correct.shape)}, {what} "
                         f"{tuple(values.shape)}, group_ids {tuple(group_ids.shape)}; "
                         f"expected three [B] tensors (one entry per row)")
    uniq, inv = torch.unique(group_ids, return_inverse=True)  # G from the output's shape
    return inv, values.to(torch.float32), uniq.numel()


def group_accuracy(correct: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``[B]``: the fraction of correct rows in each row's group."""
    inv, c, G = _check(correct, correct.float(), group_ids, "correct")
    hits = c.new_zeros(G).index_add_(0, inv, c)
    count = c.new_zeros(G).index_add_(0, inv, torch.ones_like(c))
    return (hits / count)[inv]


def kimi_length_reward(correct: torch.Tensor, lengths: torch.Tensor,
                       group_ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` length reward of Kimi k1.5 (arXiv 2501.12599 §2.3.3, "length penalty").

    λ_i = 0.5 − (L_i − min_g L)/(max_g L − min_g L); reward λ_i for a correct row and
    min(0, λ_i) for a wrong one: the shortest row of a group gets +0.5, the longest −0.5 (wrong
    rows never gain from being short). A group whose rows all have one length gets 0.

    Args:
        correct: ``[B]`` bool. lengths: ``[B]`` token counts. group_ids: ``[B]`` integer.

    Raises:
        TypeError / ValueError: wrong dtypes or shapes.
    """
    inv, L, G = _check(correct, lengths, group_ids, "lengths")
    lo = L.new_full((G,), torch.inf).scatter_reduce(0, inv, L, reduce="amin")
    hi = L.new_full((G,), -torch.inf).scatter_reduce(0, inv, L, reduce="amax")
    span = (hi - lo)[inv]
    lam = torch.where(span > 0, 0.5 - (L - lo[inv]) / span.clamp(min=1e-12), torch.zeros_like(L))
    return torch.where(correct, lam, lam.clamp(max=0.0))


def switched_length_reward(correct: torch.Tensor, lengths: torch.Tensor,
                           group_ids: torch.Tensor, *, min_accuracy: float) -> torch.Tensor:
    """``[B]`` GRPO-λ's switch (arXiv 2505.18086): :func:`kimi_length_reward` in groups whose
    accuracy is at least ``min_accuracy``, 0 elsewhere (their reward stays the plain 0/1).

    Unconfirmed: only the abstract was reachable ("a low correctness ratio ... triggering a
    switch to length-agnostic 0/1 rewards ... a high ratio maintains length penalties"); the
    threshold rule, its value and the penalty's form (Kimi k1.5's, which the paper cites as the
    length penalty it stabilizes) are mmrl's reading. A summary of the full text describes a
    batch-wise top-λ selection of groups instead of a fixed threshold (not built).

    Raises:
        ValueError: ``min_accuracy`` outside [0, 1]; as :func:`kimi_length_reward`.
    """
    if not 0.0 <= min_accuracy <= 1.0:
        raise ValueError(f"min_accuracy={min_accuracy!r}; expected a group accuracy in [0, 1]")
    on = group_accuracy(correct, group_ids) >= min_accuracy
    return torch.where(on, kimi_length_reward(correct, lengths, group_ids), 0.0)


def serial_decay_reward(correct: torch.Tensor, exit_pos: torch.Tensor, group_ids: torch.Tensor,
                        *, decay: float) -> torch.Tensor:
    """``[B]`` S-GRPO's decaying reward (arXiv 2505.07686): a correct row gets decay^k, k = the
    number of correct rows of its group that exit earlier (smaller ``exit_pos``; ties in row
    order); a wrong row gets 0. decay = 0.5 gives 1, 1/2, 1/4, ... from front to back.

    Unconfirmed: the abstract pins only "for the correct answers in a serial group, rewards
    that decay according to positions, with lower rewards towards the later ones"; the
    geometric form in the rank among correct answers is mmrl's (decay 0.5 is the form
    1/2^(N_right − 1) we recall from the paper, not checked against a reachable copy).

    Raises:
        ValueError: ``decay`` outside (0, 1]; as :func:`kimi_length_reward`.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay={decay!r}; expected 0 < decay <= 1 (1: no decay)")
    inv, pos, G = _check(correct, exit_pos, group_ids, "exit_pos")
    order = torch.argsort(pos, stable=True)
    order = order[torch.argsort(inv[order], stable=True)]  # by group, then position, then row
    c = correct[order].float()
    before = torch.cumsum(c, 0) - c  # correct rows earlier in the sorted batch
    start = pos.new_zeros(G).index_add_(0, inv, correct.float()).cumsum(0)
    start = torch.cat([pos.new_zeros(1), start[:-1]])  # correct rows of the groups before
    k = torch.empty_like(before)
    k[order] = before - start[inv[order]]
    return torch.where(correct, torch.full_like(k, float(decay)) ** k, torch.zeros_like(k))


def mode_reward(correct: torch.Tensor, thinks: torch.Tensor,
                group_ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` 1 for a row whose mode (think / no-think) is the more accurate one of its group,
    else 0 (KAT-V1 AutoThink's mode supervision, arXiv 2507.08297, as mmrl reads it).

    Per group, a_T and a_N are the accuracies of its thinking and non-thinking rows; the better
    mode is think when a_T > a_N, no-think otherwise (a tie favours the cheaper no-think mode).
    A group with rows of one mode only gives no mode signal: 0 for every row.
    Unconfirmed: the abstract says only that Step-SRPO "incorporates intermediate supervision
    into the GRPO framework, offering structured guidance over both reasoning-mode selection
    and response accuracy" and that mode priors come from majority-vote signals; this
    majority-by-accuracy rule, its tie break and the 0/1 values are mmrl's.

    Raises:
        TypeError / ValueError: ``thinks`` not bool; as :func:`kimi_length_reward`.
    """
    if not isinstance(thinks, torch.Tensor) or thinks.dtype != torch.bool:
        raise TypeError(f"thinks must be a bool tensor [B] (True = the row thought), got "
                        f"{getattr(thinks, 'dtype', type(thinks).__name__)}")
    inv, t, G = _check(correct, thinks.float(), group_ids, "thinks")
    c = correct.float()
    acc = {}
    for name, rows in (("think", t), ("plain", 1.0 - t)):
        n = c.new_zeros(G).index_add_(0, inv, rows)
        acc[name] = (c.new_zeros(G).index_add_(0, inv, rows * c) / n.clamp(min=1), n > 0)
    both = acc["think"][1] & acc["plain"][1]
    think_better = acc["think"][0] > acc["plain"][0]  # [G]
    right = torch.where(thinks, think_better[inv], ~think_better[inv])
    return (right & both[inv]).float()
