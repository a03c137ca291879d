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
Guidance (hinted re-rolls of all-fail groups, ``guidance=``) is modelled in
:mod:`mmrl.budget.sim_guidance`; a guided run is reported as ``strategy+mode``.
The strategies and settings are in :mod:`mmrl.budget.sim_config`, the command line
(``mmrl sim budget --help``) in :mod:`mmrl.budget.sim_cli`; both load no torch.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from mmrl.algo.advantages import group_advantages
from mmrl.budget.allocate import DynamicSampling, expand_groups, informative_groups, knapsack_allocate
from mmrl.budget.selection import make_selector
from mmrl.budget.sim_guidance import GUIDANCE_MODES, apply_guidance
from mmrl.budget.xrpo import two_phase_rollout
from mmrl.budget.sim_config import DEFAULT_STRATEGIES, STRATEGIES, SimSettings, Strategy  # noqa: F401


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
              group_ids: torch.Tensor, q: Optional[torch.Tensor] = None,
              c: Optional[torch.Tensor] = None) -> None:
        """One GRPO step: ``θ_i += lr · Σ_{j ∈ prompt i} c_j A_j (r_j − q_j) / group_size``;
        ``q_j = p_i`` and ``c_j = 1`` unless guidance set them (hinted rows,
        :mod:`mmrl.budget.sim_guidance`)."""
        if rewards.numel() == 0:
            return
        adv = group_advantages(rewards, group_ids, "grpo")
        q = self.success_probs()[sample_prompts] if q is None else q
        score = rewards - q  # d log π(r) / dθ
        c = torch.ones_like(score) if c is None else c
        grad = torch.zeros_like(self.logits).index_add_(0, sample_prompts, c * adv * score)
        self.logits += self.s.lr * grad / self.s.group_size

    def drift(self, generator: torch.Generator) -> None:
        self.logits += self.s.drift_std * torch.randn(
            self.logits.shape, generator=generator, dtype=torch.float64)


_COUNTS = ("groups", "effective_groups", "rollouts", "effective_rollouts", "trained_groups",
           "trained_effective", "guided_groups", "guided_rescued", "guided_rollouts")


def _account_step(tries: List[tuple], kept: List[Optional[torch.Tensor]], batch_prompts: int):
    """Count one step's groups and rollouts; gather the rows to train on.

    ``tries[t] = (sample_prompts, rewards, group_ids, q, c, guidance stats)``; ``kept[t]``:
    group ids to train on from try t (None: all). Guidance's extra samples count as rollouts.
    Returns ``({count: int}, (sample_prompts, rewards, group_ids, q, c))``.
    """
    counts = dict.fromkeys(_COUNTS, 0)
    train = []
    for (sample_prompts, rewards, group_ids, q, c, guided), keep in zip(tries, kept):
        for key, val in guided.items():
            counts[key] += val
        counts["rollouts"] += guided["guided_rollouts"]
        ids, informative = informative_groups(rewards, group_ids)
        in_eff = torch.isin(group_ids, ids[informative])
        rows = torch.ones_like(in_eff) if keep is None else torch.isin(group_ids, keep)
        for key, val in (("groups", ids.numel()), ("effective_groups", informative.sum()),
                         ("rollouts", rewards.numel()), ("effective_rollouts", in_eff.sum()),
                         ("trained_groups", torch.unique(group_ids[rows]).numel()),
                         ("trained_effective", torch.unique(group_ids[rows & in_eff]).numel())):
            counts[key] += int(val)
        offset = len(train) * (batch_prompts + 1)  # keep group ids distinct across tries
        train.append((sample_prompts[rows], rewards[rows], group_ids[rows] + offset, q[rows],
                      c[rows]))
    return counts, tuple(torch.cat(parts) for parts in zip(*train))


def _xrpo_rollout(pop: PromptPopulation, idx: torch.Tensor, s: SimSettings, gen):
    """XRPO's two phases over the step's budget (see :mod:`mmrl.budget.xrpo`)."""
    if s.group_size < 2:
        raise ValueError(f"strategy xrpo needs group_size >= 2, got {s.group_size}")
    rows = two_phase_rollout(lambda p, c: pop.rollout(p, c, gen), idx,
                             s.batch_prompts * s.group_size, min(s.xrpo_first, s.group_size),
                             s.n_max)
    return rows[:3]


def run_strategy(name: str, s: SimSettings, seed: int = 0, guidance: str = "none") -> Dict:
    """Simulate one strategy until ``total_rollouts`` are spent -> totals and a per-step history.

    ``guidance`` (:mod:`mmrl.budget.sim_guidance`) edits every try's all-fail groups after the
    selector saw the plain rewards, drawing from its own generator.

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
    hint_gen = torch.Generator().manual_seed(seed + 3_000_017)
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
            if spec.allocation != "fixed" and spec.allocation != "xrpo":
                probs = (pop.success_probs() if spec.allocation == "knapsack_oracle"
                         else selector.success_probs())[idx]
                counts = knapsack_allocate(probs, s.batch_prompts * s.group_size, s.n_min,
                                           s.n_max)
            sample_prompts, rewards, group_ids = (
                _xrpo_rollout(pop, idx, s, roll_gen) if spec.allocation == "xrpo"
                else pop.rollout(idx, counts, roll_gen))
            selector.update(sample_prompts, rewards, group_ids)
            rewards, q, c, guided = apply_guidance(guidance, pop.logits, sample_prompts, rewards,
                                                   group_ids, s, hint_gen)
            tries.append((sample_prompts, rewards, group_ids, q, c, guided))
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
               "success_end": stat(lambda r: r["success_end"]),
               "rescued": stat(lambda r: r["guided_rescued"] / max(r["guided_groups"], 1)),
               "guided_share": stat(lambda r: r["guided_rollouts"] / r["rollouts"])}
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
            "mean success start → end | guided: rescued / all-fail, share of rollouts |")
    lines = [head, "|" + "---|" * 11]

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
            f"{r['success_end'][1]:.3f} | "
            + (f"{r['rescued'][0]:.2f}, {r['guided_share'][0]:.2f} |" if r["guided_share"][0]
               else "– |"))
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
                   log=None, guidance: Sequence[str] = ("none",)) -> Dict[str, List[Dict]]:
    """Run every strategy with every guidance mode for every seed -> ``{label: [run per
    seed]}``, label ``strategy`` (no guidance) or ``strategy+mode``."""
    s.validate()
    list(map(STRATEGIES.get, strategies))  # fail on a typo before running anything
    bad = [m for m in guidance if m not in GUIDANCE_MODES]
    if bad:
        raise ValueError(f"guidance {bad}: expected modes from {', '.join(GUIDANCE_MODES)}")
    results: Dict[str, List[Dict]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of a few hundred entries: thread wake-ups cost more
    try:
        for name, mode in [(n, m) for n in strategies for m in guidance]:
            label = name if mode == "none" else f"{name}+{mode}"
            for seed in seeds:
                t0 = time.perf_counter()
                results.setdefault(label, []).append(run_strategy(name, s, seed, mode))
                if log:
                    r = results[label][-1]
                    log(f"  {label:<18} seed {seed}: {r['steps']} steps, eff. ratio "
                        f"{r['effective_groups'] / r['groups']:.3f} "
                        f"({time.perf_counter() - t0:.1f}s)")
    finally:
        torch.set_num_threads(threads)
    return results
