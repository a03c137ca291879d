"""RiskPO (arXiv 2510.00911): risk-sensitive advantages on the lower tail of bundled scores.

Bundles: ``bundle`` consecutive prompts (groups, in sorted group-id order) form a bundle; its
"paper" k takes the k-th rollout (batch order) of every prompt of the bundle, k < min_q N_q, and
scores S_k = Σ_q r_q,k. Per bundle, with quantiles q_lo, q_hi of its paper scores at α_lo, α_hi:

- range-VaR: A_R = [max(S − q_lo, 0) − max(S − q_hi, 0) + q_lo − q_hi] / (α_hi − α_lo + ε);
- mixed VaR: A_C = −max(q_lo − S, 0)/(α_lo + ε); A = (w·A_C + A_R)/(w + 1);
- A /= (unbiased std of the bundle's S + ε) (a bundle of one paper: std 1).

A ≤ 0 for every paper (A_R = 0 once S ≥ q_hi): the signal pushes low-scoring papers down. Every
response of paper k gets A_k ("uniform" credit); a response in no paper (its prompt has more
rollouts than the bundle's smallest group) gets 0.
Source: RTkenny/RiskPO ``core_algos.py`` compute_grpo_bundle_rvar_outcome_advantage_quantile_
tracking, ``ray_trainer.py`` (bundles, tracking), scripts run_qwen2.5_1.5b_MVaR_dapomath.sh.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mmrl.algo.groups import Groups, safe_sqrt
from mmrl.algo.rank_bonus import flags

__all__ = ["QuantileTracker", "bundle_papers", "mixed_var_advantages", "riskpo_advantages"]

ALPHAS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05, 0.10, ..., 0.95


def bundle_papers(inv: torch.Tensor, num_groups: int, bundle: int
                  ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """``(paper [B] long, -1 = in no paper; paper_bundle [n_b·N_max] long; N_max)``.

    Paper ids are ``bundle_index · N_max + k``; ``paper_bundle`` maps each id to its bundle.
    """
    order = torch.sort(inv, stable=True).indices  # rows grouped, batch order kept inside
    count = torch.zeros(num_groups, dtype=torch.long).index_add_(0, inv, torch.ones_like(inv))
    start = torch.cumsum(count, 0) - count  # [G] first sorted position of each group
    pos = torch.empty_like(inv)
    pos[order] = torch.arange(len(inv)) - start[inv[order]]  # rank of a row inside its group
    n_b = (num_groups + bundle - 1) // bundle
    b_of_group = torch.arange(num_groups) // bundle  # [G]
    papers = torch.full((n_b,), torch.iinfo(torch.long).max).scatter_reduce(
        0, b_of_group, count, reduce="amin")  # [n_b] min N_q of the bundle
    n_max = int(count.max())
    b = b_of_group[inv]
    paper = torch.where(pos < papers[b], b * n_max + pos, torch.full_like(pos, -1))
    return paper, torch.arange(n_b * n_max) // n_max, n_max


def riskpo_advantages(scores: torch.Tensor, valid: torch.Tensor, q_lo: torch.Tensor,
                      q_hi: torch.Tensor, *, alpha_lo: float, alpha_hi: float, w_mix: float,
                      eps: float) -> torch.Tensor:
    """Mixed-VaR advantage per paper ``[n_b, N]`` from paper scores ``scores [n_b, N]``
    (``valid`` marks real papers) and each bundle's ``q_lo, q_hi [n_b]`` (see the module
    docstring for the formula). Invalid entries get 0."""
    lo, hi = q_lo[:, None], q_hi[:, None]
    a_r = ((scores - lo).clamp(min=0) - (scores - hi).clamp(min=0) + lo - hi) / (
        alpha_hi - alpha_lo + eps)
    a_c = -(lo - scores).clamp(min=0) / (alpha_lo + eps)
    adv = (w_mix * a_c + a_r) / (w_mix + 1.0)
    n = valid.sum(1, keepdim=True)
    mean = torch.where(valid, scores, 0.0).sum(1, keepdim=True) / n.clamp(min=1)
    var = torch.where(valid, (scores - mean) ** 2, 0.0).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    # std 1 for a bundle of one paper (the release) and for equal scores (release: 0 + eps;
    # with batch quantiles A is 0 there anyway); safe_sqrt keeps sqrt'(0) out of the backward.
    std = safe_sqrt(var, (n <= 1) | (var.detach() <= 0))
    return torch.where(valid, adv / (std + eps), torch.zeros_like(adv))


def _batch_quantiles(scores: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """``[n_b]`` linear-interpolation quantile of each bundle's valid scores (numpy's default)."""
    return torch.nanquantile(torch.where(valid, scores, float("nan")), alpha, dim=1)


def _tracker_of(spec) -> Optional["QuantileTracker"]:
    """The run's state of ``mixed_var`` (its ``make_state`` flag): a :class:`QuantileTracker`
    unless ``algo.riskpo_quantile_mode`` is ``batch``."""
    mode = getattr(spec, "riskpo_quantile_mode", "mix")
    return None if mode == "batch" else QuantileTracker(
        getattr(spec, "riskpo_quantile_lr", 0.1), mode)


@flags(needs_lengths=False, needs_baseline=False, make_state=lambda spec: _tracker_of(spec),
       hparams=("riskpo_alpha_lo", "riskpo_alpha_hi", "riskpo_w_mix", "riskpo_bundle"))
def mixed_var_advantages(g: Groups, *, eps: float, r_max: float, riskpo_alpha_lo: float = 0.2,
                         riskpo_alpha_hi: float = 0.8, riskpo_w_mix: float = 1.5,
                         riskpo_bundle: int = 5, q_lo: Optional[torch.Tensor] = None,
                         q_hi: Optional[torch.Tensor] = None,
                         state: Optional["QuantileTracker"] = None) -> torch.Tensor:
    """RiskPO's mixed-VaR advantage per response (arXiv 2510.00911; module docstring).

    Quantiles: each bundle's batch quantiles, or ``q_lo``/``q_hi`` ``[n_b]`` when given. With
    ``state`` (the run's :class:`QuantileTracker`, which the training code builds from
    ``algo.riskpo_quantile_mode`` / ``riskpo_quantile_lr`` and keeps in the checkpoint), the
    tracked quantiles of the steps so far are used ("tracked", or "mix": averaged with the
    batch's) and then updated with this call's paper scores: one call per step.
    A bundle whose paper scores are all equal -> 0; a size-1 group is a bundle member like any
    other (its single rollout is paper 0, and caps the bundle at one paper).
    Papers pair the k-th rollout of each prompt in batch order, so reordering rows inside a
    group changes which rollouts share a paper (not the papers' distribution): the one entry
    that is not permutation invariant row by row.
    Differs from the release: step t uses q̂ as updated through step t−1 (none at the first
    step: batch quantiles), then updates it with step t's scores. The release writes q̂ into
    its batch's meta_info only after that batch's advantages, and each step's batch is new, so
    as read its advantages always fall back to batch quantiles; mmrl follows the evident intent.
    eps = ``algo.adv_eps`` (release 1e-6).
    """
    if not riskpo_alpha_lo < riskpo_alpha_hi:
        raise ValueError(f"mixed_var needs riskpo_alpha_lo < riskpo_alpha_hi, got "
                         f"{riskpo_alpha_lo} and {riskpo_alpha_hi}; e.g. 0.2 and 0.8")
    paper, _, n_max = bundle_papers(g.inv, g.G, int(riskpo_bundle))
    n_b = (g.G + int(riskpo_bundle) - 1) // int(riskpo_bundle)
    ok = paper >= 0
    idx = torch.where(ok, paper, torch.zeros_like(paper))
    flat = torch.zeros(n_b * n_max, dtype=g.r.dtype).index_add_(0, idx[ok], g.r[ok])
    have = torch.zeros(n_b * n_max, dtype=torch.bool)
    have[idx[ok]] = True
    scores, valid = flat.reshape(n_b, n_max), have.reshape(n_b, n_max)  # [n_b, N_max]
    lo = _batch_quantiles(scores, valid, riskpo_alpha_lo) if q_lo is None else q_lo
    hi = _batch_quantiles(scores, valid, riskpo_alpha_hi) if q_hi is None else q_hi
    if state is not None:
        lo, hi = state.pick(lo, riskpo_alpha_lo), state.pick(hi, riskpo_alpha_hi)
        state.update(scores[valid])
    adv = riskpo_advantages(scores, valid, lo, hi, alpha_lo=riskpo_alpha_lo,
                            alpha_hi=riskpo_alpha_hi, w_mix=riskpo_w_mix, eps=eps).reshape(-1)
    return torch.where(ok, adv[idx], torch.zeros_like(g.r))


class QuantileTracker:
    """SGD-tracked quantiles q̂_α, α ∈ {0.05, …, 0.95} (RiskPO's ``ray_trainer.py``).

    :meth:`update` with all paper scores S of a step: on the first call q̂ = the batch
    quantiles; then q̂_α ← q̂_α + lr·(α − mean(S < q̂_α)). :meth:`pick` gives, for a bundle's
    batch quantile q^b_α, q̂_α ("tracked") or (q̂_α + q^b_α)/2 ("mix"; the release's default),
    and q^b_α before the first update. α is the nearest level of the grid (the release's argmin).
    The state (q̂, fp64) round-trips exactly through :meth:`state_dict` (a checkpoint's).

    Example: lr 0.1, first step S = (0, 1, 2, 3): q̂_0.5 = 1.5; second step S = (0, 0, 0, 4):
    mean(S < 1.5) = ¾, so q̂_0.5 = 1.5 + 0.1·(0.5 − 0.75) = 1.475.
    """

    MODES = ("tracked", "mix")

    def __init__(self, lr: float = 0.1, mode: str = "mix"):
        if mode not in self.MODES:
            raise ValueError(f"quantile mode {mode!r}: expected one of {self.MODES} (batch "
                             f"quantiles need no tracker)")
        self.lr, self.mode, self.q = float(lr), mode, None

    def update(self, scores: torch.Tensor) -> torch.Tensor:
        s = scores.detach().double().reshape(-1).cpu()
        a = torch.tensor(ALPHAS, dtype=torch.float64)
        if len(s) == 0:
            return self.q
        if self.q is None:
            self.q = torch.quantile(s, a)
        else:
            self.q = self.q + self.lr * (a - (s[None, :] < self.q[:, None]).double().mean(1))
        return self.q

    def at(self, alpha: float) -> torch.Tensor:
        """q̂ at the grid level nearest ``alpha`` (after the first :meth:`update`)."""
        if self.q is None:
            raise ValueError("tracked quantiles unavailable: call update() first")
        return self.q[min(range(len(ALPHAS)), key=lambda k: abs(ALPHAS[k] - alpha))]

    def mixed(self, batch_q: torch.Tensor, alpha: float) -> torch.Tensor:
        return (self.at(alpha).to(batch_q) + batch_q) / 2

    def pick(self, batch_q: torch.Tensor, alpha: float) -> torch.Tensor:
        """The quantile this mode uses for batch quantiles ``batch_q [n_b]`` at ``alpha``."""
        if self.q is None:
            return batch_q
        if self.mode == "mix":
            return self.mixed(batch_q, alpha)
        return self.at(alpha).to(batch_q).expand_as(batch_q)

    def state_dict(self):
        return {"lr": self.lr, "mode": self.mode,
                "q": None if self.q is None else self.q.tolist()}

    def load_state_dict(self, state) -> None:
        self.q = None if state["q"] is None else torch.tensor(state["q"], dtype=torch.float64)
