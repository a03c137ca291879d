"""Knapsack rollout allocation and DAPO dynamic sampling (mmrl.budget.allocate)."""
import itertools

import numpy as np
import pytest
import torch

from mmrl.algo.advantages import group_advantages
from mmrl.budget.allocate import (VALUES, DynamicSampling, allocation_value, expand_groups,
                         informative_groups, knapsack_allocate, nonzero_gradient_prob,
                         rollout_value)


def test_rollout_value_hand_worked():
    # p = 0.5, n = 2: (1 - 0.25 - 0.25) * 0.5 * 0.25 = 0.0625
    assert float(rollout_value(0.5, 2)) == pytest.approx(0.0625, abs=1e-15)
    # p = 0.2, n = 3: (1 - 0.008 - 0.512) * 0.2 * 0.64 = 0.48 * 0.128 = 0.06144
    assert float(rollout_value(0.2, 3)) == pytest.approx(0.06144, abs=1e-15)
    assert float(nonzero_gradient_prob(0.2, 3)) == pytest.approx(0.48, abs=1e-15)
    # solved / hopeless prompts carry no value at any n
    for n in (1, 2, 8, 64):
        assert float(rollout_value(0.0, n)) == 0 and float(rollout_value(1.0, n)) == 0
    # one rollout never has a GRPO signal
    assert float(nonzero_gradient_prob(0.3, 1)) == pytest.approx(0.0, abs=1e-15)


def _brute_force(p, budget, n_min, n_max, value):
    best = -float("inf")
    for combo in itertools.product(range(n_min, n_max + 1), repeat=len(p)):
        if sum(combo) == budget:
            best = max(best, float(allocation_value(p, torch.tensor(combo), value)))
    return best


@pytest.mark.parametrize("value", ["knapsack_rl", "nonzero_prob"])
def test_knapsack_is_optimal_against_brute_force(value):
    g = torch.Generator().manual_seed(0)
    cases = 0
    for num in (1, 2, 3, 4):
        for _ in range(6):
            p = torch.rand(num, generator=g, dtype=torch.float64)
            if num >= 3:  # include saturated prompts and exact duplicates
                p[0], p[1] = 1.0, p[2]
            n_min, n_max = 2, 2 + int(torch.randint(2, 7, (1,), generator=g))
            for budget in range(num * n_min, num * n_max + 1, 3):
                counts = knapsack_allocate(p, budget, n_min, n_max, value=value)
                assert counts.dtype == torch.long and int(counts.sum()) == budget
                assert int(counts.min()) >= n_min and int(counts.max()) <= n_max
                got = float(allocation_value(p, counts, value))
                assert got == pytest.approx(_brute_force(p, budget, n_min, n_max, value),
                                            abs=1e-12)
                cases += 1
    assert cases > 100


def test_knapsack_moves_budget_from_saturated_to_uncertain_prompts():
    p = torch.tensor([0.999, 0.5, 0.001])
    assert knapsack_allocate(p, 16, n_min=2, n_max=32).tolist() == [2, 12, 2]
    # once p = 0.5 has ~17 rollouts its next one (0.125 * 0.5^n) is worth less than a hopeless
    # prompt's: the hopeless prompt's few extra rollouts are the optimum, not a bug
    assert knapsack_allocate(p, 24, n_min=2, n_max=32).tolist() == [2, 17, 5]
    # the paper's value prefers a hard prompt (p = 0.2) over an easy one (p = 0.8)
    counts = knapsack_allocate(torch.tensor([0.8, 0.2]), 16, n_min=2, n_max=16)
    assert counts[1] > counts[0]


def test_knapsack_spreads_ties_evenly():
    assert knapsack_allocate(torch.full((4,), 0.5), 10, n_min=2, n_max=8).tolist() == [3, 3, 2, 2]
    # all solved: no prompt has value, the budget is spread like a uniform allocation
    assert knapsack_allocate(torch.ones(4), 32, n_min=2, n_max=16).tolist() == [8, 8, 8, 8]


