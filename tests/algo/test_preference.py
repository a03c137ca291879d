"""Preference losses (mmrl.algo.preference): hand-worked values and gradients, the loop oracles
of tests/reference/preference_ref.py for every preset and every registered loss, properties
(swapped pairs, micro-batching, padding, extreme log-ratios), the pair builders, the spec's
checks and the `mmrl algos` table."""
import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from mmrl.algo import pref_presets
from mmrl.algo.preference import (PREF_LOSSES, PREF_PRESETS, PreferenceLoss, best_worst_pairs,
                                  level_pairs, pref_problems, resolve_pref, win_rates)
from tests.reference import preference_ref as ref

F64 = torch.float64
P, TC, TR = 5, 6, 4
C_LEN = torch.tensor([6, 2, 4, 1, 3])
R_LEN = torch.tensor([4, 4, 1, 2, 0])  # the last rejected completion is empty


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def pairs(seed=0, spread=0.4, dtype=F64):
    """Random pairs with garbage (NaN, ±inf) in every padded position of every input."""
    g = torch.Generator().manual_seed(seed)
    cm = torch.arange(TC)[None] < C_LEN[:, None]
    rm = torch.arange(TR)[None] < R_LEN[:, None]

    def side(mask, shape):
        lp = -2 * torch.rand(shape, generator=g, dtype=F64)
        rf = lp + spread * torch.randn(shape, generator=g, dtype=F64)
        gd = torch.randn(shape, generator=g, dtype=F64)
        junk = torch.tensor([math.nan, -math.inf, math.inf], dtype=F64)
        fill = junk[torch.randint(0, 3, shape, generator=g)]
        return [torch.where(mask, x, fill).to(dtype) for x in (lp, rf, gd)]

    cw, cref, cg = side(cm, (P, TC))
    rw, rref, rg = side(rm, (P, TR))
    win = torch.rand(P, generator=g, dtype=F64)
    return dict(cw=cw, rw=rw, cm=cm, rm=rm, cref=cref, rref=rref, cg=cg, rg=rg,
                win_w=win, win_l=1 - win, scale=1 + 2 * torch.rand(P, generator=g, dtype=F64))


def call_kwargs(spec, d, rows=slice(None)):
    """The keyword inputs ``spec`` reads, for the pairs ``rows``."""
    kw = {}
    if spec.needs_ref:
        kw.update(chosen_ref=d["cref"][rows], rejected_ref=d["rref"][rows])
    if spec.needs_win is not None:
        kw["chosen_win"] = d["win_w"][rows]
    if spec.needs_win == "both":
        kw["rejected_win"] = d["win_l"][rows]
    if spec.needs_guide:
        kw.update(chosen_guide=d["cg"][rows], rejected_guide=d["rg"][rows])
    if spec.needs_pair_scale:
        kw["pair_scale"] = d["scale"][rows]
    return kw


def mmrl_value_grad(loss, d, rows=slice(None), **extra):
    cw = d["cw"][rows].detach().clone().requires_grad_()
    rw = d["rw"][rows].detach().clone().requires_grad_()
    value, stats = loss(cw, rw, d["cm"][rows], d["rm"][rows], **call_kwargs(loss.spec, d, rows),
                        **extra)
    gw, gl = torch.autograd.grad(value, (cw, rw))
    return value.detach(), gw, gl, stats


def oracle_value_grad(spec, d):
    cw = d["cw"].detach().clone().requires_grad_()
    rw = d["rw"].detach().clone().requires_grad_()
    nest = lambda x: [[x[p, t] for t in range(x.shape[1])] for p in range(x.shape[0])]  # noqa
    kw = call_kwargs(spec, d)
    value = ref.preference_loss(
        spec, nest(cw), nest(rw), d["cm"].tolist(), d["rm"].tolist(),
        cref=kw.get("chosen_ref"), rref=kw.get("rejected_ref"), win_w=kw.get("chosen_win"),
        win_l=kw.get("rejected_win"), guide_w=kw.get("chosen_guide"),
        guide_l=kw.get("rejected_guide"), scale=kw.get("pair_scale"))
    gw, gl = torch.autograd.grad(value, (cw, rw))
    return value.detach(), gw, gl


