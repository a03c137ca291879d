"""Weighted matching losses (mmrl.algo.matching, mmrl.algo.match_presets): hand-worked values and
gradients, the loop oracles of tests/reference/matching_ref.py, NFT's implicit policies at
θ = θ_old, AWM's zero gradient at equal rewards, split invariance, the soft-update schedules, the
time draws and the presets' checks."""
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmrl.algo import match_presets as mp
from mmrl.algo import matching as m
from mmrl.algo.advantages import group_advantages
from tests.reference import matching_ref as ref


def _terms(v, target, t, mask=None, v_old=None, v_ref=None):
    mask = torch.ones(t.shape, dtype=torch.bool) if mask is None else mask
    return m.MatchTerms(v, target, t, mask, v_old, v_ref)


def test_optimality_probability_hand_worked():
    r = m.nft_optimality(torch.tensor([2.5, 5.0, 9.0, 0.0, -2.5, -7.0]))
    assert r.tolist() == [0.75, 1.0, 1.0, 0.5, 0.25, 0.0]
    a = torch.tensor([-2.0, 0.0, 3.0])
    assert m.nft_optimality(a, adv_mode="positive_only").tolist() == pytest.approx([0.5, 0.5, 0.8])
    assert m.nft_optimality(a, adv_mode="negative_only").tolist() == pytest.approx([0.3, 0.5, 0.5])
    assert m.nft_optimality(a, adv_mode="one_only").tolist() == pytest.approx([0.5, 0.5, 0.6])
    assert m.nft_optimality(a, adv_mode="binary").tolist() == pytest.approx([0.4, 0.5, 0.6])


def test_nft_hand_worked_value_and_gradient():
    """t = ½, ε − x0 = [1, −1], v = v_old = 0, β = 1: x̂0 − x0 = ½·[−1, 1], L± = ¼/½ = ½, loss
    C·½ = 2.5 for any r; ∂L±/∂v = ±[−½, ½], so r = 0.75 gives 5·(0.75 − 0.25)·[−½, ½]."""
    v = torch.zeros(1, 1, 2, dtype=torch.float64, requires_grad=True)
    terms = _terms(v, torch.tensor([[[1.0, -1.0]]], dtype=torch.float64),
                   torch.tensor([[0.5]], dtype=torch.float64), v_old=torch.zeros(1, 1, 2,
                                                                               dtype=torch.float64))
    loss, stats = m.nft_loss(terms, torch.tensor([2.5], dtype=torch.float64))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(2.5)
    assert v.grad.flatten().tolist() == pytest.approx([-1.25, 1.25])
    assert float(stats["nft_loss_pos"]) == pytest.approx(0.5)
    assert float(stats["nft_r_mean"]) == pytest.approx(0.75)


def test_awm_hand_worked_value_and_gradient():
    """uniform: e = 1, A′ = 2.5/5 = ½, loss −A′·ρ = −½, ∇ = A′·∇e = ½·[−1, 1]; ghuber: ∇ = A′·t·
    (e + 1e-10)^(p−1)·∇e = ½·½·[−1, 1]."""
    for weighting, grad in (("uniform", [-0.5, 0.5]), ("ghuber", [-0.25, 0.25])):
        v = torch.zeros(1, 1, 2, dtype=torch.float64, requires_grad=True)
        terms = _terms(v, torch.tensor([[[1.0, -1.0]]], dtype=torch.float64),
                       torch.tensor([[0.5]], dtype=torch.float64))
        loss, stats = m.awm_loss(terms, torch.tensor([2.5], dtype=torch.float64),
                                 weighting=weighting)
        loss.backward()
        assert float(loss.detach()) == pytest.approx(-0.5)
        assert v.grad.flatten().tolist() == pytest.approx(grad, rel=1e-6)
        assert float(stats["awm_error"]) == pytest.approx(1.0)


