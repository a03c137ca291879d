"""The ``diffusion`` job's config section, its cross-section checks and preflight, and the job's
registration; torch-free (stdlib, ``mmrl.config`` and the family registry only), so
``mmrl config validate`` and ``mmrl --help`` never import torch or diffusers. The job itself
(:mod:`mmrl.diffusion.job`) is imported when a run starts.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from mmrl.config.core import cfg
from mmrl.config.jobs import Job, register_job
from mmrl.diffusion.models import (FAMILIES, VIDEO_FAMILIES, family_of_class, pipeline_class_of,
                                   resolve_family)

SAMPLERS = ("full", "window", "sliding", "singular", "tree")
ODE_SOLVER_NAMES = ("euler", "dpm2")
"""``mmrl.diffusion.dpm.ODE_SOLVERS`` (a test keeps them equal; dpm.py imports torch)."""
WINDOW_SCHEDULE_NAMES = ("sliding", "progressive", "decay", "exp_decay", "random")
"""``mmrl.diffusion.schedule.WINDOW_SCHEDULES`` (a test keeps them equal)."""
SDE_KIND_NAMES = ("cps", "dance", "flow_grpo")
"""``mmrl.diffusion.sde.SDE_KINDS.names()`` (a test keeps them equal; sde.py imports torch)."""
SDE_KL_FORM_NAMES = ("flow_grpo", "transition")
ENTROPY_REFUSAL = ("a trained denoising step is a Gaussian whose entropy depends on its noise "
                   "level only, not on the weights, so an entropy bonus has zero gradient and "
                   "a top-entropy mask would rank steps by the schedule")
"""``mmrl.diffusion.sde.SDE_KL_FORMS.names()`` (a test keeps them equal)."""


@dataclass
class DiffusionConfig:
    """Flow-matching text-to-image GRPO: model, sampler, reward, prompts, evaluation."""

    model: str = cfg("stabilityai/stable-diffusion-3.5-medium", "Hub id or local directory of "
                     "a diffusers pipeline (what save_pretrained writes).")
    pipeline: str = cfg("auto", "Generator family (the adapter under diffusion/models/): auto "
                        "= the pipeline class in the model's model_index.json; sd3 "
                        "(StableDiffusion3Pipeline: SD3 / SD3.5, CFG) or flux (FluxPipeline: "
                        "FLUX.1, embedded guidance, packed latents), checked against that class.",
                        choices=["auto", *FAMILIES])
    dtype: str = cfg("auto", "Weights dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, "
                     "bfloat16, float16. The SDE math is always fp32.",
                     choices=["auto", "float32", "bfloat16", "float16"])
    finetune: str = cfg("lora", "lora (peft adapter, reference = adapter disabled) or full (all "
                        "transformer weights; reference = a frozen copy).",
                        choices=["lora", "full"], source="flow_grpo (LoRA)")
    lora_rank: int = cfg(32, "LoRA rank r.", minimum=1, source="flow_grpo (32)")
    lora_alpha: float = cfg(64.0, "LoRA alpha.", minimum=0.0, source="flow_grpo (64)")
    max_sequence_length: int = cfg(256, "T5 prompt tokens (SD3 256, FLUX 512); CLIP always "
                                   "takes 77 and longer prompts are truncated with a warning.",
                                   minimum=1)
    frames: int = cfg(0, "Frames per sample of a video family (Wan: 4k + 1, the VAE compresses "
                      "time by 4); 0 = an image job (SD3, FLUX, ...). Rewards then score "
                      "videos [F, 3, H, W].", minimum=0)
    gradient_checkpointing: bool = cfg(False, "Recompute each transformer block in the "
                                       "backward pass (diffusers' enable_gradient_checkpointing):"
                                       " less activation memory for video latents, the same "
                                       "gradient, about one more forward of time.",
                                       source="flow_grpo scripts/train_wan2_1.py (on)")
    height: int = cfg(512, "Image height in pixels.", minimum=1)
    width: int = cfg(512, "Image width in pixels.", minimum=1)
    resolution_multiple: int = cfg(16, "Height and width must be multiples of this (VAE factor "
                                   "x patch size: 16 for SD3/SD3.5/FLUX); checked before any "
                                   "work. The loaded pipeline checks its own factor too.",
                                   minimum=1)
    guidance_scale: float = cfg(4.5, "SD3: classifier-free guidance w for sampling and training "
                                "(<= 1 disables CFG: one model row per sample). FLUX: the "
                                "embedded guidance.", minimum=0.0,
                                source="flow_grpo SD3.5-M (4.5); DanceGRPO FLUX (3.5)")
    cfg_uncond_grad: bool = cfg(True, "SD3 with CFG (guidance_scale > 1): the training "
                                "forward back-propagates through the unconditional prediction "
                                "too (the exact gradient of the guided velocity). false: the "
                                "unconditional rows run without gradient, as flow_grpo's "
                                "train_sd3.py detaches noise_pred_uncond (its gradient; the "
                                "backward covers the conditional rows only). No effect without "
                                "CFG (FLUX's guidance is embedded).",
                                source="flow_grpo scripts/train_sd3.py compute_log_prob")
    eval_guidance_scale: Optional[float] = cfg(None, "Guidance for evaluation (null = "
                                               "guidance_scale).", minimum=0.0)
    num_steps: int = cfg(10, "Denoising steps T of training rollouts.", minimum=2,
                         source="flow_grpo (10)")
    eval_num_steps: int = cfg(40, "Denoising steps of the evaluation ODE sampler.", minimum=1,
                              source="flow_grpo (40)")
    shift: Optional[float] = cfg(None, "Schedule shift of families with a fixed one (SD3: null = "
                                 "the scheduler config's, 3.0 for SD3 / SD3.5); FLUX shifts by "
                                 "the resolution and needs null.", minimum=0.0)
    sampler: str = cfg("full", "full: SDE on every step but the last (Flow-GRPO); window: a random"
                       " window of SDE steps per rollout (Flow-GRPO-Fast); sliding: MixGRPO's "
                       "progressive window; singular: G2RPO singular stochastic sampling; tree: "
                       "BranchGRPO / Dynamic-TreeRPO tree sampling.", choices=list(SAMPLERS),
                       source="arXiv 2505.05470, 2507.21802, 2510.01982, 2509.06040")
    kind: str = cfg("flow_grpo", "SDE step kind: flow_grpo, dance (DanceGRPO), cps "
                    "(coefficients-preserving).",
                    choices=list(SDE_KIND_NAMES))
    noise_level: float = cfg(0.7, "SDE noise level a (flow_grpo 0.7, dance eta 0.3, cps 0.8).",
                             minimum=0.0)
    kl: str = cfg("transition", "KL to the reference policy, added as algo.beta * KL per trained "
                  "step when beta > 0, in closed form from the policy's and the reference's "
                  "transition means: transition = the exact KL of the Gaussian step, "
                  "(mu - mu_ref)^2 / (2 std^2) averaged over the latent dims; flow_grpo = "
                  "flow_grpo's kl_loss, (mu - mu_ref)^2 / (2 s^2) with s its std_dev_t, i.e. "
                  "transition * (-dt) for the flow_grpo and dance kinds (1/25 to 1/3.7 of it at "
                  "10 steps, shift 3) and transition for cps. flow_grpo's beta values (0.01, "
                  "0.04) mean the same here only with flow_grpo.",
                  choices=list(SDE_KL_FORM_NAMES),
                  source="flow_grpo scripts/train_sd3.py (kl_loss)")
    shared_noise: bool = cfg(False, "Give every member of a group the same initial noise "
                             "(DanceGRPO init_same_noise). singular/tree always share it.",
                             source="DanceGRPO")
    window: int = cfg(2, "window/sliding: SDE steps per rollout (the trained steps).",
                      minimum=1, source="Flow-GRPO-Fast (2); MixGRPO (4)")
    sliding_shift_every: int = cfg(25, "sliding: move the window every N rollouts (MixGRPO's "
                                   "iters_per_group: the dwell of progressive, the base of "
                                   "exp_decay's).", minimum=1,
                                   source="MixGRPO (25; Flash 20)")
    sliding_stride: int = cfg(1, "sliding: steps the window moves each time (MixGRPO's "
                              "prog_overlap_step; = window for no overlap; 0 freezes it, "
                              "progressive schedules only).", minimum=0,
                              source="MixGRPO (1; Flash* 0)")
    singular_steps: List[int] = cfg(doc="singular: the SDE steps k (one trained transition "
                                    "each); group_size members per (prompt, k).",
                                    default_factory=lambda: [0, 1, 2, 3],
                                    source="G2RPO arXiv 2510.01982")
    granularities: List[int] = cfg(doc="singular: ODE completion strides g (reward rows per "
                                   "member).", default_factory=lambda: [1, 2],
                                   source="G2RPO (1, 2)")
    tree_split_steps: List[int] = cfg(doc="tree: steps where every node branches "
                                      "(group_size = branching ** len(split_steps) leaves).",
                                      default_factory=lambda: [2, 4, 6],
                                      source="BranchGRPO arXiv 2509.06040")
    tree_branching: int = cfg(2, "tree: children per split.", minimum=2)
    tree_noise_levels: Optional[List[float]] = cfg(None, "tree: one noise level per depth "
                                                   "(len(split_steps) + 1); null = noise_level "
                                                   "at every depth.")
    tree_sde_steps: List[int] = cfg(doc="tree: non-split steps also sampled with the SDE (and "
                                    "trained); [] = ODE outside the splits (Dynamic-TreeRPO).",
                                    default_factory=list)
    prompts: List[str] = cfg(doc="Training prompts inline (added to prompt_file's).",
                             default_factory=list)
    prompt_file: str = cfg("", "Training prompts: a .txt (one per line) or .jsonl ('prompt' "
                           "field) file.")
    eval_prompts: List[str] = cfg(doc="Held-out evaluation prompts inline.",
                                  default_factory=list)
    eval_prompt_file: str = cfg("", "Held-out evaluation prompts file (.txt / .jsonl).")
    eval_holdout: int = cfg(0, "When no eval prompts are given: hold out the last N training "
                            "prompts for evaluation.", minimum=0)
    eval_every: int = cfg(0, "Evaluate (ODE sampler, grid PNG, eval.jsonl) every N steps, at "
                          "the first step and after the last (0 = never).", minimum=0)
    eval_batch_size: int = cfg(8, "Images per evaluation sampling call.", minimum=1)
    reward: str = cfg("pickscore", "Reward scorers of mmrl.rewards: NAME[:key=value][,NAME...] "
                      "with weight= per scorer (e.g. 'pickscore', 'hps_v2.1:path=/ckpt.pt', "
                      "'brightness,jpeg_compressibility:weight=0.5').")
    timestep_fraction: float = cfg(1.0, "sampler=full: each sample trains an independent random "
                                   "floor((num_steps - 1) * fraction) of its num_steps - 1 SDE "
                                   "steps, drawn from the run's generator (DanceGRPO's "
                                   "timestep_fraction); 1 trains all of them (no draw).",
                                   above=0.0, maximum=1.0,
                                   source="DanceGRPO arXiv 2505.07818 (0.6 in its scripts)")
    window_range: Optional[List[int]] = cfg(None, "window: [r0, r1], the window's start is "
                                            "drawn uniformly from r0 .. r1 - window each "
                                            "rollout (Flow-GRPO-Fast's sde_window_range; its "
                                            "recommended SD3 configs: [0, 5] with window 3); "
                                            "null = [0, num_steps - 1]. r1 <= num_steps - 1.",
                                            source="flow_grpo config/grpo.py (*_fast_nocfg)")

    ode_solver: str = cfg("euler", "ODE solver of the deterministic steps after the last SDE "
                          "step (MixGRPO's 'post' part; every step of an ODE rollout): euler, "
                          "or dpm2 = DPM-Solver++ 2M in flow form (first order at the first "
                          "and the final step; the x0 predictions of the steps before it are "
                          "its history). Samplers full, window, sliding.",
                          choices=list(ODE_SOLVER_NAMES),
                          source="MixGRPO-Flash arXiv 2507.21802; DiffusionNFT 2509.16117")
    ode_compression: Optional[float] = cfg(None, "window/sliding: null keeps the schedule after "
                                           "the window; c in (0, 1] replaces its T-1-last steps "
                                           "by n-1, n = floor(max((T-last)*c, 1)) (at least 2) "
                                           "points shifted like the schedule (MixGRPO-Flash).",
                                           above=0.0, maximum=1.0,
                                           source="MixGRPO-Flash (0.4; Flash* 0.2)")
    sliding_schedule: str = cfg("sliding", "sliding: how the window moves. sliding = mmrl's "
                                "original (start = stride*(iteration // shift_every) mod "
                                "(T - window)); MixGRPO's progressive (dwell shift_every), "
                                "decay (dwell max(n_min, floor(n_max*(1-cur/M) + "
                                "n_min*cur/M))), exp_decay (dwell ceil(shift_every*exp(-k*"
                                "max(0, cur-tau)))), all with M = T-2 and steps >= T-2 never "
                                "trained; random (start uniform in [0, M - window] each "
                                "rollout, from the run's generator).",
                                choices=list(WINDOW_SCHEDULE_NAMES),
                                source="MixGRPO grpo_states.py")
    sliding_roll_back: bool = cfg(True, "progressive schedules: past M the window goes back to "
                                  "0 (else it stays at the end).", source="MixGRPO roll_back")
    sliding_decay_max: int = cfg(10, "decay: n_max, the dwell at the first start.", minimum=1,
                                 source="MixGRPO scripts (10)")
    sliding_decay_min: int = cfg(1, "decay: n_min, the dwell at the last start.", minimum=1,
                                 source="MixGRPO scripts (1)")
    sliding_exp_tau: float = cfg(13.0, "exp_decay: tau, the start after which the dwell "
                                 "shrinks.", minimum=0.0, source="MixGRPO dataclass (13)")
    sliding_exp_k: float = cfg(0.1, "exp_decay: k, the dwell's decay rate per step.",
                               minimum=0.0, source="MixGRPO dataclass (0.1)")
    singular_end: str = cfg("append_zero", "singular: end of a strided completion grid that "
                            "misses sigma_T = 0. append_zero (mmrl's original) appends 0; "
                            "replace_last replaces its last sigma by 0, i.e. the image is "
                            "x0 = x - sigma*v of the last evaluated state (G2RPO's code: one "
                            "evaluation fewer).", choices=["append_zero", "replace_last"],
                            source="bcmi/Granular-GRPO train_g2rpo_hps.py")
    singular_rows: str = cfg("granularity", "singular: training rows. granularity (mmrl's "
                             "original) = one row per (member, g) with its own advantage "
                             "A_{m,g} (algo.adv_clip clamps each); member = one row per member "
                             "with A_m = clamp(sum_g A_{m,g}, +-algo.adv_clip), the loss a mean "
                             "over members (G2RPO's code).", choices=["granularity", "member"],
                             source="bcmi/Granular-GRPO train_g2rpo_hps.py")
    singular_cadence: str = cfg("per_iteration", "singular: optimizer steps per rollout. "
                                "per_iteration = one step on all k (G2RPO hps_clip @0e697991); "
                                "per_step = one step per SDE step k, in order, each on that k's "
                                "rows (G2RPO hps @ef6ec9f3); needs train.num_mini_batches = "
                                "len(singular_steps).", choices=["per_iteration", "per_step"],
                                source="bcmi/Granular-GRPO")
    objective: str = cfg("grpo", "What the rollouts train: grpo (the algo preset's loss on the "
                         "sampler's re-scored log-probs) or a weighted matching preset of "
                         "mmrl.algo.match_presets, nft (DiffusionNFT) or awm (AWM): ODE "
                         "rollouts without log-probs, the flow-matching loss on forward-noised "
                         "final samples, CFG-free training forwards; algo then gives the "
                         "advantages only (docs/diffusion_train.md).",
                         choices=lambda: ["grpo", *sorted(_match_presets().MATCH_PRESETS)],
                         source="arXiv 2509.16117 (NFT), 2509.25050 (AWM)")
    matching: Dict[str, Any] = cfg(doc="objective nft/awm: overrides of the preset's MatchSpec "
                                   "fields (mmrl algos nft), e.g. {beta: 0.1, old_decay: "
                                   "nft_delayed}.", default_factory=dict,
                                   source="mmrl.algo.match_presets")

    def trained_steps(self) -> int:
        """The most trained transitions of one training row (T of the loss)."""
        if self.sampler == "full":
            return max(math.floor((self.num_steps - 1) * self.timestep_fraction), 1)
        if self.sampler in ("window", "sliding"):
            return self.window
        if self.sampler == "singular":
            return 1
        return 1 + len(self.tree_sde_steps)

    def problems(self) -> List[str]:
        out = []
        m = self.resolution_multiple
        if self.height % m or self.width % m:
            out.append(f"height/width: got {self.height}x{self.width}; expected multiples of "
                       f"resolution_multiple={m} (VAE factor x patch size); use "
                       f"{max(m, self.height // m * m)}x{max(m, self.width // m * m)}")
        T = self.num_steps
        if self.sampler in ("window", "sliding") and not 1 <= self.window <= T - 1:
            out.append(f"window: got {self.window} for num_steps={T}; expected 1..{T - 1}")
        out.extend(self._mix_problems())
        if self.sampler == "singular":
            ks = self.singular_steps
            if not ks or len(set(ks)) != len(ks) or min(ks) < 0 or max(ks) > T - 2:
                out.append(f"singular_steps: got {ks}; expected distinct steps in [0, {T - 2}]")
            if not self.granularities or min(self.granularities) < 1:
                out.append(f"granularities: got {self.granularities}; expected ints >= 1")
        if self.sampler == "tree":
            s = self.tree_split_steps
            if not s or len(set(s)) != len(s) or min(s) < 0 or max(s) > T - 1:
                out.append(f"tree_split_steps: got {s}; expected distinct steps in [0, {T - 1}]")
            if self.tree_noise_levels is not None and len(self.tree_noise_levels) != len(s) + 1:
                out.append(f"tree_noise_levels: got {len(self.tree_noise_levels)} levels; "
                           f"expected len(tree_split_steps) + 1 = {len(s) + 1} (one per depth)")
            bad = [k for k in self.tree_sde_steps if k in s or not 0 <= k <= T - 2]
            if bad:
                out.append(f"tree_sde_steps: {bad} are split steps or outside [0, {T - 2}]")
        out.extend(self._fraction_problems() + self._window_range_problems())
        if not self.prompts and not self.prompt_file:
            out.append("prompts/prompt_file: no training prompts; set prompt_file: PATH (one "
                       "prompt per line) or prompts: [...]")
        out.extend(reward_spec_problems(self.reward))
        out.extend(reward_media_problems(self.reward, self.frames))
        out.extend(self._matching_problems())
        return out

    def _mix_problems(self) -> List[str]:
        """MixGRPO's window schedules and ODE solver options."""
        out, T = [], self.num_steps
        if self.sampler == "sliding" and self.sliding_schedule != "sliding" and \
                not 1 <= self.window <= T - 2:
            out.append(f"window: got {self.window} for sliding_schedule="
                       f"{self.sliding_schedule} and num_steps={T}; MixGRPO's schedules train "
                       f"steps < T - 2, so expected 1..{T - 2}")
        if self.sampler == "sliding" and self.sliding_schedule == "sliding" and \
                self.sliding_stride < 1:
            out.append("sliding_stride: 0 freezes the window only under a progressive "
                       "sliding_schedule (progressive, decay, exp_decay); set it >= 1")
        if self.sliding_decay_min > self.sliding_decay_max:
            out.append(f"sliding_decay_min: got {self.sliding_decay_min} > sliding_decay_max="
                       f"{self.sliding_decay_max}; expected n_min <= n_max")
        if self.ode_compression is not None and self.sampler not in ("window", "sliding"):
            out.append(f"ode_compression: set for sampler={self.sampler}; it shortens the grid "
                       f"after an SDE window, so use sampler window or sliding, or null")
        if self.ode_solver != "euler" and self.sampler in ("singular", "tree"):
            out.append(f"ode_solver: {self.ode_solver} for sampler={self.sampler}; the singular "
                       f"and tree samplers' ODE parts are Euler, set ode_solver=euler")
        return out


    def _window_range_problems(self) -> List[str]:
        r, T, W = self.window_range, self.num_steps, self.window
        if r is None:
            return []
        if self.sampler != "window":
            return [f"window_range: got {r} with sampler={self.sampler}; it places the random "
                    f"window of sampler=window; drop it or use sampler=window"]
        if len(r) != 2 or not 0 <= r[0] <= r[1] - W or r[1] > T - 1:
            return [f"window_range: got {r} for window={W}, num_steps={T}; expected [r0, r1] "
                    f"with 0 <= r0 <= r1 - window and r1 <= {T - 1} (the last step stays "
                    f"deterministic)"]
        return []

    def _fraction_problems(self) -> List[str]:
        f, K = self.timestep_fraction, self.num_steps - 1
        if not isinstance(f, (int, float)) or f >= 1 or f <= 0:
            return []  # 1: every step; out of (0, 1]: the field's own bound check says so
        if self.sampler != "full":
            return [f"timestep_fraction: got {f} with sampler={self.sampler}; a random subset "
                    f"of steps per sample is DanceGRPO's rule for the full SDE sampler; use "
                    f"sampler=full or timestep_fraction=1"]
        if math.floor(K * f) < 1:
            return [f"timestep_fraction: got {f}, which trains floor({K} * {f}) = 0 of the "
                    f"{K} SDE steps; raise it to at least {1 / K:.3g}"]
        return []
    def _matching_problems(self) -> List[str]:
        """A matching objective: its preset and overrides, and a sampler it can use."""
        if self.objective == "grpo":
            return [f"matching: got {self.matching}; it overrides a matching objective's "
                    f"preset and objective=grpo has none; drop it"] if self.matching else []
        out = [f"matching: {p}" for p in _match_presets().match_problems(self.objective,
                                                                         **self.matching)]
        if self.sampler != "full":
            out.append(f"sampler: got {self.sampler!r}, which picks the SDE steps the grpo "
                       f"objective re-scores; objective={self.objective} rolls out with the "
                       f"deterministic ODE sampler; leave sampler at full")
        return out


