"""The SD3 / FLUX adapters at their old path; they live in :mod:`mmrl.diffusion.models`
(``models/sd3.py``, ``models/flux.py``, the shared parts in ``models/base.py``)."""
from mmrl.diffusion.models.base import (FINETUNE_MODES, FlowAdapter,  # noqa: F401
                                        check_resolution, load_pipeline)
from mmrl.diffusion.models.flux import FLUX_LORA_TARGETS, FluxAdapter, FluxPolicy  # noqa: F401
from mmrl.diffusion.models.sd3 import (SD3_LORA_TARGETS, SD3Adapter, SD3Policy,  # noqa: F401
                                       load_sd3_pipeline)

__all__ = ["FINETUNE_MODES", "FLUX_LORA_TARGETS", "FlowAdapter", "FluxAdapter", "FluxPolicy",
           "SD3Adapter", "SD3Policy", "SD3_LORA_TARGETS", "check_resolution", "load_pipeline",
           "load_sd3_pipeline"]
