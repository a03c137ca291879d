"""The ``diffusion`` job: GRPO for flow-matching text-to-image models (SD3 / SD3.5, FLUX).

``mmrl train configs/diffusion/<recipe>.yaml`` builds a :class:`DiffusionGroupPolicy` around an
``SD3Policy`` / ``FluxPolicy`` (diffusers, LoRA or full fine-tuning), a reward from
``mmrl.rewards`` and the prompts, and hands them to :func:`mmrl.train.runner.run_training` (seeding,
checkpoints and exact resume, metrics, progress bar, data parallel).

Training rows and T. For the SDE samplers (``full``, ``window``, ``sliding``) a row is an image
and T its trained (stochastic) denoising steps. For ``singular`` (G²RPO) a row is a group member
(one SDE step, its images at every granularity are the reward rows) and for ``tree``
(BranchGRPO / Dynamic-TreeRPO) a row is a tree node (its incoming edge and its own SDE steps);
their advantages come from the loop's ``advantages`` hook. ``logp(rows, t0, t1)`` re-scores the
stored transitions of those rows and steps, so splitting T (``train.t_chunk``) or the rows
(``train.micro_batch_size``) never changes the gradient.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mmrl.config.core import cfg
from mmrl.diffusion.evaluate import Evaluator, ImageReward, read_prompts
from mmrl.diffusion.schedule import flow_sigmas, random_window, sliding_window
from mmrl.diffusion.sde import SDE_KL_FORMS, sde_kl
from mmrl.config.jobs import Job, register_job
from mmrl.train.policy import Capabilities, GroupPolicy
from mmrl.train.rollout import Rollout

SAMPLERS = ("full", "window", "sliding", "singular", "tree")
PIPELINES = {"sd3": "SD3Policy", "flux": "FluxPolicy"}


@dataclass
class DiffusionConfig:
    """Flow-matching text-to-image GRPO: model, sampler, reward, prompts, evaluation."""

    model: str = cfg("stabilityai/stable-diffusion-3.5-medium", "Hub id or local directory of "
                     "a diffusers pipeline (what save_pretrained writes).")
    pipeline: str = cfg("sd3", "Pipeline family: sd3 (SD3 / SD3.5, CFG) or flux (FLUX.1, "
                        "embedded guidance, packed latents).", choices=sorted(PIPELINES))
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
    eval_guidance_scale: Optional[float] = cfg(None, "Guidance for evaluation (null = "
                                               "guidance_scale).", minimum=0.0)
    num_steps: int = cfg(10, "Denoising steps T of training rollouts.", minimum=2,
                         source="flow_grpo (10)")
    eval_num_steps: int = cfg(40, "Denoising steps of the evaluation ODE sampler.", minimum=1,
                              source="flow_grpo (40)")
    shift: float = cfg(3.0, "SD3 schedule shift (FLUX uses its resolution-dependent shift).",
                       minimum=0.0)
    sampler: str = cfg("full", "full: SDE on every step but the last (Flow-GRPO); window: a random"
                       " window of SDE steps per rollout (Flow-GRPO-Fast); sliding: MixGRPO's "
                       "progressive window; singular: G2RPO singular stochastic sampling; tree: "
                       "BranchGRPO / Dynamic-TreeRPO tree sampling.", choices=list(SAMPLERS),
                       source="arXiv 2505.05470, 2507.21802, 2510.01982, 2509.06040")
    kind: str = cfg("flow_grpo", "SDE step kind: flow_grpo, dance (DanceGRPO), cps "
                    "(coefficients-preserving).",
                    choices=lambda: __import__("mmrl.diffusion.sde", fromlist=["x"])
                    .SDE_KINDS.names())
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
                  choices=lambda: __import__("mmrl.diffusion.sde", fromlist=["x"])
                  .SDE_KL_FORMS.names(), source="flow_grpo scripts/train_sd3.py (kl_loss)")
    shared_noise: bool = cfg(False, "Give every member of a group the same initial noise "
                             "(DanceGRPO init_same_noise). singular/tree always share it.",
                             source="DanceGRPO")
    window: int = cfg(2, "window/sliding: SDE steps per rollout (the trained steps).",
                      minimum=1, source="Flow-GRPO-Fast (2); MixGRPO (4)")
    sliding_shift_every: int = cfg(25, "sliding: move the window every N rollouts.", minimum=1,
                                   source="MixGRPO (25)")
    sliding_stride: int = cfg(1, "sliding: steps the window moves each time.", minimum=1)
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

    def trained_steps(self) -> int:
        """The most trained transitions of one training row (T of the loss)."""
        if self.sampler == "full":
            return self.num_steps - 1
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
        if not self.prompts and not self.prompt_file:
            out.append("prompts/prompt_file: no training prompts; set prompt_file: PATH (one "
                       "prompt per line) or prompts: [...]")
        out.extend(reward_spec_problems(self.reward))
        return out


def reward_spec_problems(spec: str) -> List[str]:
    """``diffusion.reward`` problems found without loading a model: the spec parses, every
    scorer name is registered and every ``weight=`` is a finite number."""
    import math

    from mmrl.rewards.scorers import SCORERS, parse_specs
    try:
        items = parse_specs(spec)
    except (ValueError, TypeError) as err:
        return [f"reward: {err}"]
    out = []
    for name, options in items:
        if name not in SCORERS:
            from mmrl.registry import did_you_mean
            out.append(f"reward: unknown scorer {name!r} (registered: "
                       f"{', '.join(SCORERS.names())}){did_you_mean(name, SCORERS.names())}")
        weight = options.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
                not math.isfinite(weight):
            out.append(f"reward: {name} weight={weight!r}; expected a finite number")
    return out


def check(algo, train, c: DiffusionConfig) -> List[str]:
    """Cross-section problems of a diffusion config."""
    out = []
    if c.sampler == "tree" and train.group_size != c.tree_branching ** len(c.tree_split_steps):
        out.append(f"train.group_size: got {train.group_size}; sampler=tree gives "
                   f"tree_branching ** len(tree_split_steps) = "
                   f"{c.tree_branching ** len(c.tree_split_steps)} leaves per prompt; set "
                   f"group_size to that")
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
    if algo.kl is not None:
        out.append(f"algo.kl: got {algo.kl!r}, a log-prob estimator; the diffusion job computes "
                   f"the KL to the reference in closed form from the transition means (on "
                   f"log-probs averaged over the L latent dims k2/k3 come to ~KL/L and k1's "
                   f"gradient is 0 on-policy); remove algo.kl and pick the form with "
                   f"diffusion.kl (transition or flow_grpo)")
    if train.dynamic_sampling_tries:
        out.append("train.dynamic_sampling_tries: the diffusion job stores its trajectories per "
                   "rollout round and does not merge rounds yet; set it to 0")
    return out


def preflight(config) -> List[str]:
    """The pipeline folder (or cached hub id) and the prompt files exist on this machine."""
    from mmrl.config.jobs import file_problems, model_problems
    c: DiffusionConfig = config.task
    out = model_problems("diffusion.model", c.model, "model_index.json")
    for key in ("prompt_file", "eval_prompt_file"):
        if getattr(c, key):
            out.extend(file_problems(f"diffusion.{key}", getattr(c, key), "prompt file"))
    if not reward_spec_problems(c.reward):
        from mmrl.rewards.scorers import parse_specs
        for name, options in parse_specs(c.reward):
            path = options.get("path")
            if isinstance(path, str) and not os.path.exists(os.path.expanduser(path)):
                out.append(f"diffusion.reward: {name} path={path!r} not found; fix the path "
                           f"(or leave path= out to use the scorer's hub weights)")
    return out


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class DiffusionGroupPolicy(GroupPolicy):
    """:class:`mmrl.train.loop.GroupPolicy` over an ``SD3Policy`` / ``FluxPolicy`` (``flow``).

    Args:
        flow: the adapter (velocity function, ``encode``, ``decode``, ``reference``).
        c: the job's config section.
        adv_eps, adv_clip: the preset's advantage epsilon / clip (tree and singular hooks).
        reward_weights: reward column weights (tree and singular hooks).

    Attributes:
        iteration: rollout rounds so far (positions MixGRPO's window; saved in checkpoints).
        last_nfe: per-sample model evaluations the last rollout spent (the samplers' ``nfe``).
        evaluator, eval_every: the periodic ODE evaluation, run at the start of a rollout.
    """

    def __init__(self, flow, c: DiffusionConfig, *, adv_eps: float = 1e-4,
                 adv_clip: Optional[float] = None,
                 reward_weights: Optional[Dict[str, float]] = None):
        self.flow, self.c = flow, c
        self.adv_eps, self.adv_clip = adv_eps, adv_clip
        self.reward_weights = dict(reward_weights or {})
        is_flux = c.pipeline == "flux"
        self.latent = tuple(flow.latent_shape() if is_flux else
                            flow.latent_shape(c.height, c.width))  # checks the resolution
        self.sigmas = flow.sigmas(c.num_steps) if is_flux else flow_sigmas(c.num_steps, c.shift)
        self.eval_sigmas = (flow.sigmas(c.eval_num_steps) if is_flux
                            else flow_sigmas(c.eval_num_steps, c.shift))
        self.iteration = 0  # rollout rounds so far (MixGRPO's window position; checkpointed)
        self.evaluator: Optional[Evaluator] = None
        self.eval_every = 0
        self.last_nfe = 0
        # one initial noise per group: its samples must be drawn on one rank (data parallel);
        # tree / singular sampling train rows that are not the rewarded samples
        self.capabilities = Capabilities(
            own_kl=True, row_advantages=c.sampler in ("singular", "tree"),
            whole_groups=c.shared_noise, export=True, fsdp=True)
        # The loop's advantages hook exists only where training rows are not reward rows.
        self.advantages = {"singular": self._singular_advantages,
                           "tree": self._tree_advantages}.get(c.sampler)
        SDE_KL_FORMS.get(c.kl)  # an unknown form fails here, before any sampling

    # ---------------------------------------------------------------- GroupPolicy plumbing
    def parameters(self):
        return self.flow.trainable_parameters()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The trainable weights (LoRA adapter or transformer) + the rollout counter."""
        sd = {k: v for k, v in self.flow.transformer.state_dict().items()
              if self.c.finetune == "full" or "lora" in k}
        sd["mmrl_rollout_iteration"] = torch.tensor(self.iteration)
        return sd

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.iteration = int(state.pop("mmrl_rollout_iteration", 0))
        missing = set(self.state_dict()) - set(state) - {"mmrl_rollout_iteration"}
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. "
                             f"{sorted(missing)[0]!r}); expected weights of the same finetune "
                             f"mode ({self.c.finetune}) and LoRA rank")
        self.flow.transformer.load_state_dict(state, strict=False)

    def export_pretrained(self, path: str, merge_lora: bool = False, state_dict=None) -> str:
        """The trained pipeline (or LoRA file) in diffusers format; ``state_dict``: full weights
        to write instead of the live (FSDP-sharded) ones."""
        if state_dict is not None:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("mmrl_")}
        return self.flow.export_pretrained(path, merge_lora=merge_lora, state_dict=state_dict)

    def load_extra_state(self, extras: Dict[str, torch.Tensor]) -> None:
        """The non-weight entries of :meth:`state_dict` (FSDP resume loads weights apart)."""
        self.iteration = int(extras.get("mmrl_rollout_iteration", 0))

    def apply_fsdp(self) -> torch.nn.Module:
        """FSDP2 for full fine-tuning: each transformer block is a unit, the transformer the
        root (``train.parallel=fsdp``). Rollouts run with the weights gathered (the runner's
        ``gathered_parameters``); the log-prob passes call the transformer, whose hooks gather
        and reduce-scatter."""
        from torch.distributed.fsdp import fully_shard
        if self.c.finetune != "full":
            raise ValueError(f"train.parallel=fsdp shards full fine-tuning; diffusion.finetune="
                             f"{self.c.finetune!r}: use train.parallel=ddp (a LoRA adapter is "
                             f"small enough to replicate)")
        tr = self.flow.transformer
        for name in ("transformer_blocks", "single_transformer_blocks"):
            for block in getattr(tr, name, None) or []:
                fully_shard(block)
        fully_shard(tr)
        return tr

    def noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[n, *latent]`` fp32 standard normal on the policy's device (drawn on the CPU)."""
        return torch.randn((n, *self.latent), generator=generator).to(self.flow.device)

    def _device_generator(self, generator: torch.Generator) -> torch.Generator:
        # The loop's generator lives on the CPU; the SDE noise is drawn on the latents' device
        # from a generator seeded by it, so runs stay reproducible and resumable on any device.
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        return torch.Generator(self.flow.device).manual_seed(seed)

    # ---------------------------------------------------------------- rollout
    def rollout(self, prompts: Sequence[str], metadata: Sequence[Dict[str, Any]],
                group_size, generator: torch.Generator) -> Rollout:
        """Sample with log-probs; images are decoded for the reward (called under no_grad)."""
        if self.evaluator is not None and self.eval_every and \
                self.iteration % self.eval_every == 0:
            self.evaluator(self.iteration)
        counts = [group_size] * len(prompts) if isinstance(group_size, int) else list(group_size)
        sample = {"singular": self._rollout_singular, "tree": self._rollout_tree}.get(
            self.c.sampler, self._rollout_sde)
        rollout = sample(list(prompts), list(metadata), counts, generator)
        self.iteration += 1
        return rollout

    def _sde_steps(self, generator) -> List[int]:
        c, T = self.c, self.c.num_steps
        if c.sampler == "window":
            return random_window(T, c.window, generator=generator)
        if c.sampler == "sliding":
            return sliding_window(T, c.window, self.iteration, shift_every=c.sliding_shift_every,
                                  stride=c.sliding_stride)
        return list(range(T - 1))

    def _rollout_sde(self, prompts, metadata, counts, generator) -> Rollout:
        from mmrl.diffusion.samplers import sample_sde, take_cond

        P, n = len(prompts), torch.tensor(counts)
        rows = torch.arange(P).repeat_interleave(n)  # [B] prompt of each sample
        steps = self._sde_steps(generator)
        noise = self.noise(P if self.c.shared_noise else int(n.sum()), generator)
        if self.c.shared_noise:  # [P, *L] -> [B, *L]
            noise = noise.repeat_interleave(n.to(noise.device), 0)
        cond = take_cond(self.flow.encode(prompts), rows)
        traj = sample_sde(self.flow, noise, self.sigmas, cond, sde_steps=steps, kind=self.c.kind,
                          noise_level=self.c.noise_level,
                          generator=self._device_generator(generator))
        index, _, mask = traj.per_owner(len(rows))  # [B, K]
        return self._pack(traj, cond, rows, index, mask, rows, prompts, metadata)

    def _rollout_singular(self, prompts, metadata, counts, generator) -> Rollout:
        from mmrl.diffusion.g2rpo import sample_singular

        N = self._equal_counts(counts)
        cond = self.flow.encode(prompts)
        traj = sample_singular(self.flow, self.noise(len(prompts), generator), self.sigmas, cond,
                               group_size=N, steps=self.c.singular_steps,
                               granularities=self.c.granularities, kind=self.c.kind,
                               noise_level=self.c.noise_level,
                               generator=self._device_generator(generator))
        # One training row per reward row (member m, granularity g), each owning m's transition
        # and trained with the (k, prompt, g) group's advantage A_{m,g}: Σ_g A_{m,g}·∇logp_m is
        # G²RPO's integrated advantage times ∇logp_m (see _singular_advantages).
        index = traj.output_owner[:, None]  # [M·G, 1]
        mask = torch.ones(index.shape, dtype=torch.bool)
        return self._pack(traj, cond, traj.output_cond, index, mask, traj.output_cond, prompts,
                          metadata)

    def _rollout_tree(self, prompts, metadata, counts, generator) -> Rollout:
        from mmrl.diffusion.samplers import sample_tree

        leaves = self.c.tree_branching ** len(self.c.tree_split_steps)
        if self._equal_counts(counts) != leaves:
            raise ValueError(f"group size {counts[0]} but the tree gives {leaves} leaves per "
                             f"prompt; set train.group_size={leaves}")
        cond = self.flow.encode(prompts)
        traj = sample_tree(self.flow, self.noise(len(prompts), generator), self.sigmas, cond,
                           split_steps=self.c.tree_split_steps, branching=self.c.tree_branching,
                           noise_levels=(self.c.tree_noise_levels if self.c.tree_noise_levels
                                         is not None else self.c.noise_level),
                           sde_steps=self.c.tree_sde_steps, kind=self.c.kind,
                           generator=self._device_generator(generator))
        index, _, mask = traj.per_owner(traj.num_nodes)  # [Nn, K]
        # Rows: the leaves first, in output order (row i < B is reward row i), then inner nodes.
        inner = torch.ones(traj.num_nodes, dtype=torch.bool)
        inner[traj.leaves] = False
        order = torch.cat([traj.leaves, inner.nonzero().flatten()])  # [Nn] node of each row
        rollout = self._pack(traj, cond, traj.node_cond[order], index[order], mask[order],
                             traj.output_cond, prompts, metadata)
        rollout.data["node_of_row"] = order
        return rollout

    def _equal_counts(self, counts) -> int:
        if len(set(counts)) != 1:
            raise ValueError(f"sampler={self.c.sampler} needs the same group size for every "
                             f"prompt; got {sorted(set(counts))} (use "
                             f"train.rollout_allocation=fixed)")
        return int(counts[0])

    def _pack(self, traj, cond, row_prompt, index, mask, out_prompt, prompts, metadata):
        """A :class:`Rollout`: training rows = trajectory owners, samples = decoded outputs."""
        self.last_nfe = traj.nfe
        images = self.flow.decode(traj.final).cpu()  # [B_out, 3, H, W] in [0, 1]
        pick = out_prompt.tolist()
        return Rollout(list(images), [prompts[i] for i in pick], [metadata[i] for i in pick],
                       row_prompt.clone(), mask, {"index": index, "trajectory": _Shared(traj,
                                                                                       cond)})

    # ---------------------------------------------------------------- scoring
    def _rescore(self, velocity_fn, rollout: Rollout, rows, t0: int, t1: int):
        """``(out, mask)``: the :class:`SDEStepOutput` of the stored transitions of ``rows`` and
        steps ``[t0, t1)`` where ``mask [b, t]`` is True (``out`` None when there are none)."""
        from mmrl.diffusion.samplers import rescore

        shared = rollout.data["trajectory"]
        index = rollout.data["index"][rows, t0:t1]  # [b, t] transition ids
        mask = rollout.mask[rows, t0:t1]
        if not bool(mask.any()):
            return None, mask
        return rescore(shared.traj, velocity_fn, shared.cond, index=index[mask]), mask

    def _scatter(self, values: Optional[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """``[m] -> [b, t]`` at the mask's True entries, 0 elsewhere (keeps the gradient)."""
        out = torch.zeros(mask.shape, device=self.flow.device)
        return out if values is None else out.masked_scatter(mask.to(out.device), values.float())

    def logp(self, rollout: Rollout, rows: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """``[len(rows), t1 − t0]`` log-probs of the stored transitions, with gradient (0 where
        the mask is False)."""
        out, mask = self._rescore(self.flow, rollout, rows, t0, t1)
        return self._scatter(None if out is None else out.logp, mask)

    @torch.no_grad()
    def ref_logp(self, rollout: Rollout, rows: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """The same under the reference policy (base weights). The loop's KL term does not use
        it: :meth:`logp_and_kl` gives the closed form instead."""
        out, mask = self._rescore(self.flow.reference, rollout, rows, t0, t1)
        return self._scatter(None if out is None else out.logp, mask)

    def logp_and_kl(self, rollout: Rollout, rows: torch.Tensor, t0: int,
                    t1: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(logp, kl)``, each ``[len(rows), t1 − t0]`` with gradient: :meth:`logp` and the
        closed-form KL of the same transitions to the reference, ``sde_kl(out, ref.mean,
        diffusion.kl)`` (the loop's hook when beta > 0; 0 where the mask is False).

        The reference mean is computed here, from the same stored x, step and noise level, as
        flow_grpo does per training step (one extra no-grad forward per transition and epoch).
        """
        out, mask = self._rescore(self.flow, rollout, rows, t0, t1)
        if out is None:
            return self._scatter(None, mask), self._scatter(None, mask)
        ref, _ = self._rescore(self.flow.reference, rollout, rows, t0, t1)  # no_grad inside
        return (self._scatter(out.logp, mask),
                self._scatter(sde_kl(out, ref.mean.detach(), self.c.kl), mask))

    # ---------------------------------------------------------------- advantage hooks
    def _rewards(self, rewards) -> torch.Tensor:
        return rewards.weighted_sum(self.reward_weights)  # [B_out], NaN where a reward failed

    def _singular_advantages(self, rollout: Rollout, rewards) -> torch.Tensor:
        """``[M·G]`` A_{m,g} = (r_{m,g} − mean) / (std + eps) within each (k, prompt, g) group.

        G²RPO (arXiv 2510.01982) Eq. 11 trains member m with Σ_g A_{m,g}; here m's transition
        appears in G rows, one per granularity, so the summed gradient is the same at ratio 1.
        Differs from paper: the PPO clip acts on each (m, g) row (identical to the paper while
        the update is on-policy) and the loss normalizer counts M·G rows instead of M.
        A NaN/inf reward gives its own row advantage 0.
        """
        from mmrl.diffusion.advantages import _finite_group_advantages

        traj = rollout.data["trajectory"].traj
        G = len(traj.granularities)
        groups = traj.group_ids[traj.output_owner] * G + traj.output_granularity.new_tensor(
            [traj.granularities.index(g) for g in traj.output_granularity.tolist()])
        adv = _finite_group_advantages(self._rewards(rewards).float(), groups, "grpo",
                                       eps=self.adv_eps)
        return adv if self.adv_clip is None else adv.clamp(-self.adv_clip, self.adv_clip)

    def _tree_advantages(self, rollout: Rollout, rewards) -> torch.Tensor:
        """Per-node advantages (BranchGRPO: node reward = mean of its leaves, normalized per
        tree and depth), in row order; a node without a finite leaf reward gets 0."""
        from mmrl.diffusion.advantages import tree_advantages
        adv = tree_advantages(self._rewards(rewards), rollout.data["trajectory"].traj,
                              eps=self.adv_eps, adv_clip=self.adv_clip)[0]
        return adv[rollout.data["node_of_row"]]

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def sample_ode(self, prompts: Sequence[str], noise: torch.Tensor) -> torch.Tensor:
        """Images ``[P, 3, H, W]`` from the deterministic ODE sampler on the eval schedule."""
        from mmrl.diffusion.samplers import sample_sde

        flow, scale = self.flow, self.c.eval_guidance_scale
        saved = flow.guidance_scale
        flow.guidance_scale = saved if scale is None else float(scale)
        try:
            traj = sample_sde(flow, noise, self.eval_sigmas, flow.encode(list(prompts)),
                              sde_steps=[])
        finally:
            flow.guidance_scale = saved
        return flow.decode(traj.final).cpu()


class _Shared:
    """The rollout's trajectory and cond: shared by every row (never sliced by ``select``)."""

    def __init__(self, traj, cond):
        self.traj, self.cond = traj, cond


def build_policy(c: DiffusionConfig, device: str, spec=None,
                 reward_weights: Optional[Dict[str, float]] = None) -> DiffusionGroupPolicy:
    """Load the pipeline named by ``c.model`` and wrap it (resolution checked before sampling)."""
    from mmrl.diffusion import pipeline

    dev = torch.device(device)
    kwargs = dict(finetune=c.finetune, lora_rank=c.lora_rank, lora_alpha=c.lora_alpha,
                  max_sequence_length=c.max_sequence_length, guidance_scale=c.guidance_scale)
    if c.pipeline == "flux":
        kwargs.update(height=c.height, width=c.width)
    cls = getattr(pipeline, PIPELINES[c.pipeline])
    flow = cls.from_pretrained(c.model, dtype=_dtype(c.dtype, dev), **kwargs)
    flow.pipe.to(dev)
    return DiffusionGroupPolicy(flow, c, adv_eps=getattr(spec, "adv_eps", 1e-4) or 1e-4,
                                adv_clip=getattr(spec, "adv_clip", None),
                                reward_weights=reward_weights)


def load_prompts(c: DiffusionConfig):
    """``(train_prompts, eval_prompts)``; empty files and missing files raise clearly."""
    train = read_prompts(c.prompt_file, c.prompts, "diffusion.prompt_file")
    if not train:
        raise ValueError("no training prompts: diffusion.prompts is empty and no prompt_file "
                         "is set; give at least one prompt")
    evals = read_prompts(c.eval_prompt_file, c.eval_prompts, "diffusion.eval_prompt_file")
    if not evals and c.eval_holdout:
        if c.eval_holdout >= len(train):
            raise ValueError(f"diffusion.eval_holdout={c.eval_holdout} but there are only "
                             f"{len(train)} training prompts; lower it or give eval_prompts")
        train, evals = train[:-c.eval_holdout], train[-c.eval_holdout:]
    return train, evals


def run(config) -> Dict[str, Any]:
    """Build policy, reward and prompts from ``config`` and train with the shared runner."""
    from mmrl.rewards import compose
    from mmrl.train.runner import run_training

    c: DiffusionConfig = config.task
    train_prompts, eval_prompts = load_prompts(c)  # bad prompt files fail before any loading
    device = _device(config.train.device)
    reward = ImageReward(compose(c.reward, device=device))
    config.algo.reward_weights = {**reward.weights, **config.algo.reward_weights}
    spec = config.algo.resolve()
    torch.manual_seed(config.train.seed)  # the LoRA init draws from the global RNG
    policy = build_policy(c, device, spec, config.algo.reward_weights)
    if c.eval_every and int(os.environ.get("RANK", "0")) == 0:  # evaluate on the main rank
        if not eval_prompts:
            warnings.warn("diffusion.eval_every is set but there are no eval prompts; "
                          "evaluation is off (set eval_prompts or eval_holdout)", stacklevel=2)
        else:
            policy.evaluator = Evaluator(policy, eval_prompts, reward, config.algo.reward_weights,
                                         config.train.output_dir, seed=config.train.seed,
                                         batch_size=c.eval_batch_size)
            policy.eval_every = c.eval_every
    summary = run_training(config, policy, reward, train_prompts, [{} for _ in train_prompts])
    if policy.evaluator is not None and summary.get("stopped") is None:
        summary["eval"] = policy.evaluator(summary["steps"])  # the grid after the last step
    return summary


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


register_job(Job("diffusion", DiffusionConfig, run,
                 "GRPO for flow-matching text-to-image models (SD3/SD3.5, FLUX via diffusers): "
                 "Flow-GRPO, MixGRPO, G2RPO, tree sampling",
                 check=check, preflight=preflight,
                 algo_defaults=lambda c: {"max_len": c.trained_steps()}))