TOL = dict(rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- hand-worked
def hand_pair(chosen_ref=(-1.5, -2.5), rejected_ref=(-2.0,)):
    """One pair: chosen log-probs [−1, −2, pad], rejected [−3, pad, pad]; the default reference
    makes the summed log-ratios u_w = 1, u_l = −1 (h = 2)."""
    cw = torch.tensor([[-1.0, -2.0, math.nan]], dtype=F64, requires_grad=True)
    rw = torch.tensor([[-3.0, -math.inf, 7.0]], dtype=F64, requires_grad=True)
    cm, rm = torch.tensor([[True, True, False]]), torch.tensor([[True, False, False]])
    cref = torch.tensor([[*chosen_ref, 0.0]], dtype=F64)
    rref = torch.tensor([[*rejected_ref, 0.0, 0.0]], dtype=F64)
    return cw, rw, cm, rm, cref, rref


@pytest.mark.parametrize("preset, overrides, want, dz", [
    # z = β·h = 0.5·2 = 1. DPO: softplus(−1); dℓ/ds_w = −β·σ(−1).
    ("dpo", dict(beta=0.5), softplus(-1), -0.5 / (1 + math.e)),
    # cDPO ε = 0.1: 0.9·softplus(−1) + 0.1·softplus(1) = softplus(−1) + 0.1 (softplus(z) −
    # softplus(−z) = z); d/ds_w = −β(0.9σ(−1) − 0.1σ(1)).
    ("cdpo", dict(beta=0.5), softplus(-1) + 0.1,
     -0.5 * (0.9 / (1 + math.e) - 0.1 * math.e / (1 + math.e))),
    # rDPO ε = 0.1: (0.9·a − 0.1·(a + 1))/0.8 = a − 0.125, a = softplus(−1);
    # d/ds_w = −β(0.9σ(−1) + 0.1σ(1))/0.8.
    ("robust_dpo", dict(beta=0.5), softplus(-1) - 0.125,
     -0.5 * (0.9 / (1 + math.e) + 0.1 * math.e / (1 + math.e)) / 0.8),
    # IPO β = 0.5: (h − 1/(2β))² = (2 − 1)² = 1; d/ds_w = 2(h − 1) = 2.
    ("ipo", dict(beta=0.5), 1.0, 2.0),
    # hinge: relu(1 − β·h) with β = 0.25: 1 − 0.5 = 0.5; d/ds_w = −β.
    ("dpo", dict(beta=0.25, loss="hinge"), 0.5, -0.25),
])
def test_margin_losses_by_hand(preset, overrides, want, dz):
    cw, rw, cm, rm, cref, rref = hand_pair()
    loss, stats = PreferenceLoss(preset, **overrides)(cw, rw, cm, rm, chosen_ref=cref,
                                                      rejected_ref=rref)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    gw, gl = torch.autograd.grad(loss, (cw, rw))
    # s_w = Σ valid (logp − ref): each valid token's gradient is dℓ/ds_w; padding gets 0.
    assert gw[0].tolist() == pytest.approx([dz, dz, 0.0], rel=1e-12)
    assert gl[0].tolist() == pytest.approx([-dz, 0.0, 0.0], rel=1e-12)
    beta = overrides["beta"]
    assert stats["reward_chosen"].item() == pytest.approx(beta)  # β·u_w, u_w = 1
    assert stats["reward_margin"].item() == pytest.approx(2 * beta)
    assert stats["reward_accuracy"].item() == 1.0


def test_simpo_by_hand():
    # Token means ā_w = −1.5, ā_l = −3; β = 2, γ/β = 0.25: z = 2·(1.5 − 0.25) = 2.5.
    # sft_weight 0.5 adds 0.5·1.5 (the chosen token-mean NLL).
    cw, rw, cm, rm, _, _ = hand_pair()
    loss, stats = PreferenceLoss("simpo", sft_weight=0.5)(cw, rw, cm, rm)
    assert loss.item() == pytest.approx(softplus(-2.5) + 0.75, rel=1e-12)
    gw, gl = torch.autograd.grad(loss, (cw, rw))
    dz = -2 * (1 / (1 + math.exp(2.5)))  # dℓ/dā_w = −β·σ(−z)
    assert gw[0].tolist() == pytest.approx([(dz - 0.5) / 2, (dz - 0.5) / 2, 0.0], rel=1e-12)
    assert gl[0].tolist() == pytest.approx([-dz, 0.0, 0.0], rel=1e-12)
    assert stats["reward_chosen"].item() == pytest.approx(-3.0)  # β·ā_w
    assert stats["sft"].item() == pytest.approx(1.5)


def test_sppo_by_hand():
    # β = 0.5 (η = 2): P̂_w = 0.75, P̂_l = 0.25 → targets ±0.5; u_w = 1, u_l = −1:
    # ½[(1 − 0.5)² + (−1 + 0.5)²] = 0.25; d/du_w = u_w − 0.5 = 0.5, d/du_l = −0.5.
    cw, rw, cm, rm, cref, rref = hand_pair()
    win = dict(chosen_win=torch.tensor([0.75], dtype=F64))
    both = PreferenceLoss("sppo", beta=0.5)(cw, rw, cm, rm, chosen_ref=cref, rejected_ref=rref,
                                            rejected_win=torch.tensor([0.25], dtype=F64), **win)
    single = PreferenceLoss("sppo_single", beta=0.5)(cw, rw, cm, rm, chosen_ref=cref,
                                                     rejected_ref=rref, **win)
    for loss, _ in (both, single):
        assert loss.item() == pytest.approx(0.25, rel=1e-12)
        gw, gl = torch.autograd.grad(loss, (cw, rw))
        assert gw[0].tolist() == pytest.approx([0.5, 0.5, 0.0]) and gl[0, 0].item() == -0.5


def test_tgdpo_by_hand():
    # β = 0.5, α = 1: chosen guide d = [1, 0] → weights 1 + αβd = [1.5, 1]; chosen log-ratios
    # [0.5, 0.5] → s_w = 1.25. Rejected d = [2] → weight 1 − αβ·2 = 0 → s_l = 0. z = 0.625.
    cw, rw, cm, rm, cref, rref = hand_pair(chosen_ref=(-1.5, -2.5))
    cw = torch.tensor([[-1.0, -2.0, 0.0]], dtype=F64, requires_grad=True)
    cref = torch.tensor([[-1.5, -2.5, 0.0]], dtype=F64)
    guides = dict(chosen_guide=torch.tensor([[1.0, 0.0, math.nan]], dtype=F64),
                  rejected_guide=torch.tensor([[2.0, math.inf, 0.0]], dtype=F64))
    loss, _ = PreferenceLoss("tgdpo", beta=0.5, alpha=1.0)(cw, rw, cm, rm, chosen_ref=cref,
                                                           rejected_ref=rref, **guides)
    assert loss.item() == pytest.approx(softplus(-0.625), rel=1e-12)
    gw, gl = torch.autograd.grad(loss, (cw, rw))
    dz = -0.5 / (1 + math.exp(0.625))
    assert gw[0].tolist() == pytest.approx([1.5 * dz, dz, 0.0], rel=1e-12)
    assert gl[0].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-15)


