"""The run config's sections: ``algo`` (what to optimize), ``train`` (the shared loop), ``job``.

Every field is declared once with :func:`mmrl.fields.cfg` (type, default, bounds, meaning,
source) and ``docs/config.md`` is generated from the declarations. The ``algo`` section's
overrides are derived from :class:`mmrl.algo.presets.AlgoSpec`, where they are declared; their
names, bounds and combinations are checked by :func:`mmrl.algo.presets.algo_problems` alone.

Two levels of checking. :func:`config_from_dict` / :func:`load_config` check the values
themselves (types, ranges, finite numbers, device names, combinations) and hold anywhere.
:func:`mmrl.cli.preflight.preflight` checks them against *this machine* (files and folders
exist, the device exists, the resume checkpoint is there); ``mmrl train`` and ``mmrl config
validate`` (unless ``--schema-only``) run both. Importing this module loads no torch.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mmrl.algo.presets import (EXTRA_OVERRIDES, PRESETS, AlgoSpec, algo_problems, axis_registry,
                               resolve_algo)
from mmrl.config.core import ConfigError, apply_overrides, build, cfg, load_yaml, show, to_dict
from mmrl.config.pref import PrefConfig, pref_train_problems

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
"""The torch device types a run may use (``train.device``); plus ``auto``."""

SEED_MAX = 2**63 - 1
"""Largest ``train.seed`` (torch seeds are 64-bit; per-rank seeds add small offsets)."""


def _job_names():
    from mmrl.config.jobs import job_names
    return job_names()


BUILTIN_SELECTORS = ("uniform", "vade", "variance_aware")
"""The prompt selectors of :mod:`mmrl.budget.selection` (a test checks they agree), so a config
naming one validates without importing torch."""


def selector_names() -> List[str]:
    """``train.selector``'s choices: the live registry once imported (user entries too)."""
    live = getattr(sys.modules.get("mmrl.budget.selection"), "SELECTORS", None)
    return live.names() if live is not None else sorted(BUILTIN_SELECTORS)


class _AlgoMethods:
    """What :class:`AlgoConfig` does with its fields: the preset's overrides, resolved."""

    def overrides(self) -> Dict[str, Any]:
        """The non-null preset overrides, as keyword arguments for ``resolve_algo``."""
        skip = {"preset", *REWARD_WEIGHTING_FIELDS}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in skip and getattr(self, f.name) is not None}

    def resolve(self) -> AlgoSpec:
        """The resolved :class:`mmrl.algo.presets.AlgoSpec` (raises on problems)."""
        return resolve_algo(self.preset, **self.overrides())

    def problems(self) -> List[str]:
        """Every problem of the preset with these overrides (names, types, bounds,
        combinations), from :func:`mmrl.algo.presets.algo_problems`: one checker, one message."""
        return [f"(preset {self.preset!r}) {p}" for p in algo_problems(self.preset,
                                                                      **self.overrides())]


def _override(tp, f) -> tuple:
    """An ``algo:`` override field from a field declared in mmrl.algo.presets: the same type
    (or null), doc, source and bounds; default null (keep the preset's value). Bounds and names
    are checked by ``algo_problems`` (``check=False`` here), so a config and ``resolve_algo``
    refuse the same values with the same message."""
    meta = dict(f.metadata, check=False)
    optional = tp if typing.get_origin(tp) is typing.Union else Optional[tp]
    return optional, field(default=None, metadata=meta)


REWARD_WEIGHTING_FIELDS = ("reward_weights", "reward_weighting", "reward_minimize",
                           "reward_weighting_lr")
"""``algo:`` fields that are not preset overrides: how a job's reward columns combine."""


def _reward_weighting_rows() -> list:
    """``algo.reward_weighting`` and its options (any job; :mod:`mmrl.train.reward_weighting`)."""
    return [
        ("reward_weighting", str, cfg(
            "none", "Reward weights that adapt during training, for a job with several reward "
            "columns (after the job's round augmenters): none; hypervolume (fixed weights, a "
            "multiplier in [0.5, 2) from each step's hypervolume gain); gradient (weights moved "
            "towards objectives whose policy gradients agree). The columns become one "
            "'weighted' column; starting weights from algo.reward_weights.",
            choices=["none", "hypervolume", "gradient"],
            source="arXiv 2509.11452; yining610/dynamic-reward-weighting")),
        ("reward_minimize", List[str], cfg(doc="reward_weighting hypervolume: reward columns "
                                           "to minimize (e.g. a length); the rest are "
                                           "maximized.", default_factory=list)),
        ("reward_weighting_lr", float, cfg(1e-6, "reward_weighting gradient: step eta of "
                                           "w <- softmax(log w + eta*I/1e-5) (the release: the "
                                           "actor's learning rate).", above=0.0,
                                           source="arXiv 2509.11452 (lr 1e-6)")),
    ]


