"""Tiny SD3 and FLUX pipelines (each family's builder in :mod:`mmrl.diffusion.models`), saved the
way a user's checkpoint is.

The SD3 pipeline here makes 8x8 images (the demo's default is 16), the FLUX one 16x16.
"""
from __future__ import annotations

import pytest

from mmrl.diffusion.models.flux import save_tiny_flux
from mmrl.diffusion.models.sd3 import save_tiny_sd3


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A directory written by ``FluxPipeline.save_pretrained`` (tiny, random, 16x16 images)."""
    return str(save_tiny_flux(tmp_path_factory.mktemp("tiny_flux"), size=16))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A directory written by ``StableDiffusion3Pipeline.save_pretrained`` (tiny, random, 8x8)."""
    return str(save_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"), size=8))