def test_trpa_by_hand():
    # Token means: chosen log-ratio (0.5 + 0.5)/2 = 0.5, rejected −1 → Δ_i − Δ_j = 1.5;
    # β = 0.1 times pair_scale κ = 2.5 → z = 0.375.
    cw, rw, cm, rm, cref, rref = hand_pair()
    loss, _ = PreferenceLoss("trpa")(cw, rw, cm, rm, chosen_ref=cref, rejected_ref=rref,
                                     pair_scale=torch.tensor([2.5], dtype=F64))
    assert loss.item() == pytest.approx(softplus(-0.375), rel=1e-12)


def test_diffusion_dpo_equals_flow_grpos_formula():
    # flow_grpo: −log σ(−½β[(e_w − e_ref_w) − (e_l − e_ref_l)]) with the scores −½·e, β = 100:
    # e = 0.2 / 0.3 (chosen, ref) and 0.5 / 0.4 (rejected): −log σ(10).
    e_w, e_rw, e_l, e_rl = 0.2, 0.3, 0.5, 0.4
    t = lambda x: torch.tensor([[-0.5 * x]], dtype=F64)  # noqa: E731
    one = torch.ones(1, 1, dtype=torch.bool)
    loss, _ = PreferenceLoss("diffusion_dpo")(t(e_w), t(e_l), one, one, chosen_ref=t(e_rw),
                                              rejected_ref=t(e_rl))
    want = -math.log(1 / (1 + math.exp(0.5 * 100 * ((e_w - e_rw) - (e_l - e_rl)))))
    assert loss.item() == pytest.approx(want, rel=1e-9) and want == pytest.approx(softplus(-10))


