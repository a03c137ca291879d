"""Advantages that read how likely each sample was, and a reward gated by the outcome.

- ``unlikeliness`` (Rewarding the Unlikely, arXiv 2506.02355): correct samples the policy
  already finds likely are discounted by their likelihood rank in the group.
- ``novelty_sharpen`` (XRPO, arXiv 2510.06672): positive GRPO advantages of unlikely samples
  are amplified. **Unconfirmed**: only the abstract was reachable; see its docstring.
- ``posterior_gate`` (Posterior-GRPO, arXiv 2508.05170), a multi-reward rule: the process
  (reasoning) reward counts only for samples whose outcome succeeded. **Unconfirmed** sum.

The likelihood of row i is ``seq_logp_i`` = the token mean of its old log-probs over its valid
tokens (ℓ̄_i), handed in by the training code when the entry declares ``needs_seq_logp``; it
carries no gradient (a detached rollout statistic). Extra hyper-parameters are declared in each
entry's ``hparams`` and read from :class:`mmrl.algo.spec.AlgoSpec`.
"""
from __future__ import annotations

import torch

from mmrl.algo.groups import Groups

__all__ = ["flags", "likelihood_rank", "novelty_sharpen_advantages", "posterior_gate",
           "unlikeliness_advantages"]


def flags(**attrs):
    """Attach the flags the registries and presets read (the entries are registered, one line
    each, in :mod:`mmrl.algo.advantages`)."""
    def wrap(fn):
        for key, value in attrs.items():
            setattr(fn, key, value)
        return fn
    return wrap


def _seq_logp(g: Groups, name: str) -> torch.Tensor:
    if g.seq_logp is None:
        raise ValueError(f"advantage {name!r} needs seq_logp (each row's token-mean old "
                         "log-prob) and got None; pass seq_logp=[B] (the training code does when "
                         "the spec's advantage is this one; a multi-reward method does not "
                         "forward it, so use a single reward column)")
    return g.seq_logp.detach().to(g.r.dtype)


def likelihood_rank(seq_logp: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """``[B]`` long: rank of ℓ̄_i among its group, ascending (0 = least likely).

    Ties go by batch order (the earlier row ranks lower). O(B²) comparisons, no group loop.
    """
    same = inv[:, None] == inv[None, :]  # [B, B]
    idx = torch.arange(len(inv), device=inv.device)
    below = (seq_logp[None, :] < seq_logp[:, None]) | (
        (seq_logp[None, :] == seq_logp[:, None]) & (idx[None, :] < idx[:, None]))
    return (same & below).sum(1)  # [B]


@flags(needs_lengths=False, needs_baseline=False,
       needs_seq_logp=True, hparams=("unlikely_beta",))
def unlikeliness_advantages(g: Groups, *, eps: float, r_max: float,
                            unlikely_beta: float = 0.25) -> torch.Tensor:
    """GRPO on r̃_i = r_i·(1 − β·rank_i/N_g) (Rewarding the Unlikely, arXiv 2506.02355).

    rank_i: :func:`likelihood_rank` of ℓ̄_i (``seq_logp``) in its group of N_g samples. Wrong
    samples (r = 0) stay 0; the most likely correct sample is discounted most. N = 4, β = 0.25:
    correct samples of rank 0 and 3 get 1.0 and 0.8125. Then (r̃ − mean_g)/(std_g + eps),
    unbiased std. Size-1 and zero-std groups (of r̃) -> 0.
    Differs from the code (AndreHe02/rewarding-unlikely-release ``_compute_advantages``):
    eps = ``algo.adv_eps`` (code 1e-6: override adv_eps); a singleton gets 0
    (code: mean 0, std 1, so A = r̃); ties in ℓ̄ go by batch order (code: its sort's order).
    """
    rank = likelihood_rank(_seq_logp(g, "unlikeliness"), g.inv).to(g.r.dtype)
    shaped = g.r * (1.0 - unlikely_beta * rank / g.count[g.inv])  # [B]
    s = Groups(shaped, g.inv, g.G)
    return s.zero_where_constant((shaped - s.mean[g.inv]) / (s.std[g.inv] + eps))


@flags(needs_lengths=False, needs_baseline=False,
       needs_seq_logp=True, hparams=("novelty_lambda",))
def novelty_sharpen_advantages(g: Groups, *, eps: float, r_max: float,
                               novelty_lambda: float = 1.0) -> torch.Tensor:
    """A_i = A^GRPO_i·(1 + λ·max(ν_i, 0)) where A^GRPO_i > 0, else A^GRPO_i (XRPO, 2510.06672).

    ν_i = (mean_g ℓ̄ − ℓ̄_i)/(std_g ℓ̄ + eps): how much less likely row i is than its group
    (a z-score of the token-mean log-prob, unbiased std; 0 where the group's ℓ̄ are all equal).
    Only above-mean (correct) samples are sharpened; the group's negative advantages are kept.
    Size-1 and zero-std (reward) groups -> 0.
    **Unconfirmed**: the abstract says "group-relative, novelty-aware advantage sharpening that
    leverages sequence likelihoods to amplify low-probability yet correct responses"; the paper's
    formula and constants were not reachable (UIUC-MLSys/XRPO unavailable here). ν's z-score
    form, the factor (1 + λ·ν⁺) and λ = 1 are mmrl's reading, not the paper's.
    """
    ell = _seq_logp(g, "novelty_sharpen")
    lg = Groups(ell, g.inv, g.G)
    nu = lg.zero_where_constant((lg.mean[g.inv] - ell) / (lg.std[g.inv] + eps))
    base = g.zero_where_constant((g.r - g.mean[g.inv]) / (g.std[g.inv] + eps))
    return torch.where(base > 0, base * (1.0 + novelty_lambda * nu.clamp(min=0)), base)


@flags(one_column=False, hparams=("posterior_threshold",))
def posterior_gate(columns, inv, num_groups, weights, base, *, base_fn, lengths=None,
                   baseline=None, seq_logp=None, base_hparams=None,
                   posterior_threshold: float = 1.0, **kw) -> torch.Tensor:
    """A = base(w_0·r^out + 1[r^out ≥ τ]·Σ_{k≥1} w_k r^k): process rewards only on success.

    Posterior-GRPO (arXiv 2508.05170): column 0 is the outcome reward (tests passed, answer
    right), the other columns process (reasoning) rewards; a sample whose outcome is below
    τ = ``posterior_threshold`` (1.0: full success, "passes all tests") gets its outcome reward
    alone, so the policy
    cannot raise its reward through reasoning-reward hacking on failed samples. ``base_fn``: the
    single-reward estimator named ``base`` (handed in by ``group_advantages``).
    **Unconfirmed**: the abstract pins down the gating ("selectively applying rewards to the
    reasoning processes of only successful outcomes"); the weighted sum and τ are mmrl's.
    """
    if columns.shape[1] < 2:
        raise ValueError(f"posterior_gate needs an outcome column and at least one process "
                         f"column, got {columns.shape[1]} column(s); list the outcome reward "
                         "first, then the reasoning reward(s)")
    w = torch.as_tensor(list(weights), dtype=columns.dtype, device=columns.device)
    success = (columns[:, 0] >= posterior_threshold).to(columns.dtype)  # [B]
    total = w[0] * columns[:, 0] + success * (columns[:, 1:] @ w[1:])  # [B, K-1] @ [K-1] -> [B]
    b = None if baseline is None else baseline @ w
    return base_fn(Groups(total, inv, num_groups, lengths, b, seq_logp), **kw,
                   **(base_hparams or {}))
