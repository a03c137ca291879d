"""XRPO's allocation by uncertainty reduction (mmrl.budget.xrpo) and its sim strategy."""
import itertools
import pytest
import torch

from mmrl.budget.sim import SimSettings, run_strategy
from mmrl.budget.xrpo import ci_half_width, t_critical, two_phase_rollout, xrpo_allocate


def test_t_critical_matches_the_table():
    # two-sided 95 % critical values of Student's t (any statistics table)
    got = t_critical(0.05, torch.tensor([1, 2, 3, 4, 5, 10, 30]))
    want = torch.tensor([12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.2281, 2.0423],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert float(t_critical(0.10, torch.tensor(1))) == pytest.approx(6.3138, abs=1e-4)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_critical(0.05, torch.tensor([0]))


def test_half_width_hand_worked():
    # s = 0.5, n = 4: t_{0.975, 3} · 0.5 / 2
    assert float(ci_half_width(0.5, 4)) == pytest.approx(3.18245 * 0.25, abs=1e-5)


def _brute(std, budget, n_first, n_max):
    """The least Σ_q h_q(N_q) over every allocation, by enumeration (the greedy's objective)."""
    unit = {n: float(ci_half_width(1.0, n)) for n in range(n_first, n_max + 1)}
    return min(sum(s * unit[n] for s, n in zip(std, counts))
               for counts in itertools.product(range(n_first, n_max + 1), repeat=len(std))
               if sum(counts) == budget)


@pytest.mark.parametrize("budget", [9, 12, 14])
def test_greedy_allocation_minimizes_the_summed_half_width(budget):
    std = [0.0, 0.5, 0.3]
    counts = xrpo_allocate(torch.tensor(std), budget, 2, 6)
    assert int(counts.sum()) == budget and counts.min() >= 2 and counts.max() <= 6
    total = float((torch.tensor(std, dtype=torch.float64) * ci_half_width(1.0, counts)).sum())
    assert total == pytest.approx(_brute(std, budget, 2, 6), abs=1e-12)
    assert counts[0] == 2  # unanimous first phase: no reduction to buy


def test_ties_spread_evenly_and_bad_budget_is_refused():
    assert xrpo_allocate(torch.zeros(3), 12, 2, 8).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="budget"):
        xrpo_allocate(torch.zeros(3), 30, 2, 8)


def test_two_phase_rollout_keeps_each_prompt_in_one_group():
    def rollout(prompts, counts):  # prompt 7 splits, prompt 3 always fails
        sp = torch.repeat_interleave(prompts, counts)
        gid = torch.repeat_interleave(torch.arange(len(prompts)), counts)
        r = torch.where(sp == 7, (torch.arange(len(sp)) % 2).double(), torch.zeros(len(sp)))
        return sp, r.double(), gid
    sp, r, gid, counts = two_phase_rollout(rollout, torch.tensor([3, 7]), 12, 2, 10)
    assert counts.tolist() == [2, 10] and len(r) == 12
    assert torch.equal(sp, torch.tensor([3, 7])[gid])


def test_sim_strategy_spends_the_same_budget():
    s = SimSettings(num_prompts=32, batch_prompts=8, group_size=4, total_rollouts=8 * 4 * 4,
                    xrpo_first=2, n_max=8)
    x, u = run_strategy("xrpo", s, seed=2), run_strategy("uniform", s, seed=2)
    assert x["rollouts"] == u["rollouts"] == s.total_rollouts and x["steps"] == 4
    assert x["success_start"] == u["success_start"]
