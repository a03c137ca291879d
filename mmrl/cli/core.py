"""Core sub-commands: ``mmrl train``, ``mmrl config show|validate|docs``, ``mmrl algos``."""
from __future__ import annotations

import argparse
import sys
from typing import List

EXAMPLES_TRAIN = """examples:
  mmrl train configs/demo/toy.yaml
  mmrl train configs/demo/toy.yaml algo.preset=dapo train.steps=50 train.lr=3e-4
  mmrl train configs/demo/toy.yaml algo.preset=grpo algo.beta=0.04 algo.kl=k3
"""


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train with a YAML config (+ key=value overrides)",
                       description="Run a training job described by a YAML config. Overrides "
                                   "use dotted keys: section.field=value.",
                       epilog=EXAMPLES_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="path to a YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4")
    p.set_defaults(func=cmd_train)

    c = sub.add_parser("config", help="show, validate or document configs",
                       description="Inspect configs without running anything.")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION")
    show = csub.add_parser("show", help="print the resolved config with field docs",
                           description="Print the config after defaults and overrides, each "
                                       "field with its meaning, and what the preset resolves to.")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=cmd_config_show)
    val = csub.add_parser("validate", help="check one or more configs; report every problem",
                          description="Validate configs: unknown keys, wrong types, bad values "
                                      "and invalid combinations are all reported at once.")
    val.add_argument("configs", nargs="+")
    val.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="an override applied to every config")
    val.add_argument("--schema-only", action="store_true",
                     help="check the values only; skip the checks against this machine (files "
                          "and folders exist, the device exists, the resume checkpoint), e.g. "
                          "for a config meant for another machine")
    val.set_defaults(func=cmd_config_validate)
    docs = csub.add_parser("docs", help="print the reference of every config field (markdown)")
    docs.add_argument("--job", action="append", default=None,
                      help="include this job's section (default: every job that imports)")
    docs.set_defaults(func=cmd_config_docs)
    c.set_defaults(func=lambda a: (c.print_help(), 0)[1])

    a = sub.add_parser("algos", help="list algorithm presets and what each picks on every axis, "
                                     "then the preference-loss presets",
                       description="Presets are one choice per axis (advantage, ratio level, "
                                   "objective, aggregation, KL, token weighting) plus "
                                   "hyper-parameters; override any of them under algo:.")
    a.add_argument("name", nargs="?", help="show one preset in full")
    a.set_defaults(func=cmd_algos)


def _load(path, overrides, here: bool = False):
    """``(run, None)``, or ``(None, ConfigError)`` listing every problem; ``here``: also the
    checks against this machine (:func:`mmrl.cli.preflight.preflight`)."""
    from mmrl.config.core import ConfigError
    from mmrl.config.schema import load_config
    try:
        run = load_config(path, overrides)
        if here:
            from mmrl.cli.preflight import preflight
            problems = preflight(run)
            if problems:
                raise ConfigError(problems, str(path))
        return run, None
    except ConfigError as err:
        return None, err


def cmd_train(args) -> int:
    """``mmrl train``: every config problem, and every problem with running it here (files,
    device, checkpoint), is reported before any work; exit 2 when there is one."""
    run, err = _load(args.config, args.overrides, here=True)
    if err:
        print(err, file=sys.stderr)
        return 2
    import os
    from mmrl.config.jobs import get_job
    job = get_job(run.job)
    main = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    if main:
        print(f"mmrl train: job={run.job} preset={run.algo.preset} steps={run.train.steps} "
              f"-> {run.train.output_dir}", flush=True)
    summary = job.run(run)
    if main and summary.get("stopped") is None:
        print(f"done: {summary['steps']} steps in {summary['seconds']:.1f}s; reward "
              f"{summary['reward_first']:.3f} -> {summary['reward_last']:.3f}; outputs in "
              f"{summary['output_dir']}")
    return 0


