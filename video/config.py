"""The "video" job's config section: :class:`VideoConfig`, its cross-checks (:func:`check`),
the file checks before a run (:func:`preflight`), the ``algo`` defaults it implies, and the job's
registration. Torch-free: module-level imports are the standard library and ``mmrl.config`` only;
the run itself is :func:`mmrl.video.job.run`, imported when the job starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from mmrl.config.core import UserError, cfg
from mmrl.config.jobs import Job, register_job
from mmrl.train.guidance_options import (guidance_exemplar_pool_field, guidance_exemplars_field,
                                          guidance_field, guidance_ratios_field,
                                          guidance_start_field, guide_problems, ratio_problems)

_REWARDS = {"accuracy": 1.0, "think_answer_format": 0.5}


@dataclass
class VideoConfig:
    """Model, data, decoding and video inputs of the video trainer."""

    model: str = cfg("Qwen/Qwen2.5-VL-7B-Instruct", "Hub id or local folder of a checkpoint "
                     "(model + processor) of a registered family (mmrl.video.models: Qwen2-VL, "
                     "Qwen2.5-VL, Qwen3-VL, ...; picked by config.model_type); 'tiny' builds a "
                     "~190k-parameter Qwen2.5-VL in <output_dir>/tiny_qwen_vl (the demo), "
                     "'tiny_qwen2' / 'tiny_qwen3' a tiny Qwen2-VL / Qwen3-VL in "
                     "<output_dir>/tiny_qwen2_vl / tiny_qwen3_vl (every tiny name: "
                     "mmrl.video.models.TINY_MODELS).",
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
    shared_prefix: bool = cfg(
        True, "Run each unique prompt once per forward: sampling prefills it once for its G "
        "rows, and the training passes (logp, reference, TW weights, entropy, preference "
        "scores) pack its rows' responses behind it under an explicit attention mask; equal "
        "values and gradients to the repeated-prompt forward (false: the reference path). "
        "Needs attn_implementation sdpa or eager.", source="Prefix Grouper arXiv 2506.05433")
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
    tw_chunk: int = cfg(64, "TW-GRPO weights and the entropy options (algo.entropy_coef, "
                        "algo.top_entropy_quantile): positions per chunk of full-vocabulary "
                        "log-probs.", minimum=1)
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
    reward_weighting: str = cfg(
        "none", "Deprecated: use algo.reward_weighting (every job; the same modes, with "
        "algo.reward_minimize / algo.reward_weighting_lr); this one still works, with a "
        "warning, and not together with it. none; hypervolume; gradient.",
        choices=["none", "hypervolume", "gradient"],
        source="arXiv 2509.11452; yining610/dynamic-reward-weighting")
    reward_minimize: List[str] = cfg(doc="Deprecated (algo.reward_minimize). "
                                     "reward_weighting hypervolume: reward columns to "
                                     "minimize (e.g. a length); the rest are maximized.",
                                     default_factory=list)
    reward_weighting_lr: float = cfg(1e-6, "Deprecated (algo.reward_weighting_lr). "
                                     "reward_weighting gradient: step eta of "
                                     "w <- softmax(log w + eta*I/1e-5) (the release: the "
                                     "actor's learning rate).", above=0.0,
                                     source="arXiv 2509.11452 (lr 1e-6)")
    guidance: str = guidance_field("Hints from the records' hints / solution_steps.")
    guidance_ratios: List[float] = guidance_ratios_field()
    guidance_start: int = guidance_start_field()
    guidance_exemplars: int = guidance_exemplars_field()
    guidance_exemplar_pool: str = guidance_exemplar_pool_field()
    think_style: str = cfg("tags", "How a completion's thought is read (video.length_reward, "
                           "mode_reward, the think_frac metric): tags (inside <think>...</think>) "
                           "or filler (every character before a one-character answer).",
                           choices=["tags", "filler"], source="mmrl.video.thinking")
    length_reward: str = cfg(
        "none", "Length reward of correct answers: none; kimi (a 'length' column, Kimi k1.5's "
        "0.5 - (L - min)/(max - min) per group); grpo_lambda (the same only in groups whose "
        "accuracy >= length_switch_accuracy; unconfirmed); serial_decay (accuracy of correct rows "
        "-> serial_decay^k by token count; unconfirmed).",
        choices=["none", "kimi", "grpo_lambda", "serial_decay"],
        source="Kimi k1.5 arXiv 2501.12599; GRPO-lambda arXiv 2505.18086; S-GRPO arXiv 2505.07686")
    length_switch_accuracy: Optional[float] = cfg(
        None, "grpo_lambda: group accuracy from which the length reward is on (no default: the "
        "paper's rule is not confirmed).", minimum=0.0, maximum=1.0, source="arXiv 2505.18086")
    serial_decay: Optional[float] = cfg(
        None, "serial_decay: reward decay^k of the k-th earliest-exiting correct answer of a "
        "group (0.5: 1, 1/2, 1/4, ...; no default, unconfirmed).", above=0.0, maximum=1.0,
        source="arXiv 2505.07686")
    mode_reward: bool = cfg(False, "Add a 'mode' column: 1 for rows in the group's more accurate "
                            "mode (think / no-think, ties to no-think); unconfirmed reading of "
                            "Step-SRPO.", source="KAT-V1 arXiv 2507.08297")
    sft_steps: int = cfg(0, "SFT steps before RL (the run's first steps, counted in "
                         "train.steps): token-mean cross-entropy of targets built from the "
                         "records (<think>reasoning</think><answer>a</answer>; think_style "
                         "filler: spaces + the letter), prompts_per_step records x group_size "
                         "targets a step, same optimizer and trainable weights. TON's first "
                         "stage.",
                         minimum=0, source="TON arXiv 2505.16854; mmrl.video.sft")
    thought_dropout: float = cfg(0.0, "SFT targets: probability that a target's thought is "
                                 "replaced by an empty one (tags: an empty <think></think> "
                                 "block; filler: the letter alone).", minimum=0.0, maximum=1.0,
                                 source="TON arXiv 2505.16854 (0.5)")
    sft_lr: Optional[float] = cfg(None, "Learning rate of the SFT steps (null = train.lr).",
                                  above=0.0)

    def problems(self) -> List[str]:
        out = []
        if self.data != "synthetic" and not self.data.endswith((".jsonl", ".json")):
            out.append(f"data: got {self.data!r}; expected a .jsonl/.json file or "
                       f"'synthetic'")
        if not self.rewards:
            out.append("rewards: empty; name at least one reward, e.g. {accuracy: 1.0}")
        if self.temporal_contrast and "accuracy" not in self.rewards:
            out.append("temporal_contrast needs the 'accuracy' reward in video.rewards")
        out.extend(ratio_problems(self.guidance_ratios))
        if self.guidance != "none" and "accuracy" not in self.rewards:
            out.append(f"guidance={self.guidance} finds the all-wrong groups by the 'accuracy' "
                       f"reward; add it to video.rewards or set guidance: none")
        if self.min_tokens > self.max_tokens:
            out.append(f"min_tokens={self.min_tokens} > max_tokens={self.max_tokens}")
        if (self.length_reward != "none" or self.mode_reward) and "accuracy" not in self.rewards:
            out.append("length_reward / mode_reward read the 'accuracy' reward; add it to "
                       "video.rewards")
        for key, on in (("length_switch_accuracy", "grpo_lambda"), ("serial_decay",
                                                                    "serial_decay")):
            if self.length_reward == on and getattr(self, key) is None:
                out.append(f"length_reward {on} needs video.{key} (no default: the paper's "
                           f"value is not confirmed); set it")
        if self.rewards:
            out.extend(reward_spec_problems(self.rewards))
        return out


def reward_spec_problems(spec) -> List[str]:
    """``video.rewards`` problems (keys relative to the section): the spec is built (cheap:
    rule rewards, no model); a ``ValueError``/``TypeError`` it raises (unknown name, bad option,
    bad weight) or a weight that is not finite is reported."""
    import math

    from .vl_rewards import vl_reward_parts
    try:
        weights = {name: w for name, (_, w) in vl_reward_parts(spec).items()}
    except (ValueError, TypeError) as err:
        return [f"rewards: {err}"]
    return [f"rewards: {name} weight={w!r}; expected a finite number"
            for name, w in weights.items() if not math.isfinite(w)]


def verifier_spec(text: str) -> Dict[str, Dict[str, Any]]:
    """``pref.verifier`` for the video job -> a ``video.rewards``-style spec: video reward
    names with options, written as scorer specs are (``NAME[:key=value...][,NAME...]``), e.g.
    ``accuracy:answer_source=tag_or_text,think_answer_format:weight=0.5``.

    Raises:
        ValueError: text that does not parse (the message says where).
    """
    from mmrl.rewards.specs import parse_specs
    return {name: dict(options) for name, options in parse_specs(text)}


def check_pref(pref, c: VideoConfig) -> List[str]:
    """The video job's problems with an active ``pref`` section: ``pref.verifier`` must name
    video rewards (the same registry as ``video.rewards``)."""
    if pref.verifier is None:
        return []
    try:
        spec = verifier_spec(pref.verifier)
    except (ValueError, TypeError) as err:
        spec, why = {}, str(err)
    else:
        why = "no reward named"
    if not spec:
        return [f"pref.verifier: got {pref.verifier!r} ({why}); expected video reward names "
                f"with options, e.g. accuracy:answer_source=tag_or_text,think_answer_format"]
    return [f"pref.verifier: {p.partition(': ')[2]}" for p in reward_spec_problems(spec)]


def check(algo, train, c: VideoConfig) -> List[str]:
    """Cross-section problems of a video config (prompt counts known before reading data;
    Guide's rollout correction)."""
    out = guide_problems("video", c.guidance, algo)
    if c.sft_steps > train.steps:
        out.append(f"video.sft_steps: got {c.sft_steps}, more than train.steps={train.steps} "
                   f"(SFT steps are the run's first steps); raise train.steps")
    if c.thought_dropout > 0 and not c.sft_steps:
        out.append("video.thought_dropout drops thoughts of SFT targets; set video.sft_steps")
    if c.data == "synthetic" and c.synthetic_num < train.prompts_per_step:
        out.append(f"video.synthetic_num: got {c.synthetic_num}, fewer than train."
                   f"prompts_per_step={train.prompts_per_step} (a step draws that many distinct "
                   f"prompts); raise synthetic_num or lower prompts_per_step")
    if c.limit is not None and c.limit < train.prompts_per_step:
        out.append(f"video.limit: got {c.limit}, fewer than train.prompts_per_step="
                   f"{train.prompts_per_step}; raise the limit or lower prompts_per_step")
    return out + _binary_reward_problems(algo.resolve(), c)


def _binary_reward_problems(spec, c: VideoConfig) -> List[str]:
    """An objective that reads rewards r ∈ {0, 1} (``drpo``) skips every other row: the reward
    must be the accuracy alone, weight 1, without a length or mode column that moves it off
    {0, 1}."""
    if not spec.binary_rewards or not c.rewards:
        return []
    from .vl_rewards import vl_reward_parts
    try:
        weights = {name: w for name, (_, w) in vl_reward_parts(c.rewards).items()}
    except (ValueError, TypeError):
        return []  # reported by the section's own check
    if weights == {"accuracy": 1.0} and c.length_reward == "none" and not c.mode_reward:
        return []
    return [f"video.rewards: got {weights} with length_reward={c.length_reward!r}, mode_reward="
            f"{c.mode_reward}; algo.objective={spec.objective!r} reads binary rewards (1 "
            f"correct, 0 wrong) and skips every other row: use rewards {{accuracy: 1.0}} alone, "
            f"length_reward=none, mode_reward=false (DRPO has its own length weight)"]


def preflight(config) -> List[str]:
    """The data file and the model exist on this machine (nothing is read or loaded)."""
    from mmrl.config.jobs import file_problems, model_problems

    from .models import TINY_MODELS
    c: VideoConfig = config.task
    out = []
    if c.data != "synthetic":
        out.extend(file_problems("video.data", c.data, "data file"))
    if c.model not in TINY_MODELS:
        problems = model_problems("video.model", c.model, "config.json")
        out.extend(problems or _model_type_problems(c.model))
    return out


def _model_type_problems(model: str) -> List[str]:
    """A local checkpoint whose ``config.json`` names a ``model_type`` no family handles (read
    as JSON; a hub id is checked when it is loaded)."""
    import json
    import os

    from .models import UnsupportedModelError, family_for
    path = os.path.join(os.path.expanduser(model), "config.json")
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        return [f"video.model: cannot read {path} ({err}); expected the config.json that "
                f"save_pretrained writes"]
    try:
        family_for(model_type)
    except UnsupportedModelError as err:
        return [f"video.model: {err}"]
    return []


def algo_defaults(c: VideoConfig) -> Dict[str, Any]:
    """The ``algo`` defaults this section implies: ``max_len`` = ``max_new_tokens``."""
    return {"max_len": c.max_new_tokens}


register_job(Job("video", VideoConfig, "mmrl.video.job:run",
                 "GRPO-family training of a vision-language model (Qwen2-VL, Qwen2.5-VL, "
                 "Qwen3-VL, ... : mmrl.video.models) on video/image questions (Video-R1 data, "
                 "verifiable rewards)", check=check, preflight=preflight,
                 algo_defaults=algo_defaults, check_pref=check_pref))
