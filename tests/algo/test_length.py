"""Length and thinking-mode rewards (mmrl.algo.length) and DRPO's objective (mmrl.algo.drpo):
hand-worked values, values and gradients against the loop oracles of tests/reference/length_ref.py,
and the edge cases (size-1 groups, equal lengths, one-mode groups, groups without both outcomes)."""
import math

import pytest
import torch

from mmrl.algo.drpo import drpo_objective
from mmrl.algo.length import (kimi_length_reward, mode_reward, serial_decay_reward,
                              switched_length_reward)
from mmrl.algo.losses import PolicyLoss
from mmrl.algo.presets import resolve_algo
from tests.reference import length_ref as ref

F64 = torch.float64


def _t(*xs, dtype=None):
    return [torch.tensor(x, dtype=dtype) for x in xs]


def test_kimi_length_reward_by_hand():
    correct, lengths, gids = _t([True, True, False, False, True, True, True],
                                [2, 4, 6, 2, 6, 3, 5], [0, 0, 0, 1, 1, 2, 9])
    got = kimi_length_reward(correct, lengths, gids)
    # group 0: λ = 0.5, 0, −0.5; group 1: wrong short row keeps min(0, 0.5) = 0;
    # group 2 is a singleton (max = min): 0; so is group 9
    assert got.tolist() == [0.5, 0.0, -0.5, 0.0, -0.5, 0.0, 0.0]


def test_grpo_lambda_switch_by_hand():
    correct, lengths, gids = _t([True, True, False, False, False, True, False],
                                [2, 4, 6, 2, 6, 3, 5], [0, 0, 0, 1, 1, 2, 2])
    got = switched_length_reward(correct, lengths, gids, min_accuracy=0.5)
    # group 0 (2/3) and group 2 (1/2) are on; group 1 (0/2) keeps the plain 0/1 reward
    assert got.tolist() == [0.5, 0.0, -0.5, 0.0, 0.0, 0.5, -0.5]
    with pytest.raises(ValueError, match="min_accuracy"):
        switched_length_reward(correct, lengths, gids, min_accuracy=1.5)


def test_serial_decay_by_hand():
    correct, pos, gids = _t([True, True, False, True, True, True], [5, 3, 4, 1, 2, 2],
                            [0, 0, 0, 0, 1, 1])
    got = serial_decay_reward(correct, pos, gids, decay=0.5)
    # group 0 by exit position: row 3 (1) -> 1, row 1 (3) -> 1/2, row 2 wrong -> 0, row 0 -> 1/4;
    # group 1 ties at position 2: row order breaks them
    assert got.tolist() == [0.25, 0.5, 0.0, 1.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="decay"):
        serial_decay_reward(correct, pos, gids, decay=0.0)


def test_mode_reward_by_hand():
    correct, thinks, gids = _t([True, True, False, True, True, False, True, True],
                               [True, True, False, False, True, False, True, True],
                               [0, 0, 0, 0, 1, 1, 2, 2])
    got = mode_reward(correct, thinks, gids)
    # group 0: think 2/2 > no-think 1/2 -> thinking rows; group 1: 1/1 > 0/1 -> think;
    # group 2 has only thinking rows: no mode signal
    assert got.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    tie = mode_reward(*_t([True, False, True, False], [True, True, False, False], [0, 0, 0, 0]))
    assert tie.tolist() == [0.0, 0.0, 1.0, 1.0]  # equal accuracy: the cheaper no-think mode


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rewards_match_the_loop_oracles(seed):
    g = torch.Generator().manual_seed(seed)
    B = 40
    correct = torch.rand(B, generator=g) < 0.5
    lengths = torch.randint(1, 9, (B,), generator=g)
    thinks = torch.rand(B, generator=g) < 0.5
    gids = torch.randint(0, 7, (B,), generator=g) * 3 + 5  # arbitrary ids, some singletons
    c, L, t, G = correct.tolist(), lengths.tolist(), thinks.tolist(), gids.tolist()
    torch.testing.assert_close(kimi_length_reward(correct, lengths, gids),
                               torch.tensor(ref.kimi(c, L, G)))
    torch.testing.assert_close(switched_length_reward(correct, lengths, gids, min_accuracy=0.4),
                               torch.tensor(ref.switched(c, L, G, 0.4)))
    torch.testing.assert_close(serial_decay_reward(correct, lengths, gids, decay=0.7),
                               torch.tensor(ref.serial_decay(c, L, G, 0.7)))
    torch.testing.assert_close(mode_reward(correct, thinks, gids),
                               torch.tensor(ref.mode(c, t, G)))
    perm = torch.randperm(B, generator=g)  # permutation invariance
    torch.testing.assert_close(kimi_length_reward(correct[perm], lengths[perm], gids[perm]),
                               kimi_length_reward(correct, lengths, gids)[perm])