# ---------------------------------------------------------------- oracle, every preset / loss
@pytest.mark.parametrize("preset", sorted(PREF_PRESETS))
@pytest.mark.parametrize("seed", [0, 1])
def test_every_preset_matches_the_loop_oracle(preset, seed):
    d = pairs(seed)
    loss = PreferenceLoss(preset, sft_weight=0.3)
    v, gw, gl, _ = mmrl_value_grad(loss, d)
    wv, wgw, wgl = oracle_value_grad(loss.spec, d)
    torch.testing.assert_close(v, wv, **TOL)
    torch.testing.assert_close(gw, wgw, **TOL)
    torch.testing.assert_close(gl, wgl, **TOL)
    assert torch.isfinite(gw).all() and torch.isfinite(gl).all()  # garbage padding stays out


def spec_for(name):
    """A valid spec reading every option the registered loss ``name`` can read."""
    flags = pref_presets.loss_registry().get(name)
    over = dict(loss=name, beta=0.7, length_normalize=True)
    over.update(label_smoothing=0.2) if flags.smoothing else None
    over.update(gamma_beta_ratio=0.3) if flags.margin else None
    over.update(token_guidance=True, alpha=0.4, scaled_pairs=True) if flags.win is None else None
    return over


@pytest.mark.parametrize("name", PREF_LOSSES.names())
def test_every_registered_loss_matches_the_loop_oracle(name):
    loss = PreferenceLoss("dpo", **spec_for(name))
    d = pairs(3, spread=1.0)
    v, gw, gl, _ = mmrl_value_grad(loss, d)
    wv, wgw, wgl = oracle_value_grad(loss.spec, d)
    torch.testing.assert_close((v, gw, gl), (wv, wgw, wgl), **TOL)


def test_the_torch_free_loss_table_equals_the_registry():
    assert pref_presets._STATIC.names() == PREF_LOSSES.names()
    for name in PREF_LOSSES.names():
        flags = vars(pref_presets._STATIC.get(name))
        assert flags == {k: getattr(PREF_LOSSES.get(name), k) for k in flags}, name


# ---------------------------------------------------------------- properties
def swapped(d):
    return dict(d, cw=d["rw"], rw=d["cw"], cm=d["rm"], rm=d["cm"], cref=d["rref"],
                rref=d["cref"], cg=d["rg"], rg=d["cg"], win_w=d["win_l"], win_l=d["win_w"])


def test_swapping_the_pairs_flips_the_margin():
    d = pairs(4)
    loss = PreferenceLoss("dpo", beta=0.3)
    v, _, _, st = mmrl_value_grad(loss, d)
    vs, _, _, sts = mmrl_value_grad(loss, swapped(d))
    torch.testing.assert_close(sts["reward_margin"], -st["reward_margin"], **TOL)
    torch.testing.assert_close(sts["reward_chosen"], st["reward_rejected"], **TOL)
    assert sts["reward_accuracy"] + st["reward_accuracy"] == 1  # no ties in random data
    # softplus(−z) − softplus(z) = −z: the swapped DPO loss exceeds the loss by mean z.
    torch.testing.assert_close(vs - v, st["reward_margin"], **TOL)


@pytest.mark.parametrize("preset", ["ipo", "robust_dpo", "simpo", "sppo", "trpa"])
def test_swapping_the_pairs_negates_the_margin_for_every_loss(preset):
    d = pairs(5)
    loss = PreferenceLoss(preset)
    v, gw, gl, st = mmrl_value_grad(loss, d)
    vs, gws, gls, sts = mmrl_value_grad(loss, swapped(d))
    torch.testing.assert_close(sts["reward_margin"], -st["reward_margin"], **TOL)
    margin, beta = st["reward_margin"], loss.spec.beta  # margin = mean β·m, m = s_w − s_l
    if preset == "sppo":  # each side regresses to its own win rate: swapping changes nothing
        torch.testing.assert_close((vs, gws, gls), (v, gl, gw), **TOL)
    elif preset == "ipo":  # (−m − c)² − (m − c)² = 4mc, c = 1/(2β)
        torch.testing.assert_close(vs - v, 2 * margin / beta ** 2, **TOL)
    elif preset == "robust_dpo":  # rDPO(−z) − rDPO(z) = z / (1 − 2ε)
        torch.testing.assert_close(vs - v, margin / (1 - 2 * loss.spec.label_smoothing), **TOL)


