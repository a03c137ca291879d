"""A rollout-budget simulator: which prompt-selection / allocation strategy feeds GRPO best?

The population: P prompts, prompt i solved with probability ``p_i = σ(θ_i)``, ``θ_i ~ N(μ, s²)``
at the start. The policy is tabular: one GRPO step on a group of prompt i moves ``θ_i`` along the
exact GRPO gradient of a Bernoulli policy, ``θ_i += lr · Σ_j A_j (r_j − p_i) / N`` (the score of
a success is ``1 − p``, of a failure ``−p``; ``A`` from :func:`mmrl.algo.advantages.group_advantages`),
so it improves only on prompts whose group had non-equal rewards. Every step every ``θ_i`` also
drifts by ``N(0, drift²)`` (forgetting, transfer), so estimates go stale.

Per strategy (:data:`STRATEGIES`: a selector, a per-prompt allocation, DAPO filtering or not)
it reports at an equal total rollout budget: the effective-gradient ratio over groups and over
rollouts (share of groups / rollouts with non-equal rewards), rollouts spent, optimizer steps
and the mean success over all prompts (simulated progress); as a table, a JSON file and a PNG.
Seeded and deterministic: a seed gives every strategy the same initial population.
CLI: ``mmrl sim budget --help``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from mmrl.algo.advantages import group_advantages
from mmrl.budget.allocate import DynamicSampling, expand_groups, informative_groups, knapsack_allocate
from mmrl.registry import Registry
from mmrl.budget.selection import make_selector


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A selector, an allocation (``fixed``, ``knapsack``, ``knapsack_oracle``), DAPO or not."""
    selector: str
    allocation: str = "fixed"
    dynamic: bool = False


STRATEGIES: Registry = Registry("budget strategy")
STRATEGIES.register("uniform", Strategy("uniform"))
STRATEGIES.register("dynamic_sampling", Strategy("uniform", dynamic=True))
STRATEGIES.register("vade", Strategy("vade"))
STRATEGIES.register("variance_aware", Strategy("variance_aware"))
STRATEGIES.register("knapsack", Strategy("uniform", allocation="knapsack"))
STRATEGIES.register("vade_knapsack", Strategy("vade", allocation="knapsack"))
# Knapsack on the true success rates: the allocation's ceiling, without estimation error.
STRATEGIES.register("knapsack_oracle", Strategy("uniform", allocation="knapsack_oracle"))
DEFAULT_STRATEGIES = ("uniform", "dynamic_sampling", "vade", "variance_aware", "knapsack",
                      "vade_knapsack", "knapsack_oracle")


@dataclasses.dataclass
class SimSettings:
    """Simulator settings; defaults are the run reported in docs/budget.md.

    Attributes:
        num_prompts: dataset size P.
        batch_prompts: prompts per step.
        group_size: rollouts per prompt at uniform allocation; the per-step budget is
            ``batch_prompts · group_size`` for every strategy.
        total_rollouts: rollout budget of the whole run (equal for every strategy).
        difficulty_mean, difficulty_std: initial logits ``θ ~ N(mean, std²)``.
        drift_std: per-step random walk of every logit.
        lr: step size on θ per GRPO update.
        n_min, n_max: Knapsack bounds on rollouts per prompt.
        max_tries: DAPO dynamic-sampling tries per step.
    """

    num_prompts: int = 512
    batch_prompts: int = 64
    group_size: int = 8
    total_rollouts: int = 102_400
    difficulty_mean: float = -1.0
    difficulty_std: float = 2.0
    drift_std: float = 0.05
    lr: float = 0.5
    n_min: int = 2
    n_max: int = 128
    max_tries: int = 4

    def validate(self) -> None:
        """Raise one ValueError listing every bad setting."""
        errors = [f"{k} must be >= {low}, got {getattr(self, k)}" for k, low in (
            ("num_prompts", 1), ("batch_prompts", 1), ("group_size", 1), ("total_rollouts", 1),
            ("n_min", 1), ("max_tries", 1)) if getattr(self, k) < low]
        if self.batch_prompts > self.num_prompts:
            errors.append(f"batch_prompts ({self.batch_prompts}) must be <= num_prompts "
                          f"({self.num_prompts})")
        if not self.n_min <= self.group_size <= self.n_max:
            errors.append(f"need n_min <= group_size <= n_max, got {self.n_min}, "
                          f"{self.group_size}, {self.n_max}")
        if self.difficulty_std < 0 or self.drift_std < 0 or self.lr < 0:
            errors.append("difficulty_std, drift_std and lr must be >= 0")
        if errors:
            raise ValueError("invalid simulator settings:\n  " + "\n  ".join(errors))


