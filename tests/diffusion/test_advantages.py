"""Diffusion advantages by hand-worked values and against loop oracles."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from mmrl.diffusion import (flow_sigmas, g2rpo_advantages, g2rpo_granular_advantages,
                            prompt_advantages, prompt_ids, sample_singular, sample_tree,
                            tree_advantages, tree_node_rewards)

_SPEC = importlib.util.spec_from_file_location("mmrl_tests_diffusion_reference",
                                               Path(__file__).with_name("reference.py"))
ref = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ref)

SIG = flow_sigmas(6, 3.0)


def _vf(x, sigma, cond):
    return 0.5 * x * sigma.reshape(-1, *[1] * (x.dim() - 1))


def test_prompt_advantages_hand_worked():
    # means: a 1.5, b 4; batch std (unbiased) of [1, 2, 3, 5] = sqrt(8.75 / 3).
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0])
    adv = prompt_advantages(rewards, ["a", "a", "b", "b"])
    std = math.sqrt(8.75 / 3) + 1e-4
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5, -1.0, 1.0]) / std)
    assert torch.equal(prompt_ids(["x", "y", "x", "z"]), torch.tensor([0, 1, 0, 2]))
    clipped = prompt_advantages(torch.tensor([0.0, 0.0, 0.0, 100.0]), ["a"] * 4, adv_clip=1.0)
    assert float(clipped.max()) == 1.0
    # A prompt whose samples all scored the same gets exactly 0.
    assert torch.equal(prompt_advantages(rewards.clone().fill_(2.0), ["a"] * 4), torch.zeros(4))
    with pytest.raises(ValueError, match="one prompt per sample"):
        prompt_advantages(rewards, ["a"])


def test_g2rpo_advantages_hand_worked_and_oracle():
    traj = sample_singular(_vf, torch.randn(1, 2, 2, 2), SIG, group_size=2, steps=[1],
                           granularities=[1, 2])
    # members [r_g1, r_g2]: [[1, 3], [0, 1]] -> each column ±1/sqrt(2) -> sum ±sqrt(2)
    rewards = torch.tensor([1.0, 3.0, 0.0, 1.0])
    adv = g2rpo_advantages(rewards, traj)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0]) * 2 / (math.sqrt(0.5) * 2 + 2e-8))
    clipped = g2rpo_advantages(rewards, traj, adv_clip=1.2)  # ±sqrt(2) -> ±1.2, after the sum
    torch.testing.assert_close(clipped, torch.tensor([1.2, -1.2]))
    traj = sample_singular(_vf, torch.randn(2, 2, 2, 2), SIG, group_size=3, steps=[0, 2],
                           granularities=[1, 2])
    r = torch.randn(traj.final.shape[0], generator=torch.Generator().manual_seed(0)).double()
    cols = r.reshape(-1, 2)
    groups = traj.group_ids.tolist()
    expected = [a + b for a, b in zip(ref.group_normalize(cols[:, 0].tolist(), groups, 1e-8),
                                      ref.group_normalize(cols[:, 1].tolist(), groups, 1e-8))]
    torch.testing.assert_close(g2rpo_advantages(r, traj), torch.tensor(expected, dtype=r.dtype))
    with pytest.raises(ValueError, match="granularities"):
        g2rpo_advantages(r[:-1], traj)


def test_g2rpo_granular_advantages_per_entry_non_finite_and_clip():
    """The (member, g) advantages the diffusion job trains on: a NaN / inf reward is left out of
    its (group, g) statistics and gets 0; the clip acts on every entry; the sum over g is
    g2rpo_advantages."""
    traj = sample_singular(_vf, torch.randn(1, 2, 2, 2), SIG, group_size=3, steps=[1],
                           granularities=[1, 2])
    r = torch.tensor([1.0, 0.0, 2.0, float("inf"), 4.0, float("nan")])  # [[1,0],[2,inf],[4,nan]]
    adv = g2rpo_granular_advantages(r, traj)
    g1 = ref.group_normalize([1.0, 2.0, 4.0], [0, 0, 0], 1e-8)
    # column g=2 keeps one finite reward: a group of one gets 0, and so do the two failures
    torch.testing.assert_close(adv, torch.tensor([[g1[0], 0.0], [g1[1], 0.0], [g1[2], 0.0]]))
    torch.testing.assert_close(adv.sum(1), g2rpo_advantages(r, traj))
    rr = torch.tensor([1.0, 3.0, 0.0, 1.0, 5.0, 8.0])
    clipped = g2rpo_granular_advantages(rr, traj, adv_clip=0.5)
    torch.testing.assert_close(clipped, g2rpo_granular_advantages(rr, traj).clamp(-0.5, 0.5))
    assert float(clipped.abs().max()) == 0.5
    with pytest.raises(ValueError, match="3 members x 2 granularities"):
        g2rpo_granular_advantages(rr[:-1], traj)


def test_tree_advantages_hand_worked():
    traj = sample_tree(_vf, torch.randn(1, 2, 2, 2), SIG, split_steps=[1, 3], branching=2)
    leaf_r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    adv, node_r = tree_advantages(leaf_r, traj)
    # nodes: root | two depth-1 | four leaves
    torch.testing.assert_close(node_r, torch.tensor([3.0, 1.5, 4.5, 1.0, 2.0, 3.0, 6.0]))
    leaf_std = math.sqrt(14 / 3) + 1e-4  # leaves [1,2,3,6]: mean 3, unbiased var 14/3
    depth1 = 1.5 / (math.sqrt(4.5) + 1e-4)  # [1.5, 4.5]: ±1.5 around 3, std sqrt(4.5)
    expected = [0.0, -depth1, depth1] + [d / leaf_std for d in (-2.0, -1.0, 0.0, 3.0)]
    torch.testing.assert_close(adv, torch.tensor(expected))
    # Each transition trains with its owner's advantage; the root's edges carry 0.
    assert torch.equal(adv[traj.owner][traj.step == 1], adv[1:3])


def test_tree_advantages_match_loop_oracle_per_tree_and_depth():
    traj = sample_tree(_vf, torch.randn(3, 2, 2, 2), SIG, split_steps=[0, 2, 4],
                       branching=[2, 3, 2])
    leaf_r = torch.randn(traj.leaves.shape[0], generator=torch.Generator().manual_seed(1))
    node_r = ref.tree_node_rewards(leaf_r.tolist(), traj.parent.tolist(), traj.leaves.tolist())
    torch.testing.assert_close(tree_node_rewards(leaf_r, traj), torch.tensor(node_r))
    groups = [(c, d) for c, d in zip(traj.node_cond.tolist(), traj.depth.tolist())]
    expected = ref.group_normalize(node_r, groups, 1e-4)
    adv, _ = tree_advantages(leaf_r, traj)
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=adv.dtype))
    assert torch.equal(adv[traj.depth == 0], torch.zeros(3))  # a single node at a depth -> 0
    # Per depth and tree the advantages have zero mean.
    for c in range(3):
        for d in range(1, 4):
            sel = (traj.node_cond == c) & (traj.depth == d)
            assert abs(float(adv[sel].mean())) < 1e-6
    with pytest.raises(ValueError, match="one reward per leaf"):
        tree_node_rewards(leaf_r[:-1], traj)


def test_g2rpo_equals_the_core_normalize_then_sum():
    from mmrl.algo.advantages import group_advantages

    traj = sample_singular(_vf, torch.randn(2, 2, 2, 2), SIG, group_size=4, steps=[0, 3],
                           granularities=[1, 2])
    r = torch.rand(traj.final.shape[0], generator=torch.Generator().manual_seed(3))
    core = group_advantages(r.reshape(-1, 2), traj.group_ids, "normalize_then_sum", eps=1e-8)
    torch.testing.assert_close(g2rpo_advantages(r, traj), core)


def test_non_finite_rewards_are_left_out_and_get_zero():
    rewards = torch.tensor([1.0, float("nan"), 2.0, 3.0, 5.0])
    adv = prompt_advantages(rewards, ["a", "a", "a", "b", "b"])
    expected = prompt_advantages(rewards[[0, 2, 3, 4]], ["a", "a", "b", "b"])
    assert float(adv[1]) == 0.0
    torch.testing.assert_close(adv[[0, 2, 3, 4]], expected)
    # G²RPO: a NaN drops only its own (member, g) entry.
    traj = sample_singular(_vf, torch.randn(1, 2, 2, 2), SIG, group_size=3, steps=[1],
                           granularities=[1, 2])
    r = torch.tensor([1.0, 0.0, 2.0, float("inf"), 4.0, 1.0])  # [member, g] = [[1,0],[2,inf],[4,1]]
    g1 = ref.group_normalize([1.0, 2.0, 4.0], [0, 0, 0], 1e-8)
    g2 = ref.group_normalize([0.0, 1.0], [0, 0], 1e-8)
    torch.testing.assert_close(g2rpo_advantages(r, traj),
                               torch.tensor([g1[0] + g2[0], g1[1], g1[2] + g2[1]]))
    # Tree: ancestors average the finite leaves; a node with none gets NaN reward and A = 0.
    traj = sample_tree(_vf, torch.randn(1, 2, 2, 2), SIG, split_steps=[1, 3], branching=2)
    adv, node_r = tree_advantages(torch.tensor([1.0, 3.0, float("nan"), float("nan")]), traj)
    torch.testing.assert_close(node_r[:3], torch.tensor([2.0, 2.0, float("nan")]), equal_nan=True)
    assert bool(torch.isnan(node_r[5:]).all()) and bool(torch.isfinite(adv).all())
    assert torch.equal(adv[[0, 1, 2, 5, 6]], torch.zeros(5))  # lone finite node at depth 1 -> 0
