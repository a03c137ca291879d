"""VLM judges read from next-token probabilities: pointwise (``vlm_judge``) and pairwise
(``vlm_pair``, ``vlm_pair_video``).

A judge is any image-text-to-text checkpoint transformers loads with ``AutoProcessor`` +
``AutoModelForImageTextToText`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision; tiny Qwen2-VL,
Qwen3-VL and LLaVA-OneVision checkpoints in tests/rewards/test_vlm_judge.py). One
query is one user turn, the images first, then the template text with ``{prompt}`` replaced; the
chat template is applied with ``add_generation_prompt=True`` and the template's forced answer
prefix appended (e.g. ``"<answer>Image "``). One forward pass (eval mode, no sampling) gives the
next-token logits at the last real token, and the score is an expectation over answer classes::

    score = Σ_k value_k · P(class k) / Σ_k P(class k),  P(class k) = Σ_{t ∈ class k} softmax(z)_t

- yes/no (Flow-Factory ``vllm_evaluate``): classes Yes (1) and No (0), so
  ``score = P(Yes) / (P(Yes) + P(No)) = sigmoid(logsumexp z_yes − logsumexp z_no)``, each class
  summing its case and leading-space variants (``"Yes"``, ``" Yes"``, ``"yes"``, ``"YES"``, ...)
  that are single tokens (``canonicalize=True``, Flow-Factory's ``canonicalize``).
- expected value (UnifiedReward-2.0 pointwise): classes ``"1"``..``"5"`` with values 1..5.
- pairwise: ``compare(images_a, images_b, prompts) -> Tensor[n]`` = P(A preferred). With
  ``both_orders`` (default) each pair is asked twice, A as Image 1 and B as Image 1, and
  ``P = (P(Image 1 | A, B) + 1 − P(Image 1 | B, A)) / 2`` cancels position bias (then
  ``compare(a, b) + compare(b, a) = 1`` exactly).

What each built-in template reads is in :data:`mmrl.rewards.judge_templates.TEMPLATES` and
docs/rewards.md, "VLM judges". Every answer string must be one token of the judge's tokenizer
(checked at construction, with the tokenization in the error).

Differs from UnifiedReward-Think (Pref-GRPO ``unifiedreward_think.py``): the ``<think>`` chain
is not generated; the answer is read right after the forced ``<answer>Image `` (a probability,
not a parsed win / 0.5). Differs from UnifiedReward-2.0: its decimal answers (e.g. 2.6947) are
replaced by the expected value of the first digit (pointwise: 1..5; pairwise: Image 1's first
decimal, read as the middle of its tenth), one dimension per judge (``dimension=``; a later
dimension's prefix skips the earlier lines). Differs from Flow-Factory: the variants are summed
over the whole vocabulary, not the server's top-20 log-probs, and no 0.0 fallback is needed.
Differs from the issue: the judge runs through transformers directly, not mmrl.video's adapters,
because rewards sit below the video package; the same families are tested. Images are passed
as PIL images (tensors rounded to uint8), not re-encoded as JPEG the way the vLLM requests are.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from mmrl.rewards.base import (Scorer, as_rgb, check_images, check_path, check_prompts,
                               default_device, parse_dtype, weights_error)
from mmrl.rewards.judge_templates import TEMPLATES, JudgeTemplate

Tensor = torch.Tensor
Answers = Union[str, Sequence[str]]


# --------------------------------------------------------------------------- templates

def resolve_template(name: str, template: str, kind: str, prefix: Optional[str],
                     choices: Optional[Tuple],
                     dimension: Optional[str]) -> Tuple[JudgeTemplate, str]:
    """The judge's template and its forced prefix (``{Dimension}`` filled in).

    ``template`` is a registered name or the user's own text with ``{prompt}``; ``choices``
    (``((value, strings), ...)``) replaces the template's answer classes when given.

    Raises:
        TypeError: a template, prefix or dimension that is not a string.
        ValueError: an unknown name that is not a text with ``{prompt}``; a template of the
            other kind; a dimension the template does not have.
    """
    if not isinstance(template, str) or not template:
        raise TypeError(f"{name}: template={template!r}; expected a template name "
                        f"({', '.join(TEMPLATES)}) or a text with {{prompt}}")
    for option, value in (("answer_prefix", prefix), ("dimension", dimension)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name}: {option}={value!r}; expected a string")
    if template in TEMPLATES:
        spec = TEMPLATES[template]
        if spec.kind != kind:
            other = "vlm_pair" if spec.kind == "pair" else "vlm_judge"
            raise ValueError(f"{name}: template {template!r} is a "
                             f"{'pairwise' if spec.kind == 'pair' else 'pointwise'} template; "
                             f"load it with {other!r} (templates of {name}: "
                             f"{', '.join(t for t, s in TEMPLATES.items() if s.kind == kind)})")
    elif "{prompt}" not in template:
        from mmrl.registry import did_you_mean
        raise ValueError(f"{name}: template={template[:60]!r} is neither a known template "
                         f"({', '.join(TEMPLATES)}) nor a text with a {{prompt}} placeholder"
                         f"{did_you_mean(template, TEMPLATES)}; put {{prompt}} where the "
                         f"generation prompt goes")
    else:
        spec = JudgeTemplate("custom", template, kind, "image", "",
                             choices or (((1.0, ("Yes",)), (0.0, ("No",))) if kind == "point"
                                         else ((1.0, ("1",)), (0.0, ("2",)))))
    if choices is not None:
        spec = JudgeTemplate(spec.name, spec.text, spec.kind, spec.media, spec.prefix, choices,
                             spec.dimensions, spec.default_path, spec.reads)
    if dimension is not None and dimension.capitalize() not in spec.dimensions:
        has = (f"one of {', '.join(d.lower() for d in spec.dimensions)}" if spec.dimensions
               else "none (drop dimension)")
        raise ValueError(f"{name}: dimension={dimension!r}; template {spec.name!r} has {has}")
    dim = (dimension or (spec.dimensions[0] if spec.dimensions else "")).capitalize()
    forced = spec.prefix if prefix is None else prefix
    return spec, forced.replace("{Dimension}", dim)


def _answer_list(name: str, option: str, value: Answers) -> Tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    if not items or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"{name}: {option}={value!r}; expected a non-empty string or a list of "
                         f"non-empty strings (each one token of the judge's tokenizer)")
    return items


def variants(text: str) -> List[str]:
    """``text`` and its case / leading-space variants, in a fixed order (Flow-Factory's
    ``canonicalize`` sums tokens equal after ``strip().lower()``)."""
    out: List[str] = []
    for s in (text, text.capitalize(), text.lower(), text.upper()):
        for v in (s.strip(), " " + s.strip()):
            if v not in out:
                out.append(v)
    return out


def answer_token_ids(name: str, tokenizer, choices, canonicalize: bool,
                     option: str) -> List[List[int]]:
    """One id list per answer class: each given string's single token, plus (``canonicalize``)
    its single-token variants.

    Raises:
        ValueError: a given string that is not exactly one token (its tokenization is in the
            message); a token in two classes.
    """
    classes, owner = [], {}
    for k, (_, strings) in enumerate(choices):
        ids: List[int] = []
        for s in strings:
            got = tokenizer.encode(s, add_special_tokens=False)
            if len(got) != 1:
                pieces = tokenizer.convert_ids_to_tokens(got)
                raise ValueError(
                    f"{name}: answer string {s!r} is {len(got)} tokens of this judge's tokenizer "
                    f"{pieces}; the score reads one next-token probability per answer, so each "
                    f"answer must be a single token. Pass strings the tokenizer has as one token "
                    f"(e.g. {tokenizer.decode(got[:1])!r}) with {option}, or use a judge whose "
                    f"vocabulary has {s!r} as one token")
            extra = [s] + (variants(s)[1:] if canonicalize else [])
            for v in extra:
                t = tokenizer.encode(v, add_special_tokens=False)
                if len(t) == 1 and t[0] not in ids:
                    ids.append(t[0])
        for t in ids:
            if owner.get(t, k) != k:
                raise ValueError(f"{name}: token {tokenizer.decode([t])!r} answers two classes "
                                 f"({choices[owner[t]][1]} and {strings}); make the answer "
                                 f"strings distinct (canonicalize=False keeps them as given)")
            owner[t] = k
        classes.append(ids)
    return classes


# --------------------------------------------------------------------------- the reader

def to_pil(x: Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] -> an RGB PIL image (rounded to uint8)."""
    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy(), "RGB")


