"""Reward shaping that depends only on the sample, not on the task: DAPO's soft overlong penalty."""
from __future__ import annotations

from typing import Sequence, Union

import torch


def soft_overlong_penalty(lengths: Union[torch.Tensor, Sequence[int]], max_len: int,
                          cache_len: int) -> torch.Tensor:
    """DAPO's length penalty R_len(|y|) ``[B]`` in [−1, 0] (arXiv 2503.14476 eq. 13).

    0 if |y| ≤ L_max − L_cache; ((L_max − L_cache) − |y|)/L_cache if |y| ≤ L_max; −1 beyond.
    L_max 20480, L_cache 4096: length 18432 -> −0.5. Add it to the task reward before the
    advantages are computed.

    Args:
        lengths: ``[B]`` completion lengths |y| (int or float tensor, or a sequence of ints).
        max_len: L_max, the hard generation limit.
        cache_len: L_cache, the width of the linear ramp (0 < cache_len ≤ max_len).

    Returns:
        ``[B]`` float32 penalties in [−1, 0].

    Raises:
        ValueError: cache_len not in (0, max_len].
    """
    if not (0 < cache_len <= max_len):
        raise ValueError(f"got max_len={max_len}, cache_len={cache_len}; expected "
                         f"0 < cache_len <= max_len (DAPO: 20480 and 4096)")
    n = torch.as_tensor(lengths).to(torch.float32)
    soft_start = float(max_len - cache_len)
    ramp = (soft_start - n) / float(cache_len)
    out = torch.where(n <= soft_start, torch.zeros_like(n), ramp)
    return torch.where(n <= max_len, out, torch.full_like(n, -1.0))