def cmd_config_show(args) -> int:
    import yaml
    from mmrl.config.core import field_docs
    from mmrl.config.schema import AlgoConfig, PrefConfig, TrainConfig
    from mmrl.config.jobs import get_job
    run, err = _load(args.config, args.overrides)
    if err:
        print(err, file=sys.stderr)
        return 2
    docs = {}
    for prefix, cls in (("algo", AlgoConfig), ("train", TrainConfig),
                        (run.job, get_job(run.job).section), ("pref", PrefConfig)):
        docs.update({k: d for k, _, _, d, _ in field_docs(cls, prefix)})
    for line in yaml.safe_dump(run.to_dict(), sort_keys=False).splitlines():
        _print_with_doc(line, docs)
    spec = run.algo.resolve()
    print(f"# resolved algorithm ({run.algo.preset} + overrides):")
    for k, v in vars(spec).items():
        print(f"#   {k}: {v}")
    return 0


_section_stack: List[str] = []


def _print_with_doc(line: str, docs) -> None:
    indent = len(line) - len(line.lstrip())
    key = line.strip().split(":", 1)[0]
    depth = indent // 2
    del _section_stack[depth:]
    _section_stack.append(key)
    doc = docs.get(".".join(_section_stack))
    print(f"{line:<48} # {doc}" if doc else line)


def cmd_config_validate(args) -> int:
    """Exit 0 when every config is valid, 2 when one is not (each problem is printed)."""
    bad = 0
    for path in args.configs:
        run, err = _load(path, args.overrides, here=not args.schema_only)
        if err:
            bad += 1
            print(err, file=sys.stderr)
        else:
            print(f"ok: {path} (job={run.job}, preset={run.algo.preset})")
    return 2 if bad else 0


def config_reference(jobs=None) -> str:
    """Markdown reference of every config field (the content of docs/config.md)."""
    from mmrl.config.core import field_docs
    from mmrl.config.jobs import get_job, job_names
    from mmrl.config.schema import AlgoConfig, PrefConfig, TrainConfig
    sections = [("algo", AlgoConfig), ("train", TrainConfig), ("pref", PrefConfig)]
    for name in jobs or job_names():
        try:
            sections.append((name, get_job(name).section))
        except ValueError:
            continue
    out = ["# Config reference", "", "Generated by `mmrl config docs`; every field of every "
           "section: its type and bounds, default, meaning and source. Each field is declared "
           "once (`mmrl.fields.cfg`) and validation is derived from that declaration; the "
           "`algo` overrides are the fields of `mmrl.algo.presets.AlgoSpec`, the `pref` overrides those "
           "of `mmrl.algo.preference.PrefSpec`.", ""]
    for prefix, cls in sections:
        out += [f"## `{prefix}`", "", (cls.__doc__ or "").strip().splitlines()[0], "",
                "| key | type | default | meaning | source |", "|---|---|---|---|---|"]
        for key, tp, default, doc, source in field_docs(cls, prefix):
            out.append(f"| `{key}` | {tp} | `{default!r}` | {doc} | {source} |")
        out.append("")
    return "\n".join(out)


def cmd_config_docs(args) -> int:
    print(config_reference(args.job))
    return 0


AXES = ("advantage", "ratio_level", "objective", "aggregation", "kl", "token_weighting",
        "multi_reward")


def relevant_hparams(spec) -> dict:
    """The hyper-parameters that a spec's choices actually read (for display)."""
    keys = ["adv_eps", "beta"]
    keys += {"clip": ["eps_low", "eps_high", "dual_clip_c", "delta"],
             "sapo": ["tau_pos", "tau_neg"], "reg": ["eps_reg"],
             "cispo": ["eps_low", "eps_high"], "cispo_cap": ["cispo_cap"],
             "clip_cov": ["eps_low", "eps_high", "cov_ratio", "clip_cov_lb", "clip_cov_ub"],
             "kl_cov": ["cov_ratio", "kl_cov_coef"],
             "vespo": ["vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"],
             }.get(spec.objective, [])
    keys += ["r_max"] if spec.advantage == "ngrpo" else []
    keys += ["max_len"] if spec.aggregation == "fixed_norm" else []
    keys += ["tw_alpha"] if spec.token_weighting == "tw" else []
    keys += ["adv_clip"]
    return {k: getattr(spec, k) for k in keys if getattr(spec, k, None) is not None}