def _algo_config() -> type:
    hints = typing.get_type_hints(AlgoSpec)
    declared = [(f.name, hints[f.name], f) for f in fields(AlgoSpec)]
    declared += [(name, tp, f) for name, (tp, f) in EXTRA_OVERRIDES.items()]
    rows = [("preset", str, cfg("grpo", "Named algorithm: one choice per axis plus "
                                "hyper-parameters (see `mmrl algos`).", choices=lambda: sorted(PRESETS),
                                source="GRPO arXiv 2402.03300; others in ALGORITHMS.md"))]
    rows += [(name, *_override(tp, f)) for name, tp, f in declared]
    rows += [("reward_weights", Dict[str, float], cfg(doc="Weight per reward column (missing "
                                                      "columns weigh 1).", default_factory=dict))]
    rows += _reward_weighting_rows()
    doc = """The algorithm: a named preset, plus overrides of any axis or hyper-parameter.

    ``null`` (the default of every override) keeps the preset's value; ``mmrl algos`` shows what
    each preset picks. The override fields are derived from :class:`mmrl.algo.presets.AlgoSpec`
    (declared there once: type, bounds, meaning, source).
    """
    return dataclasses.make_dataclass("AlgoConfig", rows, bases=(_AlgoMethods,),
                                      namespace={"__doc__": doc, "__module__": __name__})


AlgoConfig = _algo_config()