def _match_presets():
    """:mod:`mmrl.algo.match_presets` (torch-free), imported when first needed."""
    from mmrl.algo import match_presets
    return match_presets


MATCHING_ALGO_KEYS = ("advantage", "adv_eps", "adv_clip", "multi_reward", "r_max")
"""The ``algo`` overrides a matching objective reads (the advantage); the loss axes are its own
(``max_len``, set by :func:`algo_defaults`, is let through unread)."""


def matching_algo_problems(algo, c: DiffusionConfig) -> List[str]:
    """``algo`` overrides that a matching objective would not read (its loss, ratio, KL and
    clip settings live in ``diffusion.matching``)."""
    if c.objective == "grpo":
        return []
    unread = [k for k, v in algo.overrides().items()
              if k not in (*MATCHING_ALGO_KEYS, "max_len") and not (k == "beta" and v == 0)]
    return [f"algo.{k}: objective={c.objective} takes only the advantage from algo "
            f"({', '.join(MATCHING_ALGO_KEYS)}); its loss settings are diffusion.matching's "
            f"(e.g. kl_coef for the KL); drop algo.{k}" for k in unread]


def reward_spec_problems(spec: str) -> List[str]:
    """``diffusion.reward`` problems found without loading a model: the spec parses, every
    scorer name is registered and every ``weight=`` is a finite number."""
    from mmrl.rewards.specs import JUDGES, SCORERS, parse_specs
    try:
        items = parse_specs(spec)
    except (ValueError, TypeError) as err:
        return [f"reward: {err}"]
    out = []
    for name, options in items:
        if name in JUDGES:
            out.append(f"reward: {name} is a pairwise judge (it compares two samples, it does "
                       f"not score one); reward each sample by its win rate in its group: "
                       f"pref_winrate:judge={name}[:key=value...]")
        elif name not in SCORERS:
            from mmrl.registry import did_you_mean
            out.append(f"reward: unknown scorer {name!r} (registered: "
                       f"{', '.join(SCORERS.names())}){did_you_mean(name, SCORERS.names())}")
        weight = options.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
                not math.isfinite(weight):
            out.append(f"reward: {name} weight={weight!r}; expected a finite number")
    return out


