"""verl 0.9.1 and TRL 1.16.0 from .peers/ (see peers.txt), made callable on mmrl's tensors.

The tests compare mmrl's losses, KL estimators, advantages and off-policy corrections with the
peers' **own code** on the same inputs:

- verl: :func:`verl_algos` is ``verl.trainer.ppo.core_algos`` (``compute_policy_loss_*``,
  ``kl_penalty``, ``agg_loss``, ``compute_*_advantage``), :func:`verl_rollout_corr` is
  ``verl.trainer.ppo.rollout_corr_helper``; their config arguments are :func:`verl_config`
  objects (attribute access and ``.get``, as the functions read them).
- TRL: :func:`trl_loss` runs ``GRPOTrainer._compute_loss`` on a bare trainer (no model, no
  ``__init__``) whose attributes are set from a ``GRPOConfig``'s field defaults plus overrides,
  the way ``GRPOTrainer.__init__`` sets them, and whose ``_get_per_token_logps_and_entropies``
  returns the given tensors: TRL's code does the math on our tensors, and gradients flow back to
  them. The advantage and vLLM importance-sampling computations are inline in TRL's 600-line
  ``_generate_and_score_completions``; :func:`trl_advantages` and :func:`trl_vllm_is_ratio` run
  exactly those lines of its source (cut out between fixed marker lines, which must each occur
  once) on given tensors.

Importing the peers: both import heavy packages their math never runs (ray, tensordict,
datasets, pandas, ...). Those are stubbed while the peers import (a module whose every attribute
is a placeholder class) and removed from ``sys.modules`` afterwards, so no other test sees them;
nothing is installed for them. verl's package ``__init__`` (Ray, the data protocol) and its config
packages (dataclasses of settings, which pull in model utilities) are skipped the same way: the
math functions only read attributes of the config objects passed to them, and
``isinstance(config, ActorConfig)`` holds for :func:`verl_config` objects because the stub's
placeholder class *is* their class. The pinned stack (torch, transformers, accelerate) is the
real one, imported before any stub exists.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
import sys
import textwrap
import types
from collections import defaultdict

import torch

from tests.peer_stubs import StubFinder as _StubFinder
from tests.peers import PEERS

# Missing third-party packages on the peers' import paths (never called by the math).
_THIRD_PARTY_STUBS = ("ray", "tensordict", "codetiming", "orjson", "datasets", "pandas")
# verl's own plumbing: the package __init__ (Ray, DataProto) and the config dataclasses.
_VERL_STUBS = ("verl.protocol", "verl.workers.config", "verl.trainer.config")


@functools.lru_cache(maxsize=None)
def _modules() -> types.SimpleNamespace:
    """Import the peers' math modules once (stubs only while importing)."""
    if not (PEERS / "verl").is_dir() or not (PEERS / "trl").is_dir():
        raise RuntimeError(f"verl / trl are missing from {PEERS}: run `make install` (it installs "
                           f"peers.txt there)")
    if (PEERS / "tests" / "__init__.py").exists():
        raise RuntimeError(f"{PEERS}/tests is verl's test package, which would shadow this "
                           f"repository's tests/: rerun `make install` (it removes it)")
    import accelerate  # noqa: F401  the real pinned stack first: its availability checks
    import transformers.utils.import_utils  # noqa: F401  must not see the stubs
    if str(PEERS) not in sys.path:
        sys.path.append(str(PEERS))  # last: a peer's copy never shadows the pinned stack
    finder = _StubFinder(_THIRD_PARTY_STUBS + _VERL_STUBS)
    before = set(sys.modules)
    sys.meta_path.insert(0, finder)
    try:
        if "verl" not in sys.modules:  # skip verl/__init__.py (Ray, DataProto, plugins)
            verl = types.ModuleType("verl")
            verl.__path__ = [str(PEERS / "verl")]
            sys.modules["verl"] = verl
        core = importlib.import_module("verl.trainer.ppo.core_algos")
        corr = importlib.import_module("verl.trainer.ppo.rollout_corr_helper")
        grpo = importlib.import_module("trl.trainer.grpo_trainer")
        config = importlib.import_module("trl.trainer.grpo_config")
    finally:
        sys.meta_path.remove(finder)
        for name in set(sys.modules) - before:
            if name.split(".")[0] in _THIRD_PARTY_STUBS:
                del sys.modules[name]
    return types.SimpleNamespace(core=core, corr=corr, grpo=grpo, config=config)


def verl_algos():
    """``verl.trainer.ppo.core_algos`` (0.9.1)."""
    return _modules().core


