"""The diffusion job refuses the entropy options, with the reason, at config time and in
check_policy (a Gaussian step's entropy does not depend on the weights)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from mmrl.config.core import ConfigError

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_train_helpers import tiny_config  # noqa: E402


@pytest.mark.parametrize("algo", [{"entropy_coef": 0.01}, {"top_entropy_quantile": 0.2}])
def test_entropy_options_are_refused_with_the_reason(tiny_sd3_path, tmp_path, algo):
    with pytest.raises(ConfigError) as err:
        tiny_config(tiny_sd3_path, str(tmp_path), algo=algo)
    assert "entropy depends on its noise level only" in str(err.value)
    assert "set entropy_coef=0 and top_entropy_quantile=1" in str(err.value)


def test_check_policy_gives_the_policys_reason(tiny_sd3_path, tmp_path):
    from mmrl.algo.presets import resolve_algo
    from mmrl.diffusion.job import build_policy
    from mmrl.train.policy import check_policy
    cfg = tiny_config(tiny_sd3_path, str(tmp_path))
    torch.manual_seed(0)
    policy = build_policy(cfg.task, "cpu", cfg.algo.resolve())
    assert not check_policy(policy).entropy
    with pytest.raises(TypeError) as err:
        check_policy(policy, resolve_algo("grpo", entropy_coef=0.01))
    assert ("needs Capabilities(entropy=True), which DiffusionGroupPolicy does not declare: a "
            "trained denoising step is a Gaussian") in str(err.value)