def reward_media_problems(spec: str, frames: int) -> List[str]:
    """Scorers that score the other media than the job's samples (contract: an image job's
    reward scores ``[B, 3, H, W]``, a video job's (``frames > 0``) ``[B, F, 3, H, W]``), and
    the ``frames`` lift's own options; torch-free (:data:`mmrl.rewards.specs.VIDEO_SCORERS`)."""
    from mmrl.rewards.specs import (SCORERS, frames_problems, media_of, parse_specs,
                                    pref_problems)
    try:
        items = parse_specs(spec)
    except (ValueError, TypeError):
        return []  # reward_spec_problems reports it
    out = []
    for name, options in items:
        if name not in SCORERS:
            continue
        if name == "frames":
            out.extend(f"reward: {p}" for p in frames_problems(options, frames))
        if name == "pref_winrate":  # its media is its judge's
            out.extend(f"reward: {p}" for p in pref_problems(options))
        if name == "videoreward" and frames and options.get("fps") is None \
                and options.get("num_frames") is None:
            out.append("reward: videoreward samples frames per second of video, and the job's "
                       "videos carry no frame rate; give the generator's: videoreward:fps=16 "
                       "(Wan 2.1; Wan 2.2 TI2V-5B: 24), or num_frames=N for a fixed count")
        if media_of(name, options) == "video" and not frames:
            out.append(f"reward: {name} scores videos [B, F, 3, H, W] but diffusion.frames=0 "
                       f"(an image job); set diffusion.frames to the frames per sample of a "
                       f"video family (e.g. 33 for Wan) or pick an image scorer")
        elif media_of(name, options) == "image" and frames:
            lift = (f"give it a video judge (e.g. judge=bradley_terry:scorer=flicker)"
                    if name == "pref_winrate" else
                    f"lift it: frames:scorer={name}:reduce=mean (num=N to score N frames)")
            out.append(f"reward: {name} scores images [B, 3, H, W] but diffusion.frames={frames} "
                       f"(a video job: samples are [F, 3, H, W]); {lift}, or set "
                       f"diffusion.frames=0 for an image family")
    return out