def _random_case(seed, b=2, K=3, d=4):
    g = torch.Generator().manual_seed(seed)
    x0, eps = (torch.randn(b, K, d, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, K, d, generator=g, dtype=torch.float64).requires_grad_(True)
    v_old, v_ref = (torch.randn(b, K, d, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.rand(b, K, generator=g, dtype=torch.float64) * 0.9 + 0.05
    mask = torch.ones(b, K, dtype=torch.bool)
    mask[1, 2] = False
    adv = torch.tensor([1.7, -6.0], dtype=torch.float64)
    return x0, eps, v, v_old, v_ref, t, mask, adv


def _leaves(v):
    """[b, K, d] -> nested [b][K] rows of the same leaf (the oracle indexes it)."""
    return [[v[i, k] for k in range(v.shape[1])] for i in range(v.shape[0])]


@pytest.mark.parametrize("loss,params", [
    ("nft", dict(beta=1.0)), ("nft", dict(beta=0.1, kl_coef=0.3)),
    ("awm", dict(weighting="ghuber", kl_coef=0.2, old_coef=1.0)),
    ("awm", dict(weighting="uniform")), ("awm", dict(weighting="t")),
    ("awm", dict(weighting="t**2")), ("awm", dict(weighting="huber", adv_max=0.5))])
def test_losses_match_the_loop_oracle_in_value_and_gradient(loss, params):
    x0, eps, v, v_old, v_ref, t, mask, adv = _random_case(0)
    got, _ = m.matching_loss(loss)(_terms(v, eps - x0, t, mask, v_old, v_ref), adv, **params)
    g_got, = torch.autograd.grad(got, v)
    rename = {"beta": "beta", "kl_coef": "kl_coef", "weighting": "weighting",
              "old_coef": "old_coef", "adv_max": "adv_max"}
    want = getattr(ref, loss)(_leaves(v), v_old.tolist(), v_ref.tolist(), x0.tolist(),
                              eps.tolist(), t.tolist(), mask.tolist(), adv.tolist(),
                              **{rename[k]: val for k, val in params.items()})
    g_want, = torch.autograd.grad(want, v)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-9)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-12)
    assert float(g_got[1, 2].abs().sum()) == 0.0  # the masked term has no gradient


def test_nft_implicit_policies_equal_the_old_one_at_step_zero():
    """θ = θ_old: v⁺ = v⁻ = v_old, and at r = ½ (A = 0) the gradient is zero."""
    x0, eps, v, _, _, t, mask, _ = _random_case(1)
    v_old = v.detach().clone()
    pos, neg = m.nft_implicit_velocities(v, v_old, 0.3)
    torch.testing.assert_close(pos.detach(), v_old, rtol=0, atol=1e-15)
    torch.testing.assert_close(neg.detach(), v_old, rtol=0, atol=1e-15)
    loss, _ = m.nft_loss(_terms(v, eps - x0, t, mask, v_old), torch.zeros(2, dtype=torch.float64),
                         beta=0.3)
    grad, = torch.autograd.grad(loss, v)
    assert float(grad.abs().max()) < 1e-12


def test_awm_with_all_equal_rewards_gives_zero_gradient():
    x0, eps, v, v_old, _, t, mask, _ = _random_case(2)
    adv = group_advantages(torch.tensor([0.7, 0.7], dtype=torch.float64), torch.tensor([0, 0]))
    assert adv.tolist() == [0.0, 0.0]
    loss, _ = m.awm_loss(_terms(v, eps - x0, t, mask, v_old), adv)
    grad, = torch.autograd.grad(loss, v)
    assert float(loss.detach()) == 0.0 and float(grad.abs().max()) == 0.0


@pytest.mark.parametrize("loss", m.MATCHING_LOSSES.names())
def test_splitting_rows_and_times_sums_to_the_unsplit_loss(loss):
    """With the global term count, pieces along rows and along K sum to the whole (value and
    gradient), as micro-batching and data parallelism need; NaN in a masked term stays out."""
    x0, eps, v, v_old, v_ref, t, mask, adv = _random_case(3)
    fn, kw = m.matching_loss(loss), dict(kl_coef=0.1)
    whole, _ = fn(_terms(v, eps - x0, t, mask, v_old, v_ref), adv, **kw)
    g_whole, = torch.autograd.grad(whole, v)
    n = mask.sum()
    total = 0.0
    for rows in (slice(0, 1), slice(1, 2)):
        for ks in (slice(0, 2), slice(2, 3)):
            vv = v[rows, ks]
            if not mask[rows, ks].any():
                vv = torch.where(mask[rows, ks][..., None], vv, float("nan"))
            part, _ = fn(_terms(vv, (eps - x0)[rows, ks], t[rows, ks], mask[rows, ks],
                                v_old[rows, ks], v_ref[rows, ks]), adv[rows], num_terms=n, **kw)
            total = total + part
    g_parts, = torch.autograd.grad(total, v)
    assert float(total.detach()) == pytest.approx(float(whole.detach()), rel=1e-12)
    torch.testing.assert_close(g_parts, g_whole, rtol=1e-10, atol=1e-14)


def test_soft_update_schedules_hand_worked():
    d = m.soft_update_decay
    assert [d("none", s) for s in (0, 100)] == [0.0, 0.0]
    assert [d("nft_ramp", s) for s in (0, 100, 500, 900)] == pytest.approx([0, 0.1, 0.5, 0.5])
    assert [d("nft_delayed", s) for s in (74, 75, 100, 209, 400)] == pytest.approx(
        [0, 0, 0.1875, 0.999, 0.999])
    assert [d("awm_kl_ema", s) for s in (0, 100, 300, 1000)] == pytest.approx([0, 0.1, 0.3, 0.3])
    old, cur = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    m.soft_update_(old, cur, 0.25)  # 0.25·old + 0.75·current
    assert old["w"].tolist() == [2.5, 5.0]
    with pytest.raises(ValueError, match="unknown soft-update schedule 'ema'"):
        d("ema", 1)


def test_time_draws_follow_each_papers_rule():
    g = torch.Generator().manual_seed(0)
    grid = m.draw_times("rollout_grid", 5, 10, g, fraction=0.99)  # 9 of 10, per row
    assert grid.shape == (5, 9)
    assert all(len(set(r)) == 9 and 0 <= min(r) and max(r) <= 9 for r in grid.tolist())
    assert len({tuple(sorted(r)) for r in grid.tolist()}) > 1  # rows draw independently
    wo = m.draw_times("stratified_wo_init", 3, 14, g)  # strata ⌊linspace(1, 12, 7)⌋
    lo, hi = [1, 2, 4, 6, 8, 10], [2, 4, 6, 8, 10, 12]
    assert all(a <= j < b for r in wo.tolist() for j, a, b in zip(r, lo, hi))
    assert torch.equal(wo[0], wo[2])  # one index per stratum, shared by the rows
    st = m.draw_times("stratified", 2, 14, g)  # ⌊linspace(0, 12, 7)⌋ = 0, 2, ..., 12
    assert all(2 * k <= j < 2 * k + 2 for k, j in enumerate(st[0].tolist()))
    with pytest.raises(ValueError, match="unknown time draw 'uniform'"):
        m.draw_times("uniform", 1, 10, g)


def test_preset_tables_match_the_torch_registries():
    assert sorted(mp.LOSS_READS) == sorted(m.MATCHING_LOSSES.names())
    for name, reads in mp.LOSS_READS.items():
        kw = [p for p, a in inspect.signature(m.MATCHING_LOSSES.get(name)).parameters.items()
              if a.kind is a.KEYWORD_ONLY and p != "num_terms"]
        assert sorted(kw) == sorted(reads), name
    assert mp.SOFT_UPDATE_NAMES == tuple(m.SOFT_UPDATE_DECAYS)
    assert mp.TIME_DRAW_NAMES == m.TIME_DRAWS
    assert mp.AWM_WEIGHTING_NAMES == tuple(m.AWM_WEIGHTINGS)
    assert mp.NFT_ADV_MODE_NAMES == m.NFT_ADV_MODES


def test_presets_resolve_and_report_every_problem():
    nft, awm = mp.resolve_match("nft"), mp.resolve_match("awm")
    assert nft.loss_kwargs() == dict(beta=1.0, adv_clip_max=5.0, adv_mode="all", kl_coef=1e-4)
    assert (awm.loss, awm.weighting, awm.old_coef, awm.old_decay, awm.times) == (
        "awm", "ghuber", 1.0, "awm_kl_ema", "stratified")
    assert nft.needs_old and awm.needs_old and nft.reads_old and awm.reads_old
    assert (nft.rollout_policy, awm.rollout_policy) == ("old", "current")
    assert not mp.resolve_match("awm", old_coef=0.0).needs_old
    assert mp.resolve_match("awm", old_coef=0.0, rollout_policy="old").needs_old
    text = "\n".join(mp.match_problems("nft", beta=-1.0, betta=1.0, times="random")
                     + mp.match_problems("nft", weighting="t"))
    assert "unknown matching override 'betta'" in text and "did you mean 'beta'" in text
    assert "beta=-1.0 is out of range" in text
    assert "times='random'; expected one of rollout_grid" in text
    assert "weighting='t' is not read by loss 'nft'" in text
    assert "unknown matching preset 'nfft'" in mp.match_problems("nfft")[0]
    with pytest.raises(ValueError, match="1 problem"):
        mp.resolve_match("awm", num_times=0)


def test_core_loss_errors_say_what_was_expected():
    v = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"advantages \(3,\); expected \[b\] = \(2,\)"):
        m.awm_loss(_terms(v, v, torch.zeros(2, 3)), torch.zeros(3))
    with pytest.raises(ValueError, match="needs MatchTerms.v_old"):
        m.nft_loss(_terms(v, v, torch.zeros(2, 3)), torch.zeros(2))
    with pytest.raises(ValueError, match="unknown matching loss 'nfy'.*did you mean 'nft'"):
        m.matching_loss("nfy")