def as_pil_list(images: Any, name: str) -> List[Image.Image]:
    """A checked image batch (PIL list or ``[B, C, H, W]`` in [0, 1]) as RGB PIL images."""
    kind, _ = check_images(images, name)
    if kind == "pil":
        return [as_rgb(im) for im in images]
    x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]
    return [to_pil(v) for v in x]


class JudgeReader:
    """The judge model, its processor and the answer classes; ``read`` runs one forward.

    Args:
        name: the scorer's name, for messages.
        spec: the template; ``prefix``: the forced answer prefix (dimension filled in).
        path: a hub id or a local folder (default: the template's ``default_path``).
        device, dtype: where and in which precision the model runs (default CUDA if available,
            float32). The class probabilities are computed in float32.
        canonicalize: also sum the answers' single-token case / leading-space variants.
        option: the option that sets the answers, for the error message.
    """

    def __init__(self, name: str, spec: JudgeTemplate, prefix: str, path: Optional[str],
                 device, dtype, canonicalize: bool, option: str):
        from transformers import AutoModelForImageTextToText, AutoProcessor
        self.name, self.spec, self.prefix = name, spec, prefix
        src = check_path(name, path) or spec.default_path
        if src is None:
            raise ValueError(f"{name}: a custom template has no default judge; pass path= (a hub "
                             f"id or a local folder)")
        self.device, self.dtype = default_device(device), parse_dtype(dtype)
        try:
            self.processor = AutoProcessor.from_pretrained(src)
            model = AutoModelForImageTextToText.from_pretrained(src, dtype=self.dtype)
        except OSError as err:
            raise weights_error(name, "the judge", repr(src), f"hf download {src} --local-dir DIR",
                                err) from None
        self.model = model.to(self.device).eval()
        self.tokenizer = getattr(self.processor, "tokenizer", None) or self.processor
        if not getattr(self.processor, "chat_template", None):
            raise ValueError(f"{name}: {src} has no chat template (chat_template.jinja / "
                             f"chat_template.json); save the instruct model's processor with it")
        self.values = torch.tensor([v for v, _ in spec.choices], dtype=torch.float32,
                                   device=self.device)
        self.class_ids = answer_token_ids(name, self.tokenizer, spec.choices, canonicalize,
                                          option)

    def text(self, prompt: str, n_images: int) -> str:
        """The query as the model sees it (before image-token expansion)."""
        body = self.spec.text.replace("{prompt}", prompt)
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": body}]
        chat = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)
        return chat + self.prefix

    @torch.no_grad()
    def class_logprobs(self, images: List[List[Image.Image]], prompts: List[str]) -> Tensor:
        """``log P(class k)`` under the full next-token softmax, ``[b, K]`` float32 on the
        judge's device: one padded forward, logits at each row's last real token."""
        texts = [self.text(p, len(ims)) for p, ims in zip(prompts, images)]
        inputs = self.processor(text=texts, images=images, padding=True, padding_side="right",
                                return_tensors="pt")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else
                      v.to(self.device)) for k, v in inputs.items() if isinstance(v, Tensor)}
        mask = inputs["attention_mask"]  # [b, L]; either padding side
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # [b] index of the last real token
        out = self.model(**inputs, logits_to_keep=last[:, None], use_cache=False)
        z = out.logits[:, -1].float().log_softmax(-1)  # [b, V]
        return torch.stack([z[:, ids].logsumexp(-1) for ids in self.class_ids], 1)

    def read(self, images: List[List[Image.Image]], prompts: List[str]) -> Tensor:
        """``Σ_k value_k · P(k) / Σ_k P(k)``, ``[b]`` float32 on the judge's device."""
        return (self.class_logprobs(images, prompts).softmax(-1) * self.values).sum(-1)


