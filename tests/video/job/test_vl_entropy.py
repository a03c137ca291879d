"""QwenVLPolicy.logp_and_entropy on the tiny Qwen2.5-VL: the chunked, recomputed entropy equals
the one from the full log-softmax (values and gradients), logp equals ``logp``, and the loop's
entropy bonus + top-entropy mask give the same update unsplit and micro-batched."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from vt_helpers import make_policy, rollout  # noqa: E402


def _full_entropy(pol, ro, rows):
    """H from the whole ``[b, T, V]`` log-softmax at once (the obvious way)."""
    cache = ro.data["prompt_cache"]
    resp = ro.data["response"][rows]
    hidden, head = pol._hidden(pol.model, cache, ro.data["prompt_index"][rows], resp)
    P = cache.ids.shape[1]
    lp = pol._logprobs(head, hidden[:, P - 1:P - 1 + resp.shape[1]])  # [b, T, V]
    # −Σ p log p with 0·log 0 = 0 (where() on log p first: its gradient is NaN otherwise)
    return -(lp.exp() * torch.where(torch.isfinite(lp), lp, torch.zeros_like(lp))).sum(-1)


def _params(pol):
    return [p for p in pol.parameters() if p.requires_grad]


def test_chunked_entropy_and_logp_equal_the_full_softmax_values_and_gradients(tiny_vl_dir,
                                                                                vt_batch):
    pol = make_policy(tiny_vl_dir, tw_chunk=2, allowed_answers=["A", "B"])  # -inf entries too
    ro = rollout(pol, vt_batch)
    rows, T = torch.arange(len(ro)), ro.mask.shape[1]
    lp, h = pol.logp_and_entropy(ro, rows, 0, T)
    ref_h = _full_entropy(pol, ro, rows)
    torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp, pol.logp(ro, rows, 0, T), atol=1e-5, rtol=0)
    # allowed answers only: the entropy is at most log(#allowed ids), and > 0 for random weights
    assert float(h.detach().max()) <= float(torch.log(torch.tensor(float(len(pol.allowed))))) + 1e-5
    assert float(h.detach().min()) > 0
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(0))
    g_chunked = torch.autograd.grad(((h + lp) * w).sum(), _params(pol))
    g_full = torch.autograd.grad(((ref_h + pol.logp(ro, rows, 0, T)) * w).sum(), _params(pol))
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert sum(float(g.abs().sum()) for g in g_full) > 0
    # a T slice of rows equals the same slice of the whole
    lp2, h2 = pol.logp_and_entropy(ro, torch.tensor([1, 4]), 1, 3)
    torch.testing.assert_close(h2, h[[1, 4], 1:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(lp2, lp[[1, 4], 1:3], atol=1e-5, rtol=0)


def test_entropy_bonus_and_top_entropy_update_is_invariant_to_micro_batching(tiny_vl_dir,
                                                                               vt_batch):
    from mmrl.algo.losses import PolicyLoss
    from mmrl.train.loop import LoopSettings, update
    pol = make_policy(tiny_vl_dir, tw_chunk=3)
    ro = rollout(pol, vt_batch, group=2)
    adv = torch.tensor([1.0, -1.0, 0.3, -0.3])
    before = [p.detach().clone() for p in _params(pol)]
    loss_fn = PolicyLoss("dapo", entropy_coef=0.5, top_entropy_quantile=0.4)
    deltas = []
    for micro, t_chunk in ((0, 0), (2, 2)):
        stats = update(pol, torch.optim.SGD(_params(pol), lr=1.0), loss_fn, ro, adv,
                       LoopSettings(group_size=2, micro_batch_size=micro, t_chunk=t_chunk,
                                    max_grad_norm=0), torch.Generator().manual_seed(0))
        deltas.append(torch.cat([(p.detach() - b).flatten()
                                 for p, b in zip(_params(pol), before)]))
        with torch.no_grad():
            for p, b in zip(_params(pol), before):
                p.copy_(b)
        assert 0.3 < float(stats["entropy_kept"]) < 0.6  # ~40% of the valid tokens kept
        assert float(stats["entropy"]) > 0
    torch.testing.assert_close(deltas[1], deltas[0], atol=1e-6, rtol=1e-4)
    assert float(deltas[0].abs().sum()) > 0