class PromptPopulation:
    """Prompts with known success probabilities ``σ(θ)`` and a tabular GRPO-trained policy."""

    def __init__(self, s: SimSettings, generator: torch.Generator):
        self.s = s
        self.logits = s.difficulty_mean + s.difficulty_std * torch.randn(
            s.num_prompts, generator=generator, dtype=torch.float64)

    def success_probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def rollout(self, prompts: torch.Tensor, counts: torch.Tensor, generator: torch.Generator):
        """Bernoulli rewards -> ``(sample_prompt_idx [B], rewards [B], group_ids [B])``."""
        sample_prompts, group_ids = expand_groups(prompts, counts)
        p = self.success_probs()[sample_prompts]
        rewards = (torch.rand(p.shape, generator=generator, dtype=torch.float64) < p).double()
        return sample_prompts, rewards, group_ids

    def train(self, sample_prompts: torch.Tensor, rewards: torch.Tensor,
              group_ids: torch.Tensor) -> None:
        """One GRPO step: ``θ_i += lr · Σ_{j ∈ prompt i} A_j (r_j − p_i) / group_size``."""
        if rewards.numel() == 0:
            return
        adv = group_advantages(rewards, group_ids, "grpo")
        score = rewards - self.success_probs()[sample_prompts]  # d log π(r) / dθ
        grad = torch.zeros_like(self.logits).index_add_(0, sample_prompts, adv * score)
        self.logits += self.s.lr * grad / self.s.group_size

    def drift(self, generator: torch.Generator) -> None:
        self.logits += self.s.drift_std * torch.randn(
            self.logits.shape, generator=generator, dtype=torch.float64)


_COUNTS = ("groups", "effective_groups", "rollouts", "effective_rollouts", "trained_groups",
           "trained_effective")


def _account_step(tries: List[tuple], kept: List[Optional[torch.Tensor]], batch_prompts: int):
    """Count one step's groups and rollouts; gather the rows to train on.

    ``tries[t] = (sample_prompts, rewards, group_ids)``; ``kept[t]``: group ids to train on
    from try t (None: all). Returns ``({count: int}, (sample_prompts, rewards, group_ids))``.
    """
    counts = dict.fromkeys(_COUNTS, 0)
    train = []
    for (sample_prompts, rewards, group_ids), keep in zip(tries, kept):
        ids, informative = informative_groups(rewards, group_ids)
        in_eff = torch.isin(group_ids, ids[informative])
        rows = torch.ones_like(in_eff) if keep is None else torch.isin(group_ids, keep)
        for key, val in (("groups", ids.numel()), ("effective_groups", informative.sum()),
                         ("rollouts", rewards.numel()), ("effective_rollouts", in_eff.sum()),
                         ("trained_groups", torch.unique(group_ids[rows]).numel()),
                         ("trained_effective", torch.unique(group_ids[rows & in_eff]).numel())):
            counts[key] += int(val)
        offset = len(train) * (batch_prompts + 1)  # keep group ids distinct across tries
        train.append((sample_prompts[rows], rewards[rows], group_ids[rows] + offset))
    return counts, tuple(torch.cat(parts) for parts in zip(*train))