def test_knapsack_errors_say_how_to_fix():
    with pytest.raises(ValueError, match=r"must lie in \[6, 24\]"):
        knapsack_allocate(torch.full((3,), 0.5), 5, n_min=2, n_max=8)
    with pytest.raises(ValueError, match=r"must lie in \[6, 24\]"):
        knapsack_allocate(torch.full((3,), 0.5), 25, n_min=2, n_max=8)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        knapsack_allocate(torch.tensor([0.5, 1.5]), 8)
    with pytest.raises(ValueError, match="n_min"):
        knapsack_allocate(torch.tensor([0.5]), 8, n_min=0)
    with pytest.raises(ValueError, match="budget must be an int"):
        knapsack_allocate(torch.tensor([0.5]), 8.0)
    # numpy / torch integers are fine
    assert knapsack_allocate(torch.tensor([0.5, 0.5]), np.int64(6)).tolist() == [3, 3]
    with pytest.raises(ValueError, match="did you mean 'knapsack_rl'"):
        knapsack_allocate(torch.tensor([0.5]), 8, value="knapsack_r")


def test_knapsack_rejects_a_value_that_is_not_concave():
    VALUES.register("_test_convex", lambda p, n: torch.as_tensor(n, dtype=torch.float64) ** 2
                    * torch.as_tensor(p, dtype=torch.float64))
    try:
        with pytest.raises(ValueError, match="not concave"):
            knapsack_allocate(torch.tensor([0.5, 0.5]), 8, value="_test_convex")
    finally:
        del VALUES._entries["_test_convex"]


def test_variable_group_sizes_feed_the_core_advantages():
    prompts = torch.tensor([5, 7, 9])
    counts = knapsack_allocate(torch.tensor([0.95, 0.4, 0.3]), 16, n_min=2, n_max=12)
    sample_prompts, group_ids = expand_groups(prompts, counts)
    assert sample_prompts.tolist() == sum(([p] * c for p, c in zip([5, 7, 9], counts.tolist())),
                                          [])
    assert group_ids.tolist() == sum(([g] * c for g, c in enumerate(counts.tolist())), [])
    rewards = (torch.arange(16) % 3 == 0).float()
    adv = group_advantages(rewards, group_ids, "grpo")
    sums = torch.zeros(3).index_add_(0, group_ids, adv)
    assert torch.allclose(sums, torch.zeros(3), atol=1e-5)
    with pytest.raises(ValueError, match="equal length"):
        expand_groups(prompts, torch.tensor([1, 2]))


def test_informative_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5001, 3.0])
    group_ids = torch.tensor([4, 4, 9, 9, 2, 2, 7])
    ids, informative = informative_groups(rewards, group_ids)
    assert ids.tolist() == [2, 4, 7, 9]
    assert informative.tolist() == [True, False, False, True]  # size-1 group 7: no signal
    _, informative = informative_groups(rewards, group_ids, atol=1e-3)
    assert informative.tolist() == [False, False, False, True]


def _batch(pattern):
    """Groups of two rollouts: 'i' informative (1, 0), 'e' equal (1, 1)."""
    rewards = torch.tensor([x for c in pattern for x in ((1.0, 0.0) if c == "i" else (1.0, 1.0))])
    return rewards, torch.arange(len(pattern)).repeat_interleave(2)


def test_dynamic_sampling_never_loops_forever_and_reports_tries():
    calls = []

    def produce(t):
        calls.append(t)
        return _batch("eeee")

    kept, report = DynamicSampling(min_groups=3, max_tries=5).collect(produce)
    assert calls == [0, 1, 2, 3, 4]
    assert report.tries == 5 and report.filled is False
    assert (report.groups_seen, report.groups_kept, report.groups_dropped) == (20, 0, 20)
    assert len(kept) == 5 and all(k.numel() == 0 for k in kept)


def test_dynamic_sampling_stops_when_full_and_trims():
    batches = {0: "ieie", 1: "eiii", 2: "iiii"}
    kept, report = DynamicSampling(min_groups=4, max_tries=3).collect(lambda t: _batch(batches[t]))
    assert [k.tolist() for k in kept] == [[0, 2], [1, 2]]
    assert report.tries == 2 and report.filled
    assert (report.groups_seen, report.groups_kept, report.groups_dropped,
            report.groups_trimmed) == (8, 4, 3, 1)
    kept, report = DynamicSampling(min_groups=4, max_tries=3, trim=False).collect(
        lambda t: _batch(batches[t]))
    assert [k.tolist() for k in kept] == [[0, 2], [1, 2, 3]] and report.groups_kept == 5


def test_dynamic_sampling_argument_errors():
    with pytest.raises(ValueError, match="max_tries"):
        DynamicSampling(4, 0)
    with pytest.raises(ValueError, match="min_groups"):
        DynamicSampling(0, 2)
    with pytest.raises(TypeError, match="must return"):
        DynamicSampling(1, 2).collect(lambda t: torch.zeros(3))
