"""The "video" job: GRPO-family post-training of a vision-language model on video/image
questions.

``mmrl train configs/video/<recipe>.yaml``: a Video-R1-style JSONL (or the synthetic
"which way does the red square move?" task), prompts from :func:`~mmrl.video.data.build_messages`,
verifiable rewards from :func:`~mmrl.video.vl_rewards.build_vl_reward`, the generic
:class:`~mmrl.video.policy.VLMPolicy` with the family adapter the checkpoint's
``config.model_type`` picks (:mod:`mmrl.video.models`; no family branches here), and the shared
runner (seeding, checkpoints/resume, metrics, ``samples.jsonl``, data parallel). Any preset
works: the job reads only the resolved spec's ``needs_ref`` and ``tw_alpha``. The config section
is :mod:`mmrl.video.config` (torch-free).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict

import torch

from mmrl.config.core import UserError

# ``c`` below is the job's :class:`mmrl.video.config.VideoConfig` (not imported: that module
# imports this one when the job runs)


def _video_kwargs(c) -> Dict[str, Any]:
    kw = dict(mode=c.video_mode, fps=c.fps, max_frames=c.max_frames)
    if c.video_mode == "slow_fast":
        kw.update(token_budget=c.token_budget, min_tokens=c.min_tokens, max_tokens=c.max_tokens)
    return kw


def build_data(c, output_dir: str, seed: int):
    """``(prompts, metadata, dataset, records)``: question strings, and per prompt the record's
    metadata plus its ``messages`` and ``record_index`` (into ``records``)."""
    from .augment import qa_inversion
    from .data import build_messages, format_question, load_vl_dataset
    path = c.data
    if path == "synthetic":
        from .synthetic_task import write_synthetic_task
        path = write_synthetic_task(os.path.join(output_dir, "synthetic"), c.synthetic_num,
                                    kind=c.synthetic_kind, seed=seed)
    try:
        ds = load_vl_dataset(path, limit=c.limit)
    except (OSError, ValueError) as err:  # missing, unreadable, empty or all-malformed file
        raise UserError(f"video.data: {err}") from None
    records = list(ds)
    if c.qa_inversion > 0:
        records = list(qa_inversion(records, prob=c.qa_inversion, seed=seed))
    prompts = [format_question(r, c.template) for r in records]
    metadata = [{**r.metadata(), "record_index": j,
                 "messages": build_messages(r, c.template, system_prompt=c.system_prompt)}
                for j, r in enumerate(records)]
    return prompts, metadata, ds, records


def build_augmenters(c, records, reward_weights, policy=None) -> list:
    """The round augmenters the config asks for (guidance for all-wrong groups first, then
    difficulty, then temporal contrast, so a re-rolled variant is the one contrasted);
    ``policy``: the job's, for guide / expo / xrpo_seed (they retarget hinted rows to the plain
    prompt)."""
    from mmrl.train.guidance import Guidance, build_guidance

    from .augment import DifficultyAugmenter
    from .guidance import VideoHints
    from .rounds import DifficultyRounds, TemporalContrast, _Media
    media = _Media(records, c.template, c.system_prompt, c.fps, c.max_frames)
    guide = build_guidance(c.guidance, Guidance(VideoHints(media), column="accuracy",
                                                start_step=c.guidance_start,
                                                weights=reward_weights),
                           policy, ratios=c.guidance_ratios, exemplars=c.guidance_exemplars,
                           exemplar_pool=c.guidance_exemplar_pool)
    out = [] if guide is None else [guide]
    if c.difficulty_augmentation:
        out.append(DifficultyRounds(DifficultyAugmenter(
            momentum=c.difficulty_momentum, noise_std=c.harder_noise_std,
            drop_ratio=c.harder_drop_ratio, eliminate=c.hint_eliminate), media, reward_weights))
    if c.temporal_contrast:
        out.append(TemporalContrast(media, alpha=c.temporal_alpha, mu=c.temporal_mu))
    from .thinking import build_thinking
    out += build_thinking(c)  # after the others: it reads the final rows
    if c.reward_weighting != "none":  # last: it folds every column into one
        from mmrl.train.reward_weighting import DynamicRewardWeights
        print(f"video: video.reward_weighting is deprecated; use algo.reward_weighting: "
              f"{c.reward_weighting} (and algo.reward_minimize / reward_weighting_lr), which "
              f"every job reads", file=sys.stderr, flush=True)
        out.append(DynamicRewardWeights(c.reward_weighting, reward_weights, c.reward_minimize,
                                        lr=c.reward_weighting_lr))
    return out


def build_policy(c, output_dir: str, device: str, spec=None, pref=None):
    """The :class:`~mmrl.video.policy.VLMPolicy` of a config, its adapter picked by the
    checkpoint's ``config.model_type`` (``model: tiny*`` is built first), with a reference
    when the algorithm (``beta > 0``) or the preference section (a loss that reads the
    reference, or held-out pairs to evaluate) needs one."""
    from .models import TINY_MODELS, build_default_tiny
    from .policy import VLMPolicy, load_vlm
    path = c.model
    if path in TINY_MODELS:
        path = build_default_tiny(path, output_dir)
    model, processor = load_vlm(
        path, dtype=c.dtype, device=device, finetune=c.finetune, lora_rank=c.lora_rank,
        lora_alpha=c.lora_alpha, lora_targets=c.lora_targets, freeze_vision=c.freeze_vision,
        gradient_checkpointing=c.gradient_checkpointing)
    policy = VLMPolicy(model, processor, temperature=c.temperature, top_p=c.top_p,
                          max_new_tokens=c.max_new_tokens, stop=c.stop,
                          allowed_answers=c.allowed_answers, video=_video_kwargs(c),
                          tw_alpha=spec.tw_alpha if spec is not None else 1.7,
                          tw_chunk=c.tw_chunk, device=device, template=c.template,
                          system_prompt=c.system_prompt, shared_prefix=c.shared_prefix)
    if (spec is not None and spec.needs_ref) or (pref is not None and _pref_needs_ref(pref)):
        policy.enable_reference()
    return policy


def read_pair_file(path: str):
    """The video job's pair files (``pref.pairs_file``, ``pref.eval_pairs``):
    :func:`mmrl.video.pairs.load_pairs` (every bad line at once, media relative to the file's
    folder, missing media skipped and reported), its errors as the user's."""
    from .pairs import load_pairs
    try:
        pairs = load_pairs(path)
    except (OSError, ValueError) as err:
        raise UserError(f"pair file: {err}") from None
    if pairs.skipped:
        print(f"video: {path}: skipped {len(pairs.skipped)} pair(s) "
              f"({pairs.skip_counts()}), e.g. {pairs.skipped[0].message}", flush=True)
    return pairs


