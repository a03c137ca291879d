"""KL cap and bias correction, the entropy bonus, the top-entropy mask and ``empty_rows``:
hand-worked values and gradients, the slow oracle (tests/reference/kl_entropy_ref.py), the
chunked entropy against the unchunked one, and the config checks."""
import math

import pytest
import torch

from mmrl.algo.entropy import (entropy_threshold, logp_and_entropy, token_entropy,
                               top_entropy_mask)
from mmrl.algo.kl import bias_corrected_kl, cap_kl, kl_penalty
from mmrl.algo.losses import PolicyLoss
from mmrl.algo.presets import algo_problems, resolve_algo
from tests.reference import core_math as core
from tests.reference import kl_entropy_ref as ref

F64 = torch.float64
B, T, V = 6, 5, 7
ONE = torch.ones(1, 1, dtype=torch.bool)


def _t(x):
    return torch.tensor([[x]], dtype=F64, requires_grad=True)


# ---------------------------------------------------------------- hand-worked values
def test_kl_cap_clamps_k3_and_stops_its_gradient():
    lp = _t(-12.0)  # k3 = e^12 − 12 − 1 ≈ 162741.8: capped at 10, gradient 0
    kl = kl_penalty(lp, torch.zeros(1, 1, dtype=F64), "k3", cap=10.0)
    assert kl.item() == 10.0
    kl.sum().backward()
    assert lp.grad.item() == 0.0
    inside = _t(math.log(2.0))  # k3 = ln 2 − 0.5 < 10: unchanged, gradient 1 − e^−x = 0.5
    kl = kl_penalty(inside, torch.zeros(1, 1, dtype=F64), "k3", cap=10.0)
    assert kl.item() == pytest.approx(math.log(2) - 0.5)
    kl.sum().backward()
    assert inside.grad.item() == pytest.approx(0.5)
    assert cap_kl(torch.tensor([-20.0, 3.0]), 2.0).tolist() == [-2.0, 2.0]  # k1 can be < 0
    with pytest.raises(ValueError, match="kl_cap=0"):
        cap_kl(torch.zeros(1), 0)


def test_bias_corrected_kl_value_and_gradient_by_hand():
    # ρ = 1.5 (logp − old = ln 1.5), x = logp − ref = ln 2: k3 = ln 2 − 0.5;
    # ∂(ρ·k3)/∂logp = ρ·k3 + ρ·(1 − e^−x) = 1.5·(ln 2 − 0.5) + 0.75.
    lp = _t(math.log(1.5))
    old, refp = torch.zeros(1, 1, dtype=F64), torch.full((1, 1), math.log(0.75), dtype=F64)
    loss, stats = PolicyLoss("dapo", beta=1.0, kl_bias_correction=True)(
        lp, old, torch.zeros(1, dtype=F64), ONE, ref_logp=refp)
    k3 = math.log(2) - 0.5
    assert loss.item() == pytest.approx(1.5 * k3)
    assert stats["kl_ref"].item() == pytest.approx(1.5 * k3)  # the term as the loss uses it
    loss.backward()
    assert lp.grad.item() == pytest.approx(1.5 * k3 + 0.75)
    # at ρ = 1 the correction still changes the gradient: k3 + (1 − e^−x) instead of 1 − e^−x
    lp1 = _t(math.log(2.0))
    plain = PolicyLoss("dapo", beta=1.0)(lp1, lp1.detach(), torch.zeros(1, dtype=F64), ONE,
                                         ref_logp=torch.zeros(1, 1, dtype=F64))[0]
    (g_plain,) = torch.autograd.grad(plain, lp1)
    fixed = PolicyLoss("dapo", beta=1.0, kl_bias_correction=True)(
        lp1, lp1.detach(), torch.zeros(1, dtype=F64), ONE, ref_logp=torch.zeros(1, 1, dtype=F64))[0]
    (g_fixed,) = torch.autograd.grad(fixed, lp1)
    assert g_plain.item() == pytest.approx(0.5) and g_fixed.item() == pytest.approx(k3 + 0.5)


def test_bias_correction_broadcasts_the_sequence_ratio():
    kl = torch.ones(2, 3, dtype=F64)
    out = bias_corrected_kl(kl, torch.tensor([[math.log(2.0)], [0.0]], dtype=F64))
    assert out.tolist() == [[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]]


