"""Which prompts to roll out next: uniform epochs, VADE, variance-aware sampling, DAPO filtering.

GRPO learns nothing from a group whose rewards are all equal (every advantage is 0). A
:class:`PromptSelector` decides which dataset prompts the next batch rolls out, so the rollout
budget goes to prompts whose outcome is still uncertain. Both trainers' loops use one contract::

    idx = selector.select(num_prompts, generator)          # LongTensor[num_prompts]
    ... roll out prompts idx, score them ...
    selector.update(prompt_idx, rewards, group_ids)         # [B] each, after the step
    ckpt["selector"] = selector.state_dict()                # plain tensors / numbers

A rollout counts as a success when ``reward > success_threshold`` (default 0.5). All randomness
comes from the ``generator`` passed to :meth:`PromptSelector.select`; the state holds no RNG, so
``load_state_dict(state_dict())`` plus the same generator state reproduces the same choices.

:class:`DynamicSampling` (DAPO, arXiv 2503.14476; defined in :mod:`mmrl.budget.allocate`, re-exported
here) is the complementary *filter*: it keeps rolling out until the batch holds enough groups
with non-equal rewards, with a bounded number of tries.

Formulas: ALGORITHMS.md, "Rollout budget and prompt selection".
"""
from __future__ import annotations

import inspect
from typing import Dict, Tuple

import torch

# DAPO filtering lives with the budgets; re-exported so the loop finds the selection API here.
from mmrl.budget.allocate import DynamicSampling, DynamicSamplingReport, informative_groups  # noqa: F401
from mmrl.registry import Registry, did_you_mean

SELECTORS: Registry = Registry("prompt selector")


def _check_generator(generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}; "
                        "pass e.g. torch.Generator().manual_seed(0)")


def _check_1d(name: str, x, dtype_kind: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 1-D tensor [B], got {got}; "
                         "flatten per-sample values to one entry per rollout")
    if dtype_kind == "int" and (x.is_floating_point() or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}; use .long()")
    return x


