"""GiGPO step groups (arXiv 2505.10978) and SPO-chain segment advantages (arXiv 2505.23564):
hand-worked values, oracle parity (tests/reference/rules_ref.py), properties."""
import pytest
import torch

from mmrl.algo.stepwise import (discounted_returns, gigpo_advantages, spo_chain_advantages,
                                spo_cut_points)
from tests.reference import rules_ref

F64 = torch.float64
L = torch.long


def test_discounted_returns_hand_worked():
    r = torch.tensor([0.0, 0.0, 1.0, 2.0], dtype=F64)
    ret = discounted_returns(r, torch.tensor([5, 5, 5, 9]), torch.tensor([0, 1, 2, 0]), 0.5)
    assert ret.tolist() == [0.25, 0.5, 1.0, 2.0]


def test_gigpo_hand_worked_two_trajectories_meeting_in_one_state():
    # group 0: τ_a = s0 -> s1 -> goal (r 1 at step 1), τ_b = s0 -> s0 -> s1 (r 0); mean_norm
    r = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0], dtype=F64)
    traj, steps = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 1, 2])
    anchors = torch.tensor([10, 11, 10, 10, 11])
    adv = gigpo_advantages(r, traj, steps, torch.zeros(5, dtype=L), anchors, gamma=0.5,
                           mode="mean_norm")
    # A^E: R = [1, 1, 0, 0, 0] over 5 rows, mean 0.4. A^S: R_t = [0.5, 1, 0, 0, 0];
    # anchor 10 rows {0.5, 0, 0}: mean 1/6; anchor 11 rows {1, 0}: mean 0.5
    want = [0.6 + 0.5 - 1 / 6, 0.6 + 0.5, -0.4 - 1 / 6, -0.4 - 1 / 6, -0.4 - 0.5]
    torch.testing.assert_close(adv, torch.tensor(want, dtype=F64))


@pytest.mark.parametrize("mode", ["mean_std_norm", "mean_norm"])
def test_gigpo_matches_the_oracle_values_and_gradients(mode):
    g = torch.Generator().manual_seed(0)
    s = 14
    r = torch.rand(s, generator=g, dtype=F64).requires_grad_()
    traj = torch.randint(0, 5, (s,), generator=g)
    steps = torch.randint(0, 4, (s,), generator=g) * 10 + torch.arange(s)  # distinct per traj
    groups, anchors = traj % 2, torch.randint(0, 3, (s,), generator=g)
    adv = gigpo_advantages(r, traj, steps, groups, anchors, omega=0.7, mode=mode)
    want = rules_ref.gigpo(list(r.unbind()), traj.tolist(), steps.tolist(), groups.tolist(),
                           anchors.tolist(), omega=0.7, mode=mode)
    torch.testing.assert_close(adv, torch.stack([torch.as_tensor(w, dtype=F64) for w in want]))
    w = torch.linspace(-1, 1, s, dtype=F64)
    g1, = torch.autograd.grad((adv * w).sum(), r)
    g2, = torch.autograd.grad(sum(wi * a for wi, a in zip(w, want) if torch.is_tensor(a)), r)
    torch.testing.assert_close(g1, g2)
    perm = torch.randperm(s, generator=g)
    torch.testing.assert_close(gigpo_advantages(r[perm], traj[perm], steps[perm], groups[perm],
                                                anchors[perm], omega=0.7, mode=mode), adv[perm])


def test_gigpo_singletons_and_constant_groups_are_zero():
    r = torch.tensor([1.0, 1.0, 0.3], dtype=F64)  # two one-step trajectories of equal return
    adv = gigpo_advantages(r, torch.tensor([0, 1, 2]), torch.zeros(3, dtype=L),
                           torch.tensor([0, 0, 1]), torch.tensor([4, 4, 4]))
    assert adv.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="unknown GiGPO mode"):
        gigpo_advantages(r, r.long(), r.long(), r.long(), r.long(), mode="std")


def test_spo_cut_points_every_kth_uncertain_token():
    p = torch.tensor([[0.5, 0.95, 0.3, 0.2, 0.99, 0.1, 0.4]])
    m = torch.ones_like(p, dtype=torch.bool)
    # uncertain t = 0, 2, 3, 5, 6 -> c = -1, 1, 2, 4, 5; every 2nd: -1, 2, 5
    assert spo_cut_points(p, m, interval=2)[0].tolist() == [-1, 2, 5]


def test_spo_chain_hand_worked():
    p = torch.tensor([[0.5, 0.95, 0.3, 0.2, 0.99, 0.1, 0.4, 0.0]], dtype=F64)
    mask = torch.tensor([[True] * 7 + [False]])
    cuts, values = torch.tensor([[-1, 2, 5]]), torch.tensor([[0.4, 0.7, 0.2]], dtype=F64)
    adv = spo_chain_advantages(p, mask, cuts, values, torch.tensor([1.0], dtype=F64))
    # values: prompt 0.4, token 2: 0.7, token 5: 0.2, token 6 (last): 1.0
    # segments: tokens 0-2 -> +0.3, 3-5 -> -0.5, 6 -> +0.8; token 1, 4 (p > 0.9) -> 0
    torch.testing.assert_close(adv, torch.tensor([[0.3, 0, 0.3, -0.5, 0, -0.5, 0.8, 0]],
                                                 dtype=F64))


def test_spo_chain_matches_the_oracle_on_random_rows():
    g = torch.Generator().manual_seed(1)
    b, t = 6, 9
    p = torch.rand(b, t, generator=g, dtype=F64)
    lengths = torch.tensor([9, 5, 1, 7, 3, 9])
    mask = torch.arange(t)[None] < lengths[:, None]
    cut_lists = spo_cut_points(p, mask, interval=2)
    c = max(len(x) for x in cut_lists)
    cuts = torch.full((b, c), -2, dtype=L)
    values = torch.rand(b, c, generator=g, dtype=F64)
    for i, x in enumerate(cut_lists):
        cuts[i, :len(x)] = x
    rewards = torch.rand(b, generator=g, dtype=F64)
    adv = spo_chain_advantages(p, mask, cuts, values, rewards)
    for i in range(b):
        n = len(cut_lists[i])
        want = rules_ref.spo_chain(p[i].tolist(), int(lengths[i]), cut_lists[i].tolist(),
                                   values[i, :n].tolist(), float(rewards[i]))
        torch.testing.assert_close(adv[i], torch.tensor(want, dtype=F64))
