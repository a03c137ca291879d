"""mmrl.rewards: image reward models, their composition, a reward server and their evaluation.

``load(name, path=None, device=None, dtype=None, **options)`` returns a scorer called as
``scorer(images, prompts) -> Tensor[B]`` (float32); scorers also satisfy the core reward interface
``fn(samples, prompts, metadata)`` and can be passed to a trainer directly. Registered names:
``pickscore``, ``hps_v2``, ``hps_v2.1``, ``clip_score``, ``aesthetic``, ``imagereward``,
``jpeg_compressibility``, ``brightness``, ``color``, ``prompt_color``, ``remote``; video scorers
(``scorer(videos [B, F, 3, H, W], prompts)``, ``media = "video"``): ``frames`` (any image
scorer on sampled frames), ``motion_direction``, ``flicker``, ``brightness_trend``.
``candidate_probs(scores, prompts)`` turns logits (PickScore's) into probabilities over each
prompt's candidates. See docs/rewards.md.
"""
from mmrl._lazy import lazy_exports

# Imported on first use (PEP 562): ``mmrl reward --help`` and the reward specs in a config are
# read without torch or a reward model's stack.
__getattr__, __dir__, __all__ = lazy_exports("mmrl.rewards", {
    "mmrl.rewards.base": ("Scorer", "WeightsNotFoundError"),
    "mmrl.rewards.video": ("VideoScorer", "FrameScorer"),
    "mmrl.rewards.scorers": ("SCORERS", "ComposedScorer", "candidate_probs", "compose", "load",
                             "parse_spec", "parse_specs"),
})
