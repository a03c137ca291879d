"""Policy losses: hand-worked values, every preset vs the oracle, gradient properties, splits."""
import math

import pytest
import torch

from mmrl.algo.losses import PolicyLoss, kl_penalty, policy_loss
from mmrl.algo.presets import PRESETS, resolve_algo
from tests.reference import core_math as ref
from tests.reference import objectives_ref as obj_ref

F64 = torch.float64
B, T = 6, 5
TOKEN_AGGS = ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum", "fixed_norm"]


def make_batch(seed=0, scale=0.3, dtype=F64, adv_per_token=False):
    g = torch.Generator().manual_seed(seed)
    logp = (-2 * torch.rand(B, T, generator=g, dtype=F64)).to(dtype).requires_grad_()
    old = (logp.detach() + scale * torch.randn(B, T, generator=g, dtype=F64).to(dtype))
    ref_logp = logp.detach() + scale * torch.randn(B, T, generator=g, dtype=F64).to(dtype)
    lengths = torch.tensor([5, 3, 1, 4, 5, 2])
    mask = torch.arange(T)[None] < lengths[:, None]  # [B, T] right padding, unequal lengths
    shape = (B, T) if adv_per_token else (B,)
    adv = torch.randn(*shape, generator=g, dtype=F64).to(dtype)
    weights = (0.5 + torch.rand(B, T, generator=g, dtype=F64)).to(dtype)
    gids = torch.tensor([4, 4, 9, 9, 1, 1])
    # a Gaussian denoising step's terms (ratio_norm, step_reweight): std s, mean_d(μ_θ − μ_old)²,
    # σ gap −dt
    std = (0.05 + 0.3 * torch.rand(B, T, generator=g, dtype=F64)).to(dtype)
    shift = (1e-3 * torch.rand(B, T, generator=g, dtype=F64)).to(dtype)
    gap = (0.01 + 0.2 * torch.rand(B, T, generator=g, dtype=F64)).to(dtype)
    return dict(logp=logp, old=old, ref=ref_logp, mask=mask, adv=adv, w=weights, gids=gids,
                std=std, shift=shift, gap=gap)


# one reward r in {0, 1} per row for objectives that read rewards (spec.binary_rewards: DRPO);
# groups [4, 4, 9, 9, 1, 1]: every group has a correct and a wrong row
BINARY = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0], dtype=F64)


def rewards_if_binary(spec, d):
    """The batch with binary rewards in place of its advantages when ``spec`` reads rewards."""
    return dict(d, adv=BINARY.to(d["adv"].dtype)) if spec.binary_rewards else d


def step_kw(spec, d):
    """The step terms a spec reads (GRPO-Guard), from the batch; {} for the others."""
    return dict(step_std=d["std"], mean_shift=d["shift"], step_gap=d["gap"]) \
        if spec.needs_step_terms else {}


def gen():
    return torch.Generator().manual_seed(0)


def run(name_or_fn, d, logp=None, **kw):
    logp = d["logp"] if logp is None else logp
    fn = name_or_fn if callable(name_or_fn) else PolicyLoss(name_or_fn, **ref.preset_kwargs(name_or_fn, T))
    kw.setdefault("generator", gen())  # clip_cov's random pick: the oracles draw the same keys
    kw = {**step_kw(fn.spec, d), **kw}
    loss, stats = fn(logp, d["old"], d["adv"], d["mask"], group_ids=d["gids"], **kw)
    grad, = torch.autograd.grad(loss, logp, allow_unused=True)
    return loss, (torch.zeros_like(logp) if grad is None else grad), stats


def tw_kw(name, d):
    return {"token_weights": d["w"]} if PRESETS[name].token_weighting == "tw" else {}


