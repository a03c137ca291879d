"""DAPO soft overlong penalty: the worked example, the oracle, edge lengths, errors."""
import pytest
import torch

from mmrl.algo.shaping import soft_overlong_penalty
from tests.reference import core_math as ref


def test_dapo_worked_example():
    assert soft_overlong_penalty(torch.tensor([18432]), 20480, 4096).item() == -0.5


def test_matches_oracle_on_every_regime():
    lengths = [0, 1, 16383, 16384, 16385, 18432, 20479, 20480, 20481, 99999]
    got = soft_overlong_penalty(lengths, 20480, 4096)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx([ref.soft_overlong(n, 20480, 4096) for n in lengths])
    assert got.tolist()[:5] == pytest.approx([0, 0, 0, 0, -1 / 4096])
    assert got.tolist()[-3:] == [-1.0, -1.0, -1.0]


def test_float_lengths_and_full_cache():
    got = soft_overlong_penalty(torch.tensor([5.0, 10.0, 11.0]), max_len=10, cache_len=10)
    assert got.tolist() == pytest.approx([-0.5, -1.0, -1.0])


@pytest.mark.parametrize("max_len, cache_len", [(10, 0), (10, 11), (10, -1)])
def test_bad_cache(max_len, cache_len):
    with pytest.raises(ValueError, match="0 < cache_len <= max_len"):
        soft_overlong_penalty([1], max_len, cache_len)
