"""Prompt templates of the VLM judges (:mod:`mmrl.rewards.vlm_judge`) and what each one reads.

Each template is data, typed here from its public source and checked by length and SHA-256
(``tests/rewards/test_vlm_judge.py``; the values are in ``REWARDS-VLM.md``, "Prompt templates").
``{prompt}`` is the only placeholder; it is replaced with ``str.replace``, so other braces in a
user's own template stay literal. Torch-free.

==========================  =====  ============================================================
name                        kind   source
==========================  =====  ============================================================
``flow_factory``            point  Flow-Factory @ a0b2bc5a ``src/flow_factory/rewards/
                                   vllm_evaluate.py``, ``VLMEvaluateRewardModel.EVALUATE_PROMPT``
                                   (spec appendix G; no placeholder: the prompt is not sent)
``unifiedreward``           point  Pref-GRPO @ 3e787f6d ``fastvideo/rewards/templates.py``,
                                   ``get_unifiedreward_image_template()`` (appendix C); identical to
                                   UnifiedReward @ ff6f5202 ``inference_qwen/UnifiedReward-2.0-
                                   inference/point_score_ACS_image_generation.py``
``unifiedreward_pair``      pair   UnifiedReward @ ff6f5202 ``inference_qwen/UnifiedReward-2.0-
                                   inference/pair_score_image_generation.py``, ``problem``
                                   (appendix D; an f-string there, ``{prompt}`` kept here)
``unifiedreward_think``     pair   Pref-GRPO @ 3e787f6d ``templates.py``,
                                   ``get_unifiedreward_think_image_template()`` (appendix E)
``unifiedreward_think_video`` pair Pref-GRPO @ 3e787f6d ``templates.py``,
                                   ``get_unifiedreward_think_video_template()`` (appendix F)
==========================  =====  ============================================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


def _lines(*lines: str) -> str:
    return "\n".join(lines)


# ------------------------------------------------------------ G: Flow-Factory
FLOW_FACTORY_EVALUATE = (
    "You are an expert image quality assessor. "
    "Evaluate this AI-generated image by considering ALL of the following criteria:\n"
    "1. Naturalness: Does the scene look realistic with correct perspective, shadows, and "
    "lighting?\n"
    "2. Artifacts: Is the image free from distortions, blurriness, watermarks, "
    "deformed faces, unusual body parts, or unharmonized subjects?\n"
    "3. Aesthetic Appeal: Does the image exhibit pleasing composition, "
    "color harmony, and visual balance?\n"
    "4. Detail & Clarity: Are textures, edges, and fine details rendered "
    "sharply and coherently without noise or smearing?\n"
    "5. Overall Coherence: Is the image semantically consistent, with all "
    "elements logically fitting together in a unified scene?\n\n"
    "Considering all the above criteria holistically, is this a high-quality image? "
    "Answer Yes or No."
)

# ------------------------------------------------------------ C: UnifiedReward-2.0 point
UNIFIEDREWARD_POINT = (
    "You are presented with a generated image and its associated text caption. "
    "Your task is to analyze the image across multiple dimensions in relation to the caption. "
    "Specifically:\n"
    "Provide overall assessments for the image along the following axes (each rated from 1 to "
    "5):\n"
    "- Alignment Score: How well the image matches the caption in terms of content.\n"
    "- Coherence Score: How logically consistent the image is (absence of visual glitches, "
    "object distortions, etc.).\n"
    "- Style Score: How aesthetically appealing the image looks, regardless of caption "
    "accuracy.\n\n"
    "Output your evaluation using the format below:\n\n"
    "Alignment Score (1-5): X\n"
    "Coherence Score (1-5): Y\n"
    "Style Score (1-5): Z\n\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)

# ------------------------------------------------------------ D: UnifiedReward-2.0 pair
UNIFIEDREWARD_PAIR = (
    "You are presented with two generated images (Image 1 and Image 2) along with a shared "
    "text caption. "
    "Your task is to comparatively evaluate the two images across three specific dimensions:\n\n"
    "- Alignment Score: How well each image matches the caption in terms of content.\n"
    "- Coherence Score: How logically consistent and visually coherent each image is (absence "
    "of visual glitches, distorted objects, etc.).\n"
    "- Style Score: How aesthetically appealing each image is, regardless of caption "
    "accuracy.\n\n"
    "For each dimension, you must assign a relative score to Image 1 and Image 2, such that:\n"
    "- Each score is a float between 0 and 1 (inclusive).\n"
    "- The scores for Image 1 and Image 2 must sum to exactly 1.0 for each dimension.\n"
    "- The higher the score, the better that image is in the corresponding dimension "
    "*relative to the other*.\n\n"
    "This format emphasizes comparative quality rather than absolute evaluation.\n\n"
    "Please provide your evaluation in the format below:\n\n"
    "Alignment Score:\n"
    " Image 1: X\n"
    " Image 2: Y\n\n"
    "Coherence Score:\n"
    " Image 1: X\n"
    " Image 2: Y\n\n"
    "Style Score:\n"
    " Image 1: X\n"
    " Image 2: Y\n\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)

# ------------------------------------------------------------ E: UnifiedReward-Think image
_I8, _I12, _I16 = " " * 8, " " * 12, " " * 16
UNIFIEDREWARD_THINK_IMAGE = _lines(
    "You are an objective and precise evaluator for image quality comparison. I will provide "
    "you with a text caption and two images generated based on this caption. You must analyze "
    "the two images carefully and determine which image is better.",
    "",
    _I8 + "Evaluation procedure:",
    "",
    _I8 + "1. The caption for the generated images is: 「{prompt}」. You must evaluate the two "
    "images across these core dimensions:",
    _I8 + "- Semantic consistency (how closely the image content aligns with the caption)",
    _I8 + "- Aesthetics (composition, color usage, artistic expression)",
    _I8 + "- Authenticity (realism and attention to detail)",
    "",
    _I8 + "2. You are also encouraged to add up to two additional evaluation dimensions if they "
    "are relevant to the specific caption or images (e.g., creativity, spatial layout, "
    "fine-grained detail). If no extra dimensions are relevant, just keep the three core "
    "dimensions.",
    "",
    _I8 + "3. For each evaluation dimension:",
    _I8 + "- Provide a score between 1–10 for both Image 1 and Image 2",
    _I8 + "- Provide a short rationale for each score (2–5 short sentences)",
    _I8 + "- The evaluation must follow exactly this format with line breaks and indentation:",
    _I12 + "Dimension name: ",
    _I16 + "Image 1 (x/10) - rationale; ",
    _I16 + "Image 2 (y/10) - rationale",
    "",
    _I8 + "4. After evaluating all dimensions, calculate the total score for each image and show "
    "the calculation explicitly, following this exact format:",
    _I12 + "Total score:",
    _I12 + "Image 1: x+x+x=total",
    _I12 + "Image 2: y+y+y=total",
    "",
    _I8 + "5. Wrap all reasoning and scoring strictly within <think> and </think> tags.",
    "",
    _I8 + "6. After </think>, output the final judgment strictly inside <answer> and </answer> "
    "tags, containing only one of:",
    _I8 + "- Image 1 is better",
    _I8 + "- Image 2 is better",
    "",
    _I8 + "Constraints:",
    _I8 + "- You must strictly follow the line breaks, indentation, and formatting shown in the "
    "example below.",
    _I8 + "- Do not merge multiple dimensions into one line. Each dimension must follow the "
    "3-line block format shown below.",
    _I8 + "- Do not use Markdown formatting, bullet points, bold text, or headings.",
    _I8 + "- Do not output explanations outside <think> and <answer>.",
    _I8 + "- The <answer> tag must contain only the final string with no extra words.",
    "",
    _I8 + "Required output format:",
    "",
    _I8 + "<think>",
    _I8 + "1. Semantic consistency: ",
    _I12 + "Image 1 (9/10) - ...; ",
    _I12 + "Image 2 (7/10) - ...",
    _I8 + "2. Aesthetics: ",
    _I12 + "Image 1 (8/10) - ...; ",
    _I12 + "Image 2 (8/10) - ...",
    _I8 + "3. Authenticity: ",
    _I12 + "Image 1 (8/10) - ...; ",
    _I12 + "Image 2 (5/10) - ...",
    _I8 + "[Additional dimension if any]: ",
    _I12 + "Image 1 (7/10) - ...; ",
    _I12 + "Image 2 (8/10) - ...",
    _I8 + "[Additional dimension if any]: ",
    _I12 + "Image 1 (6/10) - ...; ",
    _I12 + "Image 2 (7/10) - ...",
    _I8 + "Total score:",
    _I8 + "Image 1: 9+8+8+7+6=38",
    _I8 + "Image 2: 7+8+5+8+7=35",
    _I8 + "</think>",
    _I8 + "<answer>Image 1 is better</answer>",
    "",
    _I8 + "Note: The example above is only to illustrate the exact format (line breaks, "
    "indentation, symbols, and style). Your actual evaluation must follow this format exactly, "
    "but be based on the given caption and images.",
    _I8,
)

# ------------------------------------------------------------ F: UnifiedReward-Think video
UNIFIEDREWARD_THINK_VIDEO = _lines(
    "You are an objective and precise evaluator for video quality comparison. I will provide "
    "you with a text caption and a sequence of consecutive frames extracted from two generated "
    "videos based on this caption. The first half of the frames belong to Video 1, and the "
    "second half of the frames belong to Video 2. You must analyze these two videos carefully "
    "and determine which video is better.",
    "",
    _I8 + "Instructions (MUST follow strictly):",
    _I8 + "1. All reasoning, analysis, explanations, and scores MUST be written strictly inside "
    "<think> and </think> tags.",
    _I8 + "2. The <think> block must start immediately with the first evaluation dimension. Do "
    "NOT include any introduction, notes, or explanations before the first numbered dimension.",
    _I8 + "3. After </think>, output the final judgment strictly inside <answer> and </answer> "
    "tags, containing only one of:",
    _I8 + "- Video 1 is better",
    _I8 + "- Video 2 is better",
    _I8 + "4. Do NOT output anything outside <think> and <answer>. No extra explanations, notes, "
    "or prefaces.",
    "",
    _I8 + "Evaluation procedure:",
    "",
    _I8 + "1. The caption for the generated videos is: 「{prompt}」. The provided frames "
    "represent two candidate videos:",
    _I8 + "- First half: Video 1",
    _I8 + "- Second half: Video 2",
    "",
    _I8 + "2. You must evaluate the two videos across these core dimensions:",
    _I8 + "- Semantic consistency (how closely the video content aligns with the caption)",
    _I8 + "- Temporal coherence (smoothness and logical flow of motion across frames)",
    _I8 + "- Authenticity (realism and attention to detail)",
    "",
    _I8 + "3. You may also add up to two additional evaluation dimensions if they are clearly "
    "relevant (e.g., camera stability, lighting consistency, creativity). If no extra "
    "dimensions are relevant, keep only the three core dimensions.",
    "",
    _I8 + "4. For each evaluation dimension:",
    _I8 + "- Provide a score between 1–10 for both Video 1 and Video 2.",
    _I8 + "- Provide a short rationale for each score (2–5 short sentences).",
    _I8 + "- Each dimension must follow exactly this 3-line block format with numbering, line "
    "breaks, and indentation:",
    _I12 + "N. Dimension name: ",
    _I16 + "Video 1 (x/10) - rationale; ",
    _I16 + "Video 2 (y/10) - rationale",
    "",
    _I8 + "5. After evaluating all dimensions, calculate the total score for each video and show "
    "the calculation explicitly, following this exact format:",
    _I12 + "Total score:",
    _I12 + "Video 1: x+x+x(+...)=total",
    _I12 + "Video 2: y+y+y(+...)=total",
    "",
    _I8 + "6. All reasoning, analysis, scoring, and totals must be written strictly inside "
    "<think> and </think> tags. Nothing related to reasoning or scores may appear outside "
    "<think>.",
    "",
    _I8 + "Required output format (follow this exactly, including line breaks and indentation):",
    "",
    _I8 + "<think>",
    _I8 + "1. Semantic consistency: ",
    _I12 + "Video 1 (9/10) - ...; ",
    _I12 + "Video 2 (7/10) - ...",
    _I8 + "2. Temporal coherence: ",
    _I12 + "Video 1 (8/10) - ...; ",
    _I12 + "Video 2 (6/10) - ...",
    _I8 + "3. Authenticity: ",
    _I12 + "Video 1 (7/10) - ...; ",
    _I12 + "Video 2 (5/10) - ...",
    _I8 + "[Additional dimension if any]: ",
    _I12 + "Video 1 (8/10) - ...; ",
    _I12 + "Video 2 (6/10) - ...",
    _I8 + "[Additional dimension if any]: ",
    _I12 + "Video 1 (7/10) - ...; ",
    _I12 + "Video 2 (7/10) - ...",
    _I8 + "Total score:",
    _I8 + "Video 1: 9+8+7+8+7=39",
    _I8 + "Video 2: 7+6+5+6+7=31",
    _I8 + "</think>",
    _I8 + "<answer>Video 1 is better</answer>",
    "",
    _I8 + "Note: The example above is only to illustrate the exact format (numbering, line "
    "breaks, indentation, and style). Your actual evaluation must follow this format exactly, "
    "but be based on the given caption and the two provided videos (frames divided into two "
    "halves).",
    _I8,
)


# ------------------------------------------------------------ how each is read

@dataclass(frozen=True)
class JudgeTemplate:
    """A judge template and the next-token read that turns it into a number.

    Attributes:
        name: the registry key (``template=`` option).
        text: the user text, ``{prompt}`` replaced by the generation prompt (when present).
        kind: ``"point"`` (one image per query) or ``"pair"`` (Image 1 then Image 2).
        media: ``"image"`` or ``"video"`` (pairs of videos, given as sampled frames).
        prefix: forced after the chat template's generation prompt; ``{Dimension}`` in it is
            replaced by the chosen dimension (``dimensions``, first = default).
        choices: ``((value, (answer strings...)), ...)``: the score is
            ``Σ_k value_k · P(class k) / Σ_k P(class k)`` over the next-token distribution, a
            class's probability being the sum over its (single-token) answer strings.
        dimensions: names ``{Dimension}`` may take (empty: the template has none).
        default_path: the hub id loaded when no ``path=`` is given.
        reads: one line for the docs: what is read.
    """

    name: str
    text: str
    kind: str
    media: str
    prefix: str
    choices: Tuple[Tuple[float, Tuple[str, ...]], ...]
    dimensions: Tuple[str, ...] = ()
    default_path: Optional[str] = None
    reads: str = ""

    @property
    def uses_prompt(self) -> bool:
        return "{prompt}" in self.text


_DIGITS_1_5 = tuple((float(k), (str(k),)) for k in range(1, 6))
# UnifiedReward-2.0 pair: Image 1's score is "0.d..."; the first decimal d read as the middle
# of its tenth, (d + 0.5) / 10
_TENTHS = tuple(((d + 0.5) / 10, (str(d),)) for d in range(10))
_ACS = ("Alignment", "Coherence", "Style")

TEMPLATES: Dict[str, JudgeTemplate] = {t.name: t for t in (
    JudgeTemplate(
        "flow_factory", FLOW_FACTORY_EVALUATE, "point", "image", "",
        ((1.0, ("Yes",)), (0.0, ("No",))), default_path="Qwen/Qwen3-VL-8B-Instruct",
        reads="P(Yes) / (P(Yes) + P(No)) at the first answer token (case and leading-space "
              "variants summed)"),
    JudgeTemplate(
        "unifiedreward", UNIFIEDREWARD_POINT, "point", "image", "{Dimension} Score (1-5): ",
        _DIGITS_1_5, _ACS, default_path="CodeGoat24/UnifiedReward-2.0-qwen3vl-8b",
        reads="Σ k·P(k) / Σ P(k), k = 1..5, at the first digit after the forced "
              "'Alignment Score (1-5): ' (or Coherence / Style), in [1, 5]"),
    JudgeTemplate(
        "unifiedreward_pair", UNIFIEDREWARD_PAIR, "pair", "image",
        "{Dimension} Score:\n Image 1: 0.", _TENTHS, _ACS,
        default_path="CodeGoat24/UnifiedReward-2.0-qwen3vl-8b",
        reads="Image 1's relative score: Σ_d P(d)·(d + 0.5)/10 over the first decimal d = 0..9 "
              "after the forced 'Alignment Score:\\n Image 1: 0.' (or Coherence / Style)"),
    JudgeTemplate(
        "unifiedreward_think", UNIFIEDREWARD_THINK_IMAGE, "pair", "image", "<answer>Image ",
        ((1.0, ("1",)), (0.0, ("2",))), default_path="CodeGoat24/UnifiedReward-Think-qwen3vl-8b",
        reads="P(1) / (P(1) + P(2)) at the token after the forced '<answer>Image ' (the "
              "<think> chain is skipped)"),
    JudgeTemplate(
        "unifiedreward_think_video", UNIFIEDREWARD_THINK_VIDEO, "pair", "video",
        "<answer>Video ", ((1.0, ("1",)), (0.0, ("2",))),
        default_path="CodeGoat24/UnifiedReward-Think-qwen3vl-8b",
        reads="P(1) / (P(1) + P(2)) at the token after the forced '<answer>Video ' (8 frames "
              "per video, the <think> chain is skipped)"),
)}
