"""The ``diffusion`` job: GRPO for flow-matching text-to-image models (SD3 / SD3.5, FLUX).

``mmrl train configs/diffusion/<recipe>.yaml`` builds a
:class:`~mmrl.diffusion.policy.DiffusionGroupPolicy` around the flow adapter that the
checkpoint's pipeline class picks (:mod:`mmrl.diffusion.models`; LoRA or full fine-tuning), a
reward from ``mmrl.rewards`` and the prompts, wires the periodic evaluation on the main rank, and
hands them to :func:`mmrl.train.runner.run_training` (seeding, checkpoints and exact resume,
metrics, progress bar, data parallel). The config section is :mod:`mmrl.diffusion.config`.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional

import torch

from mmrl.diffusion.config import DiffusionConfig
from mmrl.diffusion.evaluate import Evaluator, ImageReward, read_prompts
from mmrl.diffusion.models import adapter_class, resolve_family
from mmrl.diffusion.matching import MatchingDiffusionPolicy
from mmrl.diffusion.policy import DiffusionGroupPolicy


def build_policy(c: DiffusionConfig, device: str, spec=None,
                 reward_weights: Optional[Dict[str, float]] = None) -> DiffusionGroupPolicy:
    """Load the pipeline named by ``c.model`` with its family's adapter and wrap it (the
    resolution is checked before any sampling): a :class:`MatchingDiffusionPolicy` for a
    matching objective (``diffusion.objective: nft | awm``).

    Raises:
        ValueError: an unsupported pipeline class, or one that ``c.pipeline`` does not name.
        FileNotFoundError: the model is neither a local folder nor available from the hub.
    """
    dev = torch.device(device)
    adapter = adapter_class(resolve_family(c.pipeline, c.model, download=True))
    flow = adapter.from_pretrained(
        c.model, dtype=_dtype(c.dtype, dev), height=c.height, width=c.width,
        guidance_scale=c.guidance_scale, finetune=c.finetune, lora_rank=c.lora_rank,
        lora_alpha=c.lora_alpha, max_sequence_length=c.max_sequence_length, shift=c.shift,
        frames=c.frames or None, gradient_checkpointing=c.gradient_checkpointing)
    flow.pipe.to(dev)
    if hasattr(flow, "cfg_uncond_grad"):  # families with classifier-free guidance (SD3)
        flow.cfg_uncond_grad = c.cfg_uncond_grad
    cls = DiffusionGroupPolicy if c.objective == "grpo" else MatchingDiffusionPolicy
    return cls(flow, c, adv_eps=getattr(spec, "adv_eps", 1e-4) or 1e-4,
                                adv_clip=getattr(spec, "adv_clip", None),
                                reward_weights=reward_weights,
                                keep_means=bool(getattr(spec, "needs_step_terms", False)))


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


def attach_evaluator(policy: DiffusionGroupPolicy, config, eval_prompts, reward,
                     is_main: bool) -> None:
    """Evaluate (ODE sampler, grid, eval.jsonl) every ``diffusion.eval_every`` rollouts, on the
    main rank only; warns when evaluation is asked for without eval prompts."""
    c: DiffusionConfig = config.task
    if not c.eval_every or not is_main:
        return
    if not eval_prompts:
        warnings.warn("diffusion.eval_every is set but there are no eval prompts; "
                      "evaluation is off (set eval_prompts or eval_holdout)", stacklevel=3)
        return
    from mmrl.train.observe import MediaLog
    media = MediaLog(config.train.output_dir, wandb_project=config.train.wandb_project)
    policy.evaluator = Evaluator(policy, eval_prompts, reward, config.algo.reward_weights,
                                 config.train.output_dir, seed=config.train.seed,
                                 batch_size=c.eval_batch_size, media=media)
    policy.eval_every = c.eval_every


def read_pair_file(path: str) -> List[Dict[str, Any]]:
    """The diffusion job's pair files: :func:`mmrl.train.pref_stage.read_pair_records`, with
    relative ``chosen`` / ``rejected`` image paths made relative to the file's folder (as the
    video job's media paths are)."""
    from mmrl.train.pref_stage import read_pair_records
    base = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    return [{**rec, **{k: os.path.join(base, rec[k]) for k in ("chosen", "rejected")
                       if isinstance(rec[k], str) and not os.path.isabs(rec[k])}}
            for rec in read_pair_records(path)]


def run(config) -> Dict[str, Any]:
    """Build policy, reward and prompts from ``config`` and train with the shared runner."""
    from mmrl.rewards import compose
    from mmrl.train.distributed import init_distributed
    from mmrl.train.runner import run_training

    c: DiffusionConfig = config.task
    train_prompts, eval_prompts = load_prompts(c)  # bad prompt files fail before any loading
    device = _device(config.train.device)
    reward = ImageReward(compose(c.reward, device=device))
    config.algo.reward_weights = {**reward.weights, **config.algo.reward_weights}
    spec = config.algo.resolve()
    torch.manual_seed(config.train.seed)  # the LoRA init draws from the global RNG
    policy = build_policy(c, device, spec, config.algo.reward_weights)
    policy.flow.check_prompts(train_prompts, "training prompts")  # before any sampling
    if eval_prompts:
        policy.flow.check_prompts(eval_prompts, "evaluation prompts")
    dist = init_distributed(config.train.parallel)  # the runner joins the same process group
    attach_evaluator(policy, config, eval_prompts, reward, dist.is_main)
    verifier = None  # VerIPO's verifier: the scorers named by pref.verifier
    if config.pref.verifier is not None:
        verifier = ImageReward(compose(config.pref.verifier, device=device))
    summary = run_training(config, policy, reward, train_prompts, [{} for _ in train_prompts],
                           verifier=verifier, read_pairs=read_pair_file)
    if policy.evaluator is not None and summary.get("stopped") is None:
        summary["eval"] = policy.evaluator(summary["steps"])  # the grid after the last step
    if policy.evaluator is not None and policy.evaluator.media is not None:
        policy.evaluator.media.close()
    return summary


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