# ---------------------------------------------------------------- hand-worked values
@pytest.mark.parametrize("name, eps_high", [("grpo", 0.2), ("dapo", 0.28), ("ngrpo", 0.24)])
def test_ratio_1_5_is_clipped_at_1_plus_eps(name, eps_high):
    logp = torch.full((1, 1), math.log(1.5), dtype=F64, requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 1, dtype=F64), torch.ones(1, dtype=F64),
                              torch.ones(1, 1, dtype=torch.bool), algo=name)
    assert loss.item() == pytest.approx(-(1 + eps_high))
    assert stats["ratio_mean"].item() == pytest.approx(1.5)
    assert stats["clipfrac_high"].item() == 1.0 and stats["clipfrac_low"].item() == 0.0
    loss.backward()
    assert logp.grad.item() == 0.0  # clipped region: no gradient


def test_ratio_below_range_with_negative_advantage_and_dual_clip():
    one = torch.ones(1, 1, dtype=torch.bool)
    lp = torch.full((1, 1), math.log(0.5), dtype=F64)
    loss, stats = policy_loss(lp, torch.zeros(1, 1, dtype=F64), -torch.ones(1, dtype=F64), one)
    assert loss.item() == pytest.approx(0.8) and stats["clipfrac_low"].item() == 1.0
    big = torch.full((1, 1), 2.0, dtype=F64, requires_grad=True)  # ratio e^2 = 7.39
    plain, _ = policy_loss(big, torch.zeros(1, 1, dtype=F64), -torch.ones(1, dtype=F64), one)
    assert plain.item() == pytest.approx(math.exp(2))
    capped, stats = policy_loss(big, torch.zeros(1, 1, dtype=F64), -torch.ones(1, dtype=F64), one,
                                dual_clip_c=3.0)
    assert capped.item() == pytest.approx(3.0) and stats["clipfrac_high"].item() == 1.0
    capped.backward()
    assert big.grad.item() == 0.0


@pytest.mark.parametrize("a, tau", [(1.0, 1.0), (-1.0, 1.05), (0.5, 1.0)])
def test_sapo_f_of_1_is_2_over_tau(a, tau):
    logp = torch.zeros(1, 1, dtype=F64, requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 1, dtype=F64), torch.tensor([a], dtype=F64),
                          torch.ones(1, 1, dtype=torch.bool), algo="sapo")
    assert loss.item() == pytest.approx(-(2 / tau) * a)
    loss.backward()
    assert logp.grad.item() == pytest.approx(-a)  # f'(1) = 1: REINFORCE


