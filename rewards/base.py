"""What every scorer shares: input checks, batching, no-grad, weight resolution, CLIP preprocessing.

A scorer is called as ``scorer(images, prompts, metadata=None) -> Tensor[B]`` (float32, on the
scorer's device). ``images`` are B PIL images (any mode: grayscale and RGBA are converted to RGB,
alpha dropped the way PIL's ``convert("RGB")`` does) or a float tensor ``[B, C, H, W]`` in [0, 1]
with C = 1 (grayscale), 3 (RGB) or 4 (RGBA). The third argument is the core reward interface's
``metadata`` (:mod:`mmrl.train.reward_fn`); scorers ignore it, so a scorer can be passed to a trainer as
its reward directly.

Tensor inputs go through a differentiable torch copy of the model's preprocessing (CLIP scorers:
bicubic resize of the shortest edge with antialiasing, center crop, mean/std; HPS: hpsv2's longest
edge + zero padding, see :mod:`mmrl.rewards.hps`), so ``grad=True`` scorers back-propagate to the
pixels. PIL inputs go through the model's reference preprocessing exactly.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image

Images = Union[Sequence[Image.Image], torch.Tensor]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class WeightsNotFoundError(FileNotFoundError):
    """Weights are neither at ``path`` nor in the local hub cache (and the hub is unreachable)."""


def default_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    """``device`` or, when None, CUDA if available else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lift_hint(name: str) -> str:
    """How to score videos with the image scorer ``name`` (the frame-wise lift)."""
    return (f"lift it to video with the frames scorer: spec 'frames:scorer={name}:reduce=mean' "
            f"(Python: mmrl.rewards.load('frames', scorer={name!r}, reduce='mean'))")


def check_images(images: Any, name: str = "NAME") -> Tuple[str, int]:
    """Validate a batch of images; return ``("pil" | "tensor", B)``.

    Args:
        images: B PIL images or a float tensor ``[B, C, H, W]`` in [0, 1].
        name: the scorer's registered name, for the hint when a video batch is passed.

    Raises:
        TypeError: neither a list of PIL images nor a float tensor.
        ValueError: empty batch, wrong tensor rank/channels, values outside [0, 1], or videos
            (``[B, F, 3, H, W]``, a list of ``[F, 3, H, W]``) given to an image scorer.
    """
    if isinstance(images, torch.Tensor) and images.dim() == 5 or \
            isinstance(images, (list, tuple)) and images and \
            isinstance(images[0], torch.Tensor) and images[0].dim() == 4:
        got = (tuple(images.shape) if isinstance(images, torch.Tensor)
               else f"{len(images)} x {tuple(images[0].shape)}")
        raise ValueError(f"{name} scores images [B, 3, H, W] but got videos {got} "
                         f"([B, F, 3, H, W]); {lift_hint(name)}")
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] not in (1, 3, 4):
            raise ValueError(f"image tensor has shape {tuple(images.shape)}; expected [B, C, H, W] "
                             f"with C in (1, 3, 4); add a batch dim with x[None] for one image")
        if not images.dtype.is_floating_point:
            raise TypeError(f"image tensor has dtype {images.dtype}; expected float in [0, 1]; "
                            f"convert uint8 pixels with x.float() / 255")
        if images.shape[0] == 0:
            raise ValueError("got an empty image batch (B = 0); pass at least one image")
        lo, hi = float(images.detach().min()), float(images.detach().max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"image tensor values span [{lo:.3g}, {hi:.3g}]; expected [0, 1]; "
                             f"map [-1, 1] outputs with (x + 1) / 2 (and clamp)")
        return "tensor", int(images.shape[0])
    if isinstance(images, Image.Image):
        raise TypeError("got one PIL image; pass a list of images, e.g. [image]")
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images is {type(images).__name__}; expected a list of PIL images or a "
                        f"float tensor [B, 3, H, W] in [0, 1]")
    if len(images) == 0:
        raise ValueError("got an empty image list; pass at least one image")
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise TypeError(f"images[{i}] is {type(im).__name__}; expected a PIL image (or pass "
                            f"all images as one float tensor [B, 3, H, W])")
    return "pil", len(images)


def check_prompts(prompts: Any, n: int) -> List[str]:
    """B prompt strings, one per image.

    Raises:
        TypeError: None, a bare string or non-string entries.
        ValueError: a count different from the number of images.
    """
    if prompts is None:
        raise TypeError(f"prompts is None; this scorer reads the prompt: pass {n} prompts")
    if isinstance(prompts, str):
        raise TypeError(f"prompts is one string ({prompts[:40]!r}); pass a list with one prompt "
                        f"per image, e.g. [prompt] * {n}")
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"got {n} images but {len(prompts)} prompts; pass one prompt per image "
                         f"(repeat a group's prompt for each of its images)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] is {type(p).__name__}; expected str")
    return prompts


def as_rgb(im: Image.Image) -> Image.Image:
    """``im`` in RGB; RGB images pass through uncopied (``convert`` would copy every pixel)."""
    return im if im.mode == "RGB" else im.convert("RGB")


