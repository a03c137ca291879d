"""The budget simulator's strategies and settings, without torch (the ``mmrl sim budget``
parser reads its defaults from here; the simulator itself is :mod:`mmrl.budget.sim`)."""
from __future__ import annotations

import dataclasses

from mmrl.registry import Registry


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A selector, an allocation (``fixed``, ``knapsack``, ``knapsack_oracle``, ``xrpo``), DAPO
    or not."""
    selector: str
    allocation: str = "fixed"
    dynamic: bool = False


STRATEGIES: Registry = Registry("budget strategy")
STRATEGIES.register("uniform", Strategy("uniform"))
STRATEGIES.register("dynamic_sampling", Strategy("uniform", dynamic=True))
STRATEGIES.register("vade", Strategy("vade"))
STRATEGIES.register("variance_aware", Strategy("variance_aware"))
STRATEGIES.register("knapsack", Strategy("uniform", allocation="knapsack"))
STRATEGIES.register("vade_knapsack", Strategy("vade", allocation="knapsack"))
# Knapsack on the true success rates: the allocation's ceiling, without estimation error.
STRATEGIES.register("knapsack_oracle", Strategy("uniform", allocation="knapsack_oracle"))
# XRPO (arXiv 2510.06672): xrpo_first rollouts per prompt, the rest by CI half-width reduction.
STRATEGIES.register("xrpo", Strategy("uniform", allocation="xrpo"))
GUIDANCE_MODES = ("none", "ghpo", "scaf", "guide", "xrpo_seed")
"""``mmrl sim budget --guidance`` choices (the model: :mod:`mmrl.budget.sim_guidance`)."""
DEFAULT_STRATEGIES = ("uniform", "dynamic_sampling", "vade", "variance_aware", "knapsack",
                      "vade_knapsack", "knapsack_oracle", "xrpo")


@dataclasses.dataclass
class SimSettings:
    """Simulator settings; defaults are the run reported in docs/budget.md.

    Attributes:
        num_prompts: dataset size P.
        batch_prompts: prompts per step.
        group_size: rollouts per prompt at uniform allocation; the per-step budget is
            ``batch_prompts · group_size`` for every strategy.
        total_rollouts: rollout budget of the whole run (equal for every strategy).
        difficulty_mean, difficulty_std: initial logits ``θ ~ N(mean, std²)``.
        drift_std: per-step random walk of every logit.
        lr: step size on θ per GRPO update.
        n_min, n_max: Knapsack bounds on rollouts per prompt.
        max_tries: DAPO dynamic-sampling tries per step.
        xrpo_first: XRPO's first-phase rollouts per prompt (the rest of the step's budget
            goes by uncertainty reduction; mmrl's choice: half the uniform group); capped at
            group_size, and XRPO needs group_size >= 2.
        hint_gain, hint_levels, hint_transfer, is_cap: the guidance model's constants
            (:mod:`mmrl.budget.sim_guidance`; mmrl's assumptions, not measured): a level-l
            hint adds ``l · hint_gain`` to the logit; levels 1 … hint_levels; an on-policy
            hinted row moves the plain logit by ``hint_transfer`` times its GRPO term; Guide's
            importance weights are truncated at ``is_cap`` (``algo.rollout_is_max``).
    """

    num_prompts: int = 512
    batch_prompts: int = 64
    group_size: int = 8
    total_rollouts: int = 102_400
    difficulty_mean: float = -1.0
    difficulty_std: float = 2.0
    drift_std: float = 0.05
    lr: float = 0.5
    n_min: int = 2
    n_max: int = 128
    max_tries: int = 4
    xrpo_first: int = 4
    hint_gain: float = 1.5
    hint_levels: int = 3
    hint_transfer: float = 0.5
    is_cap: float = 3.0

    def validate(self) -> None:
        """Raise one ValueError listing every bad setting."""
        errors = [f"{k} must be >= {low}, got {getattr(self, k)}" for k, low in (
            ("num_prompts", 1), ("batch_prompts", 1), ("group_size", 1), ("total_rollouts", 1),
            ("n_min", 1), ("max_tries", 1), ("hint_levels", 1)) if getattr(self, k) < low]
        if self.batch_prompts > self.num_prompts:
            errors.append(f"batch_prompts ({self.batch_prompts}) must be <= num_prompts "
                          f"({self.num_prompts})")
        if self.xrpo_first < 2:
            errors.append(f"xrpo_first must be >= 2 (a std needs two), got {self.xrpo_first}")
        if not self.n_min <= self.group_size <= self.n_max:
            errors.append(f"need n_min <= group_size <= n_max, got {self.n_min}, "
                          f"{self.group_size}, {self.n_max}")
        if self.difficulty_std < 0 or self.drift_std < 0 or self.lr < 0:
            errors.append("difficulty_std, drift_std and lr must be >= 0")
        if self.hint_gain < 0 or not 0 <= self.hint_transfer <= 1 or self.is_cap <= 0:
            errors.append(f"need hint_gain >= 0, 0 <= hint_transfer <= 1, is_cap > 0; got "
                          f"{self.hint_gain}, {self.hint_transfer}, {self.is_cap}")
        if errors:
            raise ValueError("invalid simulator settings:\n  " + "\n  ".join(errors))