def test_kl_estimators_hand_values():
    lp, rp = torch.tensor([[math.log(2.0)]]), torch.zeros(1, 1)
    assert kl_penalty(lp, rp, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(lp, rp, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_penalty(lp, rp, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl_penalty(rp, rp, "k3").item() == 0.0
    assert torch.isfinite(kl_penalty(torch.tensor([[-1e4]]), rp, "k3")).all()


def test_reg_hand_value():
    # one group of 2, sequence log-ratios 0.3 and -0.1: mean 0.1, Â = ±0.2; A = ±1.
    logp = torch.tensor([[0.1, 0.2], [-0.1, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False]])
    loss, _ = policy_loss(logp, torch.zeros(2, 2, dtype=F64), torch.tensor([1.0, -1.0], dtype=F64),
                          mask, algo="reg_grpo", group_ids=torch.tensor([0, 0]))
    assert loss.item() == pytest.approx(((1 - 0.2) ** 2 + (-1 + 0.2) ** 2) / 2)


# ---------------------------------------------------------------- every preset vs the oracle
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_matches_oracle(name, beta):
    d = make_batch(seed=1)
    kw = dict(ref_logp=d["ref"], **tw_kw(name, d))
    fn = PolicyLoss(name, beta=beta, **ref.preset_kwargs(name, T))
    d = rewards_if_binary(fn.spec, d)
    loss, grad, stats = run(fn, d, **kw)
    want = ref.policy_loss(fn.spec, d["logp"], d["old"], d["adv"], d["mask"], ref_logp=d["ref"],
                           token_weights=kw.get("token_weights"), group_ids=d["gids"],
                           generator=gen(), **step_kw(fn.spec, d))
    want_grad, = torch.autograd.grad(want, d["logp"])
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert "kl_ref" in stats and all(not v.requires_grad for v in stats.values())


# objectives that read one binary reward per row (DRPO) refuse [B, T] advantages: see below
@pytest.mark.parametrize("name", [n for n, s in PRESETS.items()
                                  if not s.per_sequence_loss and not s.binary_rewards])
def test_token_advantages_and_weights_match_oracle(name):
    d = make_batch(seed=2, scale=0.5, adv_per_token=True)
    fn = PolicyLoss(name, dual_clip_c=2.0, **ref.preset_kwargs(name, T)) \
        if PRESETS[name].objective == "clip" else PolicyLoss(name, **ref.preset_kwargs(name, T))
    loss, grad, _ = run(fn, d, token_weights=d["w"])
    want = ref.policy_loss(fn.spec, d["logp"], d["old"], d["adv"], d["mask"], token_weights=d["w"],
                           generator=gen(), **step_kw(fn.spec, d))
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, torch.autograd.grad(want, d["logp"])[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", [n for n, s in PRESETS.items() if s.binary_rewards])
def test_binary_reward_objectives_refuse_token_advantages_and_take_token_weights(name):
    d = make_batch(seed=2, scale=0.5, adv_per_token=True)
    fn = PolicyLoss(name, **ref.preset_kwargs(name, T))
    with pytest.raises(ValueError, match=r"one reward r in \{0, 1\} per row"):
        run(fn, d, token_weights=d["w"])
    d = rewards_if_binary(fn.spec, d)
    loss, grad, _ = run(fn, d, token_weights=d["w"])
    want = ref.policy_loss(fn.spec, d["logp"], d["old"], d["adv"], d["mask"], token_weights=d["w"],
                           group_ids=d["gids"], generator=gen())
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, torch.autograd.grad(want, d["logp"])[0], rtol=1e-10, atol=1e-12)
    assert grad.abs().sum() > 0


# ---------------------------------------------------------------- gradient properties
def reinforce_grad(agg, adv, mask, max_len=T):
    """∂/∂logp of the aggregated −A·logp surrogate, written out per aggregation."""
    m = mask.to(F64)
    a = adv[:, None] if adv.dim() == 1 else adv
    n = m.sum(-1, keepdim=True).clamp(min=1)
    return {"token_mean": -a * m / m.sum(), "seq_mean_token_mean": -a * m / (n * B),
            "seq_mean": -a * m / (n * B), "seq_mean_token_sum": -a * m / B,
            "fixed_norm": -a * m / (B * max_len)}[agg]


@pytest.mark.parametrize("objective", ["clip", "sapo"])
@pytest.mark.parametrize("agg", TOKEN_AGGS)
def test_ratio_1_gradient_is_reinforce_for_every_token_aggregation(objective, agg):
    d = make_batch(seed=3)
    d["old"] = d["logp"].detach()
    fn = PolicyLoss("grpo", objective=objective, aggregation=agg, max_len=T)
    torch.testing.assert_close(run(fn, d)[1], reinforce_grad(agg, d["adv"], d["mask"]))


# reg regresses A (its own derived scale below); objectives that read binary rewards (DRPO) are
# no surrogate of A (their own derived gradient below)
@pytest.mark.parametrize("name", [n for n, s in PRESETS.items()
                                  if s.objective != "reg" and not s.binary_rewards])
def test_ratio_1_gradient_is_reinforce_for_every_preset(name):
    d = make_batch(seed=4)
    d["old"] = d["logp"].detach()
    d["shift"] = torch.zeros_like(d["shift"])  # μ_θ = μ_old: RatioNorm's ratio is 1 too
    _, grad, _ = run(name, d, **tw_kw(name, d))
    w = d["w"] if PRESETS[name].token_weighting == "tw" else 1.0
    if PRESETS[name].needs_step_terms:  # ∂ log ρ̃/∂logp = s; the objective divided by −dt
        w = d["std"] / d["gap"]
    torch.testing.assert_close(grad, w * reinforce_grad(PRESETS[name].aggregation, d["adv"], d["mask"]))


@pytest.mark.parametrize("name", [n for n, s in PRESETS.items() if s.binary_rewards])
def test_ratio_1_gradient_of_drpo_is_the_derived_one(name):
    """At ratio 1 DRPO's KL constraint is 0 with zero gradient; per group with a correct and a
    wrong row, ∂/∂logp_i,t = −N·w_i/(W·n_i·B) on correct rows (w_i = exp((1 − n_i/L)/λ)) and
    +N·softmax_j(s_j/τ)/(n_j·B) on wrong rows (s = token-mean logp); a group without a wrong
    row gets none."""
    d = make_batch(seed=4)
    d["old"] = d["logp"].detach()
    d["gids"] = torch.tensor([4, 4, 4, 9, 9, 9])  # N = 3; lengths [5, 3, 1] and [4, 5, 2]
    d["adv"] = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0], dtype=F64)
    spec = PolicyLoss(name, **ref.preset_kwargs(name, T)).spec
    _, grad, _ = run(name, d)
    m = d["mask"].to(F64)
    n = m.sum(-1)
    s = (d["logp"].detach() * m).sum(-1) / n
    w = torch.exp((1 - n / (spec.max_len or T)) / spec.drpo_lambda)
    want = torch.zeros(B, dtype=F64)
    for pos, neg in (([0, 1], [2]), ([5], [3, 4])):
        want[pos] = -3 * w[pos] / (w[pos].sum() * n[pos] * B)
        want[neg] = 3 * torch.softmax(s[neg] / spec.drpo_tau, 0) / (n[neg] * B)
    torch.testing.assert_close(grad, want[:, None] * m)
    d["adv"] = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=F64)  # no mixed group
    assert run(name, d)[1].abs().max() == 0