def to_rgb_tensor(images: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` with C in (1, 3, 4) -> ``[B, 3, H, W]`` (gray repeated, alpha dropped)."""
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    return images[:, :3]


def clip_tensor_preprocess(x: torch.Tensor, size: int, crop: Tuple[int, int],
                           mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Differentiable CLIP preprocessing of ``[B, 3, H, W]`` in [0, 1] -> normalized ``[B, 3, h, w]``.

    Shortest edge to ``size`` (bicubic, antialiased like PIL), center crop ``crop = (h, w)``,
    then ``(x - mean) / std``. Differs from the PIL path by bicubic rounding only (PIL rounds to
    uint8 after resizing; this stays in float).
    """
    h, w = x.shape[-2:]
    # Output size and crop offsets rounded exactly as torchvision's Resize / CenterCrop do.
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False,
                          antialias=True)
    top = int(round((new_h - crop[0]) / 2.0))
    left = int(round((new_w - crop[1]) / 2.0))
    x = x[..., top:top + crop[0], left:left + crop[1]]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class Scorer:
    """Base class: ``scorer(images, prompts, metadata=None) -> Tensor[B]`` float32.

    Subclasses implement ``_score(images, prompts) -> Tensor[b]`` for one chunk of at most
    ``batch_size`` images (PIL list or ``[b, 3, H, W]`` tensor already converted to RGB).

    Args:
        batch_size: images per forward pass; larger batches are split and concatenated.
        grad: if True, scoring runs with autograd enabled (reward back-propagation through
            tensor inputs); otherwise under ``torch.no_grad()``.
    """

    name: str = "scorer"
    #: the output's scale in words, e.g. "logit_scale.exp()·cos, ≈ 18–24"
    scale: str = ""
    #: whether prompts matter (False for prompt-free scorers such as aesthetic or rule rewards)
    uses_prompts: bool = True
    #: what it scores: "image" (``[B, 3, H, W]``) or "video" (``[B, F, 3, H, W]``,
    #: :class:`mmrl.rewards.video.VideoScorer`); ``compose`` refuses a mix
    media: str = "image"

    def __init__(self, batch_size: int = 32, grad: bool = False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}; expected a positive int")
        self.batch_size = batch_size
        self.grad = bool(grad)

    @property
    def names(self) -> List[str]:
        return [self.name]

    def __call__(self, images: Images, prompts: Optional[Sequence[str]],
                 metadata: Optional[Sequence[Any]] = None) -> torch.Tensor:
        return self.batched(images, prompts, self._score)

    def batched(self, images: Images, prompts: Optional[Sequence[str]], fn) -> torch.Tensor:
        """``fn(chunk, chunk_prompts) -> Tensor[b, ...]`` over chunks of ``batch_size``, after
        the input checks, concatenated as float32 (``__call__`` with ``fn = _score``; a scorer
        with more outputs than its score, e.g. HPSv3's σ, reuses it)."""
        kind, n = check_images(images, self.name)
        if prompts is None and not self.uses_prompts:
            prompts = [""] * n  # prompt-free scorers (aesthetic, rules) may be called without
        prompts = check_prompts(prompts, n)
        if kind == "tensor":
            images = to_rgb_tensor(images)
        out = []
        with torch.set_grad_enabled(self.grad):
            for i in range(0, n, self.batch_size):
                chunk = images[i:i + self.batch_size]
                out.append(fn(chunk, prompts[i:i + self.batch_size]).float())
        return torch.cat(out) if len(out) > 1 else out[0]

    def _score(self, images: Images, prompts: List[str]) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, batch_size={self.batch_size})"


def weights_error(name: str, what: str, source: str, how: str, err: Exception,
                  option: str = "path") -> WeightsNotFoundError:
    """One clear message for weights that could not be found locally or downloaded."""
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return WeightsNotFoundError(
        f"{name}: could not load {what} from {source}{offline}: {type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}\n  Download them on a machine with "
        f"internet access: {how}\n  then pass the local copy with {option}=DIR (Python: "
        f"mmrl.rewards.load({name!r}, {option}=DIR); CLI: --scorer {name}:{option}=DIR)")


def check_path(name: str, path: Optional[str]) -> Optional[str]:
    """``path`` expanded, or a clear error when it does not exist."""
    if path is None:
        return None
    p = os.path.expanduser(str(path))
    if not os.path.exists(p):
        raise WeightsNotFoundError(f"{name}: path={path!r} does not exist; pass a local directory "
                                   f"or checkpoint file (see docs/rewards.md for what to download)")
    return p


def hub_file(name: str, repo: str, filename: str, how: str) -> str:
    """Local path of ``repo/filename`` from the hub cache (downloading it when online)."""
    try:
        from huggingface_hub import hf_hub_download
        return hf_hub_download(repo, filename)
    except Exception as err:  # offline, not cached, or no huggingface_hub: one clear message
        raise weights_error(name, filename, f"the hub repo {repo!r}", how, err) from None


def load_state_dict_file(path: str) -> dict:
    """A state dict from ``.safetensors`` or a torch file loaded with ``weights_only=True``.

    Unwraps ``{"state_dict": ...}`` and strips a DataParallel ``module.`` prefix.
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}; expected a state dict")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def parse_dtype(dtype: Optional[Union[str, torch.dtype]]) -> torch.dtype:
    """``"bf16" | "fp16" | "fp32" | torch.dtype | None`` -> torch dtype (None -> float32)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(table)} or a torch.dtype")
    return table[dtype]