def group_success_counts(prompt_idx: torch.Tensor, rewards: torch.Tensor,
                         group_ids: torch.Tensor, num_items: int,
                         success_threshold: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per dataset prompt: successes k and rollouts n in one batch -> ``[num_items]`` each.

    Args:
        prompt_idx: ``[B]`` long, the dataset index of each rollout's prompt.
        rewards: ``[B]`` float, one scalar reward per rollout.
        group_ids: ``[B]`` long; every group must hold rollouts of a single prompt.
        num_items: dataset size; ``prompt_idx`` must lie in ``[0, num_items)``.
        success_threshold: a rollout succeeds when ``reward > success_threshold``.

    Returns:
        ``k, n``: float64 ``[num_items]``; prompts not in the batch have ``n = 0``.

    Raises:
        ValueError / TypeError: shapes, dtypes, out-of-range indices, a group mixing prompts.
    """
    _check_1d("prompt_idx", prompt_idx, "int")
    _check_1d("rewards", rewards, "float")
    _check_1d("group_ids", group_ids, "int")
    if not prompt_idx.numel() == rewards.numel() == group_ids.numel():
        raise ValueError(f"prompt_idx, rewards, group_ids must have the same length B, got "
                         f"{prompt_idx.numel()}, {rewards.numel()}, {group_ids.numel()}")
    if prompt_idx.numel() and (prompt_idx.min() < 0 or prompt_idx.max() >= num_items):
        raise ValueError(f"prompt_idx must lie in [0, {num_items}), got values in "
                         f"[{int(prompt_idx.min())}, {int(prompt_idx.max())}]; pass indices into "
                         "the dataset the selector was built for")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN/inf; drop those rollouts before update()")
    prompt_idx, group_ids = prompt_idx.cpu(), group_ids.cpu()
    if prompt_idx.numel():
        _, inv = torch.unique(group_ids, return_inverse=True)
        lo = torch.full((int(inv.max()) + 1,), num_items, dtype=torch.long)
        hi = torch.full_like(lo, -1)
        lo = lo.scatter_reduce(0, inv, prompt_idx, "amin")
        hi = hi.scatter_reduce(0, inv, prompt_idx, "amax")
        if (lo != hi).any():
            raise ValueError("a group holds rollouts of different prompts (group_ids and "
                             "prompt_idx disagree); give each prompt's rollouts their own group id")
    success = (rewards.detach().cpu().double() > success_threshold).double()
    k = torch.zeros(num_items, dtype=torch.float64).index_add_(0, prompt_idx, success)
    n = torch.zeros(num_items, dtype=torch.float64).index_add_(0, prompt_idx,
                                                               torch.ones_like(success))
    return k, n


def sample_beta(alpha: torch.Tensor, beta: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
    """One draw ``p̃ ~ Beta(α, β)`` per entry, reproducible from ``generator`` alone.

    ``torch.distributions.Beta`` draws from the global RNG; we seed a forked copy of it from
    ``generator`` so the caller's global RNG is untouched and the draw depends on ``generator``
    only.
    """
    _check_generator(generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.distributions.Beta(alpha, beta).sample()


class PromptSelector:
    """Base class: chooses dataset prompts and learns from their rewards.

    Every selector keeps, per prompt, the successes and rollouts of its most recent visit
    (``last_successes``, ``last_trials``); :meth:`success_probs` turns them into the estimates
    :func:`mmrl.budget.allocate.knapsack_allocate` needs. Subclasses implement ``_select`` and may extend
    ``_observe``, ``_extra_state`` and ``_load_extra``.

    Args:
        num_items: number of prompts in the dataset.
        success_threshold: a rollout succeeds when its reward is above this (default 0.5).
    """

    name = "base"

    def __init__(self, num_items: int, success_threshold: float = 0.5):
        if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"num_items must be a positive int (the dataset size), got "
                             f"{num_items!r}")
        self.num_items = num_items
        self.success_threshold = float(success_threshold)
        self.last_successes = torch.zeros(num_items, dtype=torch.float64)
        self.last_trials = torch.zeros(num_items, dtype=torch.float64)
        self.num_updates = 0

    def hparams(self) -> Dict[str, float]:
        """The hyper-parameters this selector was built with (saved and checked on load)."""
        return {"success_threshold": self.success_threshold}

    def select(self, num_prompts: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of the next ``num_prompts`` distinct prompts -> LongTensor ``[num_prompts]``."""
        _check_generator(generator)
        if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) \
                or not 1 <= num_prompts <= self.num_items:
            raise ValueError(f"num_prompts must be an int in [1, {self.num_items}] (distinct "
                             f"prompts per batch), got {num_prompts!r}; lower the batch's prompt "
                             "count or repeat prompts with a larger group size instead")
        return self._select(num_prompts, generator)

    def update(self, prompt_idx: torch.Tensor, rewards: torch.Tensor,
               group_ids: torch.Tensor) -> None:
        """Learn from one step's rollouts (see :func:`group_success_counts` for the arguments)."""
        k, n = group_success_counts(prompt_idx, rewards, group_ids, self.num_items,
                                    self.success_threshold)
        visited = n > 0
        self.last_successes[visited] = k[visited]
        self.last_trials[visited] = n[visited]
        self._observe(k, n, visited)
        self.num_updates += 1

    def success_probs(self) -> torch.Tensor:
        """Estimated success rate per prompt, ``k_last / n_last`` -> float64 ``[num_items]``.

        The rate observed at the prompt's most recent visit (Knapsack RL's "previous epoch"
        estimate, arXiv 2509.25849); 0.5 for a prompt never rolled out. It can be exactly 0 or
        1; :func:`mmrl.budget.allocate.knapsack_allocate` then gives that prompt ``n_min`` rollouts.
        """
        seen = self.last_trials > 0
        return torch.where(seen, self.last_successes / self.last_trials.clamp(min=1), 0.5)

    def state_dict(self) -> dict:
        """Plain numbers and cloned tensors; no RNG state (all randomness is the caller's)."""
        return {"name": self.name, "num_items": self.num_items, "hparams": self.hparams(),
                "num_updates": self.num_updates,
                "last_successes": self.last_successes.clone(),
                "last_trials": self.last_trials.clone(), **self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the name, dataset size and hyper-parameters must match."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        mine = {"name": self.name, "num_items": self.num_items, "hparams": self.hparams()}
        for key, want in mine.items():
            if state.get(key) != want:
                raise ValueError(f"selector state has {key}={state.get(key)!r} but this selector "
                                 f"has {want!r}; build the selector with the settings of the run "
                                 "you resume (make_selector(name, num_items, **hparams))")
        self.num_updates = int(state["num_updates"])
        self.last_successes = state["last_successes"].clone().double()
        self.last_trials = state["last_trials"].clone().double()
        self._load_extra(state)

    def _select(self, num_prompts: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _observe(self, k: torch.Tensor, n: torch.Tensor, visited: torch.Tensor) -> None:
        pass

    def _extra_state(self) -> dict:
        return {}

    def _load_extra(self, state: dict) -> None:
        pass


@SELECTORS.register("uniform")
class UniformSelector(PromptSelector):
    """Shuffled epochs: every prompt once per epoch, like a DataLoader with ``shuffle=True``.

    A batch that crosses an epoch boundary takes the old epoch's remainder and fills up from a
    fresh permutation (without repeating a prompt inside the batch); the prompts it took from
    the remainder still come up again in the new epoch.
    """

    name = "uniform"

    def __init__(self, num_items: int, success_threshold: float = 0.5):
        super().__init__(num_items, success_threshold)
        self.queue = torch.zeros(0, dtype=torch.long)
        self.epoch = 0

    def _select(self, num_prompts, generator):
        take, self.queue = self.queue[:num_prompts], self.queue[num_prompts:]
        need = num_prompts - take.numel()
        if need > 0:
            perm = torch.randperm(self.num_items, generator=generator)
            fresh = perm[~torch.isin(perm, take)][:need]
            self.queue = perm[~torch.isin(perm, fresh)]
            take = torch.cat([take, fresh])
            self.epoch += 1
        return take

    def _extra_state(self):
        return {"queue": self.queue.clone(), "epoch": self.epoch}

    def _load_extra(self, state):
        self.queue, self.epoch = state["queue"].clone().long(), int(state["epoch"])


@SELECTORS.register("vade")
class VADESelector(PromptSelector):
    """VADE (arXiv 2511.18902): Beta posteriors per prompt, two-scale decay, Thompson sampling.

    Per prompt i a posterior ``Beta(α_i, β_i)`` on its success rate, prior ``Beta(α0, β0)``. At
    every :meth:`update`:

    1. slow scale, every prompt (the policy moved a little): ``α ← α0 + λ_g (α − α0)``, same β;
    2. fast scale, prompts in this batch (the policy was just trained on them), then evidence:
       ``α ← α0 + λ_v (α − α0) + k``, ``β ← β0 + λ_v (β − β0) + (n − k)``.

    :meth:`select` draws ``p̃_i ~ Beta(α_i, β_i)`` and takes the ``num_prompts`` largest
    ``p̃(1 − p̃)`` (the Bernoulli reward variance, the information a group can carry).

    Differs from paper: the stored copy of the paper's method section was not reachable here;
    the update, the decay "toward the prior on two scales" and the ``p̃(1 − p̃)`` Thompson score
    follow ALGORITHMS.md. The two scales are mmrl's reading (global per step + per visit); the
    defaults ``λ_g = 0.99``, ``λ_v = 0.5`` are mmrl's, chosen before any simulation.

    Args:
        prior_alpha, prior_beta: the prior ``Beta(α0, β0)`` (default uniform, 1, 1).
        global_decay: ``λ_g`` in ``(0, 1]``; 1 keeps evidence forever.
        visit_decay: ``λ_v`` in ``[0, 1]``; 0 keeps only the newest visit's counts.
    """

    name = "vade"

    def __init__(self, num_items: int, success_threshold: float = 0.5, prior_alpha: float = 1.0,
                 prior_beta: float = 1.0, global_decay: float = 0.99, visit_decay: float = 0.5):
        super().__init__(num_items, success_threshold)
        if not (prior_alpha > 0 and prior_beta > 0):
            raise ValueError(f"prior_alpha and prior_beta must be > 0, got {prior_alpha}, "
                             f"{prior_beta}; use 1, 1 for a uniform prior")
        if not (0 < global_decay <= 1 and 0 <= visit_decay <= 1):
            raise ValueError(f"need 0 < global_decay <= 1 and 0 <= visit_decay <= 1, got "
                             f"{global_decay}, {visit_decay}; e.g. 0.99 and 0.5")
        self.prior_alpha, self.prior_beta = float(prior_alpha), float(prior_beta)
        self.global_decay, self.visit_decay = float(global_decay), float(visit_decay)
        self.alpha = torch.full((num_items,), self.prior_alpha, dtype=torch.float64)
        self.beta = torch.full((num_items,), self.prior_beta, dtype=torch.float64)

    def hparams(self):
        return {**super().hparams(), "prior_alpha": self.prior_alpha,
                "prior_beta": self.prior_beta, "global_decay": self.global_decay,
                "visit_decay": self.visit_decay}

    def _observe(self, k, n, visited):
        a0, b0 = self.prior_alpha, self.prior_beta
        lam = torch.full_like(self.alpha, self.global_decay)
        lam[visited] = self.global_decay * self.visit_decay
        self.alpha = a0 + lam * (self.alpha - a0) + k
        self.beta = b0 + lam * (self.beta - b0) + (n - k)

    def success_probs(self) -> torch.Tensor:
        """Posterior mean ``α / (α + β)`` -> float64 ``[num_items]``."""
        return self.alpha / (self.alpha + self.beta)

    def _select(self, num_prompts, generator):
        p = sample_beta(self.alpha, self.beta, generator)
        return torch.topk(p * (1 - p), num_prompts).indices

    def _extra_state(self):
        return {"alpha": self.alpha.clone(), "beta": self.beta.clone()}

    def _load_extra(self, state):
        self.alpha, self.beta = state["alpha"].clone().double(), state["beta"].clone().double()


@SELECTORS.register("variance_aware")
class VarianceAwareSelector(PromptSelector):
    """Variance-aware sampling (MMR1, arXiv 2509.21268): part of each batch ∝ outcome variance.

    A share ``mix`` of the batch is drawn without replacement with probability proportional to
    ``p̂(1 − p̂) + floor``, where ``p̂ = k_last / n_last`` is the prompt's success rate at its last
    visit (an unseen prompt scores the maximum 0.25); the rest is drawn uniformly from the
    remaining prompts, so prompts whose score fell to 0 still come back.

    Differs from paper: MMR1's score adds a trajectory-diversity term to the outcome variance;
    the core sees rewards only, so mmrl uses the outcome-variance term alone, refreshed at every
    update instead of on a fixed schedule.

    Args:
        mix: share of the batch drawn by variance, in ``[0, 1]`` (default 0.5).
        floor: added to every score so that every prompt keeps a non-zero weight (default 1e-3).
    """

    name = "variance_aware"

    def __init__(self, num_items: int, success_threshold: float = 0.5, mix: float = 0.5,
                 floor: float = 1e-3):
        super().__init__(num_items, success_threshold)
        if not 0 <= mix <= 1 or not floor > 0:
            raise ValueError(f"need 0 <= mix <= 1 and floor > 0, got mix={mix}, floor={floor}; "
                             "e.g. mix=0.5, floor=1e-3")
        self.mix, self.floor = float(mix), float(floor)

    def hparams(self):
        return {**super().hparams(), "mix": self.mix, "floor": self.floor}

    def scores(self) -> torch.Tensor:
        """Outcome variance ``p̂(1 − p̂)`` per prompt (0.25 for unseen prompts) -> ``[P]``."""
        seen = self.last_trials > 0
        p = torch.where(seen, self.last_successes / self.last_trials.clamp(min=1), 0.5)
        return p * (1 - p)

    def _select(self, num_prompts, generator):
        n_var = int(round(self.mix * num_prompts))
        by_var = torch.zeros(0, dtype=torch.long)
        if n_var:
            by_var = torch.multinomial(self.scores() + self.floor, n_var, replacement=False,
                                       generator=generator)
        perm = torch.randperm(self.num_items, generator=generator)
        rest = perm[~torch.isin(perm, by_var)][:num_prompts - n_var]
        return torch.cat([by_var, rest])


def make_selector(name: str, num_items: int, **hparams) -> PromptSelector:
    """Build the selector registered as ``name`` (see ``SELECTORS.names()``).

    Raises:
        ValueError: unknown name, or a hyper-parameter the selector does not take (the message
            lists the ones it takes).
    """
    cls = SELECTORS.get(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in
                ("self", "num_items")]
    for key in hparams:
        if key not in accepted:
            raise ValueError(f"prompt selector {name!r} has no hyper-parameter {key!r} "
                             f"(accepted: {', '.join(accepted)}){did_you_mean(key, accepted)}")
    return cls(num_items, **hparams)
