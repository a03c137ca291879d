"""mmrl.diffusion — GRPO for flow-matching image models: SDE steps with log-probs, samplers over a
velocity function (full / windowed SDE, G²RPO singular sampling, tree sampling) and their
advantages. Pure torch; diffusers is only needed by the model adapters (``SD3Policy``,
``FluxPolicy``, ``load_pipeline``), which are imported on first use. See docs/diffusion.md.
"""
from mmrl.diffusion.advantages import (g2rpo_advantages, prompt_advantages, prompt_ids,
                                       tree_advantages, tree_node_rewards)
from mmrl.diffusion.g2rpo import SingularTrajectory, completion_sigmas, sample_singular
from mmrl.diffusion.samplers import (Trajectory, TreeTrajectory, rescore, sample_sde, sample_tree,
                                     take_cond)
from mmrl.diffusion.schedule import (cfg_combine, flow_sigmas, initial_noise, random_window,
                                     shift_sigmas, sliding_window)
from mmrl.diffusion.sde import (SDE_KINDS, SDE_KL_FORMS, SDEStepOutput, euler_step, sde_kl,
                                sde_step)

__all__ = [
    "SDE_KINDS", "SDE_KL_FORMS", "SDEStepOutput", "SingularTrajectory", "Trajectory", "TreeTrajectory",
    "cfg_combine", "completion_sigmas", "euler_step", "flow_sigmas", "g2rpo_advantages",
    "initial_noise", "prompt_advantages", "prompt_ids", "random_window", "rescore",
    "sample_sde", "sample_singular", "sample_tree", "sde_kl", "sde_step", "shift_sigmas",
    "sliding_window", "take_cond", "tree_advantages", "tree_node_rewards",
    "FLUX_LORA_TARGETS", "FluxPolicy", "SD3Policy", "SD3_LORA_TARGETS", "load_pipeline",
    "load_sd3_pipeline",
]

_LAZY = {"FLUX_LORA_TARGETS", "FluxPolicy", "SD3Policy", "SD3_LORA_TARGETS", "load_pipeline",
         "load_sd3_pipeline"}


def __getattr__(name):
    # The diffusers adapters load diffusers/transformers/peft (seconds); import them on first use.
    if name in _LAZY:
        from mmrl.diffusion import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'mmrl.diffusion' has no attribute {name!r}")
