"""VideoReward (VideoAlign; Liu et al. 2025, arXiv 2501.13918): a Qwen2-VL-2B reward model that
scores a generated video on visual quality (VQ), motion quality (MQ) and text alignment (TA).

Sources: KwaiVGI/VideoAlign @ 219ab9db (``inference.py``, ``vision_process.py``,
``prompt_template.py``, ``trainer.py``, ``utils.py``, ``train_reward.py``); facts and their
sources in docs/rewards.md, "VideoReward (VideoAlign)". The model forward is the shared Qwen2-VL
reward backbone (:mod:`mmrl.rewards.qwen2vl_rm`, the one HPSv3 uses): plain 1-D positions, the
linear no-bias head applied at ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>`` (in that
sequence order) -> raw ``[B, 3]``.

One video, as VideoAlign's ``VideoVLMRewardInference.reward`` does it:

1. pixels to uint8 ``round(clamp(x, 0, 1) * 255)`` (half to even): the pixels a lossless video
   file written by mmrl (``mmrl.diffusion.eval_video.to_uint8``) decodes to;
2. frames: ``n = smart_nframes(F, fps, sample_fps)`` (:func:`smart_nframes`), indices
   ``round(linspace(0, F - 1, n))`` (torch float32, half to even);
3. per frame ``smart_resize(H, W, 28, min_pixels, max_pixels)`` and torchvision's bicubic
   antialiased resize of the uint8 frames (the result is rounded back to uint8);
4. rescale 1/255, CLIP mean/std, patches of 2 frames x 14 x 14 (Qwen2-VL's video path);
5. text ``DETAILED_SPECIAL.format(text_prompt=prompt)`` in the Qwen2-VL chat template with
   ``<|video_pad|>`` repeated once per visual token ((n/2)(h/28)(w/28));
6. raw ``[VQ, MQ, TA]``, normalised ``X' = (X - mean_X) / std_X`` with ``inference_config`` of
   ``model_config.json`` (``use_norm=True``), ``overall = VQ' + MQ' + TA'``.

Differs from VideoAlign:
    - The videos arrive as float tensors with a known frame rate instead of files: step 1 is the
      uint8 a lossless file would hold; a lossy codec's error (h264, yuv420p) is not modelled.
    - ``grad=True`` skips both uint8 roundings (steps 1 and 3) so gradients reach the pixels; the
      result differs from the file path by that rounding.
    - The LoRA is merged into the weights after loading (peft ``merge_and_unload``): one matmul
      per layer instead of three; equal in fp32 to float rounding.
    - The head runs in fp32 (the shared backbone's rule); VideoAlign's runs in the model dtype
      (bf16 in its inference). Identical in fp32.
    - A ``step=`` that is not in the folder raises (VideoAlign falls back to the highest).
    - Differs from the issue: built on transformers 5 directly (not on mmrl.video's adapters)
      because rewards sit below the video package; the checkpoint's transformers-4.45 key names
      are mapped on load.

Tested against ``Qwen2VLRewardModelBT`` (hpsv3 1.0.0, VideoAlign's forward) on transformers
4.45.2: ``tests/rewards/test_videoreward.py``.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mmrl.rewards.base import (WeightsNotFoundError, check_path, default_device, parse_dtype,
                               weights_error)
from mmrl.rewards.video import VideoScorer

Tensor = torch.Tensor

# The ``detailed_special`` template (VideoAlign @ 219ab9db prompt_template.py,
# DETAILED_PROMPT_WITH_SPECIAL_TOKEN; data, typed here; 3997 characters, sha256 fdb6309b...;
# trailing spaces written as \x20). The VQ and MQ tokens come before the text prompt, so under
# causal attention only TA sees it.
DETAILED_SPECIAL = """\

You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.

**Visual Quality:**\x20\x20
Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:
- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible.\x20

Please provide the ratings of Visual Quality: <|VQ_reward|>
END

**Motion Quality:**\x20\x20
Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:
- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).
- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).
- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.
- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.
- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.
- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.

Please provide the ratings of Motion Quality: <|MQ_reward|>
END

**Text Alignment:**\x20\x20
Assess how well the video matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.
- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.\x20\x20
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.
- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.

Textual prompt - {text_prompt}
Please provide the ratings of Text Alignment: <|TA_reward|>
END
"""

REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DIMENSIONS = ("VQ", "MQ", "TA")
OUTPUTS = ("overall", "vq", "mq", "ta", "all")
# vision_process.py defaults (a copy of qwen-vl-utils) and VideoAlign's released data_config.
SAMPLE_FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28      # 100,352
MAX_FRAME_PIXELS = 200_704            # 256 * 28 * 28, data_config.max_frame_pixels
# Text tokens the prompt must not contain: the tokenizer would read them as special tokens and
# add a reward position or a visual slot.
_RESERVED = REWARD_TOKENS + ("<|video_pad|>", "<|image_pad|>", "<|vision_start|>",
                             "<|vision_end|>", "<|im_start|>", "<|im_end|>")


def build_prompt(prompt: str) -> str:
    """VideoAlign's ``build_prompt(prompt, ["VQ", "MQ", "TA"], "detailed_special")``."""
    return DETAILED_SPECIAL.format(text_prompt=prompt)


