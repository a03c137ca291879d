"""The "video" job: GRPO-family post-training of Qwen2.5-VL on video/image questions.

``mmrl train configs/video/<recipe>.yaml``: a Video-R1-style JSONL (or the synthetic
"which way does the red square move?" task), prompts from :func:`~mmrl.video.data.build_messages`,
verifiable rewards from :func:`~mmrl.video.vl_rewards.build_vl_reward`, the policy in
:mod:`mmrl.video.policy`, and the shared runner (seeding, checkpoints/resume, metrics,
``samples.jsonl``, data parallel). Any preset works: the job reads only the resolved spec's
``needs_ref`` and ``tw_alpha``. transformers/peft are imported inside :func:`run`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from mmrl.config.core import UserError, cfg
from mmrl.config.jobs import Job, register_job

_REWARDS = {"accuracy": 1.0, "think_answer_format": 0.5}


@dataclass
class VideoConfig:
    """Model, data, decoding and video inputs of the video trainer."""

    model: str = cfg("Qwen/Qwen2.5-VL-7B-Instruct", "Hub id or local folder of a Qwen2-VL, "
                     "Qwen2.5-VL or Qwen3-VL checkpoint (model + processor); 'tiny' builds a "
                     "~190k-parameter Qwen2.5-VL in <output_dir>/tiny_qwen_vl (the demo), "
                     "'tiny_qwen2' / 'tiny_qwen3' a tiny Qwen2-VL / Qwen3-VL in "
                     "<output_dir>/tiny_qwen2_vl / tiny_qwen3_vl.",
                     source="Video-R1 arXiv 2503.21776")
    data: str = cfg("synthetic", "Video-R1-style JSONL (problem, options, solution, "
                    "problem_type, data_type, path), or 'synthetic' for the generated "
                    "moving-square task in <output_dir>/synthetic.")
    limit: Optional[int] = cfg(None, "Use only the first N good records (null = all).", minimum=1)
    synthetic_kind: str = cfg("direction", "Synthetic task: direction (which way the square "
                              "moves) or color (which colour it is).",
                              choices=["direction", "color"])
    synthetic_num: int = cfg(256, "Synthetic task: number of videos generated.", minimum=1)
    template: str = cfg("video_r1", "Prompt template: video_r1, tw_grpo or plain.",
                        choices=["video_r1", "tw_grpo", "plain"], source="mmrl.video.data")
    system_prompt: Optional[str] = cfg(None, "Optional system message.")
    rewards: Dict[str, Any] = cfg(doc="Reward spec for build_vl_reward: {name: weight} or "
                                  "{name: {weight: w, **options}}; the weights become "
                                  "algo.reward_weights unless those are set.",
                                  default_factory=lambda: dict(_REWARDS),
                                  source="Video-R1 (accuracy + format)")
    qa_inversion: float = cfg(0.0, "Probability of adding a question-answer inverted copy of "
                              "each multiple-choice record.", minimum=0.0, maximum=1.0,
                              source="TW-GRPO arXiv 2505.24718")
    finetune: str = cfg("lora", "lora (peft adapter on the language model; reference = adapter "
                        "disabled) or full (reference = frozen copy).", choices=["lora", "full"])
    lora_rank: int = cfg(64, "LoRA rank.", minimum=1)
    lora_alpha: int = cfg(128, "LoRA alpha (scale alpha / rank).", minimum=1)
    lora_targets: List[str] = cfg(doc="Language-model linear layers that get LoRA.",
                                  default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                           "gate_proj", "up_proj", "down_proj"])
    freeze_vision: bool = cfg(True, "Freeze the vision tower and merger (Video-R1 does).")
    gradient_checkpointing: bool = cfg(False, "Recompute activations in backward (less memory).")
    dtype: str = cfg("bfloat16", "Weights dtype: float32, bfloat16, float16.",
                     choices=["float32", "bfloat16", "float16"])
    temperature: float = cfg(1.0, "Sampling temperature (logp is of the scaled distribution).",
                             minimum=1e-3, source="Video-R1 (1.0)")
    top_p: float = cfg(1.0, "Nucleus sampling mass.", minimum=1e-3, maximum=1.0)
    max_new_tokens: int = cfg(768, "Most tokens per completion.", minimum=1,
                              source="Video-R1 (768)")
    stop: List[str] = cfg(doc="Stop strings (a completion ends after the first one).",
                          default_factory=list)
    allowed_answers: List[str] = cfg(doc="Constrained decoding: sample only the tokens of these "
                                     "strings and the end token (the demo's answer letters); "
                                     "empty = the whole vocabulary.", default_factory=list)
    video_mode: str = cfg("uniform", "Video tokens: uniform (qwen-vl-utils) or slow_fast "
                          "(Keye-VL 1.5).", choices=["uniform", "slow_fast"])
    fps: float = cfg(2.0, "Frames sampled per second.", minimum=0.01, source="Video-R1 (2)")
    max_frames: Optional[int] = cfg(16, "Most frames per video.", minimum=2,
                                    source="Video-R1 (16)")
    token_budget: int = cfg(16384, "slow_fast: visual tokens per video.", minimum=1)
    min_tokens: int = cfg(48, "slow_fast: fewest tokens per frame.", minimum=1)
    max_tokens: int = cfg(768, "slow_fast: most tokens per slow frame.", minimum=1)
    tw_chunk: int = cfg(64, "TW-GRPO: positions per chunk of full-vocabulary log-probs.",
                        minimum=1)
    difficulty_augmentation: bool = cfg(
        False, "Re-roll each group whose rewards are all equal once as a harder variant "
        "(frames dropped and noised) when its mean is above the moving reference, or an easier "
        "one (a hint) when below; the variant replaces the group.",
        source="DeepVideo-R1 arXiv 2506.07464")
    difficulty_momentum: float = cfg(0.9, "Momentum of the moving reference of group-mean "
                                     "reward.", minimum=0.0, maximum=0.999)
    harder_noise_std: float = cfg(25.0, "Harder variant: Gaussian pixel noise (uint8 units).",
                                  minimum=0.0)
    harder_drop_ratio: float = cfg(0.25, "Harder variant: fraction of frames dropped.",
                                   minimum=0.0, maximum=0.9)
    hint_eliminate: int = cfg(1, "Easier variant of a multiple-choice question: wrong options "
                              "ruled out in the hint.", minimum=1)
    temporal_contrast: bool = cfg(
        False, "T-GRPO: also roll out every video group on shuffled frames (scored, not "
        "trained); correct samples of a group with accuracy p >= temporal_mu * p(shuffled) get "
        "+temporal_alpha in a 'temporal' reward column.", source="Video-R1 arXiv 2503.21776")
    temporal_alpha: float = cfg(0.3, "T-GRPO bonus α.", minimum=0.0, source="Video-R1 (0.3)")
    temporal_mu: float = cfg(0.8, "T-GRPO ratio μ.", minimum=0.0, source="Video-R1 (0.8)")

    def problems(self) -> List[str]:
        out = []
        if self.data != "synthetic" and not self.data.endswith((".jsonl", ".json")):
            out.append(f"data: got {self.data!r}; expected a .jsonl/.json file or "
                       f"'synthetic'")
        if not self.rewards:
            out.append("rewards: empty; name at least one reward, e.g. {accuracy: 1.0}")
        if self.temporal_contrast and "accuracy" not in self.rewards:
            out.append("temporal_contrast needs the 'accuracy' reward in video.rewards")
        if self.min_tokens > self.max_tokens:
            out.append(f"min_tokens={self.min_tokens} > max_tokens={self.max_tokens}")
        if self.rewards:
            out.extend(reward_spec_problems(self.rewards))
        return out


def reward_spec_problems(spec) -> List[str]:
    """``video.rewards`` problems (keys relative to the section): the spec is built (cheap:
    rule rewards, no model); a ``ValueError``/``TypeError`` it raises (unknown name, bad option,
    bad weight) or a weight that is not finite is reported."""
    import math

    from .vl_rewards import build_vl_reward
    try:
        weights = build_vl_reward(spec).weights
    except (ValueError, TypeError) as err:
        return [f"rewards: {err}"]
    return [f"rewards: {name} weight={w!r}; expected a finite number"
            for name, w in weights.items() if not math.isfinite(w)]


def check(algo, train, c: VideoConfig) -> List[str]:
    """Cross-section problems of a video config (prompt counts known before reading data)."""
    out = []
    if c.data == "synthetic" and c.synthetic_num < train.prompts_per_step:
        out.append(f"video.synthetic_num: got {c.synthetic_num}, fewer than train."
                   f"prompts_per_step={train.prompts_per_step} (a step draws that many distinct "
                   f"prompts); raise synthetic_num or lower prompts_per_step")
    if c.limit is not None and c.limit < train.prompts_per_step:
        out.append(f"video.limit: got {c.limit}, fewer than train.prompts_per_step="
                   f"{train.prompts_per_step}; raise the limit or lower prompts_per_step")
    return out


def preflight(config) -> List[str]:
    """The data file and the model exist on this machine (nothing is read or loaded)."""
    from mmrl.config.jobs import file_problems, model_problems

    from .tiny import TINY_MODELS
    c: VideoConfig = config.task
    out = []
    if c.data != "synthetic":
        out.extend(file_problems("video.data", c.data, "data file"))
    if c.model not in TINY_MODELS:
        out.extend(model_problems("video.model", c.model, "config.json"))
    return out


def _video_kwargs(c: VideoConfig) -> Dict[str, Any]:
    kw = dict(mode=c.video_mode, fps=c.fps, max_frames=c.max_frames)
    if c.video_mode == "slow_fast":
        kw.update(token_budget=c.token_budget, min_tokens=c.min_tokens, max_tokens=c.max_tokens)
    return kw


def build_data(c: VideoConfig, output_dir: str, seed: int):
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


def build_augmenters(c: VideoConfig, records, reward_weights) -> list:
    """The round augmenters the config asks for (difficulty first, then temporal contrast, so
    a re-rolled variant is the one contrasted)."""
    from .augment import DifficultyAugmenter
    from .rounds import DifficultyRounds, TemporalContrast, _Media
    media = _Media(records, c.template, c.system_prompt, c.fps, c.max_frames)
    out = []
    if c.difficulty_augmentation:
        out.append(DifficultyRounds(DifficultyAugmenter(
            momentum=c.difficulty_momentum, noise_std=c.harder_noise_std,
            drop_ratio=c.harder_drop_ratio, eliminate=c.hint_eliminate), media, reward_weights))
    if c.temporal_contrast:
        out.append(TemporalContrast(media, alpha=c.temporal_alpha, mu=c.temporal_mu))
    return out


def build_policy(c: VideoConfig, output_dir: str, device: str, spec=None):
    """The :class:`~mmrl.video.policy.QwenVLPolicy` of a config (``model: tiny*`` is built)."""
    from .policy import QwenVLPolicy, load_qwen_vl
    from .tiny import TINY_MODELS, build_default_tiny
    path = c.model
    if path in TINY_MODELS:
        path = build_default_tiny(path, output_dir)
    model, processor = load_qwen_vl(
        path, dtype=c.dtype, device=device, finetune=c.finetune, lora_rank=c.lora_rank,
        lora_alpha=c.lora_alpha, lora_targets=c.lora_targets, freeze_vision=c.freeze_vision,
        gradient_checkpointing=c.gradient_checkpointing)
    policy = QwenVLPolicy(model, processor, temperature=c.temperature, top_p=c.top_p,
                          max_new_tokens=c.max_new_tokens, stop=c.stop,
                          allowed_answers=c.allowed_answers, video=_video_kwargs(c),
                          tw_alpha=spec.tw_alpha if spec is not None else 1.7,
                          tw_chunk=c.tw_chunk, device=device)
    if spec is not None and spec.needs_ref:
        policy.enable_reference()
    return policy


def run(config) -> Dict[str, Any]:
    import torch

    from mmrl.train.runner import run_training

    from .vl_rewards import build_vl_reward
    c: VideoConfig = config.task
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
    policy = build_policy(c, out, device, spec)
    try:
        summary = run_training(config, policy, reward, prompts, metadata,
                               augmenters=build_augmenters(c, records, config.algo.reward_weights))
    finally:  # also when the run stops because every video was unreadable: say which ones
        if policy.skips.total:
            examples = "".join(f"\n  {e}" for e in policy.skips.examples)
            print(f"video: skipped {policy.skips.summary()}; e.g.:{examples}", flush=True)
    summary["skipped_records"] = len(ds.skipped)
    summary["skipped_videos"] = policy.skips.total
    return summary


register_job(Job("video", VideoConfig, run,
                 "Qwen2.5-VL GRPO-family training on video/image questions (Video-R1 data, "
                 "verifiable rewards)", check=check, preflight=preflight,
                 algo_defaults=lambda c: {"max_len": c.max_new_tokens}))