# --------------------------------------------------------------------------- pointwise

class VLMJudge(Scorer):
    """``vlm_judge``: a VLM asked one question per image, scored from its answer token.

    Args:
        path: hub id or local folder of the judge (default: the template's model; Flow-Factory's
            question: ``Qwen/Qwen3-VL-8B-Instruct``; UnifiedReward:
            ``CodeGoat24/UnifiedReward-2.0-qwen3vl-8b``).
        template: ``"flow_factory"`` (default: Yes/No, no prompt), ``"unifiedreward"`` (1..5
            expected value) or your own text with ``{prompt}`` (read as yes/no).
        yes, no: answer strings of the yes/no classes (default ``"Yes"`` / ``"No"``); each a
            single token of the judge's tokenizer.
        canonicalize: also sum each answer's single-token case and leading-space variants.
        answer_prefix: text forced after the generation prompt (default: the template's, e.g.
            ``"Alignment Score (1-5): "``; ``""`` for flow_factory and custom templates).
        dimension: ``alignment`` (default) / ``coherence`` / ``style`` for ``unifiedreward``.
        device, dtype, batch_size: where, in which precision, and queries per forward.
    """

    name = "vlm_judge"
    scale = "P(yes) / (P(yes) + P(no)) in [0, 1]; unifiedreward: expected score in [1, 5]"

    def __init__(self, path: Optional[str] = None, template: str = "flow_factory",
                 yes: Optional[Answers] = None, no: Optional[Answers] = None,
                 canonicalize: bool = True, answer_prefix: Optional[str] = None,
                 dimension: Optional[str] = None, device=None, dtype=None, batch_size: int = 8):
        super().__init__(batch_size)
        choices = None
        if yes is not None or no is not None:
            if isinstance(template, str) and template in TEMPLATES and \
                    TEMPLATES[template].choices[0][1] != ("Yes",):
                raise ValueError(f"{self.name}: yes=/no= set the answers of a yes/no question; "
                                 f"template {template!r} reads digits: "
                                 f"{TEMPLATES[template].reads}")
            choices = ((1.0, _answer_list(self.name, "yes", "Yes" if yes is None else yes)),
                       (0.0, _answer_list(self.name, "no", "No" if no is None else no)))
        spec, prefix = resolve_template(self.name, template, "point", answer_prefix, choices,
                                        dimension)
        self.template = spec
        self.uses_prompts = spec.uses_prompt  # flow_factory's question does not read it
        self.reader = JudgeReader(self.name, spec, prefix, path, device, dtype, canonicalize,
                                  "yes=[...] / no=[...]")

    def answer_logprobs(self, images, prompts: Optional[Sequence[str]] = None) -> Tensor:
        """``log P(class k)`` under the full next-token softmax, ``[B, K]`` (classes in the
        template's order: yes, no / 1..5): how much mass the judge puts on the answers."""
        pil = as_pil_list(images, self.name)
        prompts = check_prompts([""] * len(pil) if prompts is None and not self.uses_prompts
                                else prompts, len(pil))
        b = self.batch_size
        return torch.cat([self.reader.class_logprobs([[im] for im in pil[i:i + b]],
                                                     prompts[i:i + b])
                          for i in range(0, len(pil), b)])

    def _score(self, images, prompts: List[str]) -> Tensor:
        pil = as_pil_list(images, self.name)
        return self.reader.read([[im] for im in pil], prompts)


