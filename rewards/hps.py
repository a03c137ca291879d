"""HPS v2 / v2.1 (Wu et al. 2023, arXiv 2306.09341): cosine of open_clip ViT-H-14 embeddings.

The checkpoint (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` from the hub repo
``xswu/HPSv2``) is a state dict for open_clip's ``ViT-H-14``; it is loaded with
``weights_only=True``. Preprocessing is the HPSv2 repository's evaluation transform, in its order:
``Resize(224, bicubic)`` of the shortest edge, ``CenterCrop(224)``, ``ToTensor``,
``Normalize(OpenAI mean, std)``, with ``convert("RGB")`` moved to the front (same result for RGB
and grayscale images; for RGBA the alpha channel is dropped before resizing, see
:func:`hps_transform`).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from mmrl.rewards.base import (OPENAI_MEAN, OPENAI_STD, Scorer, as_rgb, check_path,
                               clip_tensor_preprocess, default_device, hub_file,
                               load_state_dict_file, parse_dtype)

HPS_FILES = {"hps_v2": "HPS_v2_compressed.pt", "hps_v2.1": "HPS_v2.1_compressed.pt"}
HPS_REPO = "xswu/HPSv2"


def hps_transform(image_size: int):
    """The HPSv2 evaluation transform for PIL images (see module docstring)."""
    from torchvision import transforms as T
    return T.Compose([
        # RGB first: the reference converts after cropping, which for RGBA inputs resizes with
        # premultiplied alpha; converting first makes RGBA score like its RGB (alpha dropped).
        # Identical for RGB and grayscale inputs.
        as_rgb,
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])


class _quiet_open_clip(logging.Filter):  # noqa: N801 (used as a context manager)
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    def __enter__(self):
        logging.getLogger().addFilter(self)

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self)


class HPS(Scorer):
    """HPS v2 / v2.1 score: ``cos(open_clip image embedding, text embedding)``.

    Output scale: cosine in [−1, 1], ≈ 0.2–0.35 for real checkpoints (papers' tables show ×100).

    Args:
        version: ``"hps_v2"`` or ``"hps_v2.1"`` (picks the default checkpoint file).
        path: the checkpoint file (``.pt`` loaded with ``weights_only=True``, or
            ``.safetensors``), or a directory holding ``HPS_v2[.1]_compressed.pt``; default: the
            hub repo ``xswu/HPSv2``.
        arch: open_clip architecture name (default ``ViT-H-14``; tests pass a tiny registered one).
    """

    def __init__(self, version: str = "hps_v2.1", path=None, device=None, dtype=None,
                 arch: str = "ViT-H-14", batch_size: int = 32, grad: bool = False):
        import open_clip
        if version not in HPS_FILES:
            raise ValueError(f"HPS version {version!r}; expected one of {list(HPS_FILES)}")
        super().__init__(batch_size, grad)
        self.name = version
        self.scale = "cosine in [-1, 1] (≈ 0.2–0.35 for real checkpoints; tables show ×100)"
        if arch not in open_clip.list_models():
            raise ValueError(f"{version}: unknown open_clip arch {arch!r}; expected a name from "
                             f"open_clip.list_models() (HPS checkpoints are 'ViT-H-14') or one "
                             f"registered with open_clip.add_model_config")
        ckpt = self._checkpoint(version, path)
        self.device, self.dtype = default_device(device), parse_dtype(dtype)
        with _quiet_open_clip():  # its "no pretrained weights" warning: the HPS file follows
            model = open_clip.create_model(arch, pretrained=None)
        sd = load_state_dict_file(ckpt)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{version}: checkpoint {ckpt} does not fit open_clip {arch!r}: "
                             f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} "
                             f"unexpected (e.g. {unexpected[:3]}); pass arch= matching the file")
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.transform = hps_transform(self.image_size)

    @staticmethod
    def _checkpoint(version: str, path: Optional[str]) -> str:
        path = check_path(version, path)
        fname = HPS_FILES[version]
        if path is None:
            return hub_file(version, HPS_REPO, fname,
                            f"hf download {HPS_REPO} {fname} --local-dir DIR")
        if os.path.isdir(path):
            return check_path(version, os.path.join(path, fname))
        return path

    def preprocess(self, images) -> torch.Tensor:
        """``[b, 3, S, S]`` normalized pixels (S = 224 for ViT-H-14) on the scorer's device."""
        if isinstance(images, torch.Tensor):
            x = clip_tensor_preprocess(images.to(self.device, torch.float32), self.image_size,
                                       (self.image_size, self.image_size), OPENAI_MEAN, OPENAI_STD)
        else:
            x = torch.stack([self.transform(im) for im in images])
        return x.to(self.device, self.dtype)

    def _score(self, images, prompts):
        img = self.model.encode_image(self.preprocess(images), normalize=True).float()
        txt = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
        return (img * txt.float()).sum(-1)