@pytest.mark.parametrize("length_normalize", [False, True])
def test_ratio_1_gradient_of_reg_is_the_derived_scale(length_normalize):
    d = make_batch(seed=5)
    d["old"] = d["logp"].detach()
    fn = PolicyLoss("reg_grpo", eps_reg=0.7, length_normalize=length_normalize)
    _, grad, _ = run(fn, d)
    a = d["adv"]
    centered = a - torch.stack([a[d["gids"] == g].mean() for g in d["gids"]])  # A − mean_g A
    m = d["mask"].to(F64)
    scale = m / m.sum(-1, keepdim=True) if length_normalize else m
    torch.testing.assert_close(grad, -2 * 0.7 / B * centered[:, None] * scale)


def test_masked_padding_changes_nothing():
    for name in sorted(PRESETS):
        spec = PRESETS[name]
        d = rewards_if_binary(spec, make_batch(seed=6, adv_per_token=not (
            spec.per_sequence_loss or spec.binary_rewards)))
        kw = dict(ref_logp=d["ref"], token_weights=None if PRESETS[name].per_sequence_loss else d["w"])
        fn = PolicyLoss(name, beta=0.1, **ref.preset_kwargs(name, T))
        loss, grad, stats = run(fn, d, **kw)
        pad = ~d["mask"]
        garbage = dict(d, old=d["old"].masked_fill(pad, -math.inf))
        if d["adv"].dim() == 2:
            garbage["adv"] = d["adv"].masked_fill(pad, math.nan)
        kw2 = dict(ref_logp=d["ref"].masked_fill(pad, math.nan),
                   token_weights=None if kw["token_weights"] is None else d["w"].masked_fill(pad, math.nan))
        logp2 = d["logp"].detach().masked_fill(pad, 1e30).requires_grad_()
        loss2, grad2, stats2 = run(fn, garbage, logp=logp2, **kw2)
        torch.testing.assert_close(loss2, loss, msg=name)
        torch.testing.assert_close(grad2, grad, msg=name)
        assert grad2[pad].abs().max() == 0
        for k in stats:
            torch.testing.assert_close(stats2[k], stats[k], msg=f"{name} {k}")


