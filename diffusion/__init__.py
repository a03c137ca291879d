"""mmrl.diffusion — GRPO for flow-matching image models: SDE steps with log-probs, samplers over a
velocity function (full / windowed SDE, G²RPO singular sampling, tree sampling) and their
advantages; the generic flow policy and the ``diffusion`` job; one adapter per generator family
under ``models/`` (SD3, FLUX), chosen by the pipeline class. See docs/diffusion.md.

Every name is imported on first use (PEP 562), so ``import mmrl.diffusion.config`` loads no torch.
"""
from mmrl._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".advantages": ["g2rpo_advantages", "g2rpo_granular_advantages", "prompt_advantages",
                    "prompt_ids", "tree_advantages", "tree_node_rewards"],
    ".g2rpo": ["SingularTrajectory", "completion_sigmas", "sample_singular"],
    ".dpm": ["ODE_SOLVERS", "dpm2_step", "post_sigmas", "sample_mixed", "solve_ode"],
    ".samplers": ["Trajectory", "TreeTrajectory", "rescore", "sample_sde", "sample_tree",
                  "take_cond"],
    ".schedule": ["cfg_combine", "flow_sigmas", "initial_noise", "random_window", "shift_sigmas",
                  "sliding_window", "WINDOW_SCHEDULES", "mix_window", "window_start"],
    ".sde": ["SDE_KINDS", "SDE_KL_FORMS", "SDEStepOutput", "euler_step", "sde_kl", "sde_step"],
    ".models": ["FAMILIES", "adapter_class", "adapter_for_pipeline", "resolve_family"],
    ".models.base": ["FlowAdapter", "load_pipeline"],
    ".models.sd3": ["SD3Adapter", "SD3Policy", "SD3_LORA_TARGETS", "load_sd3_pipeline"],
    ".models.flux": ["FLUX_LORA_TARGETS", "FluxAdapter", "FluxPolicy"],
    ".config": ["DiffusionConfig"],
    ".policy": ["DiffusionGroupPolicy"],
})
