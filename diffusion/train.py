"""The ``diffusion`` job's names at their old path: the config section is in
:mod:`mmrl.diffusion.config`, the policy in :mod:`mmrl.diffusion.policy`, building and running in
:mod:`mmrl.diffusion.job`. Importing this module registers the job (as the config module does).
"""
from mmrl.diffusion.config import (SAMPLERS, DiffusionConfig, algo_defaults, check,  # noqa: F401
                                   preflight, reward_spec_problems)
from mmrl.diffusion.job import build_policy, load_prompts, run  # noqa: F401
from mmrl.diffusion.policy import DiffusionGroupPolicy  # noqa: F401

__all__ = ["SAMPLERS", "DiffusionConfig", "DiffusionGroupPolicy", "algo_defaults",
           "build_policy", "check", "load_prompts", "preflight", "reward_spec_problems", "run"]