def test_token_mean_equals_seq_mean_token_mean_at_equal_lengths():
    d = make_batch(seed=7)
    d["mask"] = torch.arange(T)[None].expand(B, T) < 4
    a = run(PolicyLoss("grpo"), d)
    b = run(PolicyLoss("grpo", aggregation="token_mean"), d)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_gspo_equals_gspo_token_for_sequence_advantages(beta):
    d = make_batch(seed=8, scale=2e-4)  # ratios near the GSPO clip range: both sides clipped
    out = [run(PolicyLoss(n, beta=beta), d, ref_logp=d["ref"]) for n in ("gspo", "gspo_token")]
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])
    assert out[0][1].abs().sum() > 0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_finite_under_extreme_log_ratios_and_empty_masks(name):
    d = make_batch(seed=9, dtype=torch.float32)
    sign = torch.where(torch.rand(B, T, generator=torch.Generator().manual_seed(0)) > 0.5, 1.0, -1.0)
    d["old"] = d["logp"].detach() + 1e4 * sign
    kw = dict(ref_logp=d["logp"].detach() - 1e4 * sign, **tw_kw(name, d))
    loss, grad, stats = run(PolicyLoss(name, beta=0.04, **ref.preset_kwargs(name, T)), d, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in stats.values())
    d["mask"] = torch.zeros(B, T, dtype=torch.bool)
    loss, grad, stats = run(PolicyLoss(name, beta=0.04, **ref.preset_kwargs(name, T)), d, **kw)
    assert loss.item() == 0.0 and grad.abs().max() == 0
    assert all(torch.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_row_permutation_invariance(name):
    d = make_batch(seed=14)
    fn = PolicyLoss(name, beta=0.05, **ref.preset_kwargs(name, T))
    kw = dict(ref_logp=d["ref"], **tw_kw(name, d))
    loss, grad, _ = run(fn, d, **kw)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    pd = {k: v[perm] for k, v in d.items()}
    logp = d["logp"].detach()[perm].requires_grad_()
    ploss, pgrad, _ = run(fn, pd, logp=logp, **{k: v[perm] for k, v in kw.items()})
    torch.testing.assert_close(ploss, loss)
    torch.testing.assert_close(pgrad, grad[perm])


# ---------------------------------------------------------------- micro-batching invariance
def _split_run(fn, d, row_chunks, t_chunks, **kw):
    """Sum of micro-batch losses and gradients with global normalizers."""
    norm = dict(num_tokens=d["mask"].sum(), num_seqs=B, seq_lens=d["mask"].sum(-1))
    total, grad = 0.0, torch.zeros_like(d["logp"])
    for r0, r1 in row_chunks:
        for t0, t1 in t_chunks:
            part = {k: (v[r0:r1, t0:t1] if v.dim() == 2 else v[r0:r1]) for k, v in d.items()}
            logp = d["logp"][r0:r1, t0:t1].detach().requires_grad_()
            extra = {k: v[r0:r1, t0:t1] for k, v in kw.items()}
            loss, g, _ = run(fn, part, logp=logp, num_tokens=norm["num_tokens"],
                             num_seqs=norm["num_seqs"], seq_lens=norm["seq_lens"][r0:r1], **extra)
            total = total + loss
            grad[r0:r1, t0:t1] += g
    return total, grad


# clip_cov / kl_cov select tokens by covariance over the call's tokens (as verl): not invariant
# by design; tests/algo/test_objectives_new.py checks that a split equals per-call selection.
@pytest.mark.parametrize("name", [n for n in sorted(PRESETS)
                                  if PRESETS[n].objective not in obj_ref.CALL_DEPENDENT])
def test_gradients_invariant_to_micro_batching(name):
    fn = PolicyLoss(name, beta=0.05, **ref.preset_kwargs(name, T),
                    **obj_ref.PER_CALL_CONSTRAINT.get(PRESETS[name].objective, {}))
    d = rewards_if_binary(fn.spec, make_batch(seed=10))
    kw = dict(ref_logp=d["ref"], **tw_kw(name, d))
    full_loss, full_grad, _ = run(fn, d, **kw)
    assert full_grad.abs().sum() > 0
    rows = [(0, 2), (2, 4), (4, 6)]  # whole groups (Reg-GRPO's group mean, DRPO's J_g need them)
    splits = [(rows, [(0, T)])]
    if not fn.spec.sequence_level:  # whole-sequence ratios cannot see a chunk of T
        splits += [([(0, B)], [(0, 2), (2, 3), (3, T)]), (rows, [(0, 1), (1, T)])]
    for row_chunks, t_chunks in splits:
        loss, grad = _split_run(fn, d, row_chunks, t_chunks, **kw)
        torch.testing.assert_close(loss, full_loss, msg=f"{row_chunks} {t_chunks}")
        torch.testing.assert_close(grad, full_grad, msg=f"{row_chunks} {t_chunks}")


@pytest.mark.parametrize("name", [n for n in sorted(PRESETS)
                                  if PRESETS[n].objective in obj_ref.PER_CALL_CONSTRAINT])
def test_per_call_constraint_split_equals_the_per_call_oracle(name):
    """With DRPO's KL constraint on, each micro-batch's coefficient reads its own mean KL: the
    split sums the per-call oracle losses (global sequence count), not the unsplit loss."""
    fn = PolicyLoss(name, **ref.preset_kwargs(name, T))
    d = rewards_if_binary(fn.spec, make_batch(seed=10))
    rows = [(0, 2), (2, 4), (4, 6)]
    loss, grad = _split_run(fn, d, rows, [(0, T)])
    want = sum(ref.policy_loss(fn.spec, d["logp"][a:b], d["old"][a:b], d["adv"][a:b],
                               d["mask"][a:b], group_ids=d["gids"][a:b], num_seqs=B)
               for a, b in rows)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, torch.autograd.grad(want, d["logp"])[0], rtol=1e-10,
                               atol=1e-12)
    assert (loss - run(fn, d)[0]).abs() > 1e-3  # the constraint is on and per call


