"""The training runtime shared by every domain: the policy contract and rollouts, the GRPO loop,
rollout rounds, the runner (seeding, checkpoints, exact resume, metrics), data parallelism
(DDP / FSDP2), the reward interface and the run folder. Names are imported on first use."""
from mmrl._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports("mmrl.train", {
    ".loop": ("Rollout", "GroupPolicy", "LoopSettings", "collect", "learn", "train_step",
              "update", "compute_advantages", "train_batch"),
    ".batch": ("Batch", "batch_advantages"),
    ".policy": ("Capabilities", "check_policy"),
    ".rounds": ("Round", "RoundAugmenter", "Rounds", "RoundSettings", "concat_rollouts"),
    ".runner": ("Run", "run_training", "seed_everything", "RunStopped"),
    ".reward_fn": ("CombinedReward", "RewardBatch", "RewardFn", "evaluate_reward"),
    ".preference": ("PrefScores", "preference_step", "pair_accuracy"),
    ".pref_stage": ("PrefStage", "read_pair_records"),
})
