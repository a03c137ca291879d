"""The tiny pipelines' builders at their old path; each family builds its own
(:func:`mmrl.diffusion.models.sd3.build_tiny_sd3`, :func:`mmrl.diffusion.models.flux.
build_tiny_flux`, or ``Adapter.build_tiny(folder, size)``), from the parts in
:mod:`mmrl.diffusion.models.tiny_parts`."""
from mmrl.diffusion.models.flux import build_tiny_flux, save_tiny_flux  # noqa: F401
from mmrl.diffusion.models.sd3 import build_tiny_sd3, save_tiny_sd3  # noqa: F401
from mmrl.diffusion.models.tiny_parts import write_byte_clip_vocab  # noqa: F401

__all__ = ["build_tiny_flux", "build_tiny_sd3", "save_tiny_flux", "save_tiny_sd3",
           "write_byte_clip_vocab"]