# --------------------------------------------------------------------------- pairwise

def pair_frame_indices(num_frames: int, num: int = 8) -> List[int]:
    """Pref-GRPO's frame sampling: ``np.linspace(0, F − 1, num)`` truncated to int (repeats
    when F < num)."""
    return np.linspace(0, num_frames - 1, num).astype(int).tolist()


class VLMPairJudge(Scorer):
    """``vlm_pair``: a VLM shown Image 1 then Image 2 (before the text); ``compare`` returns
    P(A preferred).

    Not a per-sample scorer: calling it as one raises, pointing at ``pref_winrate`` (the group
    win-rate reward built on ``compare``).

    Args:
        path: hub id or local folder (default ``CodeGoat24/UnifiedReward-Think-qwen3vl-8b`` /
            ``CodeGoat24/UnifiedReward-2.0-qwen3vl-8b`` for ``unifiedreward_pair``).
        template: ``"unifiedreward_think"`` (default; forced ``"<answer>Image "``, reads
            ``"1"`` vs ``"2"``), ``"unifiedreward_pair"`` (Image 1's relative score) or your own
            text with ``{prompt}``.
        answers: ``(Image 1 wins, Image 2 wins)`` answer strings, single tokens (default
            ``("1", "2")``); not for ``unifiedreward_pair``.
        both_orders: ask each pair in both orders and average (cancels position bias; 2× cost).
        answer_prefix: text forced after the generation prompt (default: the template's).
        dimension: ``alignment`` / ``coherence`` / ``style`` for ``unifiedreward_pair``.
        device, dtype, batch_size: where, in which precision, and queries per forward.
    """

    name = "vlm_pair"
    scale = "P(A preferred) in [0, 1]"
    media = "image"
    default_template = "unifiedreward_think"

    def __init__(self, path: Optional[str] = None, template: Optional[str] = None,
                 answers: Optional[Sequence[str]] = None, both_orders: bool = True,
                 answer_prefix: Optional[str] = None, dimension: Optional[str] = None,
                 device=None, dtype=None, batch_size: int = 8):
        super().__init__(batch_size)
        template = template or self.default_template
        choices = None
        if answers is not None:
            if template == "unifiedreward_pair":
                raise ValueError(f"{self.name}: answers= sets the two winner strings; template "
                                 f"'unifiedreward_pair' reads a decimal: "
                                 f"{TEMPLATES[template].reads}")
            if isinstance(answers, str) or len(answers) != 2:
                raise ValueError(f"{self.name}: answers={answers!r}; expected two strings "
                                 f"(Image 1 wins, Image 2 wins), e.g. ('1', '2')")
            choices = ((1.0, _answer_list(self.name, "answers[0]", answers[0])),
                       (0.0, _answer_list(self.name, "answers[1]", answers[1])))
        spec, prefix = resolve_template(self.name, template, "pair", answer_prefix, choices,
                                        dimension)
        if spec.name in TEMPLATES and spec.media != self.media:
            other = "vlm_pair_video" if spec.media == "video" else "vlm_pair"
            raise ValueError(f"{self.name}: template {spec.name!r} judges {spec.media} pairs; "
                             f"load it with {other!r}")
        self.template = spec
        self.both_orders = bool(both_orders)
        self.reader = JudgeReader(self.name, spec, prefix, path, device, dtype, False,
                                  "answers=(IMAGE_1_WINS, IMAGE_2_WINS)")

    def __call__(self, *args, **kwargs):
        raise TypeError(
            f"{self.name} is a pairwise judge: it compares two {self.media}s and has no "
            f"per-sample score. Use judge.compare({self.media}s_a, {self.media}s_b, prompts) -> "
            f"P(A preferred), or the group win-rate reward 'pref_winrate' built on it (each "
            f"sample scored by its wins against the other samples of its group)")

    def _items(self, media: Any, which: str) -> List[List[Image.Image]]:
        """One image list per sample (here one image)."""
        return [[im] for im in as_pil_list(media, f"{self.name} {which}")]

    def compare(self, images_a, images_b, prompts: Sequence[str]) -> Tensor:
        """P(A preferred) for each pair, ``[n]`` float32 in [0, 1].

        Args:
            images_a, images_b: n images each (PIL list or ``[n, C, H, W]`` in [0, 1]); videos
                ``[n, F, C, H, W]`` for ``vlm_pair_video``.
            prompts: n generation prompts (``prompts[i]`` for pair i).

        Raises:
            ValueError: A, B and prompts of different lengths.
        """
        a, b = self._items(images_a, "images_a"), self._items(images_b, "images_b")
        if len(a) != len(b):
            raise ValueError(f"{self.name}: got {len(a)} A {self.media}s and {len(b)} B "
                             f"{self.media}s; compare takes one A and one B per pair")
        prompts = check_prompts(prompts, len(a))
        n = len(a)
        queries = [x + y for x, y in zip(a, b)]  # Image 1 = A
        if self.both_orders:
            queries += [y + x for x, y in zip(a, b)]  # Image 1 = B
        texts = prompts * (2 if self.both_orders else 1)
        k = self.batch_size
        p = torch.cat([self.reader.read(queries[i:i + k], texts[i:i + k])
                       for i in range(0, len(queries), k)])  # [n] or [2n]: P(Image 1)
        return (p[:n] + 1 - p[n:]) / 2 if self.both_orders else p


