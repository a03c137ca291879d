"""Group-relative advantages: rewards ``[B]`` + ``group_ids [B]`` -> advantages ``[B]``.

One registry, :data:`ADVANTAGES`, holds the single-reward estimators (``grpo``, ``mean_center``,
``batch_std``, ``rloo``, ``ngrpo``; the batch-level ones ``reinforce_pp``,
``reinforce_pp_baseline``, ``gpg``; ``opo``, ``passk``, ``remax``);
:data:`MULTI_REWARD` holds the ways of combining K reward columns (``normalize_then_sum``,
``sum_then_normalize``, ``gdpo``), each built on a single-reward ``base``.

Each estimator declares what it reads besides the rewards (flags, read by the training code,
never its name): ``needs_lengths`` (each row's token count ``lengths [B]``: token-weighted
statistics) and ``needs_baseline`` (a per-row baseline reward ``baseline [B]``, e.g. ReMax's
greedy completion's reward). Estimators whose statistics span the whole batch (not only the
group) must see every rank's rows: the training code gathers them.

Every estimator sees compacted group indices (``inv [B]`` in ``0..G-1``) and computes its group
statistics with ``index_add_`` / ``scatter_reduce``: no Python loop over groups and no
``.item()``; the only host reads are ``torch.unique``'s output size and the NaN check.
Edge cases are defined, not accidental:

- a group of size 1 gets advantage 0 (there is nothing to compare with), except ``ngrpo``, whose
  virtual sample makes every group at least 2 values large, and ``remax``, whose baseline is not
  a group statistic;
- a group whose rewards are all equal ("zero-std") gets exactly 0, not ``0 / eps`` rounding noise,
  before any batch whitening (``reinforce_pp_baseline`` and ``gdpo`` then shift every row by the
  batch mean), and except ``remax``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from mmrl.algo import rank_bonus as _rank_bonus, risk as _risk
from mmrl.algo.common import entry
from mmrl.algo.drpo import reward_advantages
from mmrl.algo.groups import Groups as _Groups, batch_whiten, safe_sqrt as _safe_sqrt, token_whiten
from mmrl.registry import Registry, did_you_mean

ADVANTAGES: Registry[Callable] = Registry("advantage")
MULTI_REWARD: Registry[Callable] = Registry("multi-reward advantage")


@entry(ADVANTAGES, "grpo", needs_lengths=False, needs_baseline=False)
def grpo_advantages(g: _Groups, *, eps: float, r_max: float) -> torch.Tensor:
    """A_i = (r_i − mean_g) / (std_g + eps), std unbiased. arXiv 2402.03300 (DeepSeekMath) eq. 3.

    Size-1 and zero-std groups -> 0.
    """
    return g.zero_where_constant((g.r - g.mean[g.inv]) / (g.std[g.inv] + eps))


@entry(ADVANTAGES, "mean_center", needs_lengths=False, needs_baseline=False)
def mean_center_advantages(g: _Groups, *, eps: float, r_max: float) -> torch.Tensor:
    """A_i = r_i − mean_g (Dr.GRPO, arXiv 2503.20783). Size-1 and zero-std groups -> 0."""
    return g.zero_where_constant(g.r - g.mean[g.inv])


@entry(ADVANTAGES, "batch_std", needs_lengths=False, needs_baseline=False)
def batch_std_advantages(g: _Groups, *, eps: float, r_max: float) -> torch.Tensor:
    """A_i = (r_i − mean_g) / (std_batch + eps), unbiased std over all B (arXiv 2508.08221).

    Lite-PPO; TRL ``scale_rewards="batch"``.
    Size-1 and zero-std groups -> 0; a batch of one sample has std 0 (and advantage 0).
    """
    centered = g.r - g.r.mean()
    var = (centered * centered).sum() / max(g.r.numel() - 1, 1)
    std = _safe_sqrt(var, g.constant.all())  # all groups constant <=> batch std 0
    return g.zero_where_constant((g.r - g.mean[g.inv]) / (std + eps))


@entry(ADVANTAGES, "rloo", needs_lengths=False, needs_baseline=False)
def rloo_advantages(g: _Groups, *, eps: float, r_max: float) -> torch.Tensor:
    """A_i = r_i − mean of the other N−1 = N/(N−1)·(r_i − mean_g) (RLOO, arXiv 2402.14740).

    Size-1 (no other sample) and zero-std groups -> 0.
    """
    n = g.count[g.inv]  # [B]
    return g.zero_where_constant(n / (n - 1).clamp(min=1) * (g.r - g.mean[g.inv]))


@entry(ADVANTAGES, "ngrpo", needs_lengths=False, needs_baseline=False)
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


# ---------------------------------------------------------------- REINFORCE++, OPO, ReMax, ...
@entry(ADVANTAGES, "reinforce_pp", needs_lengths=True, needs_baseline=False)
def reinforce_pp_advantages(g: _Groups, *, eps: float, r_max: float) -> torch.Tensor:
    """A_i = token_whiten(r)_i: REINFORCE++ (arXiv 2501.03262) with γ = 1 and an outcome reward.

    The return of every token of a sequence is its reward; the returns are whitened over all
    valid tokens of the (gathered) batch (:func:`token_whiten`): no group baseline, so group
    structure is ignored. verl ``reinforce_plus_plus`` (γ = ``algorithm.gamma`` = 1).
    Differs from verl: no per-token rewards (KL-in-reward, γ < 1), so A is one value per row.
    """
    return token_whiten(g.r, g.lengths)


@entry(ADVANTAGES, "reinforce_pp_baseline", needs_lengths=True, needs_baseline=False)
def reinforce_pp_baseline_advantages(g: _Groups, *, eps: float, r_max: float) -> torch.Tensor:
    """A_i = token_whiten(v)_i, v_i = r_i − mean_g (REINFORCE++-baseline, arXiv 2501.03262).

    verl ``reinforce_plus_plus_baseline``. Size-1 and zero-std groups have v = 0 and, like
    every row, are shifted by the whitening: A = −μ/σ there (not 0).
    Differs from verl: a singleton's v is 0 (verl: baseline 0, so v = r).
    """
    return token_whiten(g.zero_where_constant(g.r - g.mean[g.inv]), g.lengths)


@entry(ADVANTAGES, "opo", needs_lengths=True, needs_baseline=False)
def opo_advantages(g: _Groups, *, eps: float, r_max: float) -> torch.Tensor:
    """A_i = r_i − Σ_g L_j r_j / Σ_g L_j: length-weighted group baseline (OPO, arXiv 2505.23585).

    L = ``lengths``; no normalization. A group whose rows have no token uses the plain mean.
    Size-1 and zero-std groups -> 0. Differs from verl ``opo``: a singleton gets 0 (verl: r).
    """
    w = g.lengths.to(g.r.dtype)
    wsum = g.sum_by_group(w)  # [G]
    weighted = g.sum_by_group(w * g.r) / wsum.clamp(min=torch.finfo(w.dtype).tiny)
    baseline = torch.where(wsum > 0, weighted, g.mean)  # [G]
    return g.zero_where_constant(g.r - baseline[g.inv])


@entry(ADVANTAGES, "remax", needs_lengths=False, needs_baseline=True)
def remax_advantages(g: _Groups, *, eps: float, r_max: float) -> torch.Tensor:
    """A_i = r_i − b_i, b_i = the reward of a greedy completion of i's prompt (ReMax, 2310.10505).

    ``baseline [B]`` holds b per row (the training code rolls out and scores one greedy
    completion per group: policy capability ``greedy``). No normalization, no group statistic:
    a size-1 group is fine, and a zero-std group still differs from its greedy baseline.
    verl ``remax``.
    """
    return g.r - g.baseline


@entry(ADVANTAGES, "passk", needs_lengths=False, needs_baseline=False)
def passk_advantages(g: _Groups, *, eps: float, r_max: float) -> torch.Tensor:
    """A = (r_max − r_2nd)/(std_g + eps) for the group's best row, 0 for the others (pass@k).

    verl ``grpo_passk`` (arXiv 2503.19595) with ``norm_adv_by_std_in_grpo`` on; std unbiased.
    Ties: the first row (in batch order) holding the maximum is the best one; with a tied
    maximum r_max − r_2nd = 0. Size-1 and zero-std groups -> 0.
    Differs from verl: a singleton gets 0 (verl raises); eps = adv_eps (verl 1e-6).
    """
    idx = torch.arange(len(g.r), device=g.r.device)
    at_max = g.r.detach() == g.max[g.inv]
    first = torch.full((g.G,), len(g.r), device=g.r.device).scatter_reduce(
        0, g.inv, torch.where(at_max, idx, len(g.r)), reduce="amin")  # [G] best row
    best = idx == first[g.inv]  # [B]
    others = torch.where(best, -torch.inf, g.r)
    second = torch.full((g.G,), -torch.inf, dtype=g.r.dtype, device=g.r.device).scatter_reduce(
        0, g.inv, others, reduce="amax")  # [G]; -inf for a singleton (then constant: A = 0)
    top = g.sum_by_group(torch.where(best, g.r, torch.zeros_like(g.r)))  # [G] r of the best
    gap = (top - torch.where(g.constant, top, second)) / (g.std + eps)  # [G]
    return g.zero_where_constant(torch.where(best, gap[g.inv], torch.zeros_like(g.r)))


@entry(ADVANTAGES, "gpg", needs_lengths=False, needs_baseline=False)
def gpg_advantages(g: _Groups, *, eps: float, r_max: float) -> torch.Tensor:
    """A_i = α·(r_i − mean_g)/F_norm, α = B / max(#{i: r_i ≠ 0}, 1), F_norm = 1 (GPG, 2504.02546).

    α counts non-zero rewards over the whole (gathered) batch, as verl ``gpg``. Size-1 and
    zero-std groups -> 0. Differs from verl: a singleton gets 0 (verl: α·r). Differs from the
    paper: its α = B/(B − M) may count the samples of zero-variance groups as M (unconfirmed).
    """
    alpha = g.r.numel() / (g.r.detach() != 0).sum().clamp(min=1).to(g.r.dtype)
    return g.zero_where_constant(alpha * (g.r - g.mean[g.inv]))


entry(ADVANTAGES, "reward", needs_lengths=False, needs_baseline=False)(reward_advantages)  # DRPO


@entry(MULTI_REWARD, "normalize_then_sum", one_column=False)
def normalize_then_sum(columns, inv, num_groups, weights, base, *, lengths=None, baseline=None,
                       **kw) -> torch.Tensor:
    """A_i = Σ_k w_k · base(r^k)_i (MixGRPO ``advantage_aggr``; G²RPO).

    Differs from TRL ``normalize_then_sum``: no final batch whitening (that is ``gdpo``).
    """
    fn = ADVANTAGES.get(base)
    per_column = [w * fn(_Groups(columns[:, k], inv, num_groups, lengths,
                                 None if baseline is None else baseline[:, k]), **kw)
                  for k, w in enumerate(weights)]
    return torch.stack(per_column, 0).sum(0)  # [K, B] -> [B]


@entry(MULTI_REWARD, "sum_then_normalize", one_column=False)
def sum_then_normalize(columns, inv, num_groups, weights, base, *, lengths=None, baseline=None,
                       **kw) -> torch.Tensor:
    """A = base(Σ_k w_k r^k) (flow_grpo ``multi_score``; TRL's default)."""
    w = torch.as_tensor(list(weights), dtype=columns.dtype, device=columns.device)
    b = None if baseline is None else baseline @ w  # [B, K] @ [K] -> [B]
    return ADVANTAGES.get(base)(_Groups(columns @ w, inv, num_groups, lengths, b), **kw)


@entry(MULTI_REWARD, "gdpo", one_column=True)
def gdpo(columns, inv, num_groups, weights, base, *, eps, **kw) -> torch.Tensor:
    """A = batch_whiten(Σ_k w_k · base(r^k)) (GDPO, arXiv 2601.05242; TRL ``normalize_then_sum``).

    Each column normalized in its group (``base``; grpo with eps 1e-4 as TRL), weighted sum,
    then whitened over the batch's sequences: (R − mean_B R)/(std_B R + eps), std unbiased.
    Applies to a single reward column too (the whitening still changes it). The batch
    statistic spans every rank's rows.
    Differs from verl ``gdpo``: verl whitens per token (length-weighted, 1e-8 under the square
    root) and uses eps 1e-6 in the per-column step; TRL and mmrl whiten per sequence.
    """
    return batch_whiten(normalize_then_sum(columns, inv, num_groups, weights, base, eps=eps, **kw),
                        eps)


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
                     adv_clip: Optional[float] = None, lengths: Optional[torch.Tensor] = None,
                     baseline: Optional[torch.Tensor] = None,
                     seq_logp: Optional[torch.Tensor] = None, hparams=None,
                     state=None) -> torch.Tensor:
    """Group-relative advantages A ``[B]`` (see :data:`ADVANTAGES` / :data:`MULTI_REWARD`).

    Args:
        rewards: ``[B]`` float (single-reward methods) or ``[B, K]`` (:data:`MULTI_REWARD`
            methods). Half precision is upcast to float32.
        group_ids: ``[B]`` integer; any ids (not necessarily contiguous), equal id = same prompt.
        method: a name in ``ADVANTAGES`` or ``MULTI_REWARD``.
        eps: added to the std (1e-4 as in GRPO / flow_grpo).
        r_max: the virtual sample's reward for ``ngrpo``.
        weights: K column weights for multi-reward methods (default all ones).
        base: single-reward method used by the multi-reward methods.
        adv_clip: clamp the result to ``[-adv_clip, adv_clip]`` (flow_grpo uses 5); None = no clip.
        lengths: ``[B]`` token counts per row, for estimators flagged ``needs_lengths``.
        baseline: ``[B]`` (``[B, K]`` with several columns) baseline rewards, for estimators
            flagged ``needs_baseline`` (ReMax's greedy rewards).
        seq_logp: ``[B]`` each row's token-mean old log-prob, for estimators flagged
            ``needs_seq_logp`` (unlikeliness, novelty sharpening).
        hparams: dict or object (an AlgoSpec) holding the extra hyper-parameters an entry
            declares in its ``hparams`` tuple (e.g. ``unlikely_beta``); None = their defaults.
        state: the run's state of an estimator flagged ``make_state`` (``PolicyLoss.adv_state``,
            e.g. RiskPO's tracked quantiles), passed as ``state``; None = stateless.

    Returns:
        ``[B]`` advantages in the rewards' dtype (float32 for half-precision rewards).

    Raises:
        TypeError: rewards not float / group_ids not integer / not tensors.
        ValueError: unknown method, shape mismatch, non-finite rewards, bad weights / adv_clip,
            lengths or baseline missing (or of the wrong shape) for an estimator that needs them.
    """
    multi = method in MULTI_REWARD
    fn = MULTI_REWARD.get(method) if multi else _get_single(method)
    _validate(rewards, group_ids, multi)
    _check_extras(ADVANTAGES.get(base) if multi else fn, base if multi else method, rewards,
                  lengths, baseline, seq_logp)
    if adv_clip is not None and not adv_clip > 0:
        raise ValueError(f"adv_clip must be > 0 or None, got {adv_clip!r}")
    r = rewards.float() if rewards.dtype in (torch.float16, torch.bfloat16) else rewards
    # Arbitrary ids -> 0..G-1; G is read from the output's shape (no .item()).
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    num_groups = uniq.numel()
    if multi:
        weights = _column_weights(weights, r.shape[1])
        adv = fn(r, inv, num_groups, weights, base, eps=eps, r_max=r_max, lengths=lengths,
                 baseline=baseline, **_multi_extras(fn, base, seq_logp, hparams, state))
    else:
        if weights is not None:
            raise ValueError(f"weights are only used by {MULTI_REWARD.names()}, got method "
                             f"{method!r}; drop weights or pick a multi-reward method")
        adv = fn(_Groups(r, inv, num_groups, lengths, baseline, seq_logp), eps=eps, r_max=r_max,
                 **_picked(fn, hparams), **_state_of(fn, state))
    return adv if adv_clip is None else adv.clamp(-adv_clip, adv_clip)


def _column_weights(weights: Optional[Sequence[float]], k: int) -> list:
    """One weight per reward column (default all ones)."""
    weights = [1.0] * k if weights is None else list(weights)
    if len(weights) != k:
        raise ValueError(f"got {len(weights)} reward weights for {k} reward columns; "
                         f"pass one weight per column of rewards [B, K]")
    return weights


def _multi_extras(fn, base: str, seq_logp, hparams, state=None) -> Dict:
    """A multi-reward entry's own hyper-parameters; entries that declare ``hparams`` also get
    the base estimator, its hyper-parameters and ``seq_logp`` (they build its input)."""
    more = _picked(fn, hparams)
    if getattr(fn, "hparams", None) is not None:
        base_fn = ADVANTAGES.get(base)
        base_hp = {**_picked(base_fn, hparams), **_state_of(base_fn, state)}
        more.update(seq_logp=seq_logp, base_fn=base_fn, base_hparams=base_hp)
    return more


def _state_of(fn, state) -> Dict:
    """``{"state": state}`` for an estimator flagged ``make_state`` that has one, else {}."""
    return {"state": state} if state is not None and getattr(fn, "make_state", None) else {}


def _picked(fn, hparams) -> Dict:
    """The hyper-parameters ``fn`` declares (``fn.hparams``), read from a dict or an object."""
    names = getattr(fn, "hparams", None) or ()
    if hparams is None:
        return {}
    get = hparams.get if isinstance(hparams, dict) else lambda k, d: getattr(hparams, k, d)
    return {k: get(k, None) for k in names if get(k, None) is not None}


def _check_extras(fn, name: str, rewards, lengths, baseline, seq_logp=None) -> None:
    """``lengths`` / ``baseline`` / ``seq_logp`` present, of shape ``[B]`` / like rewards /
    ``[B]``, when ``fn`` needs them."""
    for flag, value, what, shape in (
            ("needs_lengths", lengths, "lengths (each row's token count)", rewards.shape[:1]),
            ("needs_seq_logp", seq_logp, "seq_logp (each row's token-mean old log-prob)",
             rewards.shape[:1]),
            ("needs_baseline", baseline, "baseline (each row's baseline reward, e.g. the "
             "greedy completion's: policy capability greedy)", rewards.shape)):
        if not getattr(fn, flag, False):
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"advantage {name!r} needs {what}; got {value!r}; pass "
                             f"{flag[6:]}= a tensor of shape {tuple(shape)}")
        if value.shape != shape or (flag == "needs_baseline" and not torch.isfinite(value).all()):
            raise ValueError(f"advantage {name!r}: {flag[6:]} has shape {tuple(value.shape)}; "
                             f"expected {tuple(shape)}, finite, one per row of rewards")


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


# issue 18 (docs/seed_methods.md C): likelihood-reading, gated and risk-sensitive entries
ADVANTAGES.register("unlikeliness", _rank_bonus.unlikeliness_advantages)
ADVANTAGES.register("novelty_sharpen", _rank_bonus.novelty_sharpen_advantages)
ADVANTAGES.register("mixed_var", _risk.mixed_var_advantages)
MULTI_REWARD.register("posterior_gate", _rank_bonus.posterior_gate)