def test_entropy_by_hand():
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, -math.inf, 0.0, -math.inf],
                      [0.0, math.log(3.0), -math.inf, -math.inf]], dtype=F64, requires_grad=True)
    h = token_entropy(z)
    p = (0.25, 0.75)
    assert h.tolist() == pytest.approx([math.log(4), math.log(2),
                                        -(p[0] * math.log(p[0]) + p[1] * math.log(p[1]))])
    h[2].backward()
    # ∂H/∂z_k = −p_k (z_k − Σ p z): ±0.75·0.25·ln 3; 0 at −inf entries (no NaN)
    g = 0.75 * 0.25 * math.log(3)
    assert z.grad[2].tolist() == pytest.approx([g, -g, 0.0, 0.0])
    assert torch.isfinite(z.grad).all()


def test_threshold_and_mask_by_hand():
    h = torch.tensor([[0.1, 0.5, 0.3], [0.9, 0.7, 5.0]])
    m = torch.tensor([[True, True, True], [True, True, False]])
    # valid sorted (.1, .3, .5, .7, .9); q = 0.4 -> 0.6-quantile: pos 2.4 -> .5 + .4·.2 = .58
    assert entropy_threshold(h[m], 0.4).item() == pytest.approx(0.58)
    assert top_entropy_mask(h, m, 0.4).tolist() == [[False, False, False], [True, True, False]]
    assert top_entropy_mask(h, m, 0.0).tolist() == [[False, False, False], [True, False, False]]
    assert top_entropy_mask(h, m, 1.0).tolist() == m.tolist()
    ties = torch.full((2, 2), 0.5)
    assert top_entropy_mask(ties, torch.ones(2, 2, dtype=torch.bool), 0.1).all()  # ties kept
    assert not top_entropy_mask(h, torch.zeros(2, 3, dtype=torch.bool), 0.2).any()
    with pytest.raises(ValueError, match="top_entropy_quantile=1.5"):
        entropy_threshold(h, 1.5)


def test_entropy_bonus_by_hand():
    # two tokens, H = (1.0, 3.0), A = 0 on-policy: loss = −c·mean H (token_mean) = −0.2
    lp = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    H = torch.tensor([[1.0, 3.0]], dtype=F64, requires_grad=True)
    m = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = PolicyLoss("dapo", entropy_coef=0.1)(lp, lp.detach(), torch.zeros(1, dtype=F64),
                                                       m, entropy=H)
    assert loss.item() == pytest.approx(-0.2) and stats["entropy"].item() == 2.0
    loss.backward()
    assert H.grad.tolist() == [[-0.05, -0.05]]
    # top half by entropy: only H = 3 counts, over the unchanged normalizer 2
    H.grad = None
    loss, stats = PolicyLoss("dapo", entropy_coef=0.1, top_entropy_quantile=0.5)(
        lp, lp.detach(), torch.ones(1, dtype=F64), m, entropy=H)
    assert stats["entropy_kept"].item() == 0.5
    assert loss.item() == pytest.approx((-1.0 - 0.1 * 3.0) / 2)  # policy term of token 2 only
    loss.backward()
    assert H.grad.tolist() == [[0.0, -0.05]]


@pytest.mark.parametrize("agg, count, skip", [
    ("seq_mean_token_mean", 4 / 2, 4 / 1), ("seq_mean_token_sum", 8 / 2, 8 / 1),
    ("fixed_norm", 8 / (2 * 2), 8 / (1 * 2))])
def test_empty_rows_count_or_skip_by_hand(agg, count, skip):
    loss = torch.tensor([[3.0, 5.0], [7.0, 9.0]])
    mask = torch.tensor([[True, True], [False, False]])  # row 2 empty
    for rows, want in (("count", count), ("skip", skip)):
        fn = PolicyLoss("grpo", aggregation=agg, max_len=2, empty_rows=rows)._aggregate
        assert fn(loss, mask, max_len=2, empty_rows=rows).item() == pytest.approx(want)
    seq = PolicyLoss("gspo", empty_rows="skip")._aggregate
    assert seq(torch.tensor([[2.0], [9.0]]), torch.tensor([[True], [False]]),
               empty_rows="skip").item() == 2.0


