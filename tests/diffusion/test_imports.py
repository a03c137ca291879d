"""What importing the diffusion package costs: the config section, the family registry and the
CLI plugin load no torch (``mmrl config validate`` and ``mmrl --help`` stay fast); the old module
paths still give the same objects."""
from __future__ import annotations

import subprocess
import sys


def test_the_config_registry_and_cli_load_no_torch():
    code = ("import sys, mmrl.diffusion.config, mmrl.diffusion.models, mmrl.diffusion.cli; "
            "from mmrl.config.jobs import JOBS; "
            "heavy = sorted(m for m in ('torch', 'numpy', 'diffusers', 'transformers', 'peft') "
            "if m in sys.modules); print(heavy, 'diffusion' in JOBS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] True"


def test_old_paths_give_the_same_objects():
    import mmrl.diffusion as d
    from mmrl.diffusion import job, models, pipeline, policy, tiny, train
    from mmrl.diffusion.models import flux, sd3

    assert pipeline.SD3Policy is sd3.SD3Adapter is d.SD3Policy is models.adapter_class("sd3")
    assert pipeline.FluxPolicy is flux.FluxAdapter is d.FluxPolicy
    assert pipeline.SD3_LORA_TARGETS == d.FLUX_LORA_TARGETS and pipeline.load_sd3_pipeline
    assert tiny.save_tiny_sd3 is sd3.save_tiny_sd3 and tiny.save_tiny_flux is flux.save_tiny_flux
    assert train.run is job.run and train.DiffusionGroupPolicy is policy.DiffusionGroupPolicy
    assert set(d.__all__) >= {"sample_sde", "g2rpo_advantages", "SD3Policy", "FlowAdapter"}
