"""Slow, obvious oracle for the guidance augmenters' trigger (mmrl.train.guidance): a Python
loop over groups. Nothing here imports mmrl."""
from __future__ import annotations

import math


def failing_groups(values, gids, threshold):
    """Sorted group ids with at least 2 finite values, every one <= threshold."""
    out = []
    for g in sorted(set(gids)):
        v = [x for x, h in zip(values, gids) if h == g and math.isfinite(x)]
        if len(v) >= 2 and all(x <= threshold for x in v):
            out.append(g)
    return out