@dataclass
class TrainConfig:
    """The shared GRPO loop: rollout -> rewards -> advantages -> K epochs of updates."""

    steps: int = cfg(100, "Number of rollout/update iterations.", minimum=1)
    prompts_per_step: int = cfg(8, "Prompts per iteration (groups per rollout batch).",
                                minimum=1)
    group_size: int = cfg(8, "Samples per prompt (G in GRPO).", minimum=1,
                          source="GRPO arXiv 2402.03300 (64); DAPO (16); flow_grpo (24)")
    inner_epochs: int = cfg(1, "Passes over each rollout batch (mu in GRPO). With 1 epoch and "
                            "1 mini-batch the update is on-policy and old_logp is the detached "
                            "current logp.", minimum=1, source="GRPO arXiv 2402.03300")
    num_mini_batches: int = cfg(1, "Optimizer steps per epoch (the rollout batch is split into "
                                "this many mini-batches).", minimum=1)
    micro_batch_size: int = cfg(0, "Samples per forward/backward (gradient accumulation); 0 = "
                                "the whole mini-batch. Never changes the gradient.", minimum=0)
    t_chunk: int = cfg(0, "Split T (tokens / denoising steps) into chunks of this size per "
                       "forward; 0 = no split. Token-level objectives only. Never changes the "
                       "gradient.", minimum=0)
    lr: float = cfg(1e-3, "AdamW learning rate.", minimum=0.0)
    weight_decay: float = cfg(0.0, "AdamW weight decay.", minimum=0.0)
    max_grad_norm: float = cfg(1.0, "Clip the global gradient norm to this; 0 disables.",
                               minimum=0.0)
    max_bad_steps: int = cfg(5, "Stop after this many consecutive steps skipped for a "
                             "non-finite loss or gradient or for having no valid sample (the "
                             "message names the cause).", minimum=1)
    seed: int = cfg(0, "Seed for python, numpy and torch (rollouts, prompt order, init).",
                    minimum=0, maximum=SEED_MAX)
    device: str = cfg("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N, "
                      "mps, xpu. Checked before the run: the device must exist.")
    log_every: int = cfg(1, "Print a metrics line every N steps (JSONL gets every step).",
                         minimum=1)
    output_dir: str = cfg("runs/mmrl", "Where metrics.jsonl, the config and the final weights "
                          "are written.")
    progress: bool = cfg(True, "Show a tqdm progress bar.")
    wandb_project: Optional[str] = cfg(None, "Also log metrics to this Weights & Biases project "
                                       "(needs the wandb package); null = off.")
    parallel: str = cfg("ddp", "Data parallelism under torchrun/accelerate: ddp (gradients "
                        "summed across ranks; any policy, LoRA or full) or fsdp (FSDP2 "
                        "fully_shard of the policy's model, for full fine-tuning; needs "
                        "prompts_per_step * group_size divisible by the number of ranks). "
                        "Ignored in a single process.", choices=["ddp", "fsdp"],
                        source="PyTorch FSDP2 (torch.distributed.fsdp.fully_shard)")
    selector: str = cfg("uniform", "Prompt selection: uniform (shuffled epochs), vade (Beta "
                        "posteriors + Thompson sampling), variance_aware.",
                        choices=selector_names, source="VADE arXiv 2511.18902; MMR1 "
                        "variance-aware sampling")
    selector_hparams: Dict[str, float] = cfg(doc="Keyword arguments of the selector (see "
                                             "docs/budget.md), e.g. {decay: 0.99}.",
                                             default_factory=dict)
    rollout_allocation: str = cfg("fixed", "Samples per prompt: fixed (group_size each) or "
                                  "knapsack (the same total, prompts_per_step * group_size, "
                                  "split by estimated success rates).",
                                  choices=["fixed", "knapsack"],
                                  source="Knapsack RL arXiv 2509.25849")
    knapsack_n_min: int = cfg(2, "Knapsack: fewest samples any prompt gets.", minimum=1)
    knapsack_n_max: int = cfg(128, "Knapsack: most samples any prompt gets.", minimum=1)
    dynamic_sampling_tries: int = cfg(0, "DAPO dynamic sampling: keep only groups whose rewards "
                                      "differ and roll out more prompts until prompts_per_step "
                                      "such groups are found, at most this many rollout rounds "
                                      "per step (0 = off).", minimum=0,
                                      source="DAPO arXiv 2503.14476 (max_num_gen_batches)")
    sample_log_every: int = cfg(0, "Write the step's prompts, completions (text samples) and "
                                "reward columns to samples.jsonl every N steps (0 = never).",
                                minimum=0)
    save_every: int = cfg(0, "Write a checkpoint every N steps (0 = only at the end and on "
                          "SIGTERM/SIGINT or a fatal error).", minimum=0)
    keep_last: int = cfg(3, "Keep the newest N complete checkpoints.", minimum=1)
    export: bool = cfg(True, "At the end, write the final model in Hugging Face format to "
                       "output_dir/hf (from_pretrained loads it; a LoRA run writes the adapter "
                       "in peft/diffusers format), for jobs whose policy supports it.")
    export_merge_lora: bool = cfg(False, "export: merge a LoRA adapter into a full model "
                                  "instead of writing the adapter.")
    resume: str = cfg("auto", "auto: continue from the newest complete checkpoint in "
                      "output_dir/checkpoints (torn ones are skipped); never: start fresh; or "
                      "the path of a checkpoint folder (checked before the run: it must hold a "
                      "MANIFEST.json).")
    overwrite: bool = cfg(False, "With resume=never (or a checkpoint path): start even if "
                          "output_dir holds another run (its run.json, metrics, checkpoints or "
                          "final.pt), deleting that run's outputs first; without it such a "
                          "folder is refused (README: Checkpoints, resume and faults).")
    reward_retries: int = cfg(2, "Retries of a reward call that raises or times out; then "
                              "samples are scored one by one and the failing ones dropped.",
                              minimum=0)
    reward_timeout: float = cfg(0.0, "Seconds before a reward call counts as failed (0 = no "
                                "limit).", minimum=0.0)
    reward_chunks: int = cfg(1, "Asynchronous rewards: sample each rollout round's prompts in "
                             "this many chunks (whole groups) and score a chunk on a worker "
                             "thread while the next one is sampled (1 = off: sample all, then "
                             "score). On-policy (the overlap stays within the round); K chunks "
                             "draw other noise than one batch (docs/rewards.md, Asynchronous "
                             "rewards).", minimum=1)

    def problems(self) -> List[str]:
        out = []
        batch = self.prompts_per_step * self.group_size
        if self.rollout_allocation == "knapsack":
            if self.knapsack_n_min > self.knapsack_n_max:
                out.append(f"knapsack_n_min: got {self.knapsack_n_min} > knapsack_n_max="
                           f"{self.knapsack_n_max}; expected n_min <= n_max")
            if self.knapsack_n_min * self.prompts_per_step > batch:
                out.append(f"knapsack_n_min: {self.knapsack_n_min} per prompt x "
                           f"{self.prompts_per_step} prompts exceeds the budget prompts_per_step"
                           f" * group_size = {batch}; lower knapsack_n_min")
        if self.num_mini_batches > batch:
            out.append(f"num_mini_batches: got {self.num_mini_batches}; expected at most "
                       f"prompts_per_step * group_size = {batch}")
        out.extend(device_problems(self.device))
        for key, fix in (("resume", "auto, never or a checkpoint folder path"),
                         ("output_dir", "a folder path, e.g. runs/my-run")):
            if not getattr(self, key).strip():
                out.append(f"{key}: empty; expected {fix}")
        if self.overwrite and self.resume.strip() == "auto":  # the runner would refuse it late
            out.append("overwrite=true with resume=auto would delete the run auto resumes from; "
                       "set resume=never to start over, or drop overwrite to continue")
        return out


