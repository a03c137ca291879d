"""Weighted matching losses: the core's second contract, for objectives on forward-noised samples.

The log-prob contract (``logp [B, T]``) covers objectives that re-score the sampler's own
transitions. DiffusionNFT (arXiv 2509.16117) and Advantage Weighted Matching (AWM, arXiv
2509.25050) instead train the flow-matching regression on the generated images, noised again:
for row i (a sample with clean latent x0_i and advantage A_i) and K training times t_ik,
x_t = (1 − t)·x0 + t·ε with a fresh ε, and the loss compares the predicted velocity v_θ(x_t, t)
with the flow-matching target ε − x0. A policy hands the loss a :class:`MatchTerms`; the loss
reads nothing else (no config, no model), so every flow family shares it.

Registry :data:`MATCHING_LOSSES`: name -> ``fn(terms, adv [b], *, num_terms, **params) ->
(loss, metrics)``. The loss is Σ over the valid (row, time) terms divided by ``num_terms`` (the
global count of valid terms of the optimizer step, a number), so micro-batches along rows and
times and data-parallel ranks sum to the unsplit loss. Metrics are detached tensors (no host
sync here).

Also here, as pure functions: NFT's optimality probability :func:`nft_optimality`, its implicit
policies :func:`nft_implicit_velocities`, the soft-update schedules of the old / EMA model
(:data:`SOFT_UPDATE_DECAYS`) and the two ways the papers' code draws training times
(:func:`draw_times`). Formulas and sources: ../shared/ALGORITHMS-flow.md, docs/diffusion_train.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from mmrl.registry import Registry

__all__ = ["MatchTerms", "MATCHING_LOSSES", "SOFT_UPDATE_DECAYS", "AWM_WEIGHTINGS",
           "nft_optimality", "nft_implicit_velocities", "nft_loss", "awm_loss",
           "soft_update_decay", "draw_times", "matching_loss"]


@dataclass
class MatchTerms:
    """What a policy computes for ``b`` rows x ``K`` training times (``*d``: latent dims).

    Attributes:
        v: ``[b, K, *d]`` the current velocity v_θ(x_t, t), with gradient.
        target: ``[b, K, *d]`` the flow-matching target ε − x0 (no gradient).
        t: ``[b, K]`` the noise level σ of each term (x_t = (1 − t)·x0 + t·ε).
        mask: ``[b, K]`` bool, True where the term counts.
        v_old: ``[b, K, *d]`` detached velocity of the old / EMA model at the same x_t (NFT's
            θ_old; AWM's kl_ema adapter), or None.
        v_ref: ``[b, K, *d]`` detached velocity of the reference (base) model, or None.
    """

    v: Tensor
    target: Tensor
    t: Tensor
    mask: Tensor
    v_old: Optional[Tensor] = None
    v_ref: Optional[Tensor] = None


MATCHING_LOSSES: Registry[Callable[..., Tuple[Tensor, Dict[str, Tensor]]]] = \
    Registry("matching loss")


def _mean_d(x: Tensor) -> Tensor:
    """``[b, K, *d] -> [b, K]``: the mean over the latent dims."""
    return x.flatten(2).mean(-1)


def _total(per_term: Tensor, mask: Tensor, num_terms) -> Tensor:
    """Σ of ``per_term [b, K]`` over the valid terms / ``num_terms`` (default: their count).
    ``torch.where`` (not a product) so a non-finite masked term cannot leak a NaN."""
    n = mask.sum() if num_terms is None else torch.as_tensor(num_terms)
    per_term = torch.where(mask, per_term, torch.zeros((), dtype=per_term.dtype,
                                                       device=per_term.device))
    return per_term.sum() / n.to(per_term).clamp(min=1)


def _check(terms: MatchTerms, adv: Tensor, need_old: bool) -> None:
    b, K = terms.mask.shape
    if terms.v.shape[:2] != (b, K) or terms.target.shape != terms.v.shape or \
            terms.t.shape != (b, K):
        raise ValueError(f"MatchTerms shapes v {tuple(terms.v.shape)}, target "
                         f"{tuple(terms.target.shape)}, t {tuple(terms.t.shape)}, mask "
                         f"{tuple(terms.mask.shape)}; expected v and target [b, K, *d], t and "
                         f"mask [b, K]")
    if adv.shape != (b,):
        raise ValueError(f"advantages {tuple(adv.shape)}; expected [b] = ({b},), one per row")
    if need_old and terms.v_old is None:
        raise ValueError("this matching loss needs MatchTerms.v_old (the old model's velocity "
                         "at the same x_t); the policy must keep an old model")


# ------------------------------------------------------------------------------- DiffusionNFT
NFT_ADV_MODES = ("all", "positive_only", "negative_only", "one_only", "binary")


def nft_optimality(adv: Tensor, *, adv_clip_max: float = 5.0, adv_mode: str = "all") -> Tensor:
    """r = clamp(clip(A, ±C)/C/2 + ½, 0, 1): the optimality probability of each row.

    DiffusionNFT (arXiv 2509.16117), NVlabs/DiffusionNFT train_nft_sd3.py; C = adv_clip_max
    (5). ``adv_mode`` (train.adv_mode in their code): all (default), positive_only (A clamped
    to [0, C]), negative_only ([−C, 0]), one_only (A := 1[A > 0]), binary (A := sign A).
    A = 2.5 -> 0.75; A >= C -> 1; A = 0 -> ½.

    Raises:
        ValueError: an unknown ``adv_mode`` or C <= 0.
    """
    if adv_mode not in NFT_ADV_MODES:
        raise ValueError(f"adv_mode={adv_mode!r}; expected one of {', '.join(NFT_ADV_MODES)}")
    if not adv_clip_max > 0:
        raise ValueError(f"adv_clip_max={adv_clip_max}; expected > 0 (DiffusionNFT uses 5)")
    C = float(adv_clip_max)
    a = {"all": lambda x: x.clamp(-C, C), "positive_only": lambda x: x.clamp(0, C),
         "negative_only": lambda x: x.clamp(-C, 0), "one_only": lambda x: (x > 0).to(x),
         "binary": torch.sign}[adv_mode](adv)
    return (a / C / 2 + 0.5).clamp(0, 1)


def nft_implicit_velocities(v: Tensor, v_old: Tensor, beta: float) -> Tuple[Tensor, Tensor]:
    """``(v⁺, v⁻)``: v⁺ = β·v_θ + (1 − β)·sg(v_old), v⁻ = (1 + β)·sg(v_old) − β·v_θ.

    DiffusionNFT's implicit positive and negative policies (train_nft_sd3.py). At θ = θ_old
    both equal v_old.
    """
    v_old = v_old.detach()
    return beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v


def _x0_weighted_error(v_hat: Tensor, target: Tensor, t: Tensor) -> Tensor:
    """``[b, K]`` L = mean_d (x̂0 − x0)² / sg(max(mean_d |x̂0 − x0|, 1e-5)), x̂0 − x0 = −t·(v̂ − v).

    x̂0 = x_t − t·v̂ and x0 = x_t − t·(ε − x0), so the difference needs neither x_t nor x0.
    The adaptive weight is computed in float64 as the authors' code does, and detached.
    """
    diff = (v_hat - target) * t.reshape(*t.shape, *[1] * (v_hat.dim() - 2))
    weight = _mean_d(diff.detach().double().abs()).clamp(min=1e-5)
    return _mean_d(diff.square()) / weight.to(diff.dtype)


@MATCHING_LOSSES.register("nft")
def nft_loss(terms: MatchTerms, adv: Tensor, *, num_terms=None, beta: float = 1.0,
             adv_clip_max: float = 5.0, adv_mode: str = "all",
             kl_coef: float = 0.0) -> Tuple[Tensor, Dict[str, Tensor]]:
    """DiffusionNFT's negative-aware loss, Σ_{i,k} ℓ_ik / num_terms with
    ℓ_ik = (C/β)·[r_i·L⁺_ik + (1 − r_i)·L⁻_ik] + λ_KL·mean_d (v_θ − v_ref)².

    arXiv 2509.16117; NVlabs/DiffusionNFT @24af5554 scripts/train_nft_sd3.py. r_i =
    :func:`nft_optimality`, v^± = :func:`nft_implicit_velocities`, L^± the x0-space adaptively
    weighted errors (:func:`_x0_weighted_error`). The authors' code averages over the batch and
    divides each backward by the accumulation steps x trained times: the mean over terms.

    Args:
        terms: needs ``v_old``; ``v_ref`` when ``kl_coef > 0``.
        adv: ``[b]`` advantages (per-prompt mean, global std).
        num_terms: the global number of valid terms of the step (default: this call's).
        beta: β of the implicit policies (1.0; 0.1 for ocr / multi-reward).
        adv_clip_max, adv_mode: see :func:`nft_optimality`.
        kl_coef: λ_KL (1e-4).

    Returns:
        ``(loss, metrics)``: metrics ``nft_loss_pos``, ``nft_loss_neg``, ``nft_r_mean``,
        ``kl`` (means over the valid terms), detached.
    """
    _check(terms, adv, need_old=True)
    if not beta > 0:
        raise ValueError(f"beta={beta}; expected > 0 (the implicit policies' step, 1.0 or 0.1)")
    mask, t = terms.mask, terms.t.to(terms.v.dtype)
    r = nft_optimality(adv, adv_clip_max=adv_clip_max, adv_mode=adv_mode).to(terms.v)
    v_pos, v_neg = nft_implicit_velocities(terms.v, terms.v_old, beta)
    l_pos = _x0_weighted_error(v_pos, terms.target, t)  # [b, K]
    l_neg = _x0_weighted_error(v_neg, terms.target, t)
    per = adv_clip_max / beta * (r[:, None] * l_pos + (1 - r[:, None]) * l_neg)
    kl = _kl_term(terms, kl_coef)
    loss = _total(per + kl_coef * kl, mask, num_terms)
    stats = {"nft_loss_pos": l_pos, "nft_loss_neg": l_neg, "kl": kl,
             "nft_r_mean": r[:, None].expand_as(mask)}
    return loss, _masked_means(stats, mask)


# ------------------------------------------------------------------------------- AWM
AWM_WEIGHTINGS = {
    "uniform": lambda e, t, p: e,
    "t": lambda e, t, p: e * t,
    "t**2": lambda e, t, p: e * t * t,
    "huber": lambda e, t, p: (torch.sqrt(e + 1e-10) - 1e-5) * t,
    "ghuber": lambda e, t, p: ((e + 1e-10) ** p - 1e-10 ** p) * t / p,
}
"""AWM's φ(e)·w(t), the negated "log-prob" surrogate −ℓp (train_sd3_awm.py,
compute_log_prob_awm): e = mean_d (v_θ − (ε − x0))², p = ghuber_p. The 1e-10 inside the roots
keeps the gradient finite at e = 0."""


@MATCHING_LOSSES.register("awm")
def awm_loss(terms: MatchTerms, adv: Tensor, *, num_terms=None, weighting: str = "ghuber",
             ghuber_p: float = 0.25, adv_clip_max: float = 5.0, adv_max: float = 1.0,
             clip_range: float = 1.0, kl_coef: float = 0.0, kl_form: str = "uniform",
             old_coef: float = 0.0) -> Tuple[Tensor, Dict[str, Tensor]]:
    """AWM's advantage-weighted matching loss, Σ_{i,k} ℓ_ik / num_terms with
    ℓ_ik = max(−A′_i·ρ_ik, −A′_i·clip(ρ_ik, 1 − ε, 1 + ε)) + λ_KL·κ_ik
    + λ_old·mean_d (v_θ − v_old)²,
    ρ_ik = exp(ℓp_ik − sg(ℓp_ik)), ℓp = −φ(e)·w(t) (:data:`AWM_WEIGHTINGS`),
    A′ = clip(A, ±C)/C·adv_max.

    arXiv 2509.25050; scxue/advantage_weighted_matching @be513723 train_sd3_awm.py
    ("exp_first"). On-policy as the authors ship it: ℓp_old is the same forward's detached
    value, so ρ ≡ 1 and ∇ℓ = −A′·∇ℓp (the clip never acts; ε = clip_range = 1).
    κ = mean_d (v_θ − v_ref)² ("uniform") or that / (2σ_t²), σ_t = 0.7·√(t/(1 − min(t, 0.99)))
    ("elbo"). λ_old (ema_beta, 1 in their code) pulls toward the kl_ema adapter (``v_old``).
    Differs from the authors' code: "sum_first" (ℓp averaged over the times before the ratio)
    is not offered; on-policy it has the same gradient.

    Args:
        terms: ``v_old`` when ``old_coef > 0``; ``v_ref`` when ``kl_coef > 0``.
        adv: ``[b]`` advantages (per-prompt mean, global std).
        weighting: a key of :data:`AWM_WEIGHTINGS` (ghuber); ghuber_p: p (0.25).

    Returns:
        ``(loss, metrics)``: ``awm_error`` (e), ``awm_clip_frac``, ``kl``, ``old_dist``.
    """
    _check(terms, adv, need_old=old_coef > 0)
    if weighting not in AWM_WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}; expected one of {', '.join(AWM_WEIGHTINGS)}")
    if kl_form not in ("uniform", "elbo"):
        raise ValueError(f"kl_form={kl_form!r}; expected uniform or elbo")
    mask, t = terms.mask, terms.t.double()
    e = _mean_d((terms.v.double() - terms.target.double()).square())  # [b, K] fp64, as AWM
    logp = -AWM_WEIGHTINGS[weighting](e, t, ghuber_p)
    ratio = torch.exp(logp - logp.detach())
    a = (adv.double().clamp(-adv_clip_max, adv_clip_max) / adv_clip_max * adv_max)[:, None]
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    per = torch.maximum(-a * ratio, -a * clipped).to(terms.v.dtype)
    kl = _kl_term(terms, kl_coef)
    if kl_coef > 0 and kl_form == "elbo":
        s = 0.7 * torch.sqrt(terms.t / (1 - terms.t.clamp(max=0.99)))
        kl = kl / (2 * s.to(kl).square())
    old = _mean_d((terms.v - terms.v_old.detach()).square()) if old_coef > 0 else \
        torch.zeros_like(per)
    loss = _total(per + kl_coef * kl + old_coef * old, mask, num_terms)
    stats = {"awm_error": e, "kl": kl, "old_dist": old,
             "awm_clip_frac": (ratio.detach() != clipped.detach()).to(e)}
    return loss, _masked_means(stats, mask)


def _kl_term(terms: MatchTerms, kl_coef: float) -> Tensor:
    """``[b, K]`` mean_d (v_θ − sg(v_ref))², or zeros when ``kl_coef`` is 0."""
    if kl_coef == 0:
        return torch.zeros(terms.mask.shape, dtype=terms.v.dtype, device=terms.v.device)
    if terms.v_ref is None:
        raise ValueError(f"kl_coef={kl_coef} needs MatchTerms.v_ref (the reference velocity); "
                         f"set kl_coef=0 or give v_ref")
    return _mean_d((terms.v - terms.v_ref.detach()).square())


def _masked_means(stats: Dict[str, Tensor], mask: Tensor) -> Dict[str, Tensor]:
    """Detached means of ``[b, K]`` stats over the valid terms (0 when there is none)."""
    n = mask.sum().clamp(min=1)
    return {k: (torch.where(mask, v.detach(), torch.zeros((), dtype=v.dtype, device=v.device))
                .sum() / n).float() for k, v in stats.items()}


def matching_loss(name: str) -> Callable[..., Tuple[Tensor, Dict[str, Tensor]]]:
    """The registered matching loss ``name`` (a clear error lists the registered ones)."""
    return MATCHING_LOSSES.get(name)


# ------------------------------------------------------------------------------- soft updates
SOFT_UPDATE_DECAYS: Dict[str, Callable[[int], float]] = {
    "none": lambda s: 0.0,
    "nft_ramp": lambda s: min(0.001 * s, 0.5),
    "nft_delayed": lambda s: 0.0 if s < 75 else min(0.0075 * (s - 75), 0.999),
    "awm_kl_ema": lambda s: min(0.3, 0.001 * s),
}
"""η(step) of the old / EMA model's soft update θ_old ← η·θ_old + (1 − η)·θ, once per step
after the optimizer: none (DiffusionNFT decay_type 0: θ_old = θ), nft_ramp (type 1: geneval,
pickscore, hpsv2), nft_delayed (type 2: ocr), awm_kl_ema (AWM's kl_ema adapter)."""


def soft_update_decay(name: str, step: int) -> float:
    """η of schedule ``name`` (:data:`SOFT_UPDATE_DECAYS`) at ``step`` (0-based).

    Raises:
        ValueError: an unknown schedule name or a negative step.
    """
    if name not in SOFT_UPDATE_DECAYS:
        raise ValueError(f"unknown soft-update schedule {name!r} (registered: "
                         f"{', '.join(SOFT_UPDATE_DECAYS)})")
    if step < 0:
        raise ValueError(f"step={step}; expected >= 0")
    return float(SOFT_UPDATE_DECAYS[name](int(step)))


@torch.no_grad()
def soft_update_(old: Dict[str, Tensor], current: Dict[str, Tensor], decay: float) -> None:
    """In place: ``old[k] ← decay·old[k] + (1 − decay)·current[k]`` for every key."""
    for k, v in old.items():
        v.mul_(decay).add_(current[k].detach().to(v), alpha=1 - decay)


# ------------------------------------------------------------------------------- times
TIME_DRAWS = ("rollout_grid", "stratified", "stratified_wo_init")


def draw_times(rule: str, rows: int, num_steps: int, generator: torch.Generator, *,
               fraction: float = 0.99, num_times: int = 6, max_fraction: float = 0.9) -> Tensor:
    """``[rows, K]`` int64 indices j into the sampler's σ grid (σ_0 = 1 ... σ_T = 0, T =
    ``num_steps``; a term trains at t = σ_j), drawn from ``generator`` (CPU).

    - rollout_grid (DiffusionNFT): each row an independent random permutation of the T steps,
      the first K = ⌊T·fraction⌋ kept (T = 10, 0.99 -> 9; σ_0 = 1 can be drawn).
    - stratified / stratified_wo_init (AWM "discrete" / "discrete_wo_init"): K = num_times
      strata of b = ⌊linspace(s, ⌊T·max_fraction⌋, K + 1)⌋ (s = 0 / 1), j_k = b_k + ⌊u·(b_{k+1}
      − b_k)⌋, one u per stratum shared by all rows (AWM redraws per micro-batch; here once per
      update, so splitting rows never changes the draw).

    Raises:
        ValueError: an unknown rule, or settings that leave no time.
    """
    if rule == "rollout_grid":
        K = math.floor(num_steps * fraction)
        if not 1 <= K <= num_steps:
            raise ValueError(f"time_fraction={fraction} keeps {K} of {num_steps} steps; "
                             f"expected 0 < fraction <= 1 keeping at least one")
        keys = torch.rand((rows, num_steps), generator=generator)
        return keys.argsort(dim=1)[:, :K]  # a uniform random permutation per row
    if rule in ("stratified", "stratified_wo_init"):
        start, end = int(rule == "stratified_wo_init"), math.floor(num_steps * max_fraction)
        if num_times < 1 or end - start < 1:
            raise ValueError(f"num_times={num_times}, max_fraction={max_fraction} at "
                             f"num_steps={num_steps}: no stratum; raise num_steps or "
                             f"max_fraction")
        b = torch.linspace(start, end, num_times + 1, dtype=torch.float64).floor().long()
        u = torch.rand(num_times, generator=generator, dtype=torch.float64)
        idx = b[:-1] + (u * (b[1:] - b[:-1])).floor().long()
        return idx[None].expand(rows, num_times).clone()
    raise ValueError(f"unknown time draw {rule!r} (expected one of {', '.join(TIME_DRAWS)})")