@pytest.mark.parametrize("preset", sorted(PREF_PRESETS))
def test_micro_batches_with_the_global_pair_count_sum_to_the_whole_loss(preset):
    d = pairs(6)
    loss = PreferenceLoss(preset)
    whole, gw, gl, st = mmrl_value_grad(loss, d)
    parts = [mmrl_value_grad(loss, d, rows, num_pairs=torch.tensor(P))
             for rows in (slice(0, 2), slice(2, 3), slice(3, 5))]
    torch.testing.assert_close(sum(p[0] for p in parts), whole, **TOL)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), gw, **TOL)
    torch.testing.assert_close(torch.cat([p[2] for p in parts]), gl, **TOL)
    for key in st:
        torch.testing.assert_close(sum(p[3][key] for p in parts), st[key], **TOL)


@pytest.mark.parametrize("preset", sorted(PREF_PRESETS))
def test_masked_padding_changes_nothing(preset):
    d = pairs(7)
    loss = PreferenceLoss(preset)
    v, gw, gl, _ = mmrl_value_grad(loss, d)
    wide = dict(d)  # three more padded positions of garbage on every [P, T] input
    for key, m in (("cw", "cm"), ("cref", "cm"), ("cg", "cm"), ("rw", "rm"), ("rref", "rm"),
                   ("rg", "rm")):
        wide[key] = torch.cat([d[key], torch.full((P, 3), math.nan, dtype=F64)], -1)
    for m in ("cm", "rm"):
        wide[m] = torch.cat([d[m], torch.zeros(P, 3, dtype=torch.bool)], -1)
    v2, gw2, gl2, _ = mmrl_value_grad(loss, wide)
    torch.testing.assert_close(v2, v, **TOL)
    torch.testing.assert_close(gw2[:, :TC], gw, **TOL)
    torch.testing.assert_close(gl2[:, :TR], gl, **TOL)
    assert (gw2[:, TC:] == 0).all() and (gl2[:, TR:] == 0).all()


