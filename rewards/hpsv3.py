"""HPSv3 (Ma et al. 2025, arXiv 2508.03789): a Qwen2-VL-7B reward model, μ at ``<|Reward|>``.

As the ``hpsv3`` 1.0.0 package scores (``hpsv3/inference.py``: ``HPSv3RewardInferencer``):
Qwen2-VL-7B-Instruct fine-tuned whole, a ``ranknet`` head (3584 -> 1024 -> 16 -> 2) at the one
``<|Reward|>`` token, output ``(μ, log σ)``; the score is μ (unbounded; HPDv3 generator means
range from -0.24 for SD2 to 10.55 for Kolors). The backbone, the chat encoding and the plain
1-D positions are :mod:`mmrl.rewards.qwen2vl_rm`.

Preprocessing (``prepare_batch``): each image resized with ``smart_resize(min = max = 200704 =
256·28²)`` -- 1024² -> 448², 768×1344 -> 336×588, 1024×768 -> 504×364 -- PIL inputs with PIL
``BICUBIC`` on the uint8 image, tensor inputs with torchvision's bicubic + antialias in float
(differentiable); then CLIP mean/std and Qwen2-VL patches. Text:
``INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_SPECIAL_TOKEN`` (hpsv3
``dataset/data_collator_qwen.py``), in one user turn after the image.

Differs from hpsv3:
    - Tensor inputs are expected in [0, 1] (mmrl's image contract); hpsv3 hands tensors to the
      transformers 4.45.2 image processor, which rescales them by 1/255 again (and rejects
      non-integer values when it converts them for its resize), so only uint8-valued tensors
      work there. mmrl resizes them with the same torchvision bicubic and normalizes them
      once. hpsv3's ``differentiable=True`` processor resizes bilinearly instead; mmrl keeps
      bicubic so tensor and PIL scores agree up to rounding.
    - The model is built from the base's config and the reward file only (hpsv3 first loads the
      7B base weights, then overwrites every one of them with the reward file).
    - Scoring runs under ``torch.no_grad()`` unless ``grad=True`` (hpsv3 1.0.0 never disables
      autograd in ``reward``).
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch

from mmrl.rewards import qwen2vl_rm as rm
from mmrl.rewards.base import (Scorer, WeightsNotFoundError, check_path, default_device, hub_file,
                               parse_dtype, weights_error)

HPSV3_REPO, HPSV3_FILE = "MizzenAI/HPSv3", "HPSv3.safetensors"
BASE = "Qwen/Qwen2-VL-7B-Instruct"
PIXELS = 256 * 28 * 28  # min_pixels = max_pixels in HPSv3_7B.yaml and prepare_batch
REWARD_TOKEN = "<|Reward|>"
# Checkpoint file names, in the order a folder is searched: the release, then hpsv3 training
# outputs (final_model.pth, checkpoint-N/model.pth).
CHECKPOINT_NAMES = (HPSV3_FILE, "final_model.pth", "model.pth", "model.safetensors")

# hpsv3 1.0.0 hpsv3/dataset/data_collator_qwen.py: INSTRUCTION (2523 chars, sha256 0393599d...)
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""

# hpsv3 1.0.0 data_collator_qwen.py: prompt_with_special_token (67 chars, sha256 2471faca...)
PROMPT_WITH_SPECIAL_TOKEN = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


def hpsv3_text(prompt: str) -> str:
    """The user text hpsv3 scores ``prompt`` with (the released ``use_special_tokens: true``)."""
    return INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_SPECIAL_TOKEN


class HPSv3(Scorer):
    """``hpsv3(images, prompts) -> Tensor[B]``: μ of HPSv3 (``logits[:, 0]``).

    Args:
        path: the reward checkpoint: a file (``HPSv3.safetensors``, or a training output
            ``final_model.pth`` / ``model.pth``, a top-level ``"model"`` key unwrapped) or a folder
            holding one; default: ``MizzenAI/HPSv3`` from the hub cache.
        base: the Qwen2-VL-7B-Instruct processor and config (hub id or local folder; its weights
            are not read).
        device: default CUDA if available, else CPU.
        dtype: default bfloat16 on CUDA (as released and trained), float32 on CPU; the head runs
            in float32 either way.
        batch_size: images per forward.
        grad: autograd on (tensor inputs get gradients through the resize).
        min_pixels, max_pixels: the resize bounds; the release uses 200704 for both (tiny test
            models use smaller ones).
        attn_implementation: transformers attention (``"sdpa"``; ``"flash_attention_2"`` as hpsv3
            uses when flash-attn is installed).

    Raises:
        WeightsNotFoundError: no checkpoint at ``path`` / in the hub cache, or no base.
        ValueError: a checkpoint that does not fit the base (key names / shapes).
    """

    name = "hpsv3"
    scale = ("μ, unbounded; HPDv3 generator means: Kolors 10.55, Flux-dev 10.43, SDXL 8.20, "
             "SD3-Medium 5.31, SD2 -0.24")

    def __init__(self, path: Optional[str] = None, base: str = BASE, device=None, dtype=None,
                 batch_size: int = 8, grad: bool = False, min_pixels: int = PIXELS,
                 max_pixels: int = PIXELS, attn_implementation: str = "sdpa"):
        super().__init__(batch_size, grad)
        if not (isinstance(min_pixels, int) and isinstance(max_pixels, int)
                and 0 < min_pixels <= max_pixels):
            raise ValueError(f"min_pixels={min_pixels!r}, max_pixels={max_pixels!r}; expected "
                             f"ints with 0 < min_pixels <= max_pixels (release: {PIXELS} both)")
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.device = default_device(device)
        default = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = default if dtype is None else parse_dtype(dtype)
        ckpt = self._checkpoint(path)
        base_dir = self._base(base)
        self.model, self.processor = rm.load_reward_model(
            ckpt, base_dir, special_tokens=[REWARD_TOKEN], head="ranknet", out_dim=2,
            dtype=self.dtype, device=self.device, attn_implementation=attn_implementation,
            name=self.name)
        ip = self.processor.image_processor
        self._patch = dict(mean=tuple(ip.image_mean), std=tuple(ip.image_std),
                           patch_size=ip.patch_size, merge_size=ip.merge_size,
                           temporal_patch_size=ip.temporal_patch_size)

    def _checkpoint(self, path: Optional[str]) -> str:
        path = check_path(self.name, path)
        if path is None:
            return hub_file(self.name, HPSV3_REPO, HPSV3_FILE,
                            f"hf download {HPSV3_REPO} {HPSV3_FILE} --local-dir DIR")
        if os.path.isdir(path):
            for fname in CHECKPOINT_NAMES:
                if os.path.isfile(os.path.join(path, fname)):
                    return os.path.join(path, fname)
            raise WeightsNotFoundError(
                f"{self.name}: folder {path!r} holds none of {list(CHECKPOINT_NAMES)}; pass the "
                f"checkpoint file itself (path=.../HPSv3.safetensors)")
        return path

    def _base(self, base: str) -> str:
        """A local folder as is; a hub id through the hub cache (config, processor and tokenizer
        files only: the reward file holds every weight)."""
        local = os.path.expanduser(str(base))
        if os.path.isdir(local):
            return local
        if str(base).startswith((".", "/", "~")):
            raise WeightsNotFoundError(f"{self.name}: base={base!r} does not exist; pass the "
                                       f"Qwen2-VL-7B-Instruct folder or its hub id")
        try:
            from huggingface_hub import snapshot_download
            return snapshot_download(base, allow_patterns=["*.json", "*.txt", "*.jinja"])
        except Exception as err:  # offline and not cached: one clear message
            raise weights_error(self.name, "the base processor and config", f"{base!r}",
                                f"hf download {base} --include '*.json' '*.txt' --local-dir DIR",
                                err, option="base") from None

    def inputs(self, images, prompts: List[str]) -> dict:
        """The model inputs for a chunk (PIL list or ``[b, 3, H, W]`` in [0, 1])."""
        if isinstance(images, torch.Tensor):
            frames = [rm.resize_tensor(x.to(self.device, torch.float32)[None],
                                       self.min_pixels, self.max_pixels) for x in images]
        else:
            frames = [rm.resize_pil(im, self.min_pixels, self.max_pixels)[None] for im in images]
        rows, grids = zip(*[rm.to_patches(f, **self._patch) for f in frames])
        batch = rm.encode(self.processor, [hpsv3_text(p) for p in prompts], rows, grids)
        return {k: v.to(self.device) for k, v in batch.items()}

    def mu_sigma(self, images, prompts) -> torch.Tensor:
        """``[B, 2]`` float32: μ and σ = exp(log σ) (the uncertainty the training loss uses)."""
        logits = self.batched(images, prompts, self.logits)  # [B, 2]
        return torch.stack([logits[:, 0], logits[:, 1].exp()], dim=1)

    def logits(self, images, prompts: List[str]) -> torch.Tensor:
        """``[b, 2]`` float32 = (μ, log σ) for one chunk, as hpsv3's ``reward`` returns."""
        return self.model(**self.inputs(images, prompts))[:, 0, :]  # [b, 1, 2] -> [b, 2]

    def _score(self, images, prompts):
        return self.logits(images, prompts)[:, 0]
