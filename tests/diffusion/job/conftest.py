"""A tiny SD3 pipeline saved with save_pretrained (the demo's model), shared by this folder."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    from mmrl.diffusion.models.sd3 import save_tiny_sd3

    return str(save_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3_job"), size=8))
