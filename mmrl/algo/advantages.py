"""Group-relative advantages: rewards ``[B]`` + ``group_ids [B]`` -> advantages ``[B]``.

One registry, :data:`ADVANTAGES`, holds the single-reward estimators (``grpo``, ``mean_center``,
``batch_std``, ``rloo``, ``ngrpo``); :data:`MULTI_REWARD` holds the ways of combining K reward
columns (``normalize_then_sum``, ``sum_then_normalize``), each built on a single-reward ``base``.

Every estimator sees compacted group indices (``inv [B]`` in ``0..G-1``) and computes its group
statistics with ``index_add_`` / ``scatter_reduce``: no Python loop over groups and no
``.item()``; the only host reads are ``torch.unique``'s output size and the NaN check.
Edge cases are defined, not accidental:

- a group of size 1 gets advantage 0 (there is nothing to compare with), except ``ngrpo``, whose
  virtual sample makes every group at least 2 values large;
- a group whose rewards are all equal ("zero-std") gets exactly 0, not ``0 / eps`` rounding noise.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from mmrl.registry import Registry, did_you_mean

ADVANTAGES: Registry[Callable] = Registry("advantage")
MULTI_REWARD: Registry[Callable] = Registry("multi-reward advantage")


class _Groups:
    """Vectorized per-group statistics of one reward column ``r [B]``."""

    def __init__(self, r: torch.Tensor, inv: torch.Tensor, num_groups: int):
        self.r, self.inv, self.G = r, inv, num_groups
        self.count = self.sum_by_group(torch.ones_like(r))  # [G]
        self.mean = self.sum_by_group(r) / self.count  # [G]
        centered = r - self.mean[inv]  # [B]
        # Unbiased (Bessel) variance; a singleton's denominator is clamped to 1 (its var is 0).
        self.var = self.sum_by_group(centered * centered) / (self.count - 1).clamp(min=1)
        hi = torch.full((num_groups,), -torch.inf, dtype=r.dtype, device=r.device)
        lo = torch.full((num_groups,), torch.inf, dtype=r.dtype, device=r.device)
        hi = hi.scatter_reduce(0, inv, r.detach(), reduce="amax")  # only compared, never used
        lo = lo.scatter_reduce(0, inv, r.detach(), reduce="amin")  # as a value: no gradient
        # Exact equality test: a mean of equal floats may differ from them in the last bit.
        self.constant, self.max = hi == lo, hi  # [G] bool (singletons included), [G]
        # A constant group's advantage is 0 whatever its std; using 1 there keeps sqrt'(0) = inf
        # out of the backward (0 * inf = NaN) when rewards carry gradients.
        self.std = _safe_sqrt(self.var, self.constant)  # [G]

    def sum_by_group(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.G, dtype=x.dtype, device=x.device).index_add_(0, self.inv, x)

    def zero_where_constant(self, adv: torch.Tensor) -> torch.Tensor:
        return torch.where(self.constant[self.inv], torch.zeros_like(adv), adv)


def _safe_sqrt(var: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """sqrt(var), with 1 where ``zero`` marks a variance that is exactly 0 (value unused there)."""
    return torch.where(zero, torch.ones_like(var), var).sqrt()


@ADVANTAGES.register("grpo")
def grpo_advantages(g: _Groups, *, eps: float, r_max: float) -> torch.Tensor:
    """A_i = (r_i − mean_g) / (std_g + eps), std unbiased. arXiv 2402.03300 (DeepSeekMath) eq. 3.

    Size-1 and zero-std groups -> 0.
    """
    return g.zero_where_constant((g.r - g.mean[g.inv]) / (g.std[g.inv] + eps))


@ADVANTAGES.register("mean_center")
def mean_center_advantages(g: _Groups, *, eps: float, r_max: float) -> torch.Tensor:
    """A_i = r_i − mean_g (Dr.GRPO, arXiv 2503.20783). Size-1 and zero-std groups -> 0."""
    return g.zero_where_constant(g.r - g.mean[g.inv])


@ADVANTAGES.register("batch_std")
def batch_std_advantages(g: _Groups, *, eps: float, r_max: float) -> torch.Tensor:
    """A_i = (r_i − mean_g) / (std_batch + eps), unbiased std over all B (arXiv 2508.08221).

    Lite-PPO; TRL ``scale_rewards="batch"``.
    Size-1 and zero-std groups -> 0; a batch of one sample has std 0 (and advantage 0).
    """
    centered = g.r - g.r.mean()
    var = (centered * centered).sum() / max(g.r.numel() - 1, 1)
    std = _safe_sqrt(var, g.constant.all())  # all groups constant <=> batch std 0
    return g.zero_where_constant((g.r - g.mean[g.inv]) / (std + eps))


@ADVANTAGES.register("rloo")
def rloo_advantages(g: _Groups, *, eps: float, r_max: float) -> torch.Tensor:
    """A_i = r_i − mean of the other N−1 = N/(N−1)·(r_i − mean_g) (RLOO, arXiv 2402.14740).

    Size-1 (no other sample) and zero-std groups -> 0.
    """
    n = g.count[g.inv]  # [B]
    return g.zero_where_constant(n / (n - 1).clamp(min=1) * (g.r - g.mean[g.inv]))


@ADVANTAGES.register("ngrpo")
def ngrpo_advantages(g: _Groups, *, eps: float, r_max: float) -> torch.Tensor:
    """A_i = (r_i − mean′_g) / (std′_g + eps) over the N+1 values {r_g, r_max} (NGRPO, 2509.18851).

    The virtual sample of reward ``r_max`` enters the mean and the unbiased std (N+1 values,
    denominator N) but gets no advantage. A size-1 group is defined (2 values). Only when all
    N+1 values are equal (every reward == r_max) is the std 0, and then A = 0.
    """
    n = g.count  # [G]
    mean = (g.sum_by_group(g.r) + r_max) / (n + 1)  # [G]
    centered = g.r - mean[g.inv]  # [B]
    var = (g.sum_by_group(centered * centered) + (r_max - mean) ** 2) / n  # [G]
    all_equal = g.constant & (g.max == r_max)  # [G]: the N+1 values have std 0
    adv = centered / (_safe_sqrt(var, all_equal)[g.inv] + eps)
    return torch.where(all_equal[g.inv], torch.zeros_like(adv), adv)


@MULTI_REWARD.register("normalize_then_sum")
def normalize_then_sum(columns, inv, num_groups, weights, base, **kw) -> torch.Tensor:
    """A_i = Σ_k w_k · base(r^k)_i (MixGRPO ``advantage_aggr``; G²RPO)."""
    fn = ADVANTAGES.get(base)
    per_column = [w * fn(_Groups(columns[:, k], inv, num_groups), **kw)
                  for k, w in enumerate(weights)]
    return torch.stack(per_column, 0).sum(0)  # [K, B] -> [B]


@MULTI_REWARD.register("sum_then_normalize")
def sum_then_normalize(columns, inv, num_groups, weights, base, **kw) -> torch.Tensor:
    """A = base(Σ_k w_k r^k) (flow_grpo ``multi_score``)."""
    w = torch.as_tensor(list(weights), dtype=columns.dtype, device=columns.device)
    return ADVANTAGES.get(base)(_Groups(columns @ w, inv, num_groups), **kw)  # [B, K] @ [K] -> [B]


def _validate(rewards, group_ids, multi: bool) -> None:
    if not isinstance(rewards, torch.Tensor) or not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"rewards and group_ids must be torch tensors, got "
                        f"{type(rewards).__name__} and {type(group_ids).__name__}; "
                        f"wrap them with torch.as_tensor(...)")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a float tensor, got dtype {rewards.dtype}; "
                        f"pass rewards.float()")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}; "
                        f"pass group_ids.long()")
    want = 2 if multi else 1
    if rewards.dim() != want or group_ids.dim() != 1 or group_ids.shape[0] != rewards.shape[0]:
        expected = "rewards [B, K]" if multi else "rewards [B]"
        raise ValueError(f"shape mismatch: rewards {tuple(rewards.shape)}, group_ids "
                         f"{tuple(group_ids.shape)}; expected {expected} and group_ids [B] "
                         f"with the same B (one group id per sample)")
    if rewards.device != group_ids.device:
        raise ValueError(f"rewards are on {rewards.device} but group_ids on {group_ids.device}; "
                         f"expected one device; move group_ids with .to(rewards.device)")
    if not torch.isfinite(rewards).all():  # one boolean read back: the price of a clear error
        raise ValueError("rewards contain NaN or inf; expected finite rewards; drop the invalid "
                         "samples first (RewardBatch.valid marks them) and regroup")


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, method: str = "grpo", *,
                     eps: float = 1e-4, r_max: float = 1.0,
                     weights: Optional[Sequence[float]] = None, base: str = "grpo",
                     adv_clip: Optional[float] = None) -> torch.Tensor:
    """Group-relative advantages A ``[B]`` (see :data:`ADVANTAGES` / :data:`MULTI_REWARD`).

    Args:
        rewards: ``[B]`` float (single-reward methods) or ``[B, K]`` (``normalize_then_sum``,
            ``sum_then_normalize``). Half precision is upcast to float32.
        group_ids: ``[B]`` integer; any ids (not necessarily contiguous), equal id = same prompt.
        method: a name in ``ADVANTAGES`` or ``MULTI_REWARD``.
        eps: added to the std (1e-4 as in GRPO / flow_grpo).
        r_max: the virtual sample's reward for ``ngrpo``.
        weights: K column weights for multi-reward methods (default all ones).
        base: single-reward method used by the multi-reward methods.
        adv_clip: clamp the result to ``[-adv_clip, adv_clip]`` (flow_grpo uses 5); None = no clip.

    Returns:
        ``[B]`` advantages in the rewards' dtype (float32 for half-precision rewards).

    Raises:
        TypeError: rewards not float / group_ids not integer / not tensors.
        ValueError: unknown method, shape mismatch, non-finite rewards, bad weights / adv_clip.
    """
    multi = method in MULTI_REWARD
    fn = MULTI_REWARD.get(method) if multi else _get_single(method)
    _validate(rewards, group_ids, multi)
    if adv_clip is not None and not adv_clip > 0:
        raise ValueError(f"adv_clip must be > 0 or None, got {adv_clip!r}")
    r = rewards.float() if rewards.dtype in (torch.float16, torch.bfloat16) else rewards
    # Arbitrary ids -> 0..G-1; G is read from the output's shape (no .item()).
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    num_groups = uniq.numel()
    if multi:
        k = r.shape[1]
        weights = [1.0] * k if weights is None else list(weights)
        if len(weights) != k:
            raise ValueError(f"got {len(weights)} reward weights for {k} reward columns; "
                             f"pass one weight per column of rewards [B, K]")
        adv = fn(r, inv, num_groups, weights, base, eps=eps, r_max=r_max)
    else:
        if weights is not None:
            raise ValueError(f"weights are only used by {MULTI_REWARD.names()}, got method "
                             f"{method!r}; drop weights or pick a multi-reward method")
        adv = fn(_Groups(r, inv, num_groups), eps=eps, r_max=r_max)
    return adv if adv_clip is None else adv.clamp(-adv_clip, adv_clip)


def _get_single(method: str) -> Callable:
    if method in ADVANTAGES:
        return ADVANTAGES.get(method)
    names = ADVANTAGES.names() + MULTI_REWARD.names()
    raise ValueError(f"unknown advantage method {method!r} (registered: {', '.join(names)})"
                     f"{did_you_mean(method, names)}")


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Detached batch statistics of the group structure, for logging.

    Args:
        rewards: ``[B]`` float. group_ids: ``[B]`` integer.

    Returns:
        dict of 0-d tensors: ``num_groups``; ``zero_std_frac`` (groups whose rewards are all equal,
        singletons included — they give no learning signal); ``singleton_frac``; ``reward_mean``;
        ``reward_std`` (unbiased over the batch); ``group_std_mean`` (mean within-group unbiased
        std, singletons counted as 0).

    Raises:
        TypeError / ValueError: as :func:`group_advantages`.
    """
    _validate(rewards, group_ids, multi=False)
    with torch.no_grad():
        r = rewards.float() if rewards.dtype in (torch.float16, torch.bfloat16) else rewards
        uniq, inv = torch.unique(group_ids, return_inverse=True)
        num_groups = uniq.numel()
        g = _Groups(r.detach(), inv, num_groups)
        batch_std = r.std(correction=1) if r.numel() > 1 else r.new_zeros(())
        return {
            "num_groups": torch.tensor(float(num_groups), dtype=r.dtype, device=r.device),
            "zero_std_frac": g.constant.to(r.dtype).mean(),
            "singleton_frac": (g.count == 1).to(r.dtype).mean(),
            "reward_mean": r.mean(),
            "reward_std": batch_std,
            "group_std_mean": g.var.sqrt().mean(),
        }