class VLMVideoPairJudge(VLMPairJudge):
    """``vlm_pair_video``: :class:`VLMPairJudge` on video pairs, each video given as
    ``num_frames`` frames (Pref-GRPO: 8 at ``np.linspace(0, F − 1, 8)`` truncated), Video 1's
    frames then Video 2's, as images before the text. Default template
    ``unifiedreward_think_video`` (forced ``"<answer>Video "``, reads ``"1"`` vs ``"2"``).

    Args:
        num_frames: frames per video; other arguments as :class:`VLMPairJudge`.
    """

    name = "vlm_pair_video"
    scale = "P(A preferred) in [0, 1]"
    media = "video"
    default_template = "unifiedreward_think_video"

    def __init__(self, path: Optional[str] = None, template: Optional[str] = None,
                 answers: Optional[Sequence[str]] = None, both_orders: bool = True,
                 answer_prefix: Optional[str] = None, dimension: Optional[str] = None,
                 num_frames: int = 8, device=None, dtype=None, batch_size: int = 4):
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"{self.name}: num_frames={num_frames!r}; expected a positive int "
                             f"(Pref-GRPO: 8)")
        self.num_frames = num_frames
        super().__init__(path, template, answers, both_orders, answer_prefix, dimension, device,
                         dtype, batch_size)

    def _items(self, media: Any, which: str) -> List[List[Image.Image]]:
        from mmrl.rewards.video import check_videos
        x = check_videos(media, f"{self.name} {which}")  # [n, F, 3, H, W]
        idx = pair_frame_indices(x.shape[1], self.num_frames)
        return [[to_pil(v[t]) for t in idx] for v in x]
