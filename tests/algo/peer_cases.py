"""Shared inputs and runners of tests/algo/test_vs_peers*.py: mmrl's PolicyLoss, verl's policy
losses / estimators and TRL's GRPOTrainer._compute_loss (tests/peers_rl.py) on the same float64
tensors, each returning (value, gradient with respect to logp)."""
import numpy as np
import torch

from mmrl.algo.losses import PolicyLoss
from tests import peers_rl as peers

F64 = torch.float64
B, T = 8, 7
LENGTHS = [7, 3, 1, 5, 7, 2, 6, 4]  # every row non-empty
LENGTHS_EMPTY = [7, 3, 0, 5, 7, 2, 6, 4]  # row 2 empty
TOL = dict(rtol=1e-9, atol=1e-12)
VERL_TOL = dict(rtol=1e-7, atol=1e-10)  # verl's masked means divide by (count + 1e-8)


def batch(seed=0, lengths=LENGTHS, scale=0.3, adv_scale=1.0):
    """logp (leaf), old/ref log-probs, bool mask, advantages [B]; garbage in the padding."""
    g = torch.Generator().manual_seed(seed)
    logp = -2 * torch.rand(B, T, generator=g, dtype=F64)
    old = logp + scale * torch.randn(B, T, generator=g, dtype=F64)
    ref = logp + scale * torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]  # [B, T]
    garbage = 5 * torch.randn(B, T, generator=g, dtype=F64)
    old, ref = (torch.where(mask, x, garbage) for x in (old, ref))
    adv = adv_scale * torch.randn(B, generator=g, dtype=F64)
    return dict(logp=logp, old=old, ref=ref, mask=mask, adv=adv)


def value_and_grad(fn, logp):
    """(loss, d loss / d logp) of ``fn(leaf)``."""
    leaf = logp.detach().clone().requires_grad_()
    loss = fn(leaf)
    grad, = torch.autograd.grad(loss, leaf, allow_unused=True)
    return loss.detach(), torch.zeros_like(leaf) if grad is None else grad


def assert_same(got, want, tol=TOL):
    (gv, gg), (wv, wg) = got, want
    torch.testing.assert_close(gv, wv.to(F64), **tol)
    torch.testing.assert_close(gg, wg, **tol)


CALL_KEYS = ("num_tokens", "num_seqs", "ref_logp", "rollout_logp", "entropy", "entropy_mask",
             "generator")


def mmrl_loss(d, algo="grpo", **kw):
    """(value, grad) of mmrl's PolicyLoss; keywords for __call__ are split from overrides."""
    call = {k: kw.pop(k) for k in CALL_KEYS if k in kw}
    loss = PolicyLoss(algo, **kw)
    return value_and_grad(lambda lp: loss(lp, d["old"], d["adv"], d["mask"], **call)[0], d["logp"])


def verl_loss(d, mode, agg, **cfg):
    """(value, grad) of verl's registered policy loss ``mode`` with ``loss_agg_mode=agg``."""
    core = peers.verl_algos()
    fn = core.get_policy_loss_fn(mode)
    adv = d["adv"][:, None] * d["mask"]  # verl's estimators return A broadcast × mask
    config = peers.verl_config(**cfg)
    return value_and_grad(lambda lp: fn(d["old"], lp, adv, d["mask"].to(F64),
                                        loss_agg_mode=agg, config=config)[0], d["logp"])


def trl(d, **kw):
    """(value, grad) of TRL's GRPOTrainer._compute_loss (mask passed as TRL's long mask);
    ``ref_logp``, ``num_items``, ``entropies``, ``sampling_logp``, ``is_ratio`` are its inputs,
    the rest GRPOConfig fields."""
    inputs = {k: kw.pop(k) for k in ("ref_logp", "num_items", "entropies", "sampling_logp",
                                     "is_ratio") if k in kw}
    return value_and_grad(lambda lp: peers.trl_loss(lp, d["old"], d["adv"], d["mask"].long(),
                                                    **inputs, **kw), d["logp"])


VERL_AGG = {"token_mean": "token-mean", "seq_mean_token_mean": "seq-mean-token-mean",
            "seq_mean_token_sum": "seq-mean-token-sum"}


def loss_matrix(seed, lengths):
    """A random per-token loss [B, T] (leaf for gradients) and its bool mask of ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    return torch.randn(B, T, generator=g, dtype=F64), mask


GIDS = [3, 3, 3, 3, 8, 8, 8, 8, 5, 5, 5, 5]


def rewards(seed, n=12, ties=False):
    """[n] normal rewards for GIDS' three groups of 4; ``ties``: group 8 all 0.5 (zero std)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, generator=g, dtype=F64)
    if ties:
        r[4:8] = 0.5  # a zero-std group
    return r


def verl_adv(name, r, gids, lengths=None, **kw):
    """verl's estimator ``name`` on outcome rewards placed at each row's last valid token; its
    [B, T] output reduced to one value per row (checked constant over the row's tokens)."""
    n = r.shape[0]
    lengths = torch.full((n,), 4) if lengths is None else torch.as_tensor(lengths)
    mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).to(F64)
    token_rewards = torch.zeros_like(mask)
    token_rewards[torch.arange(n), lengths - 1] = r
    core = peers.verl_algos()
    fn = core.get_adv_estimator_fn(name)
    adv, _ = fn(token_level_rewards=token_rewards, response_mask=mask,
                index=np.array(gids), **kw)
    per_row = adv[:, 0]
    torch.testing.assert_close(adv, per_row[:, None] * mask)  # one advantage per sequence
    return per_row


# TRL's nanstd computes its Bessel factor count / (count − 1) from integer counts in the default
# float32 dtype (relative error ~1.5e-8 on every std): compared at rtol 1e-7.
TRL_ADV_TOL = dict(rtol=1e-7, atol=1e-12)


def columns(seed):
    """[12, 3] reward columns for GIDS; column 1 constant in the first group."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.randn(12, 3, generator=g, dtype=F64)
    cols[:4, 1] = 1.0  # one column constant in one group
    return cols
