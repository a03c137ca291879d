"""How many rollouts go where: Knapsack allocation across prompts and DAPO dynamic sampling.

- :func:`knapsack_allocate` (Knapsack RL, arXiv 2509.25849): split a batch's rollout budget across
  its prompts by their estimated success rates, so saturated prompts (p ≈ 0 or 1) get few
  rollouts and uncertain ones many. The result feeds variable group sizes to the trainers through
  :func:`expand_groups` (the core's advantages take arbitrary ``group_ids``).
- :class:`DynamicSampling` (DAPO, arXiv 2503.14476): roll out, drop groups whose rewards are all
  equal, and roll out again until the batch is full, with a bounded number of tries.

Formulas: ALGORITHMS.md, "Rollout budget and prompt selection".
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, List, Tuple

import torch

from mmrl.registry import Registry

VALUES: Registry = Registry("rollout value")


def _as_probs(p) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=torch.float64)
    if not torch.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("success probabilities must be finite and in [0, 1]; got values in "
                         f"[{float(p.min())}, {float(p.max())}]; pass estimated success rates, "
                         "e.g. selector.success_probs()[idx]")
    return p


def nonzero_gradient_prob(p, n) -> torch.Tensor:
    """``P(a group of n rollouts has non-equal rewards) = 1 − p^n − (1 − p)^n``.

    Knapsack RL (arXiv 2509.25849) §3, "ProbNonZeroGradient". ``n >= 1``.
    """
    p, n = _as_probs(p), torch.as_tensor(n, dtype=torch.float64)
    return 1.0 - p.pow(n) - (1.0 - p).pow(n)


@VALUES.register("knapsack_rl")
def rollout_value(p, n) -> torch.Tensor:
    """Value of giving a prompt with success rate p n rollouts: ``(1 − p^n − (1−p)^n)·p(1−p)²``.

    Knapsack RL (arXiv 2509.25849) §3: task value = ProbNonZeroGradient(n, p) × InfoGain(p),
    with InfoGain(p) ≈ p(1 − p)² (the expected gain in success rate from one update).
    Broadcasts ``p`` and ``n``; float64.
    """
    p = _as_probs(p)
    return nonzero_gradient_prob(p, n) * p * (1.0 - p) ** 2


@VALUES.register("nonzero_prob")
def _nonzero_value(p, n) -> torch.Tensor:
    """Expected number of informative groups: ``1 − p^n − (1−p)^n`` (no InfoGain weight)."""
    return nonzero_gradient_prob(p, n)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, (bool, float)) or not isinstance(value, numbers.Integral) \
            or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_allocation(success_probs, budget: int, n_min: int, n_max: int) -> torch.Tensor:
    p = _as_probs(success_probs)
    if p.dim() != 1 or p.numel() == 0:
        raise ValueError(f"success_probs must be a non-empty 1-D tensor [P], got shape "
                         f"{tuple(p.shape)}")
    n_min = _check_int("n_min", n_min, 1)
    _check_int("n_max", n_max, n_min)
    _check_int("budget", budget, 0)
    num = p.numel()
    if not num * n_min <= budget <= num * n_max:
        raise ValueError(f"budget {budget} cannot be split over {num} prompts with {n_min} <= "
                         f"N_i <= {n_max}: it must lie in [{num * n_min}, {num * n_max}]; change "
                         "budget, n_min or n_max")
    return p


def knapsack_allocate(success_probs: torch.Tensor, budget: int, n_min: int = 2,
                      n_max: int = 128, value: str = "knapsack_rl") -> torch.Tensor:
    """Rollouts per prompt ``N [P]`` maximizing ``Σ_i v(p_i, N_i)`` s.t. ``Σ N_i = budget``.

    Knapsack RL (arXiv 2509.25849) §3: each (prompt, rollout count) is a knapsack item; subject
    to ``n_min <= N_i <= n_max``.

    Exact greedy, not DP: ``v(p, ·)`` is concave in n, its marginal gain
    ``v(p, n+1) − v(p, n) = c·(p^n (1−p) + (1−p)^n p)`` with ``c = p(1−p)²`` never increases with
    n. For a separable concave objective under one sum constraint, the value of any allocation
    is ``Σ_i v(p_i, n_min)`` plus the sum of the marginal gains it takes, and each prompt's gains
    come as a prefix; so taking the ``budget − P·n_min`` largest gains over all (prompt, n) is
    optimal (Gross 1956; Ibaraki & Katoh 1988). Ties go to the smaller n, then the lower index,
    which spreads budget evenly across prompts of equal value (e.g. all unseen, all solved).
    Tests check optimality against brute-force enumeration. Cost: one sort of
    ``P·(n_max − n_min)`` gains.

    A prompt with p̂ ∈ {0, 1} has value 0 at every n, so it gets ``n_min`` unless the budget is
    larger than the valued prompts can use; then ties spread the rest evenly.

    Differs from paper: the paper adds special handling for prompts whose previous-epoch rate is
    exactly 0 or 1; its exact rule could not be checked here (the paper's text was not
    reachable), so mmrl does not reproduce it: such prompts get ``n_min``.

    Args:
        success_probs: ``[P]`` estimated success rates in [0, 1].
        budget: total rollouts for these P prompts.
        n_min: rollouts every prompt gets at least (>= 1; 2 is the least with a GRPO signal).
        n_max: cap per prompt.
        value: a name in ``VALUES`` (``knapsack_rl``: the paper; ``nonzero_prob``: expected
            number of informative groups). Must be concave in n (checked).

    Returns:
        LongTensor ``[P]`` with ``N.sum() == budget``.

    Raises:
        ValueError: budget outside ``[P·n_min, P·n_max]``, bad bounds or probabilities, a value
            that is not concave in n.
    """
    p = _check_allocation(success_probs, budget, n_min, n_max)
    budget, n_min, n_max = int(budget), int(n_min), int(n_max)
    num, fn = p.numel(), VALUES.get(value)
    n = torch.arange(n_min, n_max + 1, dtype=torch.float64)
    gains = torch.diff(fn(p[:, None], n[None, :]), dim=1)  # [P, n_max - n_min]
    if (torch.diff(gains, dim=1) > 1e-12).any():
        raise ValueError(f"rollout value {value!r} is not concave in n for these probabilities; "
                         "the greedy allocation is only exact for concave values")
    extra = budget - num * n_min
    counts = torch.full((num,), n_min, dtype=torch.long)
    if extra:
        flat = gains.t().reshape(-1)  # column-major: ties order by n, then by prompt
        order = torch.sort(flat, descending=True, stable=True).indices[:extra]
        counts += torch.bincount(order % num, minlength=num)
    return counts


def allocation_value(success_probs: torch.Tensor, counts: torch.Tensor,
                     value: str = "knapsack_rl") -> torch.Tensor:
    """``Σ_i v(p_i, N_i)`` -> float64 scalar (what :func:`knapsack_allocate` maximizes)."""
    return VALUES.get(value)(success_probs, torch.as_tensor(counts)).sum()


def expand_groups(prompt_idx: torch.Tensor, counts: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-rollout prompt indices and group ids for variable group sizes.

    ``prompt_idx [P]`` and ``counts [P]`` -> ``(sample_prompt_idx [B], group_ids [B])`` with
    ``B = counts.sum()``; prompt j's ``counts[j]`` rollouts form group j. Pass ``group_ids`` to
    the advantages and ``sample_prompt_idx`` to ``PromptSelector.update``.
    """
    counts = torch.as_tensor(counts, dtype=torch.long)
    if prompt_idx.shape != counts.shape or prompt_idx.dim() != 1 or (counts < 0).any():
        raise ValueError(f"prompt_idx and counts must be 1-D of equal length with counts >= 0, "
                         f"got shapes {tuple(prompt_idx.shape)} and {tuple(counts.shape)}")
    groups = torch.arange(counts.numel())
    return (torch.repeat_interleave(prompt_idx, counts),
            torch.repeat_interleave(groups, counts))


