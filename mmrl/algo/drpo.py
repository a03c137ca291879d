"""DRPO (arXiv 2510.04474, Optimization-AI/DRPO ``compute_policy_loss_drpo``): a group-level
objective on binary rewards whose length reward touches correct responses only.

Registered as the advantage ``reward`` (A_i = r_i: the objective reads the rewards itself) and
the objective ``drpo``; the preset ``drpo`` combines them (:mod:`mmrl.algo.presets`).

For a group with at least one correct (r = 1) and one wrong (r = 0) response, with
s_i = (1/|o_i|) Σ_t logp_i,t (current policy) and ℓ_i = |o_i| / L_max:

    w_i = exp((1 − ℓ_i)/λ)  (correct rows only)
    J_g = Σ_{r_i=1} w_i·s_i / Σ_{r_i=1} w_i − τ·S_g/sg(S_g),  S_g = Σ_{r_j=0} exp(s_j/τ − m_g)

(the second term has value τ and the gradient of τ·logsumexp_{r_j=0}(s_j/τ), as the released
code computes it; m_g = max s_j/τ, detached, for stability). Loss = −Σ_g J_g / Q +
sg(β·max(KL − δ, 0))·KL with KL the token mean of −x + eˣ − 1, x = logp − old_logp.
"""
from __future__ import annotations

import torch

from mmrl.algo.common import ratio as importance_ratio

__all__ = ["reward_advantages", "drpo_objective"]


def reward_advantages(g, *, eps: float, r_max: float) -> torch.Tensor:
    """A_i = r_i: no baseline, no normalization; for objectives that read the rewards
    themselves (``drpo``). Size-1 and zero-std groups keep their rewards (``drpo`` skips
    groups without both a correct and a wrong row)."""
    return g.r


def drpo_objective(log_ratio, adv, *, spec, valid=None, group_ids=None, logp=None, mask=None,
                   **_):
    """Per-token loss ``[B, T]`` whose ``seq_mean_token_sum`` is DRPO's loss (module docstring).

    Row i of group g carries ℓ_i = −N_g·w_i·s_i/W_g (correct) or +N_g·τ·e_i/sg(S_g) (wrong),
    spread evenly over its valid tokens, so that Σ_i ℓ_i / B = −Σ_g J_g / Q when every group has
    N rows (B = Q·N); rows of skipped groups and rows whose reward is neither 0 nor 1 get 0.
    The KL constraint adds c·k3_i,t·B_call/T_call to every valid token, c = sg(β·max(KL_call −
    δ, 0)), KL_call the token mean of k3 over this call (so it is the token mean after the
    sequence aggregation). No clipping: ``low`` / ``high`` are all False.

    ``adv`` holds the raw rewards (advantage ``reward``), ``[B, 1]`` or ``[B, T]``.
    Differs from the released code: groups of unequal size weigh by their size N_g (the code
    reshapes to equal groups); under micro-batching, or data parallelism, KL_call and c are
    per call (the code's are over the gathered batch), so the constraint is exact only when one
    call sees the whole mini-batch. Whole groups must be in one call (as ``reg``).

    L_max is ``spec.max_len`` (the video job: ``video.max_new_tokens``), else this call's T (the
    code's ``eos_mask.size(-1)``, its padded response width).

    Raises:
        ValueError: logp, mask or group_ids missing.
    """
    if logp is None or mask is None or group_ids is None:
        raise ValueError("objective 'drpo' reads logp [B, T], mask [B, T] and group_ids [B]; "
                         "PolicyLoss passes them (pass group_ids=)")
    l_max = spec.max_len if spec.max_len is not None else mask.shape[1]
    m = mask.to(logp.dtype)
    n_tok = m.sum(-1)  # [B]
    s = torch.where(mask, logp, 0.0).sum(-1) / n_tok.clamp(min=1)  # [B] with gradient
    r = adv[:, 0].detach()
    pos, neg = (r == 1) & (n_tok > 0), (r == 0) & (n_tok > 0)
    uniq, inv = torch.unique(group_ids.to(logp.device), return_inverse=True)
    G = uniq.numel()  # from the output's shape, no read-back
    zeros = torch.zeros(G, dtype=logp.dtype, device=logp.device)
    count = zeros.index_add(0, inv, torch.ones_like(s))  # N_g
    live = (zeros.index_add(0, inv, pos.to(s.dtype)) > 0) & (
        zeros.index_add(0, inv, neg.to(s.dtype)) > 0)  # [G]
    w = torch.where(pos, torch.exp((1.0 - n_tok / l_max) / spec.drpo_lambda), 0.0)
    W = zeros.index_add(0, inv, w)  # [G]
    z = s / spec.drpo_tau
    top = torch.full_like(zeros, -torch.inf).scatter_reduce(
        0, inv, torch.where(neg, z.detach(), -torch.inf), reduce="amax")
    top = torch.where(torch.isfinite(top), top, 0.0)  # a group without wrong rows
    e = torch.where(neg, torch.exp(torch.where(neg, z - top[inv], 0.0)), 0.0)
    S = zeros.index_add(0, inv, e)  # [G]
    row = torch.where(pos, -w * s / W[inv].clamp(min=1e-30),
                      spec.drpo_tau * e / S[inv].detach().clamp(min=1e-30))
    row = torch.where(live[inv] & (pos | neg), count[inv] * row, 0.0)  # [B]
    loss = (row / n_tok.clamp(min=1))[:, None] * m  # spread over the row's tokens
    x = torch.where(mask, log_ratio, 0.0)  # token ratio level: logp − sg(old_logp), masked
    k3 = torch.where(mask, -x + torch.exp(x.clamp(max=20.0)) - 1.0, 0.0)
    kl = k3.sum() / m.sum().clamp(min=1)
    coef = (spec.drpo_beta * (kl - spec.drpo_delta)).clamp(min=0.0).detach()
    loss = loss + coef * k3 * (mask.shape[0] / m.sum().clamp(min=1))
    none = torch.zeros_like(mask)
    return loss, importance_ratio(log_ratio), none, none