def test_presets_load_no_torch_and_mmrl_algos_lists_them(capsys):
    code = ("import sys; from mmrl.algo.match_presets import match_problems; "
            "assert match_problems('awm', weighting='t') == []; "
            "from mmrl.config.schema import load_config; "
            "[load_config(f'configs/diffusion/{r}.yaml') for r in ('sd35m_pickscore_nft', "
            "'sd35m_pickscore_awm', 'flux_hps_nft')]; "
            "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])  # the recipes validate too
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1] == "TORCH False"
    from mmrl.cli.app import main
    assert main(["algos"]) == 0
    table = capsys.readouterr().out.split("weighted matching losses")[1]
    assert next(l for l in table.splitlines() if l.startswith("nft ")).split()[:4] == [
        "nft", "nft", "nft_ramp", "rollout_grid"]
    assert "weighting=ghuber" in next(l for l in table.splitlines() if l.startswith("awm "))
    assert main(["algos", "awm"]) == 0
    assert "old_decay          awm_kl_ema" in capsys.readouterr().out


@pytest.mark.parametrize("loss", m.MATCHING_LOSSES.names())
def test_every_loss_ignores_masked_terms_and_stays_finite_at_extremes(loss):
    """A masked term's values (even inf) change neither the loss nor the other gradients; huge
    errors and advantages, t at 0 and 1, and a fully masked call give finite numbers."""
    x0, eps, v, v_old, v_ref, t, mask, adv = _random_case(4)
    fn, kw = m.matching_loss(loss), dict(kl_coef=0.1)
    base, _ = fn(_terms(v, eps - x0, t, mask, v_old, v_ref), adv, **kw)
    g_base, = torch.autograd.grad(base, v)
    junk = v.detach().clone()
    junk[1, 2] = float("inf")
    v2 = torch.where(mask[..., None], v, junk)
    other, _ = fn(_terms(v2, eps - x0, t, mask, v_old, v_ref), adv, **kw)
    g_other, = torch.autograd.grad(other, v)
    assert float(other.detach()) == pytest.approx(float(base.detach()), rel=1e-12)
    torch.testing.assert_close(g_other, g_base, rtol=0, atol=0)
    big = (v * 1e6).detach().requires_grad_(True)
    t_ends = t.clone()
    t_ends[0, 0], t_ends[0, 1] = 0.0, 1.0
    out, stats = fn(_terms(big, eps - x0, t_ends, mask, v_old, v_ref), adv * 1e6, **kw)
    grad, = torch.autograd.grad(out, big)
    assert torch.isfinite(out) and bool(torch.isfinite(grad).all())
    assert all(bool(torch.isfinite(x)) for x in stats.values())
    empty, _ = fn(_terms(v, eps - x0, t, torch.zeros_like(mask), v_old, v_ref), adv, **kw)
    assert float(empty.detach()) == 0.0