_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu)(?::(\d+))?$")


def device_problems(device: str, key: str = "device") -> List[str]:
    """Problems with a device name as torch reads it (existence is checked by
    :func:`mmrl.cli.preflight.device_here`). The names mmrl trains on are read without torch;
    anything else is read by ``torch.device`` so the message says what torch made of it."""
    if device == "auto":
        return []
    plain = _DEVICE.match(device)
    if plain:
        bad_cpu = plain.group(1) == "cpu" and plain.group(2) not in (None, "0")
        return [f"{key}: got {show(device)}; the CPU has no index: use cpu"] if bad_cpu else []
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return [f"{key}: got {show(device)}; expected auto, cpu, cuda, cuda:N (N = GPU index), "
                f"mps or xpu"]
    if dev.type not in DEVICE_TYPES:
        return [f"{key}: got {show(device)} (torch type {dev.type!r}), which mmrl does not "
                f"train on; expected auto, cpu, cuda, cuda:N, mps or xpu"]
    return []  # a spelling torch accepts for one of DEVICE_TYPES (e.g. "cuda:01")


@dataclass
class RunConfig:
    """A whole run: which job, the algorithm, the loop, the job's own section and the
    preference steps (:mod:`mmrl.config.pref`)."""

    job: str
    algo: AlgoConfig
    train: TrainConfig
    task: Any  # the job's section (a dataclass registered with the job)
    pref: PrefConfig = field(default_factory=PrefConfig)

    def to_dict(self) -> Dict[str, Any]:
        return {"job": self.job, "algo": to_dict(self.algo), "train": to_dict(self.train),
                self.job: to_dict(self.task), "pref": to_dict(self.pref)}


def config_from_dict(data: Dict[str, Any], source: str = "config") -> RunConfig:
    """Validate ``data`` (a parsed YAML mapping) into a :class:`RunConfig`.

    Raises:
        ConfigError: listing every problem (unknown keys, types, ranges, combinations).
    """
    from mmrl.config.jobs import get_job, step_problems
    problems: List[str] = []
    job_name = data.get("job", "toy")
    job = None
    if not isinstance(job_name, str):
        from mmrl.config.jobs import job_names
        problems.append(f"job: got {show(job_name)} ({type(job_name).__name__}); expected a job "
                        f"name: {', '.join(job_names())}")
    else:
        try:
            job = get_job(job_name)
        except ValueError as err:
            problems.append(f"job: {err}")
    allowed = {"job", "algo", "train", "pref"} | ({job_name} if job else set())
    for key in data if job else ():  # an unknown job: its section cannot be judged either
        if key not in allowed:
            name = key if isinstance(key, str) else show(key)
            problems.append(f"{name}: unknown section (known: {', '.join(sorted(allowed))})")
    before = len(problems)
    task = build(job.section, _section(data, job_name, problems), job_name, problems) if job \
        else None
    task_ok = task is not None and len(problems) == before  # defaults read typed fields only
    algo_data = dict(_section(data, "algo", problems))
    if job and job.algo_defaults is not None and task_ok:
        for key, value in job.algo_defaults(task).items():
            if algo_data.get(key) is None:
                algo_data[key] = value
    algo = build(AlgoConfig, algo_data, "algo", problems)
    train = build(TrainConfig, _section(data, "train", problems), "train", problems)
    pref = build(PrefConfig, _section(data, "pref", problems), "pref", problems)
    if job and job.check is not None and not problems:
        problems.extend(job.check(algo, train, task))
    if job and not problems:
        problems.extend(step_problems(job, algo))
    if not problems:
        problems.extend(_loop_problems(algo, train) + pref_train_problems(pref, train))
    if job and job.check_pref is not None and not problems and pref.mode != "off":
        problems.extend(job.check_pref(pref, task))
    if problems:
        raise ConfigError(problems, source)
    return RunConfig(job_name, algo, train, task, pref)


