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
    - Built on transformers 5 directly (not on mmrl.video's adapters) because rewards sit below
      the video package; the checkpoint's transformers-4.45 key names are mapped on load.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mmrl.rewards.base import (OPENAI_MEAN, OPENAI_STD, WeightsNotFoundError, check_path,
                               default_device, parse_dtype, weights_error)
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


def patchify_video(frames: Tensor, patch: int = 14, merge: int = 2,
                   temporal: int = 2) -> Tuple[Tensor, Tuple[int, int, int]]:
    """Qwen2-VL's video pixels: ``[T, 3, h, w]`` float in [0, 255] -> ``pixel_values_videos``
    ``[(T/t)(h/p)(w/p), 3·t·p·p]`` and the grid ``(T/t, h/p, w/p)``.

    Rescale 1/255, CLIP mean/std, then the rows ordered (time, merge block row, merge block
    column, row in block, column in block), each row (channel, frame, y, x): transformers'
    ``Qwen2VLImageProcessor`` (4.45.2) for videos. ``T`` must be a multiple of ``temporal`` (the
    frame count rule makes it even).
    """
    T, C, h, w = frames.shape
    if T % temporal or h % (patch * merge) or w % (patch * merge):
        raise ValueError(f"videoreward: frames {tuple(frames.shape)}; expected T a multiple of "
                         f"{temporal} and h, w multiples of {patch * merge}")
    mean = torch.tensor(OPENAI_MEAN, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    x = (frames * (1 / 255) - mean) / std
    gt, gh, gw = T // temporal, h // patch, w // patch
    # [T, C, h, w] -> [gt, t, C, gh/m, m, p, gw/m, m, p]
    x = x.reshape(gt, temporal, C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, C * temporal * patch * patch), (gt, gh, gw)


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