def check(algo, train, c: DiffusionConfig) -> List[str]:
    """Cross-section problems of a diffusion config."""
    out = []
    if c.sampler == "tree" and train.group_size != c.tree_branching ** len(c.tree_split_steps):
        out.append(f"train.group_size: got {train.group_size}; sampler=tree gives "
                   f"tree_branching ** len(tree_split_steps) = "
                   f"{c.tree_branching ** len(c.tree_split_steps)} leaves per prompt; set "
                   f"group_size to that")
    if c.sampler == "singular" and c.singular_cadence == "per_step" and \
            train.num_mini_batches != len(c.singular_steps):
        out.append(f"train.num_mini_batches: got {train.num_mini_batches}; "
                   f"singular_cadence=per_step takes one optimizer step per SDE step k, so set "
                   f"it to len(diffusion.singular_steps) = {len(c.singular_steps)}")
    if c.sampler in ("singular", "tree") and train.rollout_allocation != "fixed":
        out.append(f"train.rollout_allocation: {train.rollout_allocation!r} needs a variable "
                   f"group size, which sampler={c.sampler} does not support; use fixed")
    try:
        spec = algo.resolve()
    except ValueError:
        spec = None  # the algo section reports its own problems
    if spec is not None and spec.needs_token_weights:
        out.append(f"algo: preset {algo.preset!r} weighs tokens by the policy's vocabulary "
                   f"distribution (TW-GRPO), which a denoising step does not have; pick another "
                   f"preset or set algo.token_weighting=none")
    if spec is not None and spec.needs_baseline:
        out.append(f"algo.advantage: {spec.advantage!r} needs the reward of a greedy completion "
                   f"per prompt, and a flow-matching generator has none (an ODE sample from "
                   f"random noise is one draw, not the distribution's mode); pick another "
                   f"advantage (e.g. rloo or grpo)")
    if algo.kl is not None:
        out.append(f"algo.kl: got {algo.kl!r}, a log-prob estimator; the diffusion job computes "
                   f"the KL to the reference in closed form from the transition means (on "
                   f"log-probs averaged over the L latent dims k2/k3 come to ~KL/L and k1's "
                   f"gradient is 0 on-policy); remove algo.kl and pick the form with "
                   f"diffusion.kl (transition or flow_grpo)")
    if spec is not None and spec.needs_entropy:
        out.append(f"algo: entropy_coef={spec.entropy_coef}, top_entropy_quantile="
                   f"{spec.top_entropy_quantile}: {ENTROPY_REFUSAL}; set entropy_coef=0 and "
                   f"top_entropy_quantile=1")
    if spec is not None and spec.needs_step_terms and (c.sampler == "singular"
                                                       or c.kind == "cps"):
        out.append(f"algo: ratio_level={spec.ratio_level!r}, step_reweight={spec.step_reweight} "
                   f"(GRPO-Guard) read the Gaussian step's mean stored at sampling; got "
                   f"sampler={c.sampler}, kind={c.kind}; use kind flow_grpo or dance with the "
                   f"full, window, sliding or tree sampler")
    if spec is not None and spec.needs_step_terms and (c.ode_solver != "euler"
                                                       or c.ode_compression is not None):
        out.append(f"algo: ratio_level={spec.ratio_level!r}, step_reweight={spec.step_reweight} "
                   f"(GRPO-Guard) read the step means stored at sampling, which the MixGRPO "
                   f"sampler (ode_solver={c.ode_solver!r}, ode_compression="
                   f"{c.ode_compression}) does not keep; use ode_solver: euler without "
                   f"ode_compression")
    out.extend(matching_algo_problems(algo, c))
    if c.objective != "grpo" and train.parallel == "fsdp":
        out.append(f"train.parallel: fsdp is not supported with objective={c.objective} yet "
                   f"(the old model's weights are swapped in per forward); use ddp")
    if train.reward_chunks > 1 and c.sampler in ("singular", "tree"):
        out.append(f"train.reward_chunks: {train.reward_chunks} chunks need training rows = "
                   f"rewarded images; sampler={c.sampler} trains other rows (members / tree "
                   f"nodes); set train.reward_chunks=1 or use the full, window or sliding "
                   f"sampler")
    if train.dynamic_sampling_tries:
        out.append("train.dynamic_sampling_tries: the diffusion job stores its trajectories per "
                   "rollout round and does not merge rounds yet; set it to 0")
    return out