def verl_rollout_corr():
    """``verl.trainer.ppo.rollout_corr_helper`` (0.9.1)."""
    return _modules().corr


def verl_config(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0,
                global_batch_info=None, policy_loss=None, **algo):
    """An actor config as verl's policy losses read it (``ActorConfig`` fields), or, through
    ``**algo``, an algorithm config (``gamma``, ``norm_adv_by_std_in_grpo``, ...)."""
    cls = verl_algos().ActorConfig
    return cls(clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low,
               clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c,
               global_batch_info=dict(global_batch_info or {}),
               policy_loss=cls(**{**_POLICY_LOSS_FIELDS, **(policy_loss or {})}), **algo)


# PolicyLossConfig's fields the losses read; None = the fallback written in each loss function.
_POLICY_LOSS_FIELDS = dict(clip_cov_ratio=None, clip_cov_lb=None, clip_cov_ub=None,
                           kl_cov_ratio=None, ppo_kl_coef=None)


def verl_algo_config(**fields):
    """An algorithm config as verl's advantage estimators read it (``AlgoConfig`` fields)."""
    return verl_algos().AlgoConfig(**fields)


# ---------------------------------------------------------------- TRL
def trl_args(**overrides) -> types.SimpleNamespace:
    """``GRPOConfig``'s field defaults with ``overrides`` (no ``__post_init__``: no accelerator)."""
    cls = _modules().config.GRPOConfig
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"not GRPOConfig fields: {sorted(unknown)}")
    values = {}
    for name, f in fields.items():
        if f.default is not dataclasses.MISSING:
            values[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[name] = f.default_factory()
    values.update(overrides)
    if values["steps_per_generation"] is None:  # as __post_init__ derives it (one process)
        values["steps_per_generation"] = values["gradient_accumulation_steps"]
    values["scale_rewards"] = {True: "group", False: "none"}.get(values["scale_rewards"],
                                                                values["scale_rewards"])
    return types.SimpleNamespace(**values)


class _OneProcess:
    """The accelerator calls ``_compute_loss`` makes, for one process."""

    num_processes, process_index, sync_gradients = 1, 0, True

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def pad_across_processes(x, dim=0, pad_index=0):
        return x

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def trl_trainer(**overrides):
    """A bare ``GRPOTrainer`` with the attributes ``_compute_loss`` reads, set from
    :func:`trl_args` as ``GRPOTrainer.__init__`` sets them (one process, no accumulation)."""
    trainer_cls = _modules().grpo.GRPOTrainer
    args = trl_args(**overrides)
    t = trainer_cls.__new__(trainer_cls)
    t.args = args
    for name in ("max_completion_length", "use_vllm", "vllm_importance_sampling_correction",
                 "vllm_importance_sampling_mode", "loss_type", "multi_objective_aggregation",
                 "scale_rewards", "importance_sampling_level", "off_policy_mask_threshold",
                 "top_entropy_quantile", "entropy_coef", "use_adaptive_entropy", "beta",
                 "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max"):
        setattr(t, name, getattr(args, name))
    t.epsilon_low = args.epsilon
    t.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    t._entropy_bonus_enabled = t.entropy_coef != 0.0 or t.use_adaptive_entropy
    t._last_world_entropy = float("inf")
    t._entropy_window_stats = None
    t.aux_loss_enabled = False
    t.accelerator = _OneProcess()
    t.current_gradient_accumulation_steps = 1
    t.model = types.SimpleNamespace(training=True)
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return t


def trl_loss(logp, old_logp, advantages, mask, *, ref_logp=None, entropies=None,
             sampling_logp=None, is_ratio=None, num_items=None, **overrides):
    """``GRPOTrainer._compute_loss`` on these tensors (``overrides``: ``GRPOConfig`` fields).

    Args:
        logp: ``[B, T]`` the policy's log-probs (gradients flow back to it).
        old_logp, ref_logp: ``[B, T]``; ref_logp needed when ``beta != 0``.
        advantages: ``[B]`` or ``[B, T]``. mask: ``[B, T]`` (TRL's completion mask, any dtype).
        entropies: ``[B, T]`` per-token entropies (zeros if None).
        sampling_logp: ``[B, T]`` the sampler's log-probs (``sampling_per_token_logps``).
        is_ratio: the vLLM importance-sampling ratio (``importance_sampling_ratio``).
        num_items: the generation batch's token count (``num_items_in_batch``) for dapo/cispo/
            vespo; default: ``mask.sum()``.
    """
    t = trl_trainer(**overrides)
    ent = torch.zeros_like(logp) if entropies is None else entropies
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, ent, None)
    B, T = mask.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long),
              "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long),
              "completion_mask": mask, "advantages": advantages,
              "old_per_token_logps": old_logp,
              "num_items_in_batch": torch.as_tensor(mask.sum() if num_items is None
                                                    else num_items, dtype=logp.dtype)}
    for key, value in (("ref_per_token_logps", ref_logp),
                       ("sampling_per_token_logps", sampling_logp),
                       ("importance_sampling_ratio", is_ratio)):
        if value is not None:
            inputs[key] = value
    return t._compute_loss(None, inputs)


