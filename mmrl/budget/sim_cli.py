"""``mmrl sim budget``: the rollout-budget simulator from the command line. The parser loads no
torch (``mmrl sim --help`` answers at once); the simulator is imported when the command runs."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from mmrl.budget.sim_config import DEFAULT_STRATEGIES, GUIDANCE_MODES, STRATEGIES, SimSettings


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
            ("--max-tries", "max_tries", "DAPO dynamic sampling tries per step"),
            ("--xrpo-first", "xrpo_first", "XRPO first-phase rollouts per prompt"),
            ("--hint-gain", "hint_gain", "guidance: logit added per hint level (an assumption)"),
            ("--hint-levels", "hint_levels", "guidance: hint levels (GHPO's stages, Scaf's tiers)"),
            ("--hint-transfer", "hint_transfer", "guidance: share of an on-policy hinted row's "
             "step that reaches the plain prompt (GHPO, Scaf; an assumption)"),
            ("--is-cap", "is_cap", "guidance: Guide's importance-weight cap (rollout_is_max)"))


def _cmd_budget(args) -> int:
    strategies = [x.strip() for x in args.strategies.split(",") if x.strip()]
    guidance = [x.strip() for x in args.guidance.split(",") if x.strip()]
    s = SimSettings(**{field: getattr(args, field) for _, field, _ in _OPTIONS})
    try:
        s.validate()
        list(map(STRATEGIES.get, strategies))  # unknown names: did-you-mean errors
        bad = [m for m in guidance if m not in GUIDANCE_MODES]
        if bad or not guidance:
            raise ValueError(f"--guidance {args.guidance!r}: expected comma-separated modes "
                             f"from {', '.join(GUIDANCE_MODES)}")
    except ValueError as err:
        print(f"mmrl sim budget: {err}", file=sys.stderr)
        return 2
    from mmrl.budget.sim import format_table, plot, run_budget_sim, summarize
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"simulating {len(strategies)} strategies x {len(seeds)} seeds, {s.total_rollouts} "
          f"rollouts each ({s.batch_prompts} x {s.group_size} per step)", flush=True)
    results = run_budget_sim(s, strategies, seeds, log=lambda m: print(m, flush=True),
                             guidance=guidance)
    rows = summarize(results)
    print("\n" + (table := format_table(rows)))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "budget_sim.json"), "w") as f:
        json.dump({"settings": dataclasses.asdict(s), "guidance": guidance, "seeds": seeds,
                   "table": rows}, f, indent=1)
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
               "  mmrl sim budget --difficulty-std 3 --drift-std 0 --no-plot\n"
               "  mmrl sim budget --strategies uniform --guidance none,ghpo,scaf,guide,xrpo_seed")
    p.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                   help="comma-separated, from: " + ", ".join(STRATEGIES.names())
                   + " (default: all)")
    p.add_argument("--guidance", default="none", metavar="MODES",
                   help="comma-separated hinted re-rolls of all-fail groups, each run with every "
                   "strategy (rows 'strategy+mode'), from: " + ", ".join(GUIDANCE_MODES)
                   + " (default none; the model's assumptions: mmrl.budget.sim_guidance)")
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