# ---------------------------------------------------------------- oracle, values and gradients
def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    logp = (-2 * torch.rand(B, T, generator=g, dtype=F64)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    refp = logp.detach() + 2.0 * torch.randn(B, T, generator=g, dtype=F64)  # some k3 > cap
    logits = torch.randn(B, T, V, generator=g, dtype=F64).requires_grad_()
    mask = torch.arange(T)[None] < torch.tensor([5, 3, 0, 4, 1, 0])[:, None]  # 2 empty rows
    adv = torch.randn(B, generator=g, dtype=F64)
    return logp, old, refp, logits, mask, adv


CASES = [
    ("dapo", dict(beta=0.1, kl_cap=0.5)),
    ("grpo", dict(beta=0.1, kl_cap=0.5, kl_bias_correction=True, empty_rows="skip")),
    ("grpo", dict(entropy_coef=0.05, top_entropy_quantile=0.3, empty_rows="skip")),
    ("dapo", dict(beta=0.04, kl_bias_correction=True, entropy_coef=0.05,
                  top_entropy_quantile=0.5)),
    ("dr_grpo", dict(max_len=T, entropy_coef=0.05, empty_rows="skip", beta=0.1, kl="k2",
                     kl_cap=0.3)),
    ("gspo", dict(beta=0.1, kl_bias_correction=True, entropy_coef=0.05, empty_rows="skip")),
    ("gspo_token", dict(beta=0.1, kl_bias_correction=True, top_entropy_quantile=0.2,
                        entropy_coef=0.05)),
    ("sapo", dict(entropy_coef=0.1, top_entropy_quantile=0.6, empty_rows="count")),
]


@pytest.mark.parametrize("name, over", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_matches_the_oracle_values_and_gradients(name, over):
    logp, old, refp, logits, mask, adv = _batch(seed=len(over))
    fn = PolicyLoss(name, **over)
    _, H = logp_and_entropy(logits, torch.zeros(B, T, dtype=torch.long), chunk_size=2)
    loss, _ = fn(logp, old, adv, mask, ref_logp=refp, entropy=H)
    want = ref.policy_loss(fn.spec, logp, old, adv, mask, ref_logp=refp,
                           entropy=ref.entropies(logits))
    got_g = torch.autograd.grad(loss, (logp, logits), allow_unused=True)
    want_g = torch.autograd.grad(want, (logp, logits), allow_unused=True)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(got_g, want_g):
        if b is None:  # the oracle never touched the logits (no bonus, no mask)
            assert a is None or float(a.abs().sum()) == 0.0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert float(got_g[0].abs().sum()) > 0


def test_kl_options_and_precomputed_mask_split_over_rows_and_t_equal_the_whole():
    """Global counts + a mask from the whole batch: the pieces' losses sum to the whole's."""
    logp, old, refp, logits, mask, adv = _batch(seed=3)
    _, H = logp_and_entropy(logits, torch.zeros(B, T, dtype=torch.long))
    fn = PolicyLoss("grpo", beta=0.1, kl_cap=0.5, kl_bias_correction=True, entropy_coef=0.05,
                    top_entropy_quantile=0.4, empty_rows="skip")
    keep = top_entropy_mask(H, mask, 0.4)
    norm = dict(num_tokens=mask.sum(), num_seqs=mask.any(-1).sum())
    whole, _ = fn(logp, old, adv, mask, ref_logp=refp, entropy=H, entropy_mask=keep, **norm)
    parts = sum(fn(logp[r][:, t], old[r][:, t], adv[r], mask[r][:, t], ref_logp=refp[r][:, t],
                   entropy=H[r][:, t], entropy_mask=keep[r][:, t], seq_lens=mask[r].sum(-1),
                   **norm)[0]
                for r in (slice(0, 4), slice(4, 6)) for t in (slice(0, 2), slice(2, 5)))
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- chunked entropy
def test_chunked_entropy_equals_unchunked_for_tensors_and_callables():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 7, 11, generator=g, dtype=F64)
    z[..., 4] = -math.inf  # a banned token
    z = z.requires_grad_()
    tokens = torch.randint(0, 4, (3, 7), generator=g)
    want_lp = torch.log_softmax(z, -1).gather(-1, tokens[..., None])[..., 0]
    want_h = token_entropy(z)
    w = torch.randn(2, 3, 7, generator=g, dtype=F64)
    want_g = torch.autograd.grad((want_lp * w[0] + want_h * w[1]).sum(), z)[0]
    calls = []

    def source(t0, t1):
        calls.append((t0, t1))
        return z[:, t0:t1] * 1.0

    for src, chunk in ((z, 3), (z, 100), (source, 3)):
        lp, h = logp_and_entropy(src, tokens, chunk_size=chunk)
        torch.testing.assert_close(lp, want_lp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h, want_h, rtol=1e-12, atol=1e-12)
        got_g = torch.autograd.grad((lp * w[0] + h * w[1]).sum(), z)[0]
        torch.testing.assert_close(got_g, want_g, rtol=1e-12, atol=1e-12)
    # the callable ran once per chunk forward, and again per chunk in the backward (recompute)
    assert calls == [(0, 3), (3, 6), (6, 7)] + sorted([(0, 3), (3, 6), (6, 7)], reverse=True)
    with pytest.raises(ValueError, match=r"logits\(0, 2\) returned"):
        logp_and_entropy(lambda a, b: z[:1, a:b], tokens, chunk_size=2)


def test_entropy_upcasts_half_precision():
    z = torch.randn(2, 3, 50, dtype=torch.bfloat16)
    assert token_entropy(z).dtype == torch.float32
    torch.testing.assert_close(token_entropy(z), token_entropy(z.float()))


# ---------------------------------------------------------------- config checks and errors
def test_options_that_would_be_ignored_are_refused():
    assert algo_problems("grpo", kl_cap=10.0) == [
        "kl_cap shapes the KL term, which beta=0.0 leaves out; set beta > 0 or drop kl_cap"]
    assert "kl_bias_correction shapes the KL term" in algo_problems(
        "grpo", kl_bias_correction=True)[0]
    assert "masks tokens but ratio_level 'sequence' gives one loss per sequence" in \
        algo_problems("gspo", top_entropy_quantile=0.2)[0]
    assert "aggregation 'token_mean' counts tokens" in algo_problems("dapo", empty_rows="skip")[0]
    assert algo_problems("grpo", empty_rows="skp") == [
        "unknown empty_rows 'skp' (expected one of count, skip); did you mean 'skip'?"]
    assert algo_problems("grpo", kl_bias_correction=1) == [
        "kl_bias_correction must be true or false, got int 1"]
    assert "top_entropy_quantile=1.5 is out of range" in algo_problems(
        "grpo", top_entropy_quantile=1.5)[0]
    spec = resolve_algo("grpo", beta=0.04, kl_cap=10.0, kl_bias_correction=True,
                        entropy_coef=0.01, top_entropy_quantile=0.2, empty_rows="skip")
    assert spec.needs_entropy and not resolve_algo("grpo").needs_entropy


def test_missing_entropy_inputs_are_clear_errors():
    lp = torch.zeros(1, 2, dtype=F64)
    m = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.zeros(1, dtype=F64)
    with pytest.raises(ValueError, match="entropy_coef=0.1 needs entropy"):
        PolicyLoss("grpo", entropy_coef=0.1)(lp, lp, adv, m)
    with pytest.raises(ValueError, match="top_entropy_quantile=0.2 needs entropy_mask"):
        PolicyLoss("grpo", top_entropy_quantile=0.2)(lp, lp, adv, m)
    with pytest.raises(ValueError, match="entropy_mask given but top_entropy_quantile is 1"):
        PolicyLoss("grpo")(lp, lp, adv, m, entropy_mask=m)
    with pytest.raises(ValueError, match=r"entropy has shape \(1, 3\)"):
        PolicyLoss("grpo", entropy_coef=0.1)(lp, lp, adv, m, entropy=torch.zeros(1, 3))


def test_oracle_helpers_agree_with_core_oracle_without_options():
    """The KL/entropy oracle reduces to the core oracle when every option is off."""
    logp, old, refp, _, mask, adv = _batch(seed=5)
    spec = resolve_algo("grpo", beta=0.04)
    a = ref.policy_loss(spec, logp, old, adv, mask, ref_logp=refp)
    b = core.policy_loss(spec, logp, old, adv, mask, ref_logp=refp)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