def preference_problems(spec) -> List[str]:
    """Problems of a resolved preference spec (``mmrl.algo.preference.PrefSpec``) for the
    diffusion job, whose scores are Diffusion-DPO's −½·e at one shared (σ, ε) per pair (T = 1).

    Refused: ``reference_free`` (SimPO): −½·e is a log-likelihood only up to a weight and a
    constant that depend on the sampled σ; they cancel in e_θ − e_ref at the same σ and ε, not
    in a policy-only margin. ``token_guidance`` (TGDPO): it weighs each token by a guide model's
    per-token log-ratio, and a flow sample has one score and no guide model. Accepted as they
    are: ``length_normalize`` (a no-op at T = 1), the sppo losses (win rates from the group's
    rewards) and TRPA's pair scales.
    """
    out = []
    if spec.reference_free:
        out.append(f"pref: reference_free=true (SimPO): the diffusion job's scores -e/2 are "
                   f"log-likelihoods only up to a weight and a constant that depend on the "
                   f"sampled noise level, which cancel against the reference at the same noise "
                   f"(e - e_ref) and not in a policy-only margin; use pref.preset=diffusion_dpo "
                   f"(or dpo, ipo, cdpo) with the reference")
    if spec.token_guidance:
        out.append("pref: token_guidance=true (TGDPO) weighs each token by a guide model's "
                   "per-token log-ratio, and a flow sample has one Diffusion-DPO score (T = 1) "
                   "and no guide model; use pref.preset=diffusion_dpo")
    return out


