"""mmrl: group-relative RL (GRPO and its family) for video-language and flow-matching image models.

The core (this package) depends on torch, numpy and pyyaml only. Domain packages:
``mmrl.video`` (transformers / Qwen2.5-VL), ``mmrl.diffusion`` (diffusers / SD3, FLUX),
``mmrl.rewards`` (reward models and their evaluation).
"""
from mmrl.registry import Registry
from mmrl.reward_fn import CombinedReward, RewardBatch, RewardFn, evaluate_reward

__version__ = "0.1.0"