# ---------------------------------------------------------------- API and errors
def test_functional_and_class_forms_agree_and_stats_are_detached():
    d = make_batch(seed=11)
    a = run(PolicyLoss("dapo", beta=0.1), d, ref_logp=d["ref"])
    b = policy_loss(d["logp"], d["old"], d["adv"], d["mask"], algo="dapo", beta=0.1,
                    ref_logp=d["ref"])
    torch.testing.assert_close(a[0], b[0])
    assert set(a[2]) == {"loss", "clipfrac_low", "clipfrac_high", "ratio_mean", "ratio_min",
                         "ratio_max", "approx_kl", "kl_ref", "adv_mean"}
    assert all(v.dim() == 0 and not v.requires_grad for v in a[2].values())
    assert PolicyLoss("dapo").spec == resolve_algo("dapo")


@pytest.mark.parametrize("algo, change, words", [
    ("grpo", {"beta": 0.1}, "needs ref_logp"),
    ("reg_grpo", {"group_ids": None}, "needs group_ids"),
    ("tw_grpo", {}, "needs token_weights"),
    ("gspo", {"adv": "per_token"}, "one advantage per sequence"),
    ("gspo", {"token_weights": "ones"}, "token_weights cannot weight"),
    ("grpo", {"mask": "float"}, "mask.bool()"),
    ("grpo", {"old": "short"}, "expected the same"),
    ("grpo", {"adv": "wrong"}, "advantages have shape"),
])
def test_errors_that_teach(algo, change, words):
    d = make_batch(seed=12)
    args = dict(logp=d["logp"], old_logp=d["old"], advantages=d["adv"], mask=d["mask"],
                group_ids=d["gids"])
    kw = {}
    if "beta" in change:
        kw["beta"] = change["beta"]
    if change.get("adv") == "per_token":
        args["advantages"] = torch.zeros(B, T, dtype=F64)
    if change.get("adv") == "wrong":
        args["advantages"] = torch.zeros(B + 1, dtype=F64)
    if change.get("mask") == "float":
        args["mask"] = d["mask"].to(F64)
    if change.get("old") == "short":
        args["old_logp"] = d["old"][:, :2]
    extra = {"token_weights": torch.ones(B, T, dtype=F64)} if "token_weights" in change else {}
    if "group_ids" in change:
        args["group_ids"] = None
    with pytest.raises((ValueError, TypeError), match=words):
        policy_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"),
                    args.pop("mask"), algo=algo, **args, **extra, **kw)