def informative_groups(rewards: torch.Tensor, group_ids: torch.Tensor,
                       atol: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Which groups carry a GRPO gradient: ``max_g r − min_g r > atol``.

    Returns:
        ``(ids [G], informative [G])``: the distinct group ids (sorted) and a bool per group.
        A group of one rollout is never informative (its advantage is 0).
    """
    if not (isinstance(rewards, torch.Tensor) and isinstance(group_ids, torch.Tensor)
            and rewards.dim() == 1 and group_ids.dim() == 1) or group_ids.is_floating_point():
        raise ValueError("rewards and group_ids must be 1-D tensors [B] (group_ids integer); "
                         "one scalar reward per rollout")
    if rewards.numel() != group_ids.numel():
        raise ValueError(f"rewards and group_ids must have the same length, got "
                         f"{rewards.numel()} and {group_ids.numel()}")
    ids, inv = torch.unique(group_ids.cpu(), return_inverse=True)
    r = rewards.detach().cpu().double()
    hi = torch.full((ids.numel(),), -float("inf"), dtype=torch.float64)
    lo = torch.full((ids.numel(),), float("inf"), dtype=torch.float64)
    hi, lo = hi.scatter_reduce(0, inv, r, "amax"), lo.scatter_reduce(0, inv, r, "amin")
    return ids, (hi - lo) > atol


@dataclasses.dataclass
class DynamicSamplingReport:
    """What one :meth:`DynamicSampling.collect` did (log it; DAPO logs the tries)."""

    tries: int
    groups_seen: int
    groups_kept: int
    groups_dropped: int
    groups_trimmed: int
    filled: bool


class DynamicSampling:
    """DAPO dynamic sampling (arXiv 2503.14476, §3.2): drop groups whose rewards are all equal.

    :meth:`collect` calls ``produce(try_index) -> (rewards [B], group_ids [B])`` (one fresh
    batch of groups per try), keeps the informative groups, and stops as soon as it holds
    ``min_groups`` of them or after ``max_tries`` tries, whichever comes first; it never loops
    more than ``max_tries`` times.

    Args:
        min_groups: informative groups the training batch needs.
        max_tries: upper bound on calls to ``produce`` (DAPO's ``max_num_gen_batches``).
        trim: keep exactly ``min_groups`` groups when more were found (DAPO trims to the
            training batch size); the extra ones are counted as ``groups_trimmed``.
        atol: rewards closer than this count as equal (0: exact equality).
    """

    def __init__(self, min_groups: int, max_tries: int, trim: bool = True, atol: float = 0.0):
        for key, val in (("min_groups", min_groups), ("max_tries", max_tries)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{key} must be a positive int, got {val!r}")
        if atol < 0:
            raise ValueError(f"atol must be >= 0, got {atol}")
        self.min_groups, self.max_tries = min_groups, max_tries
        self.trim, self.atol = bool(trim), float(atol)

    def collect(self, produce: Callable[[int], Tuple[torch.Tensor, torch.Tensor]]
                ) -> Tuple[List[torch.Tensor], DynamicSamplingReport]:
        """Keep informative groups try by try -> ``(kept ids per try, report)``.

        ``kept[t]`` are the group ids (as ``produce(t)`` numbered them) to train on from try
        ``t``; ``len(kept) == report.tries``. ``report.filled`` is False when the tries ran out
        first: train on what was kept, or skip the step.
        """
        kept: List[torch.Tensor] = []
        seen = dropped = trimmed = total = 0
        for t in range(self.max_tries):
            out = produce(t)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(f"produce({t}) must return (rewards [B], group_ids [B]), got "
                                f"{type(out).__name__}")
            ids, informative = informative_groups(*out, atol=self.atol)
            keep = ids[informative]
            seen, dropped = seen + ids.numel(), dropped + int((~informative).sum())
            if self.trim and total + keep.numel() > self.min_groups:
                trimmed += total + keep.numel() - self.min_groups
                keep = keep[:self.min_groups - total]
            kept.append(keep)
            total += keep.numel()
            if total >= self.min_groups:
                break
        report = DynamicSamplingReport(tries=len(kept), groups_seen=seen, groups_kept=total,
                                       groups_dropped=dropped, groups_trimmed=trimmed,
                                       filled=total >= self.min_groups)
        return kept, report