def run_strategy(name: str, s: SimSettings, seed: int = 0) -> Dict:
    """Simulate one strategy until ``total_rollouts`` are spent -> totals and a per-step history.

    Returns:
        dict with ``groups``, ``effective_groups``, ``trained_groups``, ``trained_effective``,
        ``rollouts``, ``effective_rollouts``, ``steps``, ``tries``, ``success_start``,
        ``success_end`` and ``history`` (per step: rollouts spent so far, the step's effective
        ratio over groups and over rollouts, mean success).
    """
    spec = STRATEGIES.get(name)
    s.validate()
    pop = PromptPopulation(s, torch.Generator().manual_seed(seed))
    roll_gen = torch.Generator().manual_seed(seed + 1_000_003)
    sel_gen = torch.Generator().manual_seed(seed + 2_000_003)
    selector = make_selector(spec.selector, s.num_prompts)
    filt = DynamicSampling(s.batch_prompts, s.max_tries) if spec.dynamic else None
    tot = dict.fromkeys(_COUNTS + ("steps", "tries"), 0)
    tot["success_start"] = float(pop.success_probs().mean())
    history: List[tuple] = []  # (rollouts so far, eff. ratio groups, rollouts, mean success)
    while tot["rollouts"] < s.total_rollouts:
        tries: List[tuple] = []

        def produce(_t: int):
            idx = selector.select(s.batch_prompts, sel_gen)
            counts = torch.full((s.batch_prompts,), s.group_size, dtype=torch.long)
            if spec.allocation != "fixed":
                probs = (pop.success_probs() if spec.allocation == "knapsack_oracle"
                         else selector.success_probs())[idx]
                counts = knapsack_allocate(probs, s.batch_prompts * s.group_size, s.n_min,
                                           s.n_max)
            sample_prompts, rewards, group_ids = pop.rollout(idx, counts, roll_gen)
            selector.update(sample_prompts, rewards, group_ids)
            tries.append((sample_prompts, rewards, group_ids))
            return rewards, group_ids

        if filt:
            kept = filt.collect(produce)[0]
        else:
            produce(0)
            kept = [None]
        step, batch = _account_step(tries, kept, s.batch_prompts)
        pop.train(*batch)
        pop.drift(roll_gen)
        for key, val in step.items():
            tot[key] += val
        tot["steps"] += 1
        tot["tries"] += len(tries)
        history.append((tot["rollouts"], step["effective_groups"] / step["groups"],
                        step["effective_rollouts"] / step["rollouts"],
                        float(pop.success_probs().mean())))
    tot["success_end"] = float(pop.success_probs().mean())
    return {**tot, "history": history}


def summarize(results: Dict[str, List[Dict]]) -> List[Dict]:
    """Per strategy, mean and std over seeds of the reported metrics -> table rows."""
    rows = []
    base = results.get("uniform")
    for name, runs in results.items():
        def stat(f):
            v = np.array([f(r) for r in runs], dtype=float)
            return float(v.mean()), float(v.std())

        row = {"strategy": name,
               "eff_ratio": stat(lambda r: r["effective_groups"] / r["groups"]),
               "trained_eff": stat(lambda r: r["trained_effective"] / max(r["trained_groups"], 1)),
               "eff_rollout_share": stat(lambda r: r["effective_rollouts"] / r["rollouts"]),
               "eff_groups_per_1k": stat(lambda r: 1000 * r["trained_effective"] / r["rollouts"]),
               "rollouts": stat(lambda r: r["rollouts"]), "steps": stat(lambda r: r["steps"]),
               "success_start": stat(lambda r: r["success_start"]),
               "success_end": stat(lambda r: r["success_end"])}
        for key, num, den in (("eff_ratio", "effective_groups", "groups"),
                              ("eff_rollout_share", "effective_rollouts", "rollouts")):
            ref = np.mean([r[num] / r[den] for r in base]) if base else 0.0
            if ref > 0:  # no uniform run, or one without any signal: no relative number
                row[key + "_vs_uniform"] = row[key][0] / ref - 1
        rows.append(row)
    return rows