def pref_table() -> List[str]:
    """The lines of the "preference losses" table: each preset's loss, how a completion is
    scored (reference or none, sum or mean, TGDPO guidance, TRPA pair scale) and the
    hyper-parameters it reads."""
    from mmrl.algo.preference import PREF_PRESETS
    from mmrl.algo.pref_presets import loss_registry
    rows = [("preset", "loss", "score", "hyper-parameters")]
    for name, spec in sorted(PREF_PRESETS.items()):
        flags = loss_registry().get(spec.loss)
        score = ["logp" if spec.reference_free else "logp-ref",
                 "mean" if spec.length_normalize else "sum"]
        score += ["guided"] * spec.token_guidance + ["x pair_scale"] * spec.scaled_pairs
        hp = {"beta": spec.beta}
        hp.update({k: getattr(spec, k) for k, on in (
            ("label_smoothing", flags.smoothing and spec.label_smoothing > 0),
            ("gamma_beta_ratio", flags.margin and spec.gamma_beta_ratio > 0),
            ("sft_weight", spec.sft_weight > 0), ("alpha", spec.token_guidance),
            ("kappa", spec.scaled_pairs)) if on})
        rows.append((name, spec.loss, " ".join(score),
                     ", ".join(f"{k}={v:g}" for k, v in hp.items())))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]


def cmd_algos(args) -> int:
    from mmrl.algo.presets import PRESETS, resolve_algo
    from mmrl.algo.preference import PREF_PRESETS, resolve_pref
    from mmrl.algo.match_presets import MATCH_PRESETS, resolve_match
    if args.name and args.name not in PRESETS and (args.name in PREF_PRESETS
                                                   or args.name in MATCH_PRESETS):
        resolve = resolve_pref if args.name in PREF_PRESETS else resolve_match
        for k, v in vars(resolve(args.name)).items():
            print(f"{k:18s} {v}")
        return 0
    if args.name:
        spec = resolve_algo(args.name)
        for k, v in vars(spec).items():
            print(f"{k:18s} {v}")
        return 0
    rows = [("preset",) + AXES + ("hyper-parameters",)]
    for name, spec in sorted(PRESETS.items()):
        hp = relevant_hparams(spec)
        rows.append((name,) + tuple(str(getattr(spec, a)) for a in AXES) +
                    (", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in hp.items()),))
    widths = [max(len(r[i]) for r in rows) for i in range(len(AXES) + 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    print("\nOverride any axis or hyper-parameter under algo: in a config, e.g. "
          "algo.preset=dapo algo.eps_high=0.3")
    from mmrl.algo.presets import axis_registry
    print("Rollout/training mismatch correction, with any preset (mmrl.algo.offpolicy; TRL, "
          "verl): algo.rollout_is=" + "|".join(axis_registry("rollout_is").names())
          + " (rollout_is_min/max), algo.off_policy_mask=<delta> (DeepSeek-V3.2); "
          "guidance: guide's hinted rows: algo.off_policy_shaping="
          + "|".join(axis_registry("off_policy_shaping").names()) + " (off_policy_gamma)")
    print("\npreference losses (mmrl.algo.preference; score = what each completion is scored "
          "with, summed or averaged over its tokens / steps; docs/algorithms.md):")
    print("\n".join(pref_table()))
    print("\nweighted matching losses of flow models (mmrl.algo.matching; the diffusion job's "
          "diffusion.objective, overrides in diffusion.matching; docs/diffusion_train.md):")
    print("\n".join(match_table()))
    return 0


def match_table() -> List[str]:
    """The lines of the "weighted matching losses" table: each preset's loss, old-model
    schedule, time draw and the hyper-parameters its loss reads."""
    from mmrl.algo.match_presets import MATCH_PRESETS
    rows = [("preset", "loss", "old model", "times", "hyper-parameters")]
    for name, spec in sorted(MATCH_PRESETS.items()):
        hp = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in spec.loss_kwargs().items())
        rows.append((name, spec.loss, spec.old_decay if spec.needs_old else "-", spec.times, hp))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
