"""mmrl: group-relative RL (GRPO and its family) for video-language and flow-matching image models.

The core (this package) depends on torch, numpy and pyyaml only, in layers (each imports only
the ones above it; tests/test_structure.py checks it, function-level imports included)::

    mmrl.registry            named choices with "did you mean" errors
    mmrl.fields              a config field declared once: type, default, bounds, doc, source
    mmrl.algo                the math: advantages, losses, presets, token weights, shaping
    mmrl.budget              prompt selection, rollout budgets, their simulator
    mmrl.config              config fields, YAML, the run config's sections, the job registry
    mmrl.train               policy contract, loop, rounds, runner, checkpoints, data parallel
    mmrl.demo                the pure-torch toy job
    mmrl.cli                 the ``mmrl`` command

Domain packages: ``mmrl.video`` (transformers VLMs), ``mmrl.diffusion`` (diffusers flow models),
``mmrl.rewards`` (reward models and their evaluation).

Public core API (imported on first use: ``import mmrl`` itself does not load torch)::

    group_advantages(rewards, group_ids, method="grpo", **hp) -> Tensor[B]
    policy_loss(logp, old_logp, advantages, mask, *, algo="grpo", ...) -> (loss, stats)
    PolicyLoss(algo, **overrides)      # resolved once, called like policy_loss
    kl_penalty(logp, ref_logp, kind="k3") -> Tensor[B, T]
    tw_token_weights(full_logp, mask, *, alpha=1.7, chunk_size=64) -> Tensor[N, T]
    logp_and_entropy(logits_or_chunk_fn, tokens, *, chunk_size=64) -> (Tensor[B, T], Tensor[B, T])
    top_entropy_mask(entropy, mask, quantile) -> BoolTensor[B, T]
    soft_overlong_penalty(lengths, max_len, cache_len) -> Tensor[B]
    PRESETS, resolve_algo(name, **overrides)
    PreferenceLoss(preset="dpo", **overrides)   # DPO family: (chosen, rejected) -> (loss, stats)
    PREF_PRESETS, resolve_pref(name, **overrides); best_worst_pairs, win_rates, level_pairs
    evaluate_reward(fn, samples, prompts, metadata) -> RewardBatch
"""
from mmrl import _moved
from mmrl._lazy import lazy_exports

__version__ = "0.1.0"

_moved.install()  # old flat module paths (mmrl.losses, ...) still import, with a warning

__getattr__, __dir__, __all__ = lazy_exports("mmrl", {
    "mmrl.algo.advantages": ("ADVANTAGES", "group_advantages", "group_stats"),
    "mmrl.algo.losses": ("AGGREGATIONS", "KL_ESTIMATORS", "OBJECTIVES", "RATIO_LEVELS",
                         "PolicyLoss", "kl_penalty", "policy_loss"),
    "mmrl.algo.presets": ("PRESETS", "AlgoSpec", "algo_problems", "resolve_algo"),
    "mmrl.registry": ("Registry",),
    "mmrl.train.reward_fn": ("CombinedReward", "RewardBatch", "RewardFn", "evaluate_reward"),
    "mmrl.algo.shaping": ("soft_overlong_penalty",),
    "mmrl.algo.token_weights": ("tw_token_weights",),
    "mmrl.algo.entropy": ("logp_and_entropy", "token_entropy", "top_entropy_mask"),
    "mmrl.algo.pref_presets": ("PREF_PRESETS", "PrefSpec", "pref_problems", "resolve_pref"),
    "mmrl.algo.pref_losses": ("PREF_LOSSES", "PreferenceLoss"),
    "mmrl.algo.pref_pairs": ("best_worst_pairs", "level_pairs", "win_rates"),
})
