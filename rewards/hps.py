"""HPS v2 / v2.1 (Wu et al. 2023, arXiv 2306.09341): cosine of open_clip ViT-H-14 embeddings.

The checkpoint (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` from the hub repo
``xswu/HPSv2``) is a state dict for open_clip's ``ViT-H-14``; it is loaded with
``weights_only=True``.

Preprocessing is the one the hpsv2 package (1.2.0) scores and evaluates with, its
``light_augmentation`` validation transform: pixels to a float tensor in [0, 1] first, then the
**longest** edge resized to 224 on that float tensor (bicubic, antialiased, no uint8 rounding, no
clamp; sizes rounded with Python's ``round``), zero padding to a 224 × 224 square (the short
side's extra pixel on the right / bottom), then OpenAI mean/std. PIL and tensor inputs take the
same path (:func:`hps_preprocess`), so both equal the package to float precision and tensor
inputs are differentiable. Nothing is cropped.

Differs from hpsv2:
    - RGBA: hpsv2 keeps the alpha as a 4th channel, which its 3-channel model then rejects (a
      RuntimeError); mmrl drops the alpha and scores the RGB channels as stored (straight, not
      premultiplied), i.e. exactly hpsv2's first three channels.
    - An image whose longest edge is already 224 but is not square: hpsv2 neither resizes nor pads
      it, and its model fails on the non-square input; mmrl pads it to the square.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image

from mmrl.rewards.base import (OPENAI_MEAN, OPENAI_STD, Scorer, as_rgb, check_path,
                               default_device, hub_file, load_state_dict_file, parse_dtype)

HPS_FILES = {"hps_v2": "HPS_v2_compressed.pt", "hps_v2.1": "HPS_v2.1_compressed.pt"}
HPS_REPO = "xswu/HPSv2"


def hps_preprocess(x: torch.Tensor, size: int) -> torch.Tensor:
    """hpsv2's evaluation preprocessing: ``[b, 3, H, W]`` in [0, 1] -> normalized ``[b, 3, S, S]``.

    Longest edge to ``size`` (bicubic, antialiased, in float: torchvision's ``resize`` of a float
    tensor, which hpsv2's ``ResizeMaxSize`` calls), zeros padded to the square (black before
    normalizing), then ``(x - OpenAI mean) / std``. Differentiable.
    """
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))  # the same float expression as hpsv2, so sizes round alike
    nh, nw = h, w
    if scale != 1.0:
        # Python's round (half to even), as hpsv2; at least 1 px for extreme aspect ratios.
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    ph, pw = size - nh, size - nw
    if ph or pw:  # (left, right, top, bottom): the odd pixel goes right / bottom
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    m = torch.tensor(OPENAI_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(OPENAI_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def pil_to_float(im: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` float32 in [0, 1] (torchvision's ``ToTensor``), after RGB conversion."""
    from torchvision.transforms.functional import to_tensor
    return to_tensor(as_rgb(im))


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
        """``[b, 3, S, S]`` normalized pixels (S = 224 for ViT-H-14) on the scorer's device.

        PIL images become float tensors and are resized one at a time on the CPU, as hpsv2's
        transform does (on the CPU, faster than resizing a stacked batch of large images).
        """
        if isinstance(images, torch.Tensor):
            x = hps_preprocess(images.to(self.device, torch.float32), self.image_size)
        else:
            x = torch.cat([hps_preprocess(pil_to_float(im)[None], self.image_size)
                           for im in images])
        return x.to(self.device, self.dtype)

    def _score(self, images, prompts):
        img = self.model.encode_image(self.preprocess(images), normalize=True).float()
        txt = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
        return (img * txt.float()).sum(-1)
