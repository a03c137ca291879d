"""mmrl's preference losses against TRL 1.16's own code on the same float64 inputs.

- ``DPOTrainer._compute_loss`` (loss types sigmoid, hinge, ipo, robust, sppo_hard) on a bare
  trainer (no ``__init__``) whose attributes are set as ``DPOTrainer.__init__`` sets them from a
  ``DPOConfig``, with a stand-in model: its output ``log_probs`` are the given per-token
  log-probs (0 where the label is -100, as TRL's fused LM head returns them), and the reference
  sums come in as precomputed ``ref_chosen_logps`` / ``ref_rejected_logps``
  (``precompute_ref_log_probs=True``). Gradients flow back to our tensors.
- ``CPOTrainer.cpo_loss`` (loss types simpo and sigmoid with label smoothing, i.e. SimPO and the
  conservative loss) on ``CPOTrainer.get_batch_logps`` of logits built so that the label's
  log-softmax is exactly the given log-prob (vocabulary of 2: [x, log(1 − e^x)]).

TRL is imported from .peers (tests/peers_rl.py's stubs for its unused heavy imports). Every
difference is asserted exactly: the DPO authors' IPO sums the log-ratios (TRL: token means),
TRL's DPO sigmoid ignores label_smoothing (mmrl cdpo = CPO's conservative sigmoid), TRL's
sppo_hard is twice SPPO's loss with win rates 1 and 0.
"""
import functools
import importlib
import math
import sys
import types
from collections import defaultdict

import pytest
import torch

from mmrl.algo.preference import PreferenceLoss
from tests import peers_rl
from tests.peers import PEERS

F64 = torch.float64
P, TC, TR = 6, 5, 7
TOL = dict(rtol=1e-10, atol=1e-12)


@functools.lru_cache(maxsize=None)
def trl():
    """``trl.trainer.dpo_trainer`` and ``trl.experimental.cpo.cpo_trainer`` (stubs only while
    importing, as tests/peers_rl.py does)."""
    if not (PEERS / "trl").is_dir():
        raise RuntimeError(f"trl is missing from {PEERS}: run `make install`")
    import accelerate  # noqa: F401  the real pinned stack first
    import transformers.utils.import_utils  # noqa: F401
    if str(PEERS) not in sys.path:
        sys.path.append(str(PEERS))
    finder = peers_rl._StubFinder(peers_rl._THIRD_PARTY_STUBS)
    before = set(sys.modules)
    sys.meta_path.insert(0, finder)
    try:
        dpo = importlib.import_module("trl.trainer.dpo_trainer")
        cpo = importlib.import_module("trl.experimental.cpo.cpo_trainer")
    finally:
        sys.meta_path.remove(finder)
        for name in set(sys.modules) - before:
            if name.split(".")[0] in peers_rl._THIRD_PARTY_STUBS:
                del sys.modules[name]
    return types.SimpleNamespace(dpo=dpo, cpo=cpo)


class _OneProcess:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def pairs(seed, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    cm = torch.arange(TC)[None] < torch.tensor([5, 1, 3, 4, 2, 5])[:, None]
    rm = torch.arange(TR)[None] < torch.tensor([7, 2, 2, 6, 1, 3])[:, None]
    cw, rw = (-2 * torch.rand(s, generator=g, dtype=F64) for s in ((P, TC), (P, TR)))
    cref, rref = (x + spread * torch.randn(x.shape, generator=g, dtype=F64) for x in (cw, rw))
    return dict(cw=cw, rw=rw, cm=cm, rm=rm, cref=cref, rref=rref)


def _pad(x, width):
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def trl_dpo(d, loss_type, beta, label_smoothing=0.0):
    """(loss, d loss/d chosen logp, d loss/d rejected logp) of DPOTrainer._compute_loss."""
    cw, rw = (d[k].detach().clone().requires_grad_() for k in ("cw", "rw"))
    L = max(TC, TR)
    per_token = torch.cat([_pad(torch.where(d["cm"], cw, 0.0), L),
                           _pad(torch.where(d["rm"], rw, 0.0), L)])  # [2P, L]
    mask = torch.cat([_pad(d["cm"], L), _pad(d["rm"], L)]).long()
    mask = torch.cat([torch.zeros(2 * P, 1, dtype=torch.long), mask], 1)  # [2P, 1 + L]
    out = types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                                mean_logits=torch.zeros_like(per_token),
                                is_top1=torch.zeros(per_token.shape, dtype=torch.bool))
    cls = trl().dpo.DPOTrainer
    t = cls.__new__(cls)
    t.__dict__.update(
        beta=beta, label_smoothing=label_smoothing, loss_types=[loss_type], loss_weights=[1.0],
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        use_weighting=False, aux_loss_enabled=False, accelerator=_OneProcess(),
        model=types.SimpleNamespace(training=True), _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": mask,
              "completion_mask": mask,
              "ref_chosen_logps": torch.where(d["cm"], d["cref"], 0.0).sum(-1),
              "ref_rejected_logps": torch.where(d["rm"], d["rref"], 0.0).sum(-1)}
    loss = cls._compute_loss(t, lambda **kw: out, inputs, return_outputs=False)
    return (loss.detach(), *torch.autograd.grad(loss, (cw, rw)))


