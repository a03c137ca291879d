"""Conformance: every registered name on every axis, and every preset, meets the same contract.

Parametrized over the registries themselves, so a new entry is tested for free — and fails
with "add an oracle" until tests/reference/core_math.py (or, for objectives that read the whole
call, tests/reference/objectives_ref.py) restates its formula.
"""
import pytest
import torch

from mmrl.algo.advantages import ADVANTAGES, MULTI_REWARD, group_advantages
from mmrl.algo.losses import AGGREGATIONS, KL_ESTIMATORS, OBJECTIVES, RATIO_LEVELS, PolicyLoss
from mmrl.algo.presets import PRESETS, algo_problems, resolve_algo
from tests.reference import objectives_ref as obj_ref
from tests.reference import advantages_ref, core_math as ref

F64 = torch.float64
B, T = 6, 5
GIDS = torch.tensor([3, 3, 8, 8, 8, 1])
LENGTHS = torch.tensor([5, 2, 0, 4, 5, 1])  # one empty row
MASK = torch.arange(T)[None] < LENGTHS[:, None]


def oracle(table, name):
    if name not in table:
        pytest.fail(f"no oracle for {name!r}: add a loop version to tests/reference/core_math.py")
    return table[name]


def tensors(seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    logp = (-2 * torch.rand(B, T, generator=g, dtype=F64)).requires_grad_()
    old = logp.detach() + scale * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    return logp, old, adv


def nested(x):
    return [[x[i, t] for t in range(x.shape[1])] for i in range(x.shape[0])]


@pytest.mark.parametrize("registry", [ADVANTAGES, MULTI_REWARD, RATIO_LEVELS, OBJECTIVES,
                                      AGGREGATIONS, KL_ESTIMATORS], ids=lambda r: r.axis)
def test_every_entry_documents_its_formula(registry):
    for name, fn in registry.items():
        assert fn.__doc__ and len(fn.__doc__.strip()) > 10, f"{registry.axis} {name!r}"


# ---------------------------------------------------------------- advantages
def _extras(fn):
    """The inputs an estimator's flags ask for (token counts, a baseline reward per row)."""
    assert isinstance(fn.needs_lengths, bool) and isinstance(fn.needs_baseline, bool)
    extra = {"lengths": LENGTHS} if fn.needs_lengths else {}
    if fn.needs_baseline:
        extra["baseline"] = torch.tensor([0.5, 0.5, 1.0, 1.0, 1.0, 0.0], dtype=F64)
    if getattr(fn, "needs_seq_logp", False):  # each row's token-mean old log-prob
        extra["seq_logp"] = torch.tensor([-0.7, -0.2, -1.5, -0.4, -0.9, -1.1], dtype=F64)
    return extra, {k: v.tolist() for k, v in extra.items()}


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_advantage_entry(name):
    r = torch.tensor([0.3, 0.3, 0.0, 0.0, 1.0, 0.4], dtype=F64)  # constant group, singleton
    extra, lists = _extras(ADVANTAGES.get(name))
    table = {**ref.ADVANTAGES, **advantages_ref.ADVANTAGES}
    adv = group_advantages(r, GIDS, name, **extra)
    want = oracle(table, name)(r.tolist(), GIDS.tolist(), **lists)
    torch.testing.assert_close(adv, torch.tensor(want, dtype=F64), rtol=1e-10, atol=1e-12)
    assert adv.shape == (B,) and torch.isfinite(adv).all()
    big = group_advantages(r * 1e6, GIDS, name, **extra)
    assert torch.isfinite(big).all()
    # gradients w.r.t. the rewards (e.g. a differentiable reward model) match the oracle's
    rg = r.clone().requires_grad_()
    w = torch.linspace(-1, 2, B, dtype=F64)
    g1, = torch.autograd.grad((group_advantages(rg, GIDS, name, **extra) * w).sum(), rg)
    want = oracle(table, name)(list(rg.unbind()), GIDS.tolist(), **lists)
    g2, = torch.autograd.grad(sum(wi * a for wi, a in zip(w, want) if torch.is_tensor(a)), rg)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("name", MULTI_REWARD.names())
def test_multi_reward_entry(name):
    cols = torch.tensor([[0.2, 1], [0.9, 0], [0, 0], [0, 1], [1, 1], [0.4, 0]], dtype=F64)
    got = group_advantages(cols, GIDS, name, weights=[1.0, 0.5])
    table = {**ref.MULTI_REWARD, **advantages_ref.MULTI_REWARD}
    want = oracle(table, name)(cols.tolist(), GIDS.tolist(), [1.0, 0.5])
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- ratio levels
@pytest.mark.parametrize("name", RATIO_LEVELS.names())
def test_ratio_level_entry(name):
    fn = RATIO_LEVELS.get(name)
    assert isinstance(fn.per_sequence, bool) and isinstance(fn.whole_sequence, bool)
    assert isinstance(fn.needs_step_terms, bool)
    logp, old, _ = tensors(0)
    g = torch.Generator().manual_seed(4)  # a Gaussian step's std and mean_d(μ_θ − μ_old)²
    terms = dict(step_std=0.05 + torch.rand(B, T, generator=g, dtype=F64),
                 mean_shift=1e-3 * torch.rand(B, T, generator=g, dtype=F64)) \
        if fn.needs_step_terms else {}
    got = fn(logp, old, MASK, **terms)
    assert got.shape == ((B, 1) if fn.per_sequence else (B, T))
    want = torch.stack([torch.stack(row) for row in oracle(ref.RATIO_LEVELS, name)(logp, old, MASK,
                                                                                  **terms)])
    valid = MASK.any(-1, keepdim=True) if fn.per_sequence else MASK
    torch.testing.assert_close(got[valid], want[valid])
    w = torch.randn(got.shape, dtype=F64)
    g1, = torch.autograd.grad((got * w)[valid].sum(), logp)
    g2, = torch.autograd.grad((want * w)[valid].sum(), logp)
    torch.testing.assert_close(g1, g2)
    same = {k: torch.zeros_like(v) if k == "mean_shift" else v for k, v in terms.items()}
    assert torch.all(fn(logp, logp.detach(), MASK, **same) == 0)  # same policy: log-ratio 0


# ---------------------------------------------------------------- objectives
def _spec_for(name, **kw):
    fn = OBJECTIVES.get(name)
    level = "sequence_sum" if fn.needs_per_sequence else "token"
    agg = "seq_mean" if fn.needs_per_sequence else "token_mean"
    return resolve_algo("grpo", objective=name, ratio_level=level, aggregation=agg, **kw)


def _objective_case(name, log_ratio, adv, spec):
    fn = OBJECTIVES.get(name)
    valid = torch.ones(log_ratio.shape, dtype=torch.bool)
    # logp = old_logp + log_ratio: objectives that read logp get the same gradient path
    old = -2 * torch.rand(log_ratio.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    logp = old + log_ratio
    loss, ratio, low, high = fn(log_ratio, adv, spec=spec, valid=valid, group_ids=GIDS,
                                logp=logp, mask=valid, generator=torch.Generator().manual_seed(7))
    if name in obj_ref.OBJECTIVES:  # whole-call oracles (tests/reference/objectives_ref.py)
        groups = {"group_ids": GIDS.tolist()} if fn.needs_groups else {}
        want = obj_ref.OBJECTIVES[name](nested(log_ratio), nested(adv.expand_as(log_ratio)),
                                        nested(logp), nested(valid), spec,
                                        torch.Generator().manual_seed(7), **groups)
        return loss, torch.stack([torch.stack(row) for row in want]), ratio, low, high
    ora = oracle(ref.OBJECTIVES, name)
    if fn.needs_per_sequence:
        want = torch.stack(ora([x for x in log_ratio[:, 0]], [a for a in adv[:, 0]],
                               GIDS.tolist(), [True] * B, spec)).unsqueeze(-1)
    else:
        a = adv.expand_as(log_ratio)
        want = torch.stack([torch.stack([ora(log_ratio[i, t], a[i, t], spec)
                                         for t in range(log_ratio.shape[1])]) for i in range(B)])
    return loss, want, ratio, low, high


# dual_clip_c is a parameter of 'clip' only (algo_problems rejects it elsewhere)
@pytest.mark.parametrize("name, dual", [(n, None) for n in OBJECTIVES.names()] + [("clip", 2.5)])
def test_objective_entry(name, dual):
    spec = _spec_for(name, dual_clip_c=dual)
    cols = 1 if OBJECTIVES.get(name).needs_per_sequence else T
    g = torch.Generator().manual_seed(1)
    log_ratio = 0.6 * torch.randn(B, cols, generator=g, dtype=F64)
    adv = torch.randn(B, 1, generator=g, dtype=F64)
    log_ratio[0, 0], adv[0] = 1.5, -1.0  # ratio 4.5 > dual-clip bound 2.5
    log_ratio.requires_grad_()
    loss, want, ratio, low, high = _objective_case(name, log_ratio, adv, spec)
    if dual is not None:
        assert high[0, 0] and loss[0, 0].item() == pytest.approx(2.5)
    torch.testing.assert_close(loss, want)
    w = torch.rand(loss.shape, dtype=F64)
    g1, = torch.autograd.grad((loss * w).sum(), log_ratio, retain_graph=True)
    g2, = torch.autograd.grad((want * w).sum(), log_ratio)
    torch.testing.assert_close(g1, g2)
    # the clipped masks mark exactly where the gradient is zero (and A != 0); CISPO's mark
    # truncated weights instead (documented in objectives_ref.CLIP_MASKS_KEEP_GRADIENT)
    if name not in obj_ref.CLIP_MASKS_KEEP_GRADIENT:
        assert torch.all(g1[(low | high).expand_as(g1)] == 0)
    torch.testing.assert_close(ratio, torch.exp(log_ratio.detach()))


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_objective_finite_under_extreme_log_ratios(name):
    spec = _spec_for(name)
    cols = 1 if OBJECTIVES.get(name).needs_per_sequence else T
    log_ratio = (1e4 * torch.randn(B, cols, dtype=torch.float32).sign()).requires_grad_()
    adv = torch.randn(B, 1)
    valid = torch.ones(B, cols, dtype=torch.bool)
    loss, ratio, low, high = OBJECTIVES.get(name)(log_ratio, adv, spec=spec, valid=valid,
                                                  group_ids=GIDS, logp=log_ratio - 1.0,
                                                  mask=valid)
    g, = torch.autograd.grad(loss.sum(), log_ratio)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all() and torch.isfinite(ratio).all()


# ---------------------------------------------------------------- aggregations
@pytest.mark.parametrize("name", AGGREGATIONS.names())
def test_aggregation_entry(name):
    fn = AGGREGATIONS.get(name)
    mask = MASK.any(-1, keepdim=True) if fn.per_sequence else MASK
    loss = torch.randn(mask.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    loss = loss.masked_fill(~mask, float("nan")).requires_grad_()  # padding must not leak
    got = fn(loss, mask, max_len=7)
    want = oracle(ref.AGGREGATIONS, name)(nested(loss), nested(mask), max_len=7)
    torch.testing.assert_close(got, want)
    g1, = torch.autograd.grad(got, loss)
    g2, = torch.autograd.grad(want, loss)
    torch.testing.assert_close(g1[mask], g2[mask])
    assert torch.all(g1[~mask] == 0)
    # global normalizers: the sum over row chunks is the full-batch value
    norm = dict(num_tokens=mask.sum(), num_seqs=B, max_len=7)
    parts = sum(fn(loss[a:b], mask[a:b], seq_lens=mask[a:b].sum(-1), **norm)
                for a, b in [(0, 1), (1, 4), (4, B)])
    torch.testing.assert_close(parts, got)
    empty = fn(torch.zeros(mask.shape, dtype=F64), torch.zeros_like(mask), max_len=7)
    assert empty.item() == 0.0


@pytest.mark.parametrize("name", [n for n in AGGREGATIONS.names()
                                  if not AGGREGATIONS.get(n).per_sequence])
def test_token_aggregation_is_exact_over_t_chunks(name):
    fn = AGGREGATIONS.get(name)
    loss = torch.randn(B, T, dtype=F64)
    norm = dict(num_tokens=MASK.sum(), num_seqs=B, seq_lens=MASK.sum(-1), max_len=7)
    parts = sum(fn(loss[:, a:b], MASK[:, a:b], **norm) for a, b in [(0, 2), (2, 3), (3, T)])
    torch.testing.assert_close(parts, fn(loss, MASK, max_len=7))


# ---------------------------------------------------------------- KL estimators
@pytest.mark.parametrize("name", KL_ESTIMATORS.names())
def test_kl_entry(name):
    x = torch.tensor([-1e4, -3.0, -0.5, 0.0, 0.7, 25.0], dtype=F64, requires_grad=True)
    fn = KL_ESTIMATORS.get(name)
    got = fn(x.clamp(-20, 20))
    want = torch.stack([oracle(ref.KL, name)(v) for v in x])
    torch.testing.assert_close(got, want)
    assert got[3].item() == 0.0 and torch.isfinite(got).all()


# ---------------------------------------------------------------- presets
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_resolves_and_runs(name):
    kw = ref.preset_kwargs(name, T)
    assert algo_problems(name, **kw) == []
    spec = resolve_algo(name, **kw)
    for axis, registry in [("ratio_level", RATIO_LEVELS), ("objective", OBJECTIVES),
                           ("aggregation", AGGREGATIONS), ("kl", KL_ESTIMATORS),
                           ("advantage", ADVANTAGES)]:
        assert getattr(spec, axis) in registry
    logp, old, adv = tensors(3)
    extra = {"token_weights": torch.ones(B, T, dtype=F64)} if spec.needs_token_weights else {}
    if spec.needs_step_terms:  # GRPO-Guard: a Gaussian step's std, mean shift and σ gap
        extra.update(step_std=torch.full((B, T), 0.2, dtype=F64),
                     mean_shift=torch.full((B, T), 1e-4, dtype=F64),
                     step_gap=torch.full((B, T), 0.05, dtype=F64))
    loss, stats = PolicyLoss(name, **kw)(logp, old, adv, MASK, group_ids=GIDS, **extra)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in stats.values())


BAD = {"eps_low": -0.5, "objective": "clipp", "epsilon": 0.2, "beta": "high"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_algo_problems_reports_several_errors_at_once(name):
    problems = algo_problems(name, **ref.preset_kwargs(name, T), **BAD)
    text = "\n".join(problems)
    assert len(problems) >= 4, problems
    for words in ["eps_low=-0.5", "did you mean 'clip'", "unknown override 'epsilon'",
                  "beta must be a number"]:
        assert words in text, (name, words)
    with pytest.raises(ValueError, match=f"{len(problems)} problem"):
        resolve_algo(name, **ref.preset_kwargs(name, T), **BAD)
