"""ImageReward (Xu et al. 2023, arXiv 2304.05977) through the optional ``image-reward`` package.

The BLIP model and its checkpoint come from the package (``pip install image-reward``; it imports
as ``ImageReward``). mmrl batches its ``score`` computation across different prompts: BLIP
cross-attention text features -> MLP -> ``(raw − 0.16717362830052426) / 1.0333394966054072``,
exactly the package's per-prompt ``score``. The package's ``load`` uses ``torch.load``, whose
default in torch ≥ 2.6 is ``weights_only=True``.
"""
from __future__ import annotations

import os

import torch

from mmrl.rewards.base import (OPENAI_MEAN, OPENAI_STD, Scorer, as_rgb, check_path,
                               clip_tensor_preprocess, default_device, parse_dtype, weights_error)

SERVE_HINT = ("serve it from its own environment: `pip install mmrl image-reward openai-clip "
              "'transformers<5'` there (mmrl without its [rewards] extra, which requires "
              "transformers 5), run `mmrl reward serve imagereward:path=DIR` in it, and score "
              "from training with the 'remote' scorer (docs/rewards.md, \"Reward server\")")
EXTRA_HINT = ("imagereward needs the optional package 'image-reward' (imports as ImageReward), "
              "which pins its own transformers/timm versions: install it with "
              "`pip install image-reward`, or " + SERVE_HINT)


def import_imagereward():
    """The ``ImageReward`` module, or an ImportError saying why it cannot be imported here.

    Three failures have their own message: the package missing; its undeclared dependency
    ``clip`` (OpenAI CLIP, imported by ``ImageReward/models/CLIPScore.py`` and
    ``AestheticScore.py`` but absent from its requirements) missing; and transformers >= 5,
    whose ``transformers.modeling_utils`` no longer has ``apply_chunking_to_forward`` (and
    friends), which the package's BLIP text encoder (``ImageReward/models/BLIP/med.py``)
    imports. Other missing modules name themselves and the package.
    """
    try:
        import ImageReward  # noqa: N813 (the package's own name)
    except ModuleNotFoundError as err:
        if err.name in ("ImageReward", None):
            raise ImportError(f"{EXTRA_HINT} ({err})") from None
        if err.name == "clip":
            raise ImportError(
                f"imagereward: the image-reward package imports OpenAI's CLIP as `clip`, which it "
                f"does not declare as a dependency, and `clip` is not installed ({err}). Install "
                f"it with `pip install openai-clip` (PyPI's `clip` is an unrelated clipboard "
                f"tool), or {SERVE_HINT}") from None
        raise ImportError(f"imagereward: the image-reward package needs the module {err.name!r}, "
                          f"which is not installed ({err}); install the package's requirements "
                          f"(`pip install image-reward` pulls them), or {SERVE_HINT}") from None
    except ImportError as err:
        if "apply_chunking_to_forward" in str(err) or "modeling_utils" in str(err):
            import transformers
            raise ImportError(
                f"imagereward: the image-reward package does not work with transformers "
                f"{transformers.__version__}: its BLIP code imports `apply_chunking_to_forward` "
                f"(and other helpers) from transformers.modeling_utils, which transformers 5 "
                f"removed ({err}). mmrl pins transformers 5, so {SERVE_HINT}") from None
        raise
    return ImageReward


class ImageRewardScorer(Scorer):
    """ImageReward score, normalized by the package's mean and std.

    Output scale: standardized, ``(raw − 0.16717362830052426) / 1.0333394966054072`` (≈ N(0, 1)
    over the ImageRewardDB training images; good images ≈ 0.5–2).

    Args:
        path: an ``ImageReward.pt`` file (with ``med_config.json`` beside it), or a directory
            holding both, used as the package's ``download_root``; default: the package
            downloads ``ImageReward-v1.0`` from the hub ``THUDM/ImageReward``.
    """

    name = "imagereward"
    scale = "standardized: (raw - 0.16717) / 1.03334 (≈ N(0,1) on ImageRewardDB)"

    def __init__(self, path=None, device=None, dtype=None, batch_size: int = 16,
                 grad: bool = False):
        rm = import_imagereward()
        super().__init__(batch_size, grad)
        path = check_path(self.name, path)
        self.device = default_device(device)
        src, root, extra = "ImageReward-v1.0", None, {}
        if path is not None:
            # A checkpoint file or a folder: med_config.json is looked up beside it, so the
            # package does not try to download it.
            src = path if os.path.isfile(path) else src
            root = os.path.dirname(path) if os.path.isfile(path) else path
            if os.path.exists(os.path.join(root, "med_config.json")):
                extra["med_config"] = os.path.join(root, "med_config.json")
        try:
            self.model = rm.load(src, device=str(self.device), download_root=root, **extra)
        except (OSError, RuntimeError) as err:
            raise weights_error(self.name, "ImageReward-v1.0", repr(path or "THUDM/ImageReward"),
                                "hf download THUDM/ImageReward ImageReward.pt "
                                "med_config.json --local-dir DIR", err) from None
        if dtype is not None:
            self.model.to(parse_dtype(dtype))
        self.model.eval().requires_grad_(False)

    def preprocess(self, images) -> torch.Tensor:
        """The package's transform for PIL; its differentiable torch copy for tensors."""
        if isinstance(images, torch.Tensor):
            return clip_tensor_preprocess(images.to(self.device, torch.float32), 224, (224, 224),
                                          OPENAI_MEAN, OPENAI_STD)
        # RGB before the package's resize, as for HPS (RGBA: alpha dropped, not premultiplied).
        return torch.stack([self.model.preprocess(as_rgb(im))
                            for im in images]).to(self.device)

    def _score(self, images, prompts):
        m = self.model
        text = m.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                return_tensors="pt").to(self.device)
        pixels = self.preprocess(images).to(next(m.parameters()).dtype)
        image_embeds = m.blip.visual_encoder(pixels)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = m.blip.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                  encoder_hidden_states=image_embeds,
                                  encoder_attention_mask=image_atts, return_dict=True)
        raw = m.mlp(out.last_hidden_state[:, 0, :].float()).squeeze(-1)  # [b, 1] -> [b]
        return (raw - m.mean) / m.std


__all__ = ["ImageRewardScorer", "import_imagereward"]