def trl_cpo(d, loss_type, beta, *, simpo_gamma=0.0, label_smoothing=0.0, average=True,
            with_ref=False):
    """CPOTrainer.cpo_loss(...).mean() on get_batch_logps of each side."""
    cw, rw = (d[k].detach().clone().requires_grad_() for k in ("cw", "rw"))
    cls = trl().cpo.CPOTrainer

    def logps(x, mask, ref):
        x = x - ref if with_ref else x  # conservative DPO: CPO's code on the log-ratios
        safe = torch.where(mask, x, -1.0)
        if with_ref:  # a log-ratio may be ≥ 0: shift into (−∞, 0) and back (sum of shifts)
            safe = safe - 10.0
        logits = torch.stack([safe, torch.log(-torch.expm1(safe))], -1)  # [P, T, 2]
        # get_batch_logps predicts label t + 1 from position t: a last position predicts nothing
        logits = torch.cat([logits, torch.zeros_like(logits[:, :1])], 1)
        labels = torch.cat([torch.full((x.shape[0], 1), -100), torch.where(mask, 0, -100)], 1)
        value = cls.get_batch_logps(logits, labels, average_log_prob=average)
        return value + 10.0 * mask.sum(-1) if with_ref else value

    t = cls.__new__(cls)
    t.__dict__.update(alpha=0.0, loss_type=loss_type, beta=beta, simpo_gamma=simpo_gamma,
                      label_smoothing=label_smoothing, accelerator=_OneProcess())
    losses, _, _ = cls.cpo_loss(t, logps(cw, d["cm"], d["cref"]), logps(rw, d["rm"], d["rref"]))
    loss = losses.mean()
    return (loss.detach(), *torch.autograd.grad(loss, (cw, rw)))


def mmrl(d, preset, **overrides):
    cw, rw = (d[k].detach().clone().requires_grad_() for k in ("cw", "rw"))
    loss = PreferenceLoss(preset, **overrides)
    kw = dict(chosen_ref=d["cref"], rejected_ref=d["rref"]) if loss.spec.needs_ref else {}
    if loss.spec.needs_win == "both":  # SPPO's hard win rates: chosen 1, rejected 0
        kw.update(chosen_win=torch.ones(P, dtype=F64), rejected_win=torch.zeros(P, dtype=F64))
    value, _ = loss(cw, rw, d["cm"], d["rm"], **kw)
    return (value.detach(), *torch.autograd.grad(value, (cw, rw)))


def same(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("preset, overrides, loss_type, kw", [
    ("dpo", dict(beta=0.3), "sigmoid", {}),
    ("dpo", dict(beta=0.3, loss="hinge"), "hinge", {}),
    ("robust_dpo", dict(beta=0.3, label_smoothing=0.2), "robust", dict(label_smoothing=0.2)),
    ("ipo", dict(beta=0.3, length_normalize=True), "ipo", {}),
], ids=["sigmoid", "hinge", "robust", "ipo_token_mean"])
def test_equals_trl_dpo_trainer(seed, preset, overrides, loss_type, kw):
    d = pairs(seed)
    same(mmrl(d, preset, **overrides), trl_dpo(d, loss_type, overrides["beta"], **kw))


def test_ipo_sums_the_log_ratios_as_the_dpo_authors_code_trl_averages_them():
    d = pairs(2)
    ours, theirs = mmrl(d, "ipo", beta=0.3), trl_dpo(d, "ipo", 0.3)
    assert not torch.allclose(ours[0], theirs[0])
    # With every completion one token long the two conventions coincide.
    one = dict(d, cm=d["cm"] & (torch.arange(TC) == 0), rm=d["rm"] & (torch.arange(TR) == 0))
    same(mmrl(one, "ipo", beta=0.3), trl_dpo(one, "ipo", 0.3))


def test_trl_dpo_sigmoid_ignores_label_smoothing_mmrl_cdpo_equals_cpos_conservative_loss():
    d = pairs(3)
    # TRL 1.16's DPOTrainer reads label_smoothing only in robust / exo_pair / aot*: its sigmoid
    # with label_smoothing=0.1 is plain DPO, not conservative DPO.
    same(mmrl(d, "dpo", beta=0.4), trl_dpo(d, "sigmoid", 0.4, label_smoothing=0.1))
    assert not torch.allclose(mmrl(d, "cdpo", beta=0.4)[0], mmrl(d, "dpo", beta=0.4)[0])
    # cDPO is CPOTrainer's sigmoid with label smoothing on the summed log-ratios.
    same(mmrl(d, "cdpo", beta=0.4), trl_cpo(d, "sigmoid", 0.4, label_smoothing=0.1,
                                            average=False, with_ref=True))


def test_sppo_is_half_of_trls_sppo_hard_with_win_rates_one_and_zero():
    d = pairs(4)
    ours, theirs = mmrl(d, "sppo", beta=0.5), trl_dpo(d, "sppo_hard", 0.5)
    same(tuple(2 * x for x in ours), theirs)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_equals_trl_cpo_simpo(smoothing):
    d = pairs(5)
    # CPO parametrizes the margin by γ itself: γ = β·(γ/β) = 2.0·0.25.
    same(mmrl(d, "simpo", label_smoothing=smoothing),
         trl_cpo(d, "simpo", 2.0, simpo_gamma=0.5, label_smoothing=smoothing))


def test_the_harness_feeds_trl_exactly_our_log_probs():
    # get_batch_logps of the crafted logits returns the masked mean of the given log-probs.
    d = pairs(6)
    cls = trl().cpo.CPOTrainer
    x = d["cw"]
    logits = torch.stack([x, torch.log(-torch.expm1(x))], -1)
    logits = torch.cat([logits, torch.zeros_like(logits[:, :1])], 1)
    labels = torch.cat([torch.full((P, 1), -100), torch.where(d["cm"], 0, -100)], 1)
    got = cls.get_batch_logps(logits, labels, average_log_prob=True)
    want = torch.where(d["cm"], x, 0.0).sum(-1) / d["cm"].sum(-1)
    torch.testing.assert_close(got, want, **TOL)
    assert math.isclose(float(torch.logsumexp(logits[0, 1], -1)), 0.0, abs_tol=1e-15)