def check_pref(pref, c: DiffusionConfig) -> List[str]:
    """The diffusion job's problems with an active ``pref`` section: the preset
    (:func:`preference_problems`) and ``pref.verifier``, a scorer spec like ``reward``."""
    out = preference_problems(pref.resolve())
    if pref.verifier is not None:
        out += [f"pref.verifier: {p.partition(': ')[2]}" for p in reward_spec_problems(pref.verifier)]
    return out


def preflight(config) -> List[str]:
    """The pipeline folder (or cached hub id) and the prompt files exist on this machine."""
    from mmrl.config.jobs import file_problems, model_problems
    c: DiffusionConfig = config.task
    out = model_problems("diffusion.model", c.model, "model_index.json")
    if not out and (c.pipeline != "auto" or pipeline_class_of(c.model) is not None):
        try:  # the family matches the checkpoint's pipeline class (when it can be read)
            resolve_family(c.pipeline, c.model)
        except ValueError as err:
            out.append(f"diffusion.pipeline: {err}")
    out.extend(frames_problems(c))
    for key in ("prompt_file", "eval_prompt_file"):
        if getattr(c, key):
            out.extend(file_problems(f"diffusion.{key}", getattr(c, key), "prompt file"))
    if not reward_spec_problems(c.reward):
        from mmrl.rewards.specs import parse_specs
        for name, options in parse_specs(c.reward):
            path = options.get("path")
            if isinstance(path, str) and not os.path.exists(os.path.expanduser(path)):
                out.append(f"diffusion.reward: {name} path={path!r} not found; fix the path "
                           f"(or leave path= out to use the scorer's hub weights)")
    return out