def _trl_lines(method, start: str, stop: str) -> str:
    """The source lines of ``method`` from the line containing ``start`` up to (not including)
    the line containing ``stop``, dedented; each marker must occur exactly once."""
    lines = inspect.getsource(method).splitlines()
    at = [i for i, line in enumerate(lines) if start in line]
    end = [i for i, line in enumerate(lines) if stop in line]
    if len(at) != 1 or len(end) != 1 or end[0] <= at[0]:
        raise RuntimeError(f"TRL source changed: markers {start!r} ({len(at)}x) / {stop!r} "
                           f"({len(end)}x) in {method.__qualname__}; pin trl==1.16.0")
    return textwrap.dedent("\n".join(lines[at[0]:end[0]]))


def _run_trl_lines(start: str, stop: str, trainer, **variables) -> dict:
    grpo = _modules().grpo
    code = _trl_lines(grpo.GRPOTrainer._generate_and_score_completions, start, stop)
    namespace = dict(vars(grpo), self=trainer, **variables)
    exec(compile(code, f"<{grpo.__file__}: {start}>", "exec"), namespace)  # noqa: S102
    return namespace


def trl_advantages(rewards_per_func, num_generations, *, weights=None, **overrides) -> dict:
    """TRL's advantage lines of ``_generate_and_score_completions`` on ``rewards_per_func``
    ``[B, K]`` (groups = consecutive blocks of ``num_generations``). ``overrides``:
    ``multi_objective_aggregation``, ``scale_rewards``. Returns their variables:
    ``advantages`` [B] (final), ``rewards`` [B] (the summed / normalized-then-summed rewards)."""
    t = trl_trainer(**overrides)
    k = rewards_per_func.shape[1]
    t.reward_weights = torch.ones(k) if weights is None else torch.as_tensor(weights)
    t.reward_weights = t.reward_weights.to(rewards_per_func.dtype)
    t.reward_funcs = [None] * k
    return _run_trl_lines("unscorable_mask = torch.isnan(rewards_per_func)",
                          "# Slice to keep only the local part of the data", t,
                          rewards_per_func=rewards_per_func, num_generations=num_generations,
                          device=rewards_per_func.device)


def trl_vllm_is_ratio(old_logp, sampling_logp, mask, *, mode, clip_max=3.0, clip_min=None):
    """TRL's vLLM importance-sampling ratio lines (``[B, T]`` token modes, ``[B, 1]`` sequence
    modes) for ``vllm_importance_sampling_mode=mode``."""
    t = trl_trainer(use_vllm=True, vllm_importance_sampling_mode=mode,
                    vllm_importance_sampling_clip_max=clip_max,
                    vllm_importance_sampling_clip_min=clip_min)
    ns = _run_trl_lines("per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps)",
                        "# Compute the per-token log probabilities for the reference model", t,
                        mask=mask, old_per_token_logps=old_logp,  # the line before: no tool mask
                        sampling_per_token_logps=sampling_logp, math=math)
    return ns["vllm_importance_sampling_ratio"]


def trl_high_entropy_mask(entropies, mask, threshold):
    """``GRPOTrainer.get_high_entropy_mask`` (one process): H ≥ quantile(H, threshold)."""
    return trl_trainer().get_high_entropy_mask(entropies, mask, threshold)


def trl_off_policy_mask(advantages, logp, sampling_logp, mask, threshold):
    """``GRPOTrainer.get_off_policy_mask``: ``[B, 1]`` 1 = keep."""
    return _modules().grpo.GRPOTrainer.get_off_policy_mask(
        advantages=advantages, per_token_logps=logp, sampling_per_token_logps=sampling_logp,
        mask=mask, off_policy_threshold=threshold)


def trl_gamma_weights(advantages, log_ratio, mask, is_ratio=None, **kw):
    """``GRPOTrainer.get_gamma_weights`` (VESPO's φ, ``[B, 1]``)."""
    return _modules().grpo.GRPOTrainer.get_gamma_weights(
        advantages=advantages, log_ratio_per_token=log_ratio, mask=mask,
        importance_sampling_ratio=is_ratio, **kw)