def _round_by(x: float, factor: int) -> int:
    return round(x / factor) * factor  # Python round: half to even, as the source


def smart_nframes(total: int, video_fps: Optional[float], sample_fps: float = SAMPLE_FPS,
                  num_frames: Optional[int] = None) -> int:
    """How many frames VideoAlign samples from a video of ``total`` frames at ``video_fps``.

    fps mode (``num_frames`` None): ``n = total / video_fps * sample_fps`` clamped to
    ``[4, 2 * floor(min(768, total) / 2)]``, then ``2 * round(n / 2)``; ``num_frames`` mode:
    ``2 * round(num_frames / 2)``. Either is capped at ``total``. (``vision_process.py:
    smart_nframes``; 120 frames @ 24 fps -> 10, 81 @ 16 fps -> 10.)

    Raises:
        ValueError: the result is outside [2, total] (a video of one frame), or fps mode without
            ``video_fps``.
    """
    if num_frames is not None:
        n = _round_by(num_frames, FRAME_FACTOR)
    else:
        if video_fps is None:
            raise ValueError("videoreward samples frames at sample_fps frames per second of "
                             "video, which needs the videos' frame rate: pass fps=RATE (e.g. "
                             "fps=16 for Wan 2.1) or metadata [{'fps': RATE}], or sample a fixed "
                             "count with num_frames=N")
        lo = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(min(FPS_MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        n = _round_by(min(max(total / float(video_fps) * sample_fps, lo), hi), FRAME_FACTOR)
    n = min(n, total)
    if not FRAME_FACTOR <= n <= total:
        raise ValueError(f"videoreward: {n} frames sampled from a video of {total}; VideoAlign "
                         f"needs at least {FRAME_FACTOR} (Qwen2-VL's temporal patch): pass "
                         f"videos of >= {FRAME_FACTOR} frames (and num_frames >= {FRAME_FACTOR})")
    return n


def frame_indices(total: int, n: int) -> List[int]:
    """``round(linspace(0, total - 1, n))`` in torch float32, as ``vision_process.py``
    (120 frames, n = 10 -> [0, 13, 26, 40, 53, 66, 79, 93, 106, 119])."""
    return torch.linspace(0, total - 1, n).round().long().tolist()


def frame_plan(total: int, height: int, width: int, video_fps: Optional[float],
               sample_fps: float = SAMPLE_FPS, num_frames: Optional[int] = None,
               min_pixels: int = VIDEO_MIN_PIXELS,
               max_pixels: int = MAX_FRAME_PIXELS) -> Tuple[List[int], Tuple[int, int], int]:
    """The frames, the frame size and the visual-token count VideoAlign gives a video of
    ``total`` frames of ``height x width`` at ``video_fps``: ``(indices, (h, w), tokens)`` with
    ``tokens = (n/2)(h/28)(w/28)``. 120 frames @ 24 fps, 480x832 -> 10 frames
    [0, 13, 26, 40, 53, 66, 79, 93, 106, 119], 336x588, 1,260 tokens."""
    from mmrl.rewards.qwen2vl_rm import smart_resize
    n = smart_nframes(total, video_fps, sample_fps, num_frames)
    h, w = smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    return frame_indices(total, n), (h, w), (n // 2) * (h // 28) * (w // 28)


def to_uint8(videos: Tensor) -> Tensor:
    """``[..., 3, H, W]`` float in [0, 1] -> the same shape, uint8 ``round(clamp(x, 0, 1) * 255)``
    (half to even): the pixels mmrl writes to a video file, which a lossless decode returns."""
    return (videos.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def resize_frames(frames: Tensor, size: Tuple[int, int]) -> Tensor:
    """torchvision's bicubic antialiased resize of ``[n, 3, H, W]`` frames to ``size`` (h, w),
    as ``vision_process.fetch_video``: uint8 in, uint8 out (clamped and rounded by torchvision);
    float frames (the ``grad=True`` path) stay float and are clamped to [0, 255]. Returns float
    values in [0, 255]."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize
    if tuple(frames.shape[-2:]) != tuple(size):
        frames = resize(frames, list(size), interpolation=InterpolationMode.BICUBIC,
                        antialias=True)
    if frames.dtype == torch.uint8:
        return frames.float()
    return frames.clamp(0, 255)


def per_dimension(out: Tensor) -> Tensor:
    """The head at the three tokens ``[B, 3, output_dim]`` -> ``[B, 3]`` (VQ, MQ, TA):
    ``output_dim`` 1 the one value per token, 3 the diagonal (dimension k read at token k),
    as ``trainer.py``'s ``Qwen2VLRewardModelBT.forward``."""
    if out.shape[-1] == 1:
        return out[..., 0]
    return out.diagonal(dim1=1, dim2=2)


def normalise(raw: Tensor, stats: Optional[Dict[str, float]]) -> Dict[str, Tensor]:
    """Raw ``[B, 3]`` (VQ, MQ, TA) -> columns ``vq, mq, ta, overall``.

    ``X' = (X - stats["X_mean"]) / stats["X_std"]`` for X in VQ, MQ, TA, ``overall = VQ' + MQ'
    + TA'`` (``inference.py:_norm`` and ``reward``); ``stats`` None: raw values and their sum.
    """
    cols = {}
    for k, d in enumerate(DIMENSIONS):
        x = raw[:, k].float()
        if stats is not None:
            x = (x - float(stats[f"{d}_mean"])) / float(stats[f"{d}_std"])
        cols[d.lower()] = x
    cols["overall"] = cols["vq"] + cols["mq"] + cols["ta"]
    return cols


HUB_REPO = "KwaiVGI/VideoReward"
_DOWNLOAD = (f"huggingface-cli download {HUB_REPO} --local-dir DIR (it holds model_config.json "
             f"and checkpoint-<step>/)")


def read_layout(root: str, step: Optional[int] = None) -> Dict[str, Any]:
    """VideoAlign's checkpoint layout at ``root`` -> ``{"config", "root", "checkpoint", "step",
    "weights" ("full" | "adapter"), "tokenizer" (a folder or None)}``.

    ``<root>/model_config.json`` (data_config, model_config, peft_lora_config, inference_config)
    and ``<root>/checkpoint-<step>/`` holding ``model.pth`` (the full PEFT-wrapped state dict) or
    ``adapter_model.safetensors`` + ``non_lora_state_dict.pth``, and ``tokenizer/`` (in the
    checkpoint folder or the root). The highest step unless ``step`` is given
    (``utils.py:load_model_from_checkpoint``).

    Differs from VideoAlign: a ``step`` that is not there raises (VideoAlign falls back to the
    highest step with a print).

    Raises:
        WeightsNotFoundError: no such folder, no model_config.json, no checkpoint folder or no
            weights in it.
        ValueError: ``step`` not among the checkpoints; a config that is not a VideoReward one.
    """
    root = check_path("videoreward", root)
    if not os.path.isdir(root):
        raise WeightsNotFoundError(f"videoreward: path={root!r} is a file; expected the "
                                   f"VideoAlign checkpoint folder (model_config.json + "
                                   f"checkpoint-<step>/); get it with {_DOWNLOAD}")
    cfg_file = os.path.join(root, "model_config.json")
    if not os.path.isfile(cfg_file):
        raise WeightsNotFoundError(f"videoreward: no model_config.json in {root} (it holds "
                                   f"{sorted(os.listdir(root))[:8]}); expected VideoAlign's layout "
                                   f"(model_config.json + checkpoint-<step>/); get it with "
                                   f"{_DOWNLOAD}")
    with open(cfg_file) as f:
        config = json.load(f)
    _check_config(config, cfg_file)
    steps = {int(m.group(1)): d for d in glob.glob(os.path.join(root, "checkpoint-*"))
             if os.path.isdir(d) and (m := re.fullmatch(r"checkpoint-(\d+)", os.path.basename(d)))}
    if not steps:
        raise WeightsNotFoundError(f"videoreward: no checkpoint-<step>/ folder in {root}; "
                                   f"expected e.g. checkpoint-11352/model.pth next to "
                                   f"model_config.json")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise ValueError(f"videoreward: step={step!r} but {root} holds the steps "
                         f"{sorted(steps)}; pick one of them or drop step (the highest)")
    ckpt = steps[step]
    has = {n: os.path.isfile(os.path.join(ckpt, n)) for n in
           ("model.pth", "adapter_model.safetensors", "non_lora_state_dict.pth")}
    if has["model.pth"]:
        weights = "full"
    elif has["adapter_model.safetensors"] and has["non_lora_state_dict.pth"]:
        weights = "adapter"
    else:
        raise WeightsNotFoundError(f"videoreward: {ckpt} holds {sorted(os.listdir(ckpt))[:8]}; "
                                   f"expected model.pth, or adapter_model.safetensors together "
                                   f"with non_lora_state_dict.pth")
    tok = next((d for d in (os.path.join(ckpt, "tokenizer"), os.path.join(root, "tokenizer"))
                if os.path.isdir(d)), None)
    return dict(config=config, root=root, checkpoint=ckpt, step=step, weights=weights,
                tokenizer=tok)


def _check_config(config: Any, where: str) -> None:
    missing = [k for k in ("data_config", "model_config", "peft_lora_config")
               if not isinstance(config, dict) or not isinstance(config.get(k), dict)]
    if missing:
        raise ValueError(f"videoreward: {where} lacks {', '.join(missing)}; expected VideoAlign's "
                         f"model_config.json (data_config, model_config, peft_lora_config, "
                         f"inference_config)")
    mc = config["model_config"]
    problems = []
    if not mc.get("use_special_tokens", False):
        problems.append("use_special_tokens is not true (the reward tokens are how it scores)")
    if mc.get("output_dim", 1) not in (1, 3):
        problems.append(f"output_dim={mc.get('output_dim')!r} (VideoReward uses 1 or 3)")
    pc = config["peft_lora_config"]
    if pc.get("lora_enable") and pc.get("num_lora_modules", -1) not in (-1, None):
        problems.append(f"num_lora_modules={pc['num_lora_modules']} (only -1, every module, "
                        f"is supported)")
    stats = config.get("inference_config")
    if stats is not None:
        bad = [f"{d}_{s}" for d in DIMENSIONS for s in ("mean", "std")
               if not isinstance(stats.get(f"{d}_{s}"), (int, float))]
        if bad:
            problems.append(f"inference_config lacks {', '.join(bad)}")
    if problems:
        raise ValueError(f"videoreward: {where}: {'; '.join(problems)}; this is not a "
                         f"VideoReward checkpoint config")


def lora_exclusions(peft_config: Dict[str, Any]) -> List[str]:
    """Name parts whose modules get no LoRA: ``lora_namespan_exclude`` plus ``visual`` unless
    ``vision_lora`` (``train_reward.py``); a string holding a Python list is read as one."""
    ex = peft_config.get("lora_namespan_exclude") or []
    if isinstance(ex, str):
        import ast
        ex = ast.literal_eval(ex) if ex.strip().startswith("[") else [ex]
    ex = list(ex)
    if not peft_config.get("vision_lora", False) and "visual" not in ex:
        ex.append("visual")
    return ex


def _lora_config(peft_config: Dict[str, Any], model: torch.nn.Module):
    """peft ``LoraConfig`` from VideoAlign's ``peft_lora_config``: every ``nn.Linear`` /
    ``nn.Embedding`` whose name contains none of :func:`lora_exclusions`
    (``train_reward.py:find_target_linear_names``), r, alpha, dropout, rsLoRA, no bias."""
    ex = lora_exclusions(peft_config)
    targets = [n for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
               and not any(e in n for e in ex)]
    if not targets:
        raise ValueError(f"videoreward: no Linear/Embedding module outside {ex} for the LoRA; "
                         f"check peft_lora_config.lora_namespan_exclude")
    return _peft().LoraConfig(target_modules=targets, r=int(peft_config.get("lora_r", 16)),
                      lora_alpha=peft_config.get("lora_alpha", 32),
                      lora_dropout=float(peft_config.get("lora_dropout", 0.05)),
                      use_rslora=bool(peft_config.get("use_rslora", False)), bias="none")


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError("videoreward rebuilds VideoAlign's LoRA with peft: pip install "
                          "'peft>=0.15' (it is in mmrl[rewards])") from err
    return peft


def _peft_keys(sd: Dict[str, Tensor], where: str, wrapped: bool = True) -> Dict[str, Tensor]:
    """VideoAlign's PEFT-wrapped keys ``base_model.model.<transformers-4.45 key>`` -> the keys
    of a peft-wrapped :class:`~mmrl.rewards.qwen2vl_rm.Qwen2VLRewardModel` (``wrapped`` False,
    a checkpoint trained without LoRA: the bare keys -> the model's)."""
    from mmrl.rewards.qwen2vl_rm import from_released_keys
    if not wrapped:
        return from_released_keys(sd)
    prefix = "base_model.model."
    bare = [k for k in sd if not k.startswith(prefix)]
    if bare:
        raise ValueError(f"videoreward: {where} has keys without the PEFT prefix {prefix!r} "
                         f"(e.g. {bare[:3]}); expected VideoAlign's PEFT-wrapped state dict")
    return {prefix + k: v for k, v in
            from_released_keys({k[len(prefix):]: v for k, v in sd.items()}).items()}


def _adapter_keys(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """peft's saved adapter keys (``...q_proj.lora_A.weight``) with the adapter name inserted
    (``...q_proj.lora_A.default.weight``), as ``utils.py:_insert_adapter_name_into_state_dict``."""
    return {re.sub(r"\.(lora_[A-Za-z_]+)\.", r".\1.default.", k): v for k, v in sd.items()}


def _read_torch(path: str) -> Dict[str, Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"videoreward: {path} holds a {type(sd).__name__}; expected a state dict")
    return sd


def load_videoreward(path: str, step: Optional[int] = None, base: Optional[str] = None,
                     dtype: torch.dtype = torch.float32, device="cpu"):
    """VideoAlign's checkpoint -> ``(model, processor, layout)``: a
    :class:`~mmrl.rewards.qwen2vl_rm.Qwen2VLRewardModel` (linear head, the three reward tokens)
    in eval mode with the LoRA merged, the base's processor with the tokens added, and
    :func:`read_layout`'s dict.

    ``base`` (default ``model_config.model_name_or_path``; a folder, or a hub id in the local
    cache) gives the architecture, the processor and, for the adapter layout, the weights the
    LoRA sits on. Steps (``utils.py:load_model_from_checkpoint``): tokens added, vocabulary
    resized to ``len(tokenizer)``, LoRA from ``peft_lora_config``, then ``model.pth`` loaded
    strictly, or the base weights updated with ``non_lora_state_dict.pth`` and the adapter.

    Raises:
        WeightsNotFoundError: the layout or the base cannot be found.
        ValueError: keys that do not fit (missing / unexpected / other shapes), reward tokens
            whose ids differ from the checkpoint's ``tokenizer/``.
    """
    from mmrl.rewards.qwen2vl_rm import load_processor
    layout = read_layout(path, step)
    mc, pc = layout["config"]["model_config"], layout["config"]["peft_lora_config"]
    base = _resolve_base(base or mc.get("model_name_or_path"), layout["root"])
    try:
        processor, ids = load_processor(base, REWARD_TOKENS)
    except (OSError, ValueError) as err:
        raise weights_error("videoreward", "the base model's processor", repr(base),
                            "huggingface-cli download Qwen/Qwen2-VL-2B-Instruct --local-dir "
                            "BASE", err, option="base") from None
    _check_token_ids(layout["tokenizer"], ids)
    model = _build_model(base, processor, ids, int(mc.get("output_dim", 1)),
                         weights=layout["weights"] == "adapter")
    if pc.get("lora_enable", False):
        model = _peft().get_peft_model(model, _lora_config(pc, model))
    elif layout["weights"] == "adapter":
        raise ValueError(f"videoreward: {layout['checkpoint']} holds a LoRA adapter but "
                         f"peft_lora_config.lora_enable is false in model_config.json")
    ckpt, lora = layout["checkpoint"], bool(pc.get("lora_enable", False))
    if layout["weights"] == "full":
        sd = _peft_keys(_read_torch(os.path.join(ckpt, "model.pth")), ckpt, lora)
        head, embed = (f"{'base_model.model.' if lora else ''}base.{k}" for k in
                       ("lm_head.weight", "model.language_model.embed_tokens.weight"))
        if head not in sd and embed in sd and model.base.config.tie_word_embeddings:
            sd[head] = sd[embed]  # a tied lm_head saved once (it does not enter the score)
        _load_strict(model, sd, ckpt)
    else:
        from safetensors.torch import load_file
        sd = dict(model.state_dict())
        update = _peft_keys(_read_torch(os.path.join(ckpt, "non_lora_state_dict.pth")), ckpt)
        update.update(_peft_keys(_adapter_keys(
            load_file(os.path.join(ckpt, "adapter_model.safetensors"))), ckpt))
        stray = sorted(set(update) - set(sd))
        if stray:
            raise ValueError(f"videoreward: {ckpt}: {len(stray)} adapter / non-LoRA keys fit no "
                             f"parameter (e.g. {stray[:3]}); check peft_lora_config and the base")
        sd.update(update)
        _load_strict(model, sd, ckpt)
    # merge in float32, then cast: W + (alpha / r) B A, one matmul per layer at scoring time
    model = model.to(device=device, dtype=torch.float32)
    if lora:
        model = model.merge_and_unload()
    model = model.to(dtype)
    model.rm_head.float()
    return model.eval().requires_grad_(False), processor, layout


def _resolve_base(base: Optional[str], root: str) -> str:
    if not base:
        raise ValueError("videoreward: model_config.model_name_or_path is empty; pass base=DIR "
                         "(a local Qwen/Qwen2-VL-2B-Instruct)")
    base = os.path.expanduser(str(base))
    rel = os.path.join(root, base)
    if not os.path.isabs(base) and os.path.isdir(rel):
        return rel  # a base stored next to model_config.json (the tiny checkpoints do this)
    if os.path.isdir(base) or not os.path.isabs(base) and base.count("/") == 1:
        return base  # a folder, or a hub id (resolved from the local cache when offline)
    raise WeightsNotFoundError(f"videoreward: the base {base!r} is neither a folder nor a hub id; "
                               f"pass base=DIR (a local Qwen/Qwen2-VL-2B-Instruct)")


def _check_token_ids(tokenizer_dir: Optional[str], ids: List[int]) -> None:
    """The reward tokens must get the ids the checkpoint was trained with (its ``tokenizer/``)."""
    if tokenizer_dir is None:
        return
    saved: Dict[str, int] = {}
    for name in ("added_tokens.json", "tokenizer.json"):
        f = os.path.join(tokenizer_dir, name)
        if os.path.isfile(f):
            with open(f) as fh:
                data = json.load(fh)
            saved = data if name == "added_tokens.json" else \
                {t["content"]: t["id"] for t in data.get("added_tokens", [])}
            break
    want = {t: saved[t] for t in REWARD_TOKENS if t in saved}
    got = dict(zip(REWARD_TOKENS, ids))
    if want and want != {t: got[t] for t in want}:
        raise ValueError(f"videoreward: the base's tokenizer gives the reward tokens {got} but "
                         f"the checkpoint's {tokenizer_dir} has {want}; pass the base the "
                         f"checkpoint was trained on (base=DIR)")


def _build_model(base: str, processor, ids: List[int], out_dim: int, weights: bool):
    """The reward model on ``base``: random (to be overwritten by model.pth; parameters on the
    meta device, no init cost) or with the base's weights (adapter layout)."""
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration
    from mmrl.rewards.qwen2vl_rm import Qwen2VLRewardModel, _meta_parameters
    n = len(processor.tokenizer)
    try:
        if weights:
            lm = Qwen2VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32,
                                                                 attn_implementation="sdpa")
            lm.resize_token_embeddings(n, mean_resizing=False)
            return Qwen2VLRewardModel(lm, head="linear", out_dim=out_dim, token_ids=ids)
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as err:
        raise weights_error("videoreward", "the base model", repr(base),
                            "huggingface-cli download Qwen/Qwen2-VL-2B-Instruct --local-dir "
                            "BASE", err, option="base") from None
    config.text_config.vocab_size = n
    with _meta_parameters():
        return Qwen2VLRewardModel(Qwen2VLForConditionalGeneration._from_config(
            config, attn_implementation="sdpa"), head="linear", out_dim=out_dim, token_ids=ids)


def _load_strict(model: torch.nn.Module, sd: Dict[str, Tensor], where: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k])}"
              for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != tuple(expected[k])]
    if missing or unexpected or shapes:
        raise ValueError(f"videoreward: {where} does not fit the model built from "
                         f"model_config.json and the base: {len(missing)} missing keys (e.g. "
                         f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                         f"{len(shapes)} of another shape (e.g. {shapes[:2]}); check the base "
                         f"(Qwen2-VL-2B-Instruct for the released VideoReward) and "
                         f"peft_lora_config")
    model.load_state_dict(sd, strict=True, assign=True)


class VideoReward(VideoScorer):
    """VideoAlign's VideoReward: ``overall = VQ' + MQ' + TA'`` (or one of them, or all four).

    ``X' = (X - mean_X) / std_X`` with ``X`` the linear head at the ``<|X_reward|>`` token and
    the means / stds of ``model_config.json``'s ``inference_config`` (released: VQ 3.6757 /
    2.2476, MQ 1.1646 / 1.3811, TA 2.8105 / 2.5121); the module docstring lists the steps.

    Args:
        path: VideoAlign's checkpoint folder (``model_config.json`` + ``checkpoint-<step>/``);
            default: the hub repo ``KwaiVGI/VideoReward`` from the local cache.
        step: the checkpoint step (default: the highest).
        base: the base model (default ``model_config.model_name_or_path``, the hub id
            ``Qwen/Qwen2-VL-2B-Instruct``); a local copy when offline.
        output: ``overall`` | ``vq`` | ``mq`` | ``ta`` (one column) or ``all`` (columns
            overall, vq, mq, ta: ``videoreward.overall`` ... in the reward batch).
        use_norm: standardise with ``inference_config`` (VideoAlign's default True); False:
            raw head values and their sum.
        fps: the videos' frame rate when the metadata has none (Wan 2.1: 16).
        sample_fps: frames sampled per second of video (default ``data_config.fps``, 2.0).
        num_frames: sample this many frames instead (rounded to even; ``nframes`` mode).
        min_pixels, max_pixels: per-frame pixel bounds of the resize (default 100,352 and
            ``data_config.max_frame_pixels``, 200,704); small values for tiny tests.
        batch_size: videos per forward; grad: keep the graph (skips the uint8 roundings).
        device, dtype: where and in which precision the model runs (default CUDA if
            available, float32; VideoAlign runs bf16).

    Raises:
        ValueError: an unknown ``output``; ``sample_fps`` together with ``num_frames``.
        WeightsNotFoundError: the checkpoint or the base is not found.
    """

    name = "videoreward"
    scale = ("VQ' + MQ' + TA', each standardised with VideoAlign's inference_config (0 = the "
             "calibration mean, unbounded)")

    def __init__(self, path: Optional[str] = None, step: Optional[int] = None,
                 base: Optional[str] = None, output: str = "overall", use_norm: bool = True,
                 fps: Optional[float] = None, sample_fps: Optional[float] = None,
                 num_frames: Optional[int] = None, min_pixels: Optional[int] = None,
                 max_pixels: Optional[int] = None, batch_size: int = 4, grad: bool = False,
                 device=None, dtype=None):
        if output not in OUTPUTS:
            raise ValueError(f"videoreward: output={output!r}; expected one of "
                             f"{', '.join(OUTPUTS)}")
        if sample_fps is not None and num_frames is not None:
            raise ValueError("videoreward: sample_fps and num_frames both given; VideoAlign "
                             "samples by one of them: drop one")
        for key, val in (("sample_fps", sample_fps), ("num_frames", num_frames),
                         ("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if val is not None and (isinstance(val, bool) or not val > 0):
                raise ValueError(f"videoreward: {key}={val!r}; expected a positive number")
        super().__init__(batch_size, grad, fps)
        self.device = default_device(device)
        root = path if path is not None else _hub_snapshot()
        self.model, self.processor, layout = load_videoreward(
            root, step, base, parse_dtype(dtype), self.device)
        dc, cfg = layout["config"]["data_config"], layout["config"]
        if num_frames is None and sample_fps is None and dc.get("num_frames") is not None:
            num_frames = int(dc["num_frames"])
        self.num_frames = num_frames
        self.sample_fps = float(sample_fps or dc.get("fps") or SAMPLE_FPS)
        self.min_pixels = int(min_pixels or VIDEO_MIN_PIXELS)
        self.max_pixels = int(max_pixels or dc.get("max_frame_pixels") or MAX_FRAME_PIXELS)
        self.stats = cfg.get("inference_config") if use_norm else None
        self.output, self.step = output, layout["step"]
        if dc.get("prompt_template_type", "detailed_special") != "detailed_special":
            raise ValueError(f"videoreward: data_config.prompt_template_type="
                             f"{dc['prompt_template_type']!r}; only 'detailed_special' (the "
                             f"released model's) is implemented")
        ip = self.processor.image_processor
        # the processor resizes again (smart_resize with its own bounds): a no-op only inside them
        self._bounds = (ip.size.get("shortest_edge") or 0, ip.size.get("longest_edge") or 1 << 62)
        self._patch = dict(mean=tuple(ip.image_mean), std=tuple(ip.image_std),
                           patch_size=ip.patch_size, merge_size=ip.merge_size,
                           temporal_patch_size=ip.temporal_patch_size)

    def frames(self, video: Tensor, fps: Optional[float]) -> Tensor:
        """One video ``[F, 3, H, W]`` in [0, 1] -> VideoAlign's frames ``[n, 3, h, w]`` in
        [0, 1] (uint8 values / 255 unless ``grad``): steps 1-3 of the module docstring."""
        F_, _, H, W = video.shape
        idx, size, _ = frame_plan(F_, H, W, fps, self.sample_fps, self.num_frames,
                                  self.min_pixels, self.max_pixels)
        lo, hi = self._bounds
        if not lo <= size[0] * size[1] <= hi:
            raise ValueError(f"videoreward: frames resized to {size[0]}x{size[1]} fall outside "
                             f"the processor's pixel bounds [{lo}, {hi}], where VideoAlign's "
                             f"processor would resize them again; set min_pixels >= {lo}")
        if self.grad:
            return resize_frames(video[idx] * 255, size) / 255
        x = resize_frames(to_uint8(video[idx]), size)
        # x * (1/255) in float64, then float32: the 4.45.2 processor's rescale, bit for bit
        return (x.double() * (1 / 255)).float()

    def inputs(self, videos: Tensor, prompts: List[str],
               fps: Sequence[Optional[float]]) -> Dict[str, Tensor]:
        """The model inputs for a chunk (``input_ids``, ``attention_mask``,
        ``pixel_values_videos``, ``video_grid_thw``) on the model's device."""
        from mmrl.rewards.qwen2vl_rm import encode, to_patches
        for i, p in enumerate(prompts):
            bad = [t for t in _RESERVED if t in p]
            if bad:
                raise ValueError(f"videoreward: prompts[{i}] contains {bad}, which the "
                                 f"tokenizer reads as special tokens; remove them from the "
                                 f"prompt")
        rows, grids = [], []
        for v, f in zip(videos, fps):
            r, g = to_patches(self.frames(v, f), **self._patch)
            rows.append(r)
            grids.append(g)
        batch = encode(self.processor, [build_prompt(p) for p in prompts], rows, grids, "video")
        batch["pixel_values_videos"] = batch["pixel_values_videos"].to(self.model.base.dtype)
        return {k: v.to(self.device) for k, v in batch.items()}

    def raw(self, videos: Tensor, prompts: List[str],
            fps: Sequence[Optional[float]]) -> Tensor:
        """Head values ``[b, 3]`` (VQ, MQ, TA) before normalisation, float32."""
        return per_dimension(self.model(**self.inputs(videos, prompts, fps)))

    def _score_videos(self, videos, prompts, fps):
        cols = normalise(self.raw(videos, prompts, fps), self.stats)
        if self.output == "all":
            return {k: cols[k] for k in ("overall", "vq", "mq", "ta")}
        return cols[self.output]


def _hub_snapshot() -> str:
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(HUB_REPO)
    except Exception as err:  # offline, not cached, or no huggingface_hub: one clear message
        raise weights_error("videoreward", "the checkpoint", f"the hub repo {HUB_REPO!r}",
                            _DOWNLOAD, err) from None


RELEASED_STATS = {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646, "MQ_std": 1.3811,
                  "TA_mean": 2.8105, "TA_std": 2.5121}
"""The released ``inference_config`` (3rd-party copies of the official model_config.json)."""


def build_tiny_videoreward(root: str, *, step: int = 100, weights: str = "full",
                           lora_r: int = 4, output_dim: int = 1, hidden_size: int = 32,
                           layers: int = 1, seed: int = 0,
                           max_frame_pixels: int = MAX_FRAME_PIXELS) -> str:
    """A random tiny VideoReward in VideoAlign's layout at ``root`` -> ``root``.

    ``root/base/``: a tiny Qwen2-VL in the Qwen2-VL-Instruct file layout
    (:func:`mmrl.rewards.qwen2vl_rm.build_tiny_checkpoint`); ``root/model_config.json``
    (``model_name_or_path: "base"``, read relative to ``root``; LoRA r ``lora_r``, alpha
    2r, the usual exclusions; the released ``inference_config``);
    ``root/checkpoint-<step>/``: ``model.pth`` (``weights="full"``, the PEFT-wrapped state dict
    in transformers-4.45 key names) or ``adapter_model.safetensors`` + ``non_lora_state_dict.pth``
    (``weights="adapter"``), and ``tokenizer/``. The LoRA weights are random and non-zero, so
    the LoRA changes the scores.
    """
    from peft import get_peft_model
    from safetensors.torch import save_file
    from mmrl.rewards.qwen2vl_rm import (build_tiny_checkpoint, load_reward_model,
                                         to_released_keys)
    if weights not in ("full", "adapter"):
        raise ValueError(f"weights={weights!r}; expected 'full' or 'adapter'")
    info = build_tiny_checkpoint(os.path.join(root, "base"), special_tokens=REWARD_TOKENS,
                                 head="linear", out_dim=output_dim, hidden_size=hidden_size,
                                 layers=layers, seed=seed, filename="reward.safetensors")
    model, processor = load_reward_model(info["path"], info["base"],
                                         special_tokens=REWARD_TOKENS, head="linear",
                                         out_dim=output_dim)
    os.remove(info["path"])
    pc = {"lora_enable": True, "vision_lora": False, "lora_r": lora_r, "lora_alpha": 2 * lora_r,
          "lora_dropout": 0.05, "lora_target_modules": None,
          "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens", "visual"],
          "lora_modules_to_save": None, "lora_task_type": "CAUSAL_LM", "use_rslora": False,
          "num_lora_modules": -1}
    peft_model = get_peft_model(model.requires_grad_(True), _lora_config(pc, model))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for k, p in peft_model.named_parameters():
            if "lora_" in k:
                p.normal_(0.0, 0.2)
    sd = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    prefix = "base_model.model."
    sd = {prefix + k: v for k, v in to_released_keys(
        {k[len(prefix):]: v for k, v in sd.items()}).items()}
    ckpt = os.path.join(root, f"checkpoint-{step}")
    os.makedirs(ckpt, exist_ok=True)
    if weights == "full":
        torch.save(sd, os.path.join(ckpt, "model.pth"))
    else:  # peft's adapter file (no adapter name) + what VideoAlign trains besides the LoRA
        lora = {k.replace(".default.", "."): v for k, v in sd.items() if "lora_" in k}
        save_file({k: v.contiguous() for k, v in lora.items()},
                  os.path.join(ckpt, "adapter_model.safetensors"), metadata={"format": "pt"})
        keep = ("visual.", "embed_tokens", "lm_head", "rm_head")
        torch.save({k: v for k, v in sd.items() if "lora_" not in k and any(s in k for s in keep)},
                   os.path.join(ckpt, "non_lora_state_dict.pth"))
    processor.tokenizer.save_pretrained(os.path.join(ckpt, "tokenizer"))
    config = {
        "data_config": {"meta_data": "", "data_dir": "", "meta_data_test": None,
                        "max_frame_pixels": max_frame_pixels, "num_frames": None, "fps": 2.0,
                        "p_shuffle_frames": 0.0, "p_color_jitter": 0.0,
                        "eval_dim": list(DIMENSIONS), "prompt_template_type": "detailed_special",
                        "add_noise": False, "sample_type": "uniform", "use_tied_data": True},
        "model_config": {"model_name_or_path": "base", "model_revision": "main",
                         "output_dim": output_dim, "use_special_tokens": True,
                         "freeze_vision_tower": False, "freeze_llm": False, "tune_merger": True,
                         "torch_dtype": "float32", "reward_token": "special",
                         "loss_type": "btt"},
        "peft_lora_config": pc, "inference_config": dict(RELEASED_STATS),
        "training_args": {"output_dir": root}}
    with open(os.path.join(root, "model_config.json"), "w") as f:
        json.dump(config, f, indent=4)
    return root