def test_rewards_refuse_bad_inputs():
    with pytest.raises(TypeError, match="bool"):
        kimi_length_reward(torch.ones(2), torch.ones(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="three"):
        kimi_length_reward(torch.ones(2, dtype=torch.bool), torch.ones(3),
                           torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------- DRPO
def _drpo_case():
    """One group of three: correct rows of 1 and 2 tokens (s = −1, −0.5), a wrong row s = −2."""
    logp = torch.tensor([[-1.0, 0.0], [-0.5, -0.5], [-2.0, -2.0]], dtype=F64,
                        requires_grad=True)
    mask = torch.tensor([[True, False], [True, True], [True, True]])
    return logp, mask, torch.tensor([1.0, 1.0, 0.0], dtype=F64), torch.zeros(3, dtype=torch.long)


def test_drpo_value_and_gradient_by_hand():
    logp, mask, r, gids = _drpo_case()
    loss_fn = PolicyLoss("drpo", max_len=2, drpo_lambda=1.0, drpo_tau=1.0)
    loss, _ = loss_fn(logp, logp.detach(), r, mask, group_ids=gids)
    e = math.exp(0.5)  # w = exp((1 − ℓ)/λ): ℓ = 1/2 and 1
    # J = (e·(−1) + 1·(−0.5))/(e + 1) − τ·1; loss = −J (one group, Q = 1); KL = 0 (old = logp)
    assert loss.item() == pytest.approx((e + 0.5) / (e + 1) + 1.0)
    loss.backward()
    want = [[-e / (e + 1), 0.0], [-0.5 / (e + 1)] * 2, [0.5, 0.5]]  # neg: d(τ·LSE)/ds = 1
    torch.testing.assert_close(logp.grad, torch.tensor(want, dtype=F64))


def test_drpo_kl_constraint_by_hand():
    logp, mask, r, gids = _drpo_case()
    base, _ = PolicyLoss("drpo", max_len=2)(logp, logp.detach(), r, mask, group_ids=gids)
    loss, _ = PolicyLoss("drpo", max_len=2)(logp, logp.detach() - 0.1, r, mask, group_ids=gids)
    k3 = -0.1 + math.exp(0.1) - 1  # every valid token: x = 0.1
    assert (loss - base).item() == pytest.approx(1000 * (k3 - 1e-4) * k3)
    small, _ = PolicyLoss("drpo", max_len=2, drpo_delta=0.01)(logp, logp.detach() - 0.1, r,
                                                              mask, group_ids=gids)
    assert small.item() == pytest.approx(base.item())  # KL below δ: no constraint


@pytest.mark.parametrize("seed", [0, 1])
def test_drpo_matches_the_loop_oracle(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 9, 6
    logp = (-2 * torch.rand(B, T, generator=g, dtype=F64)).requires_grad_()
    old = logp.detach() + 0.05 * torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B,), generator=g)[:, None]
    r = torch.tensor([1, 0, 1, 0, 0, 0, 1, 1, 0.5], dtype=F64)  # a 0.5 row counts as neither
    gids = torch.tensor([4, 4, 4, 7, 7, 7, 2, 2, 2])  # group 7 has no correct row: skipped
    spec = resolve_algo("drpo", max_len=8, drpo_tau=2.0, drpo_lambda=0.5)
    lr = torch.where(mask, logp - old, 0.0)
    got, ratio, low, high = drpo_objective(lr, r[:, None], spec=spec, group_ids=gids,
                                           logp=logp, mask=mask)
    want = ref.obj_drpo([list(x) for x in lr], [[a] for a in r], [list(x) for x in logp],
                        mask.tolist(), spec, group_ids=gids.tolist())
    want = torch.stack([torch.stack([torch.as_tensor(v, dtype=F64) for v in row])
                        for row in want])
    torch.testing.assert_close(got, want)
    w = torch.rand(B, T, generator=g, dtype=F64)
    g1, = torch.autograd.grad((got * w).sum(), logp, retain_graph=True)
    g2, = torch.autograd.grad((want * w).sum(), logp)
    torch.testing.assert_close(g1, g2)
    assert not (low | high).any()
    assert torch.all(got[3:6] == torch.where(mask[3:6], got[3:6], 0.0))  # padding stays 0


def test_drpo_length_weight_is_off_for_large_lambda_and_never_touches_wrong_rows():
    logp, mask, r, gids = _drpo_case()
    flat, _ = PolicyLoss("drpo", max_len=2, drpo_lambda=1e12, drpo_tau=1.0)(
        logp, logp.detach(), r, mask, group_ids=gids)
    assert flat.item() == pytest.approx(0.75 + 1.0)  # equal weights: −J = (1 + 0.5)/2 + τ
    short = mask.clone()
    short[2, 1] = False  # a wrong row's length (same s): the loss does not change
    logp2 = logp.detach().clone()
    logp2[2, 1] = 0.0
    a, _ = PolicyLoss("drpo", max_len=2)(logp, logp.detach(), r, mask, group_ids=gids)
    b, _ = PolicyLoss("drpo", max_len=2)(logp2, logp2, r, short, group_ids=gids)
    assert a.item() == pytest.approx(b.item())