def test_half_precision_log_probs_are_upcast():
    d = make_batch(seed=13, scale=2e-4)
    want, _ = policy_loss(d["logp"], d["old"], d["adv"], d["mask"], algo="gspo")
    lp16 = d["logp"].detach().to(torch.bfloat16).requires_grad_()
    got, stats = policy_loss(lp16, d["old"].to(torch.bfloat16), d["adv"], d["mask"], algo="gspo")
    assert got.dtype == torch.float32 and stats["ratio_mean"].dtype == torch.float32
    got.backward()
    assert lp16.grad.dtype == torch.bfloat16 and torch.isfinite(lp16.grad.float()).all()
    # bf16 inputs round the log-probs themselves, so compare loosely
    assert got.item() == pytest.approx(want.item(), abs=0.05)


# ---------------------------------------------------------------- padding and stats, by value
def test_ratio_stats_ignore_padding():
    # valid ratios e^0.5, e^0.25 and e^0.1 (all > 1); the padding's ratio would read as exactly 1
    logp = torch.tensor([[0.5, 0.25], [0.1, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False]])
    _, stats = policy_loss(logp, torch.zeros(2, 2, dtype=F64), torch.ones(2, dtype=F64), mask,
                           aggregation="token_mean")
    assert stats["ratio_min"].item() == pytest.approx(math.exp(0.1))
    assert stats["ratio_max"].item() == pytest.approx(math.exp(0.5))
    assert stats["ratio_mean"].item() == pytest.approx(
        (math.exp(0.5) + math.exp(0.25) + math.exp(0.1)) / 3)
    _, stats = policy_loss(-logp, torch.zeros(2, 2, dtype=F64), torch.ones(2, dtype=F64), mask)
    assert stats["ratio_max"].item() == pytest.approx(math.exp(-0.1))


def test_zero_advantage_tokens_are_not_counted_as_clipped():
    # A = 0 (a zero-std group): the clip changes nothing, so neither clip fraction counts it;
    # A = -1 with the same ratio 0.5 is low-clipped, A = +1 with ratio 2 is high-clipped.
    logp = torch.log(torch.tensor([[0.5, 2.0], [0.5, 2.0], [0.5, 2.0]], dtype=F64))
    mask = torch.ones(3, 2, dtype=torch.bool)
    _, stats = policy_loss(logp, torch.zeros(3, 2, dtype=F64),
                           torch.tensor([0.0, -1.0, 1.0], dtype=F64), mask,
                           aggregation="token_mean")
    assert stats["clipfrac_low"].item() == pytest.approx(1 / 6)
    assert stats["clipfrac_high"].item() == pytest.approx(1 / 6)


def test_reg_group_mean_leaves_out_empty_rows():
    # group of 3: log-ratios 0.3, -0.1 and an empty row; the mean is 0.1 over the 2 real rows
    logp = torch.tensor([[0.1, 0.2], [-0.1, 0.0], [5.0, 5.0]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    loss, _ = policy_loss(logp, torch.zeros(3, 2, dtype=F64),
                          torch.tensor([1.0, -1.0, 0.5], dtype=F64), mask, algo="reg_grpo",
                          group_ids=torch.tensor([0, 0, 0]))
    assert loss.item() == pytest.approx(((1 - 0.2) ** 2 + (-1 + 0.2) ** 2) / 3)  # seq_mean over B
