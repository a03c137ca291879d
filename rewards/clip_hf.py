"""transformers CLIP scorers: PickScore, CLIP score, LAION aesthetic.

All three embed with a ``transformers.CLIPModel`` (``get_image_features`` / ``get_text_features``,
L2-normalized) and its ``CLIPProcessor``; they differ in the checkpoint and the head:

- ``pickscore`` (Kirstain et al. 2023, arXiv 2305.01569): ``s = logit_scale.exp() · cos(t, i)``.
- ``clip_score`` (Hessel et al. 2021, arXiv 2104.08718): ``2.5 · max(cos, 0)`` or ``100 · cos``.
- ``aesthetic`` (LAION improved aesthetic predictor): MLP 768→1024→128→64→16→1 on the
  L2-normalized CLIP ViT-L/14 image embedding.
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch

from mmrl.rewards.base import (Images, Scorer, WeightsNotFoundError, as_rgb, check_path,
                               clip_tensor_preprocess, default_device, hub_file,
                               load_state_dict_file, parse_dtype, weights_error)


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _has_processor(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f))
        for f in ("processor_config.json", "preprocessor_config.json"))


class HFClip:
    """A transformers CLIP model + processor giving L2-normalized embeddings.

    Args:
        name: the scorer name (for error messages).
        path: local directory (``save_pretrained`` layout) or None for ``default_repo``.
        default_repo: hub id of the model.
        processor_path: directory or hub id of the processor; default: ``path`` when it holds a
            ``processor_config.json`` or ``preprocessor_config.json``, else ``processor_repo``.
    """

    def __init__(self, name: str, path: Optional[str], default_repo: str, processor_repo: str,
                 processor_path: Optional[str] = None, device=None, dtype=None):
        from transformers import CLIPModel, CLIPProcessor
        path = check_path(name, path)
        self.device, self.dtype = default_device(device), parse_dtype(dtype)
        src = path or default_repo
        proc_src = processor_path or (path if path and _has_processor(path) else processor_repo)
        how = f"hf download {src} --local-dir DIR"
        try:
            self.model = CLIPModel.from_pretrained(src, dtype=self.dtype).to(self.device).eval()
        except OSError as err:
            raise weights_error(name, "the CLIP model", repr(src), how, err) from None
        try:
            self.processor = CLIPProcessor.from_pretrained(proc_src)
        except OSError as err:
            raise weights_error(name, "the CLIP processor", repr(proc_src),
                                f"hf download {proc_src} --local-dir DIR",
                                err, option="processor_path") from None
        self.model.requires_grad_(False)
        ip = self.processor.image_processor
        self._size = int(ip.size["shortest_edge"])
        self._crop = (int(ip.crop_size["height"]), int(ip.crop_size["width"]))
        self._mean, self._std = tuple(ip.image_mean), tuple(ip.image_std)

    def pixel_values(self, images: Images) -> torch.Tensor:
        """Processor output for PIL images; the differentiable torch copy for tensors."""
        if isinstance(images, torch.Tensor):
            x = images.to(self.device, torch.float32)
            return clip_tensor_preprocess(x, self._size, self._crop, self._mean,
                                          self._std).to(self.dtype)
        rgb = [as_rgb(im) for im in images]
        pv = self.processor.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        return pv.to(self.device, self.dtype)

    def image_embeds(self, images: Images) -> torch.Tensor:
        """``[b, D]`` L2-normalized image embeddings (float32)."""
        e = _pooled(self.model.get_image_features(pixel_values=self.pixel_values(images))).float()
        return e / e.norm(dim=-1, keepdim=True)

    def text_embeds(self, prompts: List[str]) -> torch.Tensor:
        """``[b, D]`` L2-normalized text embeddings (float32); prompts truncated at 77 tokens."""
        t = self.processor.tokenizer(prompts, padding=True, truncation=True, max_length=77,
                                     return_tensors="pt").to(self.device)
        e = _pooled(self.model.get_text_features(input_ids=t["input_ids"],
                                                 attention_mask=t["attention_mask"])).float()
        return e / e.norm(dim=-1, keepdim=True)


# PickScore normalizations used in papers (ALGORITHMS.md "Image rewards").
PICKSCORE_NORMALIZE = {
    "none": "s = logit_scale.exp()·cos (≈ 18–24 for PickScore_v1)",
    "div26": "s / 26 (flow_grpo)",
    "shift18_div8": "(s − 18) / 8 (MixGRPO)",
    "cosine": "cos(text, image) (DanceGRPO)",
}


class PickScore(Scorer):
    """PickScore: ``s = logit_scale.exp() · cos(text, image)``; arXiv 2305.01569.

    Output scale: by ``normalize`` — ``"none"``: s (≈ 18–24 for ``yuvalkirstain/PickScore_v1``,
    whose ``logit_scale.exp()`` ≈ 100); ``"div26"``: s/26 (flow_grpo); ``"shift18_div8"``:
    (s − 18)/8 (MixGRPO); ``"cosine"``: cos (DanceGRPO).

    Args:
        path: local directory of the model (default hub id ``yuvalkirstain/PickScore_v1``).
        processor_path: processor directory or hub id (default: ``path`` when it has one, else
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
        normalize: one of :data:`PICKSCORE_NORMALIZE`.
    """

    name = "pickscore"
    default_repo = "yuvalkirstain/PickScore_v1"
    processor_repo = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __init__(self, path=None, device=None, dtype=None, normalize: str = "none",
                 processor_path=None, batch_size: int = 32, grad: bool = False):
        if normalize not in PICKSCORE_NORMALIZE:
            choices = "; ".join(f"{k!r}: {v}" for k, v in PICKSCORE_NORMALIZE.items())
            raise ValueError(f"pickscore normalize={normalize!r}; expected one of: {choices}")
        super().__init__(batch_size, grad)
        self.normalize = normalize
        self.scale = PICKSCORE_NORMALIZE[normalize]
        self.clip = HFClip(self.name, path, self.default_repo, self.processor_repo,
                           processor_path, device, dtype)

    def _score(self, images, prompts):
        cos = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)
        if self.normalize == "cosine":
            return cos
        s = self.clip.model.logit_scale.float().exp() * cos
        if self.normalize == "div26":
            return s / 26.0
        if self.normalize == "shift18_div8":
            return (s - 18.0) / 8.0
        return s


CLIP_SCORE_VARIANTS = {
    "hessel": "2.5·max(cos, 0) (Hessel et al. 2021, CLIPScore), in [0, 2.5]",
    "cos_x100": "100·cos (torchmetrics-style scale without the clamp at 0), in [-100, 100]",
}


class ClipScore(Scorer):
    """CLIP score; the variant is required because papers report different scales.

    Output scale: ``variant="hessel"``: ``2.5 · max(cos, 0)`` (arXiv 2104.08718 eq. 1) in
    [0, 2.5]; ``variant="cos_x100"``: ``100 · cos`` in [−100, 100] (torchmetrics' ``CLIPScore``
    additionally clamps at 0; this variant keeps the sign so it has a gradient everywhere).

    Args:
        path: local model directory (default hub id ``openai/clip-vit-large-patch14``, the
            torchmetrics default; Hessel et al. used ViT-B/32: pass its directory to match).
        variant: one of :data:`CLIP_SCORE_VARIANTS` (required).
    """

    name = "clip_score"
    default_repo = "openai/clip-vit-large-patch14"

    def __init__(self, path=None, device=None, dtype=None, variant: Optional[str] = None,
                 processor_path=None, batch_size: int = 32, grad: bool = False):
        if variant not in CLIP_SCORE_VARIANTS:
            raise ValueError(f"clip_score variant={variant!r}; choose one explicitly (papers "
                             f"differ): " + "; ".join(f"{k!r}: {v}" for k, v in
                                                       CLIP_SCORE_VARIANTS.items())
                             + " — e.g. load('clip_score', variant='hessel') or "
                               "--scorer clip_score:variant=hessel")
        super().__init__(batch_size, grad)
        self.variant, self.scale = variant, CLIP_SCORE_VARIANTS[variant]
        self.clip = HFClip(self.name, path, self.default_repo, self.default_repo,
                           processor_path, device, dtype)

    def _score(self, images, prompts):
        cos = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)
        return 2.5 * cos.clamp_min(0.0) if self.variant == "hessel" else 100.0 * cos


class AestheticMLP(torch.nn.Module):
    """LAION improved-aesthetic-predictor head: D→1024→128→64→16→1 (dropout is inactive in eval)."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(in_dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Aesthetic(Scorer):
    """LAION aesthetic score: MLP(L2-normalized CLIP ViT-L/14 image embedding); prompts unused.

    Output scale: the predictor's 1–10 rating scale (typical SD images ≈ 4.5–7).

    Args:
        path: the MLP head file (``.pth`` state dict or ``.safetensors``), or a directory holding
            ``sac+logos+ava1-l14-linearMSE.pth`` or ``aesthetic-model.pth``; default: the hub
            repo ``trl-lib/ddpo-aesthetic-predictor`` (``aesthetic-model.pth``, the same head
            as used by TRL's DDPO).
        clip_path: directory of the CLIP model (default hub id ``openai/clip-vit-large-patch14``).
    """

    name = "aesthetic"
    scale = "LAION aesthetic rating, 1–10 scale (typical ≈ 4.5–7)"
    uses_prompts = False
    clip_repo = "openai/clip-vit-large-patch14"
    head_repo, head_file = "trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"
    head_files = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic-model.pth")

    def __init__(self, path=None, device=None, dtype=None, clip_path=None,
                 batch_size: int = 32, grad: bool = False):
        super().__init__(batch_size, grad)
        head = self._head_file(check_path(self.name, path))
        self.clip = HFClip(self.name, clip_path, self.clip_repo, self.clip_repo, None, device,
                           dtype)
        sd = load_state_dict_file(head)
        if "layers.0.weight" not in sd:
            raise ValueError(f"aesthetic head {head} has keys {sorted(sd)[:4]}...; expected the "
                             f"improved-aesthetic-predictor layout (layers.0.weight, ...)")
        self.mlp = AestheticMLP(sd["layers.0.weight"].shape[1])
        self.mlp.load_state_dict(sd)
        self.mlp.to(self.clip.device).eval().requires_grad_(False)

    def _head_file(self, path):
        if path is None:
            return hub_file(self.name, self.head_repo, self.head_file,
                            f"hf download {self.head_repo} {self.head_file} --local-dir DIR")
        if not os.path.isdir(path):
            return path
        for f in self.head_files:
            if os.path.exists(os.path.join(path, f)):
                return os.path.join(path, f)
        raise WeightsNotFoundError(f"aesthetic: no head file in {path}; expected one of "
                                   f"{list(self.head_files)} (or pass the file itself as path=)")

    def _score(self, images, prompts):
        return self.mlp(self.clip.image_embeds(images)).squeeze(-1)
