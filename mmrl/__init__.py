"""mmrl: group-relative RL (GRPO and its family) for video-language and flow-matching image models.

The core (this package) depends on torch, numpy and pyyaml only. Domain packages:
``mmrl.video`` (transformers / Qwen2.5-VL), ``mmrl.diffusion`` (diffusers / SD3, FLUX),
``mmrl.rewards`` (reward models and their evaluation).

Public core API::

    group_advantages(rewards, group_ids, method="grpo", **hp) -> Tensor[B]
    policy_loss(logp, old_logp, advantages, mask, *, algo="grpo", ...) -> (loss, stats)
    PolicyLoss(algo, **overrides)      # resolved once, called like policy_loss
    kl_penalty(logp, ref_logp, kind="k3") -> Tensor[B, T]
    tw_token_weights(full_logp, mask, *, alpha=1.7, chunk_size=64) -> Tensor[N, T]
    soft_overlong_penalty(lengths, max_len, cache_len) -> Tensor[B]
    PRESETS, resolve_algo(name, **overrides)
    evaluate_reward(fn, samples, prompts, metadata) -> RewardBatch
"""
from mmrl.advantages import ADVANTAGES, group_advantages, group_stats
from mmrl.losses import (AGGREGATIONS, KL_ESTIMATORS, OBJECTIVES, RATIO_LEVELS, PolicyLoss,
                         kl_penalty, policy_loss)
from mmrl.presets import PRESETS, AlgoSpec, algo_problems, resolve_algo
from mmrl.registry import Registry
from mmrl.reward_fn import CombinedReward, RewardBatch, RewardFn, evaluate_reward
from mmrl.shaping import soft_overlong_penalty
from mmrl.token_weights import tw_token_weights

__version__ = "0.1.0"

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "KL_ESTIMATORS", "OBJECTIVES", "RATIO_LEVELS", "PRESETS",
    "AlgoSpec", "CombinedReward", "PolicyLoss", "Registry", "RewardBatch", "RewardFn",
    "algo_problems", "evaluate_reward", "group_advantages", "group_stats", "kl_penalty",
    "policy_loss", "resolve_algo", "soft_overlong_penalty", "tw_token_weights",
]
