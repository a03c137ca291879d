"""Slow, obvious oracles for mmrl.algo.length (Kimi / GRPO-λ / S-GRPO / mode rewards) and DRPO
(mmrl.algo.drpo): Python loops over groups, restating ../shared/ALGORITHMS-seed.md section B;
nothing here imports mmrl. Lists in, lists out; DRPO takes nested ``[B][T]`` lists of 0-d
tensors (they carry autograd) like tests/reference/objectives_ref.py.
"""
from __future__ import annotations

import math

import torch


def _groups(gids):
    out = {}
    for i, g in enumerate(gids):
        out.setdefault(g, []).append(i)
    return out


def kimi(correct, lengths, gids):
    out = [0.0] * len(correct)
    for rows in _groups(gids).values():
        lo, hi = min(lengths[i] for i in rows), max(lengths[i] for i in rows)
        for i in rows:
            lam = 0.0 if hi == lo else 0.5 - (lengths[i] - lo) / (hi - lo)
            out[i] = lam if correct[i] else min(0.0, lam)
    return out


def switched(correct, lengths, gids, min_accuracy):
    base = kimi(correct, lengths, gids)
    out = [0.0] * len(correct)
    for rows in _groups(gids).values():
        if sum(correct[i] for i in rows) / len(rows) >= min_accuracy:
            for i in rows:
                out[i] = base[i]
    return out


def serial_decay(correct, exit_pos, gids, decay):
    out = [0.0] * len(correct)
    for rows in _groups(gids).values():
        k = 0
        for i in sorted(rows, key=lambda j: (exit_pos[j], j)):
            if correct[i]:
                out[i] = decay ** k
                k += 1
    return out


def mode(correct, thinks, gids):
    out = [0.0] * len(correct)
    for rows in _groups(gids).values():
        t = [i for i in rows if thinks[i]]
        n = [i for i in rows if not thinks[i]]
        if not t or not n:
            continue
        think_better = sum(correct[i] for i in t) / len(t) > sum(correct[i] for i in n) / len(n)
        for i in rows:
            out[i] = 1.0 if thinks[i] == think_better else 0.0
    return out


def adv_reward(r, gids, **_):
    """A_i = r_i."""
    return list(r)


def obj_drpo(lr, adv, logp, mask, spec, generator=None, group_ids=None):
    """DRPO's loss spread over tokens as mmrl.algo.drpo does: per group J_g with the negative
    term τ·S/sg(S) (value τ), rows −N·w·s/W or +N·τ·e/sg(S) over their tokens; plus the KL
    constraint c·k3·B/T_valid, c = sg(β·max(mean k3 − δ, 0))."""
    B, T = len(lr), len(lr[0])
    l_max = spec.max_len or T
    n = [sum(1 for t in range(T) if mask[i][t]) for i in range(B)]
    s = [sum(logp[i][t] for t in range(T) if mask[i][t]) / max(n[i], 1) for i in range(B)]
    r = [float(a[0]) for a in adv]
    row = [torch.zeros((), dtype=torch.float64) for _ in range(B)]
    for rows in _groups(group_ids).values():
        pos = [i for i in rows if r[i] == 1 and n[i] > 0]
        neg = [i for i in rows if r[i] == 0 and n[i] > 0]
        if not pos or not neg:
            continue
        w = {i: math.exp((1 - n[i] / l_max) / spec.drpo_lambda) for i in pos}
        W = sum(w.values())
        top = max(float(s[j].detach()) / spec.drpo_tau for j in neg)
        e = {j: torch.exp(s[j] / spec.drpo_tau - top) for j in neg}
        S = sum(e.values())
        for i in pos:
            row[i] = -len(rows) * w[i] * s[i] / W
        for j in neg:
            row[j] = len(rows) * spec.drpo_tau * e[j] / S.detach()
    k3 = [[(-lr[i][t] + torch.exp(lr[i][t]) - 1) if mask[i][t] else 0.0 for t in range(T)]
          for i in range(B)]
    valid = sum(n)
    kl = sum(k3[i][t] for i in range(B) for t in range(T)) / max(valid, 1)
    coef = max(spec.drpo_beta * (float(torch.as_tensor(kl).detach()) - spec.drpo_delta), 0.0)
    zero = torch.zeros((), dtype=torch.float64)
    return [[(row[i] / max(n[i], 1) + coef * k3[i][t] * B / max(valid, 1)) if mask[i][t]
             else zero for t in range(T)] for i in range(B)]