def frames_problems(c: DiffusionConfig) -> List[str]:
    """``diffusion.frames`` against the family's media: > 0 for a video family (Wan), 0 for an
    image family; checked when the family is known (named by ``diffusion.pipeline``, or the
    checkpoint's pipeline class readable from its ``model_index.json``)."""
    family, where = (c.pipeline, f"diffusion.pipeline={c.pipeline}") if c.pipeline != "auto" \
        else (None, "")
    if family is None:
        found = pipeline_class_of(c.model)
        try:
            family = family_of_class(found) if found else None
        except ValueError:  # an unsupported class: reported by the pipeline check
            return []
        where = f"{c.model!r} is a {found}"
    if family is None or family not in FAMILIES:
        return []
    if family in VIDEO_FAMILIES and c.frames == 0:
        return [f"diffusion.frames=0 but {where} ({family} makes videos); set diffusion.frames "
                f"to the frames per video, 4k + 1 for Wan (e.g. 33 as flow_grpo, 81 as Wan2.1)"]
    if family not in VIDEO_FAMILIES and c.frames > 0:
        return [f"diffusion.frames={c.frames} but {where} ({family} makes images); set "
                f"diffusion.frames=0 (or use a video family: "
                f"{', '.join(sorted(VIDEO_FAMILIES))})"]
    return []


def algo_defaults(c: DiffusionConfig) -> dict:
    """``max_len`` = the most trained steps of a row (the ``fixed_norm`` aggregation's T)."""
    return {"max_len": c.trained_steps()}


register_job(Job("diffusion", DiffusionConfig, "mmrl.diffusion.job:run",
                 "GRPO for flow-matching text-to-image models (SD3/SD3.5, FLUX via diffusers): "
                 "Flow-GRPO, MixGRPO, G2RPO, tree sampling",
                 check=check, preflight=preflight, algo_defaults=algo_defaults,
                 check_pref=check_pref))