def _loop_problems(algo: AlgoConfig, train: TrainConfig) -> List[str]:
    """Combinations of the algorithm and the loop that cannot train."""
    spec = algo.resolve()
    out = []
    if train.t_chunk and spec.rollout_correction_whole_rows:
        out.append(f"train.t_chunk: got {train.t_chunk} with algo.rollout_is="
                   f"{spec.rollout_is!r} / off_policy_mask={spec.off_policy_mask!r}, which read "
                   f"whole rows; set t_chunk=0, or use rollout_is token_truncate / token_mask "
                   f"without off_policy_mask")
    elif train.t_chunk and spec.sequence_level:
        out.append(f"train.t_chunk: got {train.t_chunk} with the sequence-level preset "
                   f"{algo.preset!r}; a sequence ratio needs whole sequences, set t_chunk=0")
    out.extend(_whole_group_problems(spec, train))
    if train.group_size == 1 and spec.advantage != "ngrpo":
        # mmrl.algo.advantages: a group of one sample has nothing to compare with -> advantage 0
        out.append(f"train.group_size: got 1 with advantage {spec.advantage!r}, which gives a "
                   f"group of one sample advantage 0: every step would have zero gradient. Use "
                   f"group_size >= 2 (GRPO uses 8-64), or algo.advantage=ngrpo, whose virtual "
                   f"sample gives a single sample an advantage")
    return out


def _whole_group_problems(spec, train: TrainConfig) -> List[str]:
    """An objective that reads group_ids (``reg``'s group mean, ``drpo``'s J_g) sees one
    micro-batch at a time: mini-batches hold whole groups, one after the other, so a micro-batch
    keeps them whole only when it is a multiple of a fixed group size."""
    micro = train.micro_batch_size
    if not spec.needs_groups or micro == 0:
        return []
    if train.rollout_allocation != "fixed":
        return [f"train.micro_batch_size: got {micro} with rollout_allocation="
                f"{train.rollout_allocation!r}, whose groups vary in size, and objective "
                f"{spec.objective!r}, which needs whole groups in one micro-batch; set "
                f"micro_batch_size=0 or rollout_allocation=fixed"]
    if micro % train.group_size:
        return [f"train.micro_batch_size: got {micro}, which splits groups of group_size="
                f"{train.group_size}; objective {spec.objective!r} needs whole groups in one "
                f"micro-batch: set micro_batch_size to a multiple of group_size (or 0)"]
    return []


def _section(data, key, problems) -> Dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        problems.append(f"{key}: got {show(value)}; expected a section (mapping)")
        return {}
    return value


def load_config(path, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a YAML config file, apply ``key=value`` overrides, validate everything at once
    (the checks against this machine are :func:`mmrl.cli.preflight.preflight`'s).

    Raises:
        ConfigError: every problem found.
    """
    data = load_yaml(path)
    problems = apply_overrides(data, overrides)
    if problems:
        raise ConfigError(problems, str(path))
    return config_from_dict(data, str(path))


def save_config(run: RunConfig, path) -> None:
    import yaml
    Path(path).write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))


_MOVED_UP = {"preflight": "mmrl.cli.preflight", "device_here": "mmrl.cli.preflight"}


def __getattr__(name: str):
    """A clear message for the machine checks that moved above the config layer (an
    ImportError, so ``from mmrl.config.schema import preflight`` shows it)."""
    if name in _MOVED_UP:
        raise ImportError(f"mmrl.config.schema.{name} moved to {_MOVED_UP[name]}.{name} (the "
                             f"checks against this machine use the runner's run-folder rules); "
                             f"import it from there")
    raise AttributeError(f"module 'mmrl.config.schema' has no attribute {name!r}")