def format_table(rows: Sequence[Dict]) -> str:
    """Markdown table of :func:`summarize` rows (mean ± std over seeds)."""
    head = ("| strategy | eff. ratio, groups | vs uniform | eff. ratio, rollouts | vs uniform | "
            "trained groups w/ signal | signal groups / 1k rollouts | rollouts spent | steps | "
            "mean success start → end |")
    lines = [head, "|" + "---|" * 10]

    def vs(r, key):
        return f"{100 * r[key]:+.1f} %" if key in r else "n/a"

    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['eff_ratio'][0]:.3f} ± {r['eff_ratio'][1]:.3f} | "
            f"{vs(r, 'eff_ratio_vs_uniform')} | {r['eff_rollout_share'][0]:.3f} ± "
            f"{r['eff_rollout_share'][1]:.3f} | {vs(r, 'eff_rollout_share_vs_uniform')} | "
            f"{r['trained_eff'][0]:.3f} | {r['eff_groups_per_1k'][0]:.1f} | "
            f"{r['rollouts'][0]:.0f} | {r['steps'][0]:.0f} | "
            f"{r['success_start'][0]:.3f} → {r['success_end'][0]:.3f} ± "
            f"{r['success_end'][1]:.3f} |")
    return "\n".join(lines)


def _trailing_mean(y: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each step (fewer at the start)."""
    sums = np.convolve(y, np.ones(window), mode="full")[:len(y)]
    return sums / np.minimum(np.arange(1, len(y) + 1), window)


def plot(results: Dict[str, List[Dict]], path: str, window: int = 10) -> str:
    """PNG: effective ratios (groups, rollouts) and mean success vs rollouts spent (seed mean)."""
    import matplotlib  # lazily: the core does not need matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    runs_all = [r for runs in results.values() for r in runs]
    grid = np.linspace(max(r["history"][0][0] for r in runs_all),
                       min(r["history"][-1][0] for r in runs_all), 200)
    for name, runs in results.items():
        for col, ax in enumerate(axes, start=1):
            curves = []
            for r in runs:
                h = np.array(r["history"], dtype=float)
                y = h[:, col] if col == 3 else _trailing_mean(h[:, col], window)
                curves.append(np.interp(grid, h[:, 0], y))
            ax.plot(grid, np.mean(curves, axis=0), label=name)
    titles = ("share of groups with non-equal rewards", "share of rollouts in such groups",
              "simulated progress")
    ylabels = (f"effective ratio, groups ({window}-step mean)",
               f"effective ratio, rollouts ({window}-step mean)", "mean success over all prompts")
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set(xlabel="rollouts spent", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_budget_sim(s: SimSettings, strategies: Sequence[str], seeds: Sequence[int],
                   log=None) -> Dict[str, List[Dict]]:
    """Run every strategy for every seed -> ``{strategy: [run per seed]}``."""
    s.validate()
    list(map(STRATEGIES.get, strategies))  # fail on a typo before running anything
    results: Dict[str, List[Dict]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of a few hundred entries: thread wake-ups cost more
    try:
        for name in strategies:
            for seed in seeds:
                t0 = time.perf_counter()
                results.setdefault(name, []).append(run_strategy(name, s, seed))
                if log:
                    r = results[name][-1]
                    log(f"  {name:<18} seed {seed}: {r['steps']} steps, eff. ratio "
                        f"{r['effective_groups'] / r['groups']:.3f} "
                        f"({time.perf_counter() - t0:.1f}s)")
    finally:
        torch.set_num_threads(threads)
    return results


# --flag -> SimSettings field, help
_OPTIONS = (("--prompts", "num_prompts", "dataset size"),
            ("--batch-prompts", "batch_prompts", "prompts per step"),
            ("--group-size", "group_size", "rollouts per prompt at uniform allocation"),
            ("--budget", "total_rollouts", "total rollouts per run, equal for every strategy"),
            ("--difficulty-mean", "difficulty_mean", "mean initial logit (success = sigmoid)"),
            ("--difficulty-std", "difficulty_std", "std of the initial logits"),
            ("--drift-std", "drift_std", "per-step random-walk std of every logit"),
            ("--lr", "lr", "policy step size on the logits"),
            ("--n-min", "n_min", "Knapsack minimum rollouts per prompt"),
            ("--n-max", "n_max", "Knapsack maximum rollouts per prompt"),
            ("--max-tries", "max_tries", "DAPO dynamic sampling tries per step"))


def _cmd_budget(args) -> int:
    strategies = [x.strip() for x in args.strategies.split(",") if x.strip()]
    s = SimSettings(**{field: getattr(args, field) for _, field, _ in _OPTIONS})
    try:
        s.validate()
        list(map(STRATEGIES.get, strategies))  # unknown names: did-you-mean errors
    except ValueError as err:
        print(f"mmrl sim budget: {err}", file=sys.stderr)
        return 2
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"simulating {len(strategies)} strategies x {len(seeds)} seeds, {s.total_rollouts} "
          f"rollouts each ({s.batch_prompts} x {s.group_size} per step)", flush=True)
    results = run_budget_sim(s, strategies, seeds, log=lambda m: print(m, flush=True))
    rows = summarize(results)
    print("\n" + (table := format_table(rows)))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "budget_sim.json"), "w") as f:
        json.dump({"settings": dataclasses.asdict(s), "seeds": seeds, "table": rows}, f, indent=1)
    with open(os.path.join(args.out, "budget_sim.md"), "w") as f:
        f.write(table + "\n")
    if not args.no_plot:
        try:
            print(f"plot: {plot(results, os.path.join(args.out, 'budget_sim.png'))}")
        except ModuleNotFoundError as err:  # matplotlib is optional for the core
            print(f"plot skipped: {err.name} is not installed (pip install matplotlib)",
                  file=sys.stderr)
    print(f"table and settings: {os.path.join(args.out, 'budget_sim.json')}")
    return 0


def add_commands(subparsers) -> None:
    """Add ``mmrl sim budget`` to the top-level ``mmrl`` parser."""
    sim = subparsers.add_parser("sim", help="simulators (rollout budget strategies)",
                                description="Simulators that measure strategies without a model.")
    sim.set_defaults(func=lambda _a: (sim.print_help(), 2)[1])
    sub = sim.add_subparsers(dest="sim_command", metavar="SIM")
    d = SimSettings()
    p = sub.add_parser(
        "budget", help="compare prompt selection / rollout allocation strategies",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Simulate GRPO on prompts with known, drifting success rates and compare, "
                    "at equal rollout budget, how often groups carry a gradient (non-equal "
                    "rewards), and how fast the mean success rate rises. Strategies: "
                    + ", ".join(STRATEGIES.names()) + ".",
        epilog="examples:\n"
               "  mmrl sim budget                      # all strategies, 3 seeds, ./budget_sim\n"
               "  mmrl sim budget --strategies uniform,knapsack --seeds 5 --out /tmp/sim\n"
               "  mmrl sim budget --difficulty-std 3 --drift-std 0 --no-plot")
    p.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                   help="comma-separated, from: " + ", ".join(STRATEGIES.names())
                   + " (default: all)")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds (default 3)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="first seed (default 0)")
    for flag, field, text in _OPTIONS:
        default = getattr(d, field)
        p.add_argument(flag, dest=field, type=type(default), default=default, help=f"{text} "
                       f"(default {default})", metavar="N" if type(default) is int else "X")
    p.add_argument("--out", default="budget_sim", metavar="DIR",
                   help="output folder for budget_sim.{md,json,png} (default ./budget_sim)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.set_defaults(func=_cmd_budget)
