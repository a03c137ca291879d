"""GiGPO (arXiv 2505.10978) and SPO-chain (arXiv 2505.23564) against episode-level GRPO on a
tiny task with steps, 3 seeds.

    .venv/bin/python benchmarks/bench_steps.py [--iters 100 --seeds 3 --rules grpo,gigpo,spo,spo@5] [--plot docs/PATH.png]

The task ("key chain"; mmrl has no multi-step environment, so this one is built here): P tasks,
each a hidden key sequence of L = 4 actions out of A = 4. An agent starts in state 0; the right
action for its state moves it one state on, a wrong one leaves it where it is (so the same state
recurs across trajectories and within one: GiGPO's anchor states). Reaching state L within
H = 8 steps ends the episode with reward 1 (given at that step), otherwise 0. The policy is
tabular, logits θ[task, state, action] from 0 (a random agent solves a task 11 % of the time).

Each iteration draws 4 tasks and N = 8 trajectories per task (one episode group each), computes
per-step advantages with the rule under test and takes one exact REINFORCE step on the logits,
θ += lr·mean_rows A_row·∇ log π(a_row | s_row). Rules:

- ``grpo``: every step of a trajectory gets its episode's GRPO advantage (GiGPO's A^E alone);
- ``gigpo``: A^E + ω·A^S, step groups by (task, state), γ = 0.95, ω = 1, mean_std_norm;
- ``spo``: SPO-chain token advantages; the tokens are the actions, p_t = π(a_t | s_t), cut
  points at p_t < 0.9 (interval 1: trajectories are short), V(c) = mean reward of M = 4
  continuations of the policy from the state after action c (the environment's state is known;
  these extra episodes are counted in ``env_steps``).

Reported: mean success probability over all P tasks of the sampled policy (exact, by dynamic
programming over states and steps) after every iteration, and the environment steps spent.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrl.algo.advantages import group_advantages  # noqa: E402
from mmrl.algo.stepwise import gigpo_advantages, spo_chain_advantages, spo_cut_points  # noqa: E402

P, L, A, H, N, TASKS_PER_ITER, M = 8, 4, 4, 8, 8, 4, 4


def success_prob(theta: torch.Tensor) -> torch.Tensor:
    """[P] exact probability of reaching state L within H steps under the sampling policy."""
    p_right = _p_right(theta)  # [P, L]
    dist = torch.zeros(theta.shape[0], L + 1, dtype=torch.float64)
    dist[:, 0] = 1.0
    for _ in range(H):  # mass in state s < L moves on with probability p_right[s]
        move = dist[:, :L] * p_right
        dist = dist.clone()
        dist[:, :L] -= move
        dist[:, 1:] += move
    return dist[:, L]


_KEY = torch.zeros(P, L, dtype=torch.long)


def _p_right(theta: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(theta, -1)  # [P, L, A]
    return probs.gather(-1, _KEY[:, :, None])[..., 0]  # [P, L]


def rollout(theta, tasks, n, gen, start=None, steps_left=None):
    """Trajectories: per row (task, traj, step, state, action, prob, reward); n per task."""
    rows, finals = [], []
    traj = 0
    for task in tasks.tolist():
        for _ in range(n):
            s = 0 if start is None else start
            for t in range(H if steps_left is None else steps_left):
                probs = torch.softmax(theta[task, s], -1)
                a = int(torch.multinomial(probs, 1, generator=gen))
                nxt = s + 1 if a == int(_KEY[task, s]) else s
                r = 1.0 if nxt == L else 0.0
                rows.append((task, traj, t, s, a, float(probs[a]), r))
                s = nxt
                if s == L:
                    break
            finals.append(1.0 if s == L else 0.0)
            traj += 1
    return rows, finals


def step_advantages(rule: str, theta, rows, finals, gen):
    """[S] per-step advantages under ``rule``; and the extra env steps it spent."""
    t = lambda i, dt=torch.long: torch.tensor([r[i] for r in rows], dtype=dt)  # noqa: E731
    task, traj, step, state = t(0), t(1), t(2), t(3)
    rew = t(6, torch.float64)
    if rule in ("grpo", "gigpo"):
        adv = gigpo_advantages(rew, traj, step, task, state, gamma=0.95,
                               omega=1.0 if rule == "gigpo" else 0.0)
        return adv, 0
    # SPO-chain: one row per trajectory, tokens = actions
    n_traj = len(finals)
    probs = torch.zeros(n_traj, H, dtype=torch.float64)
    mask = torch.zeros(n_traj, H, dtype=torch.bool)
    states = torch.zeros(n_traj, H, dtype=torch.long)
    for (tk, tr, st, s, a, p, r) in rows:
        probs[tr, st], mask[tr, st], states[tr, st] = p, True, s
    cut_lists = spo_cut_points(probs, mask, 0.9, 1)
    c_max = max(1, max(len(c) for c in cut_lists))
    cuts = torch.full((n_traj, c_max), -2, dtype=torch.long)
    values = torch.zeros(n_traj, c_max, dtype=torch.float64)
    spent = 0
    task_of = {tr: tk for (tk, tr, *_rest) in rows}
    for i, cl in enumerate(cut_lists):
        for j, c in enumerate(cl.tolist()):
            # state after action c (c = -1: the start state); continue for the steps left
            s_after = 0 if c < 0 else _after(rows, i, c)
            left = H - (c + 1)
            if s_after == L or left <= 0:
                v = 1.0 if s_after == L else 0.0
            else:
                cont, fin = rollout(theta, torch.tensor([task_of[i]]), M, gen, s_after, left)
                spent += len(cont)
                v = sum(fin) / M
            cuts[i, j], values[i, j] = c, v
    adv = spo_chain_advantages(probs, mask, cuts, values, torch.tensor(finals, dtype=torch.float64))
    return torch.tensor([float(adv[tr, st]) for (_, tr, st, *_r) in rows]), spent


def _after(rows, traj, c):
    for (tk, tr, st, s, a, p, r) in rows:
        if tr == traj and st == c:
            return s + 1 if a == int(_KEY[tk, s]) else s
    raise AssertionError("cut point beyond the trajectory")


def train(rule: str, iters: int, seed: int, lr: float):
    rule, _, scale = rule.partition("@")  # "spo@5": SPO with lr·5 (its advantages are raw)
    lr = lr * float(scale or 1)
    global _KEY
    gen = torch.Generator().manual_seed(seed)
    _KEY = torch.randint(0, A, (P, L), generator=gen)
    theta = torch.zeros(P, L, A, dtype=torch.float64)  # state L is terminal: no logits
    curve, env_steps = [float(success_prob(theta).mean())], 0
    for _ in range(iters):
        tasks = torch.randperm(P, generator=gen)[:TASKS_PER_ITER]
        rows, finals = rollout(theta, tasks, N, gen)
        adv, extra = step_advantages(rule, theta, rows, finals, gen)
        env_steps += len(rows) + extra
        grad = torch.zeros_like(theta)
        for (tk, tr, st, s, a, p, r), a_i in zip(rows, adv.tolist()):
            g = -torch.softmax(theta[tk, s], -1)
            g[a] += 1.0
            grad[tk, s] += a_i * g
        theta += lr * grad / len(rows) * TASKS_PER_ITER
        curve.append(float(success_prob(theta).mean()))
    return {"curve": curve, "env_steps": env_steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2.0)
    ap.add_argument("--rules", default="grpo,gigpo,spo,spo@5",
                    help="comma-separated; rule@k runs it with lr·k")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    print("| rule | success at start | after iters/3 | at the end | env steps |")
    print("|---|---|---|---|---|")
    for rule in args.rules.split(","):
        out[rule] = [train(rule, args.iters, seed, args.lr) for seed in range(args.seeds)]
        ends = torch.tensor([r["curve"][-1] for r in out[rule]])
        mid = torch.tensor([r["curve"][args.iters // 3] for r in out[rule]])
        steps = sum(r["env_steps"] for r in out[rule]) / args.seeds
        print(f"| {rule} | {out[rule][0]['curve'][0]:.3f} | {mid.mean():.3f} ± {mid.std():.3f} | "
              f"{ends.mean():.3f} ± {ends.std():.3f} | {steps:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for rule, runs in out.items():
            curves = torch.tensor([r["curve"] for r in runs])
            ax.plot(curves.mean(0), label=f"{rule} (mean of {len(runs)} seeds)")
        ax.set(xlabel="iteration (32 trajectories)", ylabel="mean success probability",
               title="key chain: L = 4, A = 4, H = 8")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
