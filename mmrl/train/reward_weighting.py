"""Dynamic reward weighting as a round augmenter: K reward columns -> one column
``weighted`` = m·Σ_k w_k r^k, with w or m adapting from step to step (arXiv 2509.11452).

``mode``:

- ``hypervolume``: w fixed; m from :class:`mmrl.algo.reward_weights.HypervolumeWeighting` fed
  with each round's per-objective mean reward (all ranks).
- ``gradient``: m = 1; after the round is weighted, w moves by
  :func:`mmrl.algo.reward_weights.gradient_weight_update` from each objective's policy gradient
  (its GRPO advantages alone, one backward pass per objective, averaged over ranks).

Any job: ``algo.reward_weighting`` (:func:`with_reward_weighting`, called by the runner)
appends it after the job's own augmenters. The round's original columns are reported as
``reward/<name>`` means, and the weights / the multiplier as ``reward_weight/<name>`` /
``reward_multiplier``.
Differs from the release: the objective vector of the hypervolume is the training round's mean
reward (the release evaluates a validation set after each step), and the gradient uses every
trainable parameter (the release: layers 10–25).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from mmrl.algo.advantages import group_advantages
from mmrl.algo.reward_weights import HypervolumeWeighting, gradient_weight_update, influence
from mmrl.train.reward_fn import RewardBatch

__all__ = ["DynamicRewardWeights", "objective_gradients", "with_reward_weighting"]

MODES = ("hypervolume", "gradient")


def objective_gradients(policy, rollout, columns: torch.Tensor, group_ids: torch.Tensor,
                        ) -> torch.Tensor:
    """``[K, P]``: per reward column k, ∇θ of mean_i A^k_i·(mean_t logp_i,t), A^k its GRPO
    advantages alone (the policy gradient of that objective at ratio 1)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    mask = rollout.mask
    logp = policy.logp(rollout, torch.arange(len(rollout)), 0, mask.shape[1])
    row = torch.where(mask, logp, torch.zeros_like(logp)).sum(-1) / mask.sum(-1).clamp(min=1)
    grads = []
    for k in range(columns.shape[1]):
        adv = group_advantages(columns[:, k].double(), group_ids).to(row)
        g = torch.autograd.grad((adv * row).mean(), params, retain_graph=True, allow_unused=True)
        grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                for x, p in zip(g, params)]))
    return torch.stack(grads)  # [K, P]


class DynamicRewardWeights:
    """Round augmenter ``aug(rounds, rnd) -> rnd`` (see the module docstring).

    Args:
        mode: ``hypervolume`` or ``gradient``.
        weights: initial weight per reward column name (normalized to sum 1; a missing name
            weighs 1); None = uniform. The columns are the first round's.
        minimize: reward columns to minimize (hypervolume mode; e.g. a length); the rest are
            maximized.
        lr: η, the step of the gradient mode (the release: the actor's learning rate).
        reg: λ_reg of the gradient mode (1e-5).
    """

    def __init__(self, mode: str = "hypervolume", weights: Optional[Dict[str, float]] = None,
                 minimize: Sequence[str] = (), lr: float = 1e-6, reg: float = 1e-5):
        if mode not in MODES:
            raise ValueError(f"unknown reward weighting mode {mode!r}; expected one of {MODES}")
        self.mode, self.lr, self.reg = mode, float(lr), float(reg)
        self.given, self.minimize = dict(weights or {}), list(minimize)
        self.names: Optional[list] = None
        self.weights = torch.zeros(0, dtype=torch.float64)
        self.hv = HypervolumeWeighting([])

    def _start(self, names) -> None:
        """Fix the columns, their starting weights and orientations at the first round."""
        w = torch.tensor([float(self.given.get(n, 1.0)) for n in names], dtype=torch.float64)
        unknown = sorted(set(self.minimize) - set(names))
        if not (w > 0).all() or unknown:
            raise ValueError(f"reward weighting over columns {list(names)}: weights must be > 0 "
                             f"(got {w.tolist()}) and minimize must name columns (unknown: "
                             f"{unknown}); fix algo.reward_weights / reward_minimize")
        self.names, self.weights = list(names), w / w.sum()
        self.hv = HypervolumeWeighting([n not in self.minimize for n in names])

    def __call__(self, rounds, rnd):
        r = rnd.rewards
        if self.names is None:
            self._start(r.names)
        cols = torch.stack([r.column(n) for n in self.names], 1).double()  # [B, K]
        ok = r.valid
        multiplier = self.hv.multiplier if self.mode == "hypervolume" else 1.0
        total = (multiplier * (cols @ self.weights)).float()
        gathered, _ = rounds.gathered(rnd.rollout, torch.where(ok[:, None], cols, 0.0))
        n_ok, _ = rounds.gathered(rnd.rollout, ok.double())
        means = gathered.sum(0) / n_ok.sum().clamp(min=1)  # [K] over every rank's valid rows
        rounds.add_round_metrics({}, {**{f"reward/{n}": (float(means[k]), 1)
                                         for k, n in enumerate(self.names)},
                                      **{f"reward_weight/{n}": (float(self.weights[k]), 1)
                                         for k, n in enumerate(self.names)},
                                      "reward_multiplier": (multiplier, 1)})
        if self.mode == "hypervolume":
            self.hv.update(means.tolist())
        else:
            self._gradient_step(rounds, rnd, cols, ok)
        rnd.rewards = RewardBatch(torch.where(ok, total, float("nan"))[:, None], ["weighted"],
                                  ok)
        return rnd

    def _gradient_step(self, rounds, rnd, cols: torch.Tensor, ok: torch.Tensor) -> None:
        rows = ok.nonzero()[:, 0]
        if len(rows) == 0:
            return
        grads = objective_gradients(rounds.policy, rnd.rollout.select(ok), cols[rows],
                                    rnd.rollout.group_ids[rows])
        local = influence(grads).tolist()  # [K]; the mean over ranks is the same everywhere
        every = torch.tensor(rounds.dist.all_gather_object(local), dtype=torch.float64)
        self.weights = gradient_weight_update(self.weights, every.mean(0), self.lr, self.reg)

    def state_dict(self) -> Dict:
        return {"names": self.names, "weights": self.weights.tolist(),
                "sign": self.hv.sign, "hv": self.hv.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.names = state["names"]
        self.weights = torch.tensor(state["weights"], dtype=torch.float64)
        self.hv = HypervolumeWeighting([s > 0 for s in state["sign"]])
        self.hv.load_state_dict(state["hv"])


def with_reward_weighting(algo, augmenters: Sequence) -> list:
    """``augmenters`` plus, last (it folds every column into one), the
    :class:`DynamicRewardWeights` that ``algo.reward_weighting`` asks for (``algo``: the config's
    ``algo:`` section; ``none``: the list unchanged).

    Raises:
        UserError: the job already weights its columns dynamically (the video job's deprecated
            ``video.reward_weighting``) and ``algo.reward_weighting`` asks for it again.
    """
    mode = getattr(algo, "reward_weighting", "none")
    out = list(augmenters)
    if mode == "none":
        return out
    if any(isinstance(a, DynamicRewardWeights) for a in out):
        from mmrl.config.core import UserError
        raise UserError(f"algo.reward_weighting={mode!r} and the job's own dynamic reward "
                        f"weighting (video.reward_weighting, deprecated) are both set; keep "
                        f"algo.reward_weighting and set video.reward_weighting: none")
    return out + [DynamicRewardWeights(mode, algo.reward_weights, algo.reward_minimize,
                                       lr=algo.reward_weighting_lr)]