def _pref_needs_ref(pref) -> bool:
    """Does the ``pref`` section score against the reference (its loss, or eval pairs)?"""
    return pref.eval_pairs is not None or (pref.mode != "off" and pref.resolve().needs_ref)


def run(config) -> Dict[str, Any]:
    """Train the video job's ``config`` -> the runner's summary plus ``skipped_records`` and
    ``skipped_videos``."""
    from mmrl.train.runner import run_training

    from .vl_rewards import build_vl_reward
    c = config.task
    out = config.train.output_dir
    device = config.train.device
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    torch.manual_seed(config.train.seed)
    spec = config.algo.resolve()
    prompts, metadata, ds, records = build_data(c, out, config.train.seed)
    if ds.skipped:
        print(f"video: {ds.skip_report()}", flush=True)
    reward = build_vl_reward(c.rewards)
    if not config.algo.reward_weights:
        config.algo.reward_weights = dict(reward.weights)
        if c.temporal_contrast:
            from .rounds import TEMPORAL_COLUMN
            config.algo.reward_weights[TEMPORAL_COLUMN] = 1.0
        from .thinking import thinking_columns
        config.algo.reward_weights.update(thinking_columns(c.length_reward, c.mode_reward))
    policy = build_policy(c, out, device, spec, config.pref)
    verifier = None  # VerIPO's verifier: video rewards named by pref.verifier
    if config.pref.verifier is not None:
        from .config import verifier_spec
        verifier = build_vl_reward(verifier_spec(config.pref.verifier))
    from .sft import build_sft_stage
    t = config.train
    sft = build_sft_stage(c, records, t.prompts_per_step, t.group_size, t.seed)
    try:
        summary = run_training(config, policy, reward, prompts, metadata,
                               augmenters=build_augmenters(c, records, config.algo.reward_weights,
                                                           policy),
                               verifier=verifier, read_pairs=read_pair_file, sft=sft)
    finally:  # also when the run stops because every video was unreadable: say which ones
        if policy.skips.total:
            examples = "".join(f"\n  {e}" for e in policy.skips.examples)
            print(f"video: skipped {policy.skips.summary()}; e.g.:{examples}", flush=True)
    summary["skipped_records"] = len(ds.skipped)
    summary["skipped_videos"] = policy.skips.total
    return summary
