"""TW-GRPO token weights: oracle parity, chunking, bounded memory, α = 1, errors."""

import pytest
import torch

from mmrl.algo.token_weights import tw_token_weights
from tests.reference import core_math as ref

N, T, V = 4, 9, 7


def make_group(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(N, T, V, generator=g, dtype=torch.float64).mul(2).log_softmax(-1).to(dtype)
    lengths = torch.tensor([9, 6, 2, 7])
    mask = torch.arange(T)[None] < lengths[:, None]  # [N, T]
    mask[:, -1] = False  # a position nobody reaches
    return full, mask


@pytest.mark.parametrize("alpha", [1.7, 3.0, 0.5])
@pytest.mark.parametrize("seed", range(3))
def test_matches_oracle(seed, alpha):
    full, mask = make_group(seed)
    got = tw_token_weights(full, mask, alpha=alpha)
    torch.testing.assert_close(got, ref.tw_weights(full, mask, alpha=alpha), rtol=1e-9, atol=1e-9)


def test_large_disagreement_hits_the_clamp_like_the_oracle():
    full, mask = make_group(5)
    full = full.clone()
    full[0, :, 0] = -40.0  # d = M − ℓp > 11 somewhere: clamped
    torch.testing.assert_close(tw_token_weights(full, mask), ref.tw_weights(full, mask),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunk_size, vocab_chunk", [(1, None), (2, 3), (4, 1), (64, 2), (5, 7)])
def test_chunked_equals_unchunked(chunk_size, vocab_chunk):
    full, mask = make_group(1)
    whole = tw_token_weights(full, mask, chunk_size=T)
    chunked = tw_token_weights(full, mask, chunk_size=chunk_size, vocab_chunk=vocab_chunk)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)


def test_callable_source_never_asks_for_more_than_a_chunk():
    full, mask = make_group(2)
    calls = []

    def source(t0, t1):
        calls.append((t0, t1))
        return full[:, t0:t1]

    got = tw_token_weights(source, mask, chunk_size=4)
    assert calls == [(0, 4), (4, 8), (8, 9)]
    torch.testing.assert_close(got, tw_token_weights(full, mask))


def test_alpha_one_gives_ones_and_weights_are_shared_and_bounded():
    full, mask = make_group(3)
    assert torch.equal(tw_token_weights(full, mask, alpha=1.0), torch.ones(N, T, dtype=torch.float64))
    w = tw_token_weights(full, mask, alpha=1.7)
    for t in range(T):
        col = w[mask[:, t], t]
        assert torch.all(col == col[0]) if len(col) else True  # shared by the group's samples
    assert w[mask].min().item() == pytest.approx(1.0) and w[mask].max().item() == pytest.approx(1.7)
    assert torch.all(w[~mask] == 1.0)


def test_identical_samples_and_empty_mask_give_ones():
    full, mask = make_group(4)
    same = full[:1].expand(N, T, V)
    assert torch.allclose(tw_token_weights(same, torch.ones(N, T, dtype=torch.bool)),
                          torch.ones(N, T, dtype=torch.float64))
    assert torch.equal(tw_token_weights(full, torch.zeros(N, T, dtype=torch.bool)),
                       torch.ones(N, T, dtype=torch.float64))


def test_half_precision_is_upcast_and_no_gradient():
    full, mask = make_group(6, dtype=torch.bfloat16)
    full.requires_grad_()
    w = tw_token_weights(full, mask)
    assert w.dtype == torch.float32 and not w.requires_grad
    want = ref.tw_weights(full.detach().double(), mask)
    torch.testing.assert_close(w.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, words", [
    (dict(chunk_size=0), "chunk_size >= 1"),
    (dict(vocab_chunk=0), "vocab_chunk >= 1"),
    (dict(alpha=-1.0), "alpha >= 0"),
])
def test_bad_arguments(kwargs, words):
    full, mask = make_group(0)
    with pytest.raises(ValueError, match=words):
        tw_token_weights(full, mask, **kwargs)


def test_bad_shapes():
    full, mask = make_group(0)
    with pytest.raises(ValueError, match="expected \\[N, T, V\\]"):
        tw_token_weights(full[:, :3], mask)
    with pytest.raises(ValueError, match="mask.bool()"):
        tw_token_weights(full, mask.float())
    with pytest.raises(ValueError, match="returned"):
        tw_token_weights(lambda t0, t1: full[:, :1], mask)
