"""The axes of an algorithm, without torch: each axis's registry (the live one once its module is
imported, else a table of the built-in entries with the flags the checks read).

Validating a config (``mmrl config validate``) must not load torch, so :func:`axis_registry`
answers from :data:`_BUILTIN` until the implementing module (mmrl.algo.ratios, objectives,
aggregations, kl, advantages, offpolicy) is imported; after that the live registry answers, so
entries a user registers count too. tests/config/test_algo_fields.py checks that the table equals
the built-in registries.
"""
from __future__ import annotations

import sys
import types

from mmrl.registry import Registry

TOKEN_WEIGHTINGS = ("none", "tw")
EMPTY_ROWS = ("count", "skip")
# advantages below the row (``algo.step_advantage``, :mod:`mmrl.train.steps`): name -> what the
# rollout must carry: per-step rewards and anchor states from the job (``job_steps``), or
# Monte-Carlo values at cut points from the policy's continuations (``mc_values``)
STEP_ADVANTAGES = {"none": dict(job_steps=False, mc_values=False),
                   "gigpo": dict(job_steps=True, mc_values=False),
                   "spo_chain": dict(job_steps=False, mc_values=True)}

# The built-in entries of each axis and the flags the checks read (see the module docstring).
_BUILTIN = {
    ("advantage", "mmrl.algo.advantages", "ADVANTAGES"): {
        **{n: dict(needs_lengths=False, needs_baseline=False) for n in (
            "batch_std", "grpo", "mean_center", "ngrpo", "rloo", "passk", "gpg")},
        **{n: dict(needs_lengths=True, needs_baseline=False) for n in (
            "reinforce_pp", "reinforce_pp_baseline", "opo")},
        "remax": dict(needs_lengths=False, needs_baseline=True),
        **{n: dict(needs_lengths=False, needs_baseline=False, needs_seq_logp=True)
           for n in ("unlikeliness", "novelty_sharpen")},
        "mixed_var": dict(needs_lengths=False, needs_baseline=False),
        "reward": dict(needs_lengths=False, needs_baseline=False)},
    ("multi-reward advantage", "mmrl.algo.advantages", "MULTI_REWARD"): {
        "normalize_then_sum": dict(one_column=False), "sum_then_normalize": dict(one_column=False),
        "gdpo": dict(one_column=True), "posterior_gate": dict(one_column=False)},
    ("ratio level", "mmrl.algo.ratios", "RATIO_LEVELS"): {
        "token": dict(per_sequence=False, whole_sequence=False, needs_step_terms=False),
        "sequence": dict(per_sequence=True, whole_sequence=True, needs_step_terms=False),
        "sequence_token": dict(per_sequence=False, whole_sequence=True, needs_step_terms=False),
        "sequence_sum": dict(per_sequence=True, whole_sequence=True, needs_step_terms=False),
        "ratio_norm": dict(per_sequence=False, whole_sequence=False, needs_step_terms=True)},
    ("objective", "mmrl.algo.objectives", "OBJECTIVES"): {
        "clip": dict(needs_groups=False, needs_per_sequence=False, needs_token_ratio=False,
                     whole_sequence=False, binary_rewards=False),
        "sapo": dict(needs_groups=False, needs_per_sequence=False, needs_token_ratio=False,
                     whole_sequence=False, binary_rewards=False),
        "reg": dict(needs_groups=True, needs_per_sequence=True, needs_token_ratio=False,
                    whole_sequence=False, binary_rewards=False),
        **{n: dict(needs_groups=False, needs_per_sequence=False, needs_token_ratio=True,
                   whole_sequence=n in ("clip_cov", "kl_cov", "vespo"), binary_rewards=False)
           for n in ("cispo", "cispo_cap", "clip_cov", "gpg", "kl_cov", "vespo")},
        "drpo": dict(needs_groups=True, needs_per_sequence=False, needs_token_ratio=True,
                     whole_sequence=True, binary_rewards=True)},
    ("aggregation", "mmrl.algo.aggregations", "AGGREGATIONS"): {
        "token_mean": dict(per_sequence=False, averages_rows=False),
        "seq_mean_token_mean": dict(per_sequence=False, averages_rows=True),
        "seq_mean_token_sum": dict(per_sequence=False, averages_rows=True),
        "fixed_norm": dict(per_sequence=False, averages_rows=True),
        "seq_mean": dict(per_sequence=True, averages_rows=True)},
    ("KL estimator", "mmrl.algo.kl", "KL_ESTIMATORS"): {n: {} for n in ("k1", "k2", "k3")},
    ("rollout correction", "mmrl.algo.offpolicy", "ROLLOUT_CORRECTIONS"): {
        "none": dict(per_sequence=False, needs_rollout_logp=False),
        **{n: dict(per_sequence=n.startswith("sequence"), needs_rollout_logp=True)
           for n in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")}},
    ("off-policy shaping", "mmrl.algo.offpolicy", "OFF_POLICY_SHAPINGS"): {
        n: dict(whole_rows=n == "percentile") for n in ("none", "percentile", "constant", "power")},
}
_AXIS_OF = {"advantage": "ADVANTAGES", "multi_reward": "MULTI_REWARD",
            "ratio_level": "RATIO_LEVELS", "objective": "OBJECTIVES",
            "aggregation": "AGGREGATIONS", "kl": "KL_ESTIMATORS",
            "rollout_is": "ROLLOUT_CORRECTIONS", "off_policy_shaping": "OFF_POLICY_SHAPINGS"}


def _static(axis: str, entries: dict) -> Registry:
    table: Registry = Registry(axis)
    for name, flags in entries.items():
        table.register(name, types.SimpleNamespace(**flags))
    return table


_STATIC = {key[2]: (key[1], _static(key[0], entries)) for key, entries in _BUILTIN.items()}


def axis_registry(axis: str) -> Registry:
    """The registry of ``axis`` (``"objective"``, ``"ratio_level"``, ...): the live one when its
    module is imported (user entries included), else the torch-free table of built-in entries
    (same names, flags and error messages)."""
    module, table = _STATIC[_AXIS_OF[axis]]
    live = getattr(sys.modules.get(module), _AXIS_OF[axis], None)
    return live if live is not None else table


def _axis_doc(axis: str) -> str:
    return ", ".join(_STATIC[_AXIS_OF[axis]][1].names())