@pytest.mark.parametrize("preset", sorted(PREF_PRESETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_for_extreme_log_ratios(preset, dtype):
    d = pairs(8, dtype=dtype)
    g = torch.Generator().manual_seed(9)
    for key in ("cref", "rref"):  # log-ratios of ±300 per token (margins in the thousands)
        d[key] = d[key] + 300 * torch.sign(torch.randn(d[key].shape, generator=g)).to(dtype)
    for key in ("cw", "rw"):  # and log-probs down to −200 per token (SimPO scores logp alone)
        d[key] = d[key] * 100
    loss = PreferenceLoss(preset)
    v, gw, gl, stats = mmrl_value_grad(loss, d)
    assert v.dtype == torch.float32  # half precision is scored in fp32
    assert torch.isfinite(v) and torch.isfinite(gw).all() and torch.isfinite(gl).all()
    assert all(torch.isfinite(s) for s in stats.values())


def test_empty_completion_scores_zero_and_no_pairs_give_zero():
    loss = PreferenceLoss("dpo")
    empty = torch.zeros(1, 2, dtype=torch.bool)
    x = torch.full((1, 2), math.nan, dtype=F64, requires_grad=True)
    v, st = loss(x, x, empty, empty, chosen_ref=x.detach(), rejected_ref=x.detach())
    assert v.item() == pytest.approx(math.log(2)) and st["reward_margin"].item() == 0
    none = torch.zeros(0, 3, dtype=F64, requires_grad=True)
    m0 = torch.zeros(0, 3, dtype=torch.bool)
    v0, st0 = loss(none, none, m0, m0, chosen_ref=none.detach(), rejected_ref=none.detach(),
                   num_pairs=4)
    assert v0.item() == 0 and st0["reward_accuracy"].item() == 0


# ---------------------------------------------------------------- input checks
def test_inputs_the_spec_needs_or_does_not_read_are_refused():
    cw, rw, cm, rm, cref, rref = hand_pair()
    with pytest.raises(ValueError, match="needs chosen_ref"):
        PreferenceLoss("dpo")(cw, rw, cm, rm)
    with pytest.raises(ValueError, match="reference_free"):
        PreferenceLoss("simpo")(cw, rw, cm, rm, chosen_ref=cref, rejected_ref=rref)
    with pytest.raises(ValueError, match="needs chosen_win"):
        PreferenceLoss("sppo")(cw, rw, cm, rm, chosen_ref=cref, rejected_ref=rref)
    with pytest.raises(ValueError, match="pair_scale given"):
        PreferenceLoss("dpo")(cw, rw, cm, rm, chosen_ref=cref, rejected_ref=rref,
                              pair_scale=torch.ones(1))
    with pytest.raises(ValueError, match=r"rejected_win given"):
        PreferenceLoss("sppo_single")(cw, rw, cm, rm, chosen_ref=cref, rejected_ref=rref,
                                      chosen_win=torch.ones(1), rejected_win=torch.ones(1))
    with pytest.raises(TypeError, match="bool"):
        PreferenceLoss("dpo")(cw, rw, cm.float(), rm, chosen_ref=cref, rejected_ref=rref)
    with pytest.raises(ValueError, match=r"chosen_ref has shape \(1, 2\)"):
        PreferenceLoss("dpo")(cw, rw, cm, rm, chosen_ref=cref[:, :2], rejected_ref=rref)
    with pytest.raises(ValueError, match="1 pairs but rejected_logp 2"):
        PreferenceLoss("dpo")(cw, rw.expand(2, 3), cm, rm.expand(2, 3), chosen_ref=cref,
                              rejected_ref=rref.expand(2, 3))


# ---------------------------------------------------------------- spec
def test_every_problem_is_reported_at_once():
    problems = pref_problems("dpo", beta=-1.0, label_smoothing=0.5, reference_free="yes",
                             betta=0.1, loss="sigmod")
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "did you mean 'beta'" in text and "did you mean 'sigmoid'" in text
    assert "beta=-1.0 is out of range; expected beta > 0" in text
    assert "label_smoothing=0.5 is out of range" in text and "true or false" in text
    with pytest.raises(ValueError, match="5 problem"):
        resolve_pref("dpo", beta=-1.0, label_smoothing=0.5, reference_free="yes", betta=0.1,
                     loss="sigmod")
    assert "did you mean 'simpo'" in pref_problems("simpo2")[0]


@pytest.mark.parametrize("overrides, fragment", [
    (dict(loss="ipo", label_smoothing=0.1), "label_smoothing=0.1 is read by losses sigmoid"),
    (dict(loss="ipo", gamma_beta_ratio=0.5), "gamma_beta_ratio=0.5 shifts the margin"),
    (dict(loss="sppo", reference_free=True), "cannot be reference_free"),
    (dict(token_guidance=True, reference_free=True), "token_guidance weights"),
    (dict(loss="sppo_single", scaled_pairs=True), "regresses each side"),
])
def test_combinations_that_cannot_work_are_refused(overrides, fragment):
    assert any(fragment in p for p in pref_problems("dpo", **overrides)), \
        pref_problems("dpo", **overrides)


def test_presets_are_valid_frozen_and_declare_their_inputs():
    for name, spec in PREF_PRESETS.items():
        assert pref_problems(name) == [], name
    spec = resolve_pref("simpo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.beta = 1.0
    assert (spec.needs_ref, spec.beta, spec.gamma_beta_ratio) == (False, 2.0, 0.25)
    assert resolve_pref("sppo").needs_win == "both"
    assert resolve_pref("sppo_single").needs_win == "chosen"
    assert resolve_pref("tgdpo").needs_guide and resolve_pref("trpa").needs_pair_scale
    assert resolve_pref("diffusion_dpo").beta == 100 and resolve_pref("dpo").needs_ref
    assert resolve_pref("dpo", beta=2).beta == 2  # an int is a number


def test_the_spec_side_and_mmrl_algos_load_no_torch():
    code = ("import sys; from mmrl.algo.preference import PrefSpec, pref_problems, resolve_pref; "
            "assert pref_problems('dpo', loss='ipo') == []; "
            "from mmrl.cli.app import main; main(['algos']); "
            "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "diffusion_dpo" in out.stdout and out.stdout.splitlines()[-1] == "TORCH False"


def test_the_public_names_import_from_every_level():
    import mmrl
    import mmrl.algo
    assert mmrl.PreferenceLoss is mmrl.algo.PreferenceLoss is PreferenceLoss
    assert mmrl.best_worst_pairs is best_worst_pairs and mmrl.PREF_PRESETS is PREF_PRESETS


def test_mmrl_algos_prints_the_preference_table(capsys):
    from mmrl.cli.app import main
    assert main(["algos"]) == 0
    out = capsys.readouterr().out.split("preference losses")[1]
    for name, spec in PREF_PRESETS.items():
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        assert spec.loss in line and f"beta={spec.beta:g}" in line
    assert "logp mean" in out and "logp-ref sum guided" in out and "kappa=2.5" in out
    assert main(["algos", "simpo"]) == 0
    assert "gamma_beta_ratio   0.25" in capsys.readouterr().out


# ---------------------------------------------------------------- pair builders
def test_best_worst_pairs_by_hand():
    r = torch.tensor([0.5, 0.9, 0.9, 0.1, 2.0, 1.0, 1.0, 7.0, 3.0])
    g = torch.tensor([4, 4, 4, 4, 9, 1, 1, 0, 1])
    # group 0: one row → no pair; group 1: rows 5, 6, 8 → best 8, worst 5 (first of the tie);
    # group 4: best row 1 (first of the tie 0.9), worst row 3; group 9: one row → no pair.
    chosen, rejected = best_worst_pairs(r, g)
    assert chosen.tolist() == [8, 1] and rejected.tolist() == [5, 3]
    flat = torch.tensor([1.0, 1.0, 2.0, 3.0])
    c, rj = best_worst_pairs(flat, torch.tensor([0, 0, 1, 1]))  # group 0 all equal: skipped
    assert c.tolist() == [3] and rj.tolist() == [2]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        best_worst_pairs(torch.tensor([1.0, math.nan]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="integer"):
        best_worst_pairs(flat, flat)


@pytest.mark.parametrize("seed", range(4))
def test_pair_builders_match_their_oracles(seed):
    g = torch.Generator().manual_seed(seed)
    gids = torch.randint(0, 5, (23,), generator=g) * 7
    rewards = torch.randint(0, 4, (23,), generator=g).double()  # many ties
    chosen, rejected = best_worst_pairs(rewards, gids)
    assert list(zip(chosen.tolist(), rejected.tolist())) == ref.best_worst(rewards.tolist(),
                                                                           gids.tolist())
    scores = torch.randn(23, generator=g, dtype=F64)
    assert win_rates(scores, gids).tolist() == pytest.approx(
        ref.win_rates(scores.tolist(), gids.tolist()), rel=1e-12)
    levels = torch.randint(1, 5, (23,), generator=g)
    i, j, scale = level_pairs(levels, gids, kappa=2.5)
    assert list(zip(i.tolist(), j.tolist(), scale.tolist())) == ref.level_pairs(
        levels.tolist(), gids.tolist(), 2.5)


def test_win_rates_and_level_pairs_by_hand():
    s = torch.tensor([0.0, math.log(3), 5.0], dtype=F64)
    w = win_rates(s, torch.tensor([2, 2, 0]))
    # row 0: (½ + σ(−ln 3))/2 = (0.5 + 0.25)/2; row 1: (0.75 + 0.5)/2; row 2 alone: ½.
    assert w.tolist() == pytest.approx([0.375, 0.625, 0.5], rel=1e-12)
    i, j, scale = level_pairs(torch.tensor([1, 3, 2, 1, 4]), torch.tensor([0, 0, 0, 1, 1]),
                              kappa=2.0)
    assert list(zip(i.tolist(), j.tolist(), scale.tolist())) == [
        (0, 1, 2.0), (0, 2, 2.0), (2, 1, 1.0), (3, 4, 2.0)]
