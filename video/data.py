"""Video-R1-style question data: loading with per-line errors, and prompts as chat messages.

A record has Video-R1's fields (``problem``, ``options``, ``solution``, ``problem_type``,
``data_type``, ``path``; others such as ``problem_id``, ``data_source`` or ``hint`` are kept in
``extra``), and optionally ``hints`` (tiered hints, abstract to concrete) and ``solution_steps``
(the reference solution, step by step) for the guidance augmenters (:mod:`mmrl.train.guidance`);
image, video and text-only records mix freely. Files are JSONL (one record a line)
or a JSON array (``Video-R1-260k.json``). Media paths are resolved relative to the data file's
folder (or ``root=``). Each record is checked when it is read; a malformed one is counted and
skipped with its line and reason (``on_error="skip"``), so one bad line never stops a long run,
or raises ``ValueError`` naming the line (``"raise"``).

Prompts follow Video-R1 / TW-GRPO's structure: the question, then ``Options:`` and one option a
line for multiple choice, then an instruction to reason in ``<think> </think>`` and answer in
``<answer> </answer>`` with a hint per problem type. :func:`build_messages` returns them in
qwen-vl-utils' format (``{"type": "video", "video": path}`` + ``{"type": "text", ...}``), which
:func:`mmrl.video.build_qwen_video_inputs` consumes.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

from mmrl.registry import Registry, did_you_mean

from .vl_rewards import Accuracy, LabelError, normalize_problem_type, option_table

__all__ = ["PROBLEM_TYPES", "DATA_TYPES", "PROMPT_TEMPLATES", "PromptTemplate", "VLRecord",
           "VLDataset", "SkippedRecord", "RecordError", "parse_record", "load_vl_dataset",
           "save_vl_dataset", "format_question", "build_messages"]

# Canonical spellings (Video-R1's, plus temporal grounding); lookups ignore case, "-" and "_".
PROBLEM_TYPES = ("multiple choice", "numerical", "regression", "OCR", "free-form",
                 "temporal grounding")
_CANONICAL = {normalize_problem_type(t): t for t in PROBLEM_TYPES}
DATA_TYPES = ("image", "video")
VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".flv", ".m4v", ".mpeg", ".mpg"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_FIELDS = ("problem", "problem_type", "solution", "options", "data_type", "path")
_GUIDANCE_FIELDS = ("hints", "solution_steps")  # optional lists of strings (guidance)
_CHECKER = Accuracy(on_bad_label="raise")  # one reading of the ground truth: the reward's


class RecordError(ValueError):
    """A malformed record; ``source`` is ``"file.jsonl:7"`` and ``reason`` a short label."""

    def __init__(self, source: str, reason: str, detail: str):
        self.source, self.reason = source, reason
        super().__init__(f"{source}: {detail}")


@dataclass
class VLRecord:
    """One question.

    Attributes:
        problem: the question text (without options).
        problem_type: canonical type (one of ``PROBLEM_TYPES``).
        solution: the ground truth as in the file (``"<answer>B</answer>"``, ``"3.5"``, ``[2, 6]``).
        options: option strings (``["A. red", "B. blue"]``); empty when not multiple choice.
        data_type: ``"image"``, ``"video"`` or None (text only).
        path: the media file, resolved (None for text only).
        source: where the record came from (``"train.jsonl:7"``).
        extra: the record's other fields (``problem_id``, ``data_source``, ``hint``, ...).
        hints: hints for a question the policy never solves, abstract to concrete (Scaf-GRPO's
            knowledge, planning, solution tiers, in that order); empty when none.
        solution_steps: the reference solution as steps (GHPO shows a prefix of it); empty when
            none.
    """

    problem: str
    problem_type: str
    solution: Any
    options: List[str] = field(default_factory=list)
    data_type: Optional[str] = None
    path: Optional[str] = None
    source: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)
    hints: List[str] = field(default_factory=list)
    solution_steps: List[str] = field(default_factory=list)

    def metadata(self) -> Dict[str, Any]:
        """The per-sample dict the rewards read (``solution``, ``problem_type``, ``options``...)."""
        return {**self.extra, "solution": self.solution, "problem_type": self.problem_type,
                "options": list(self.options), "data_type": self.data_type, "path": self.path,
                "source": self.source, "hints": list(self.hints),
                "solution_steps": list(self.solution_steps)}

    def replace(self, **changes) -> "VLRecord":
        """A copy with some fields changed (``extra`` is copied, not shared)."""
        changes.setdefault("extra", dict(self.extra))
        return dataclasses.replace(self, **changes)

    def to_json(self, relative_to: Optional[str] = None) -> Dict[str, Any]:
        """Video-R1 fields (+ ``extra``); ``path`` relative to ``relative_to`` when given."""
        path = self.path
        if path is not None and relative_to is not None:
            path = os.path.relpath(path, relative_to)
        out = {**self.extra, "problem": self.problem, "problem_type": self.problem_type,
               "solution": self.solution}
        if self.options:
            out["options"] = list(self.options)
        if self.data_type is not None:
            out.update(data_type=self.data_type, path=path)
        out.update({k: list(getattr(self, k)) for k in _GUIDANCE_FIELDS if getattr(self, k)})
        return out


@dataclass
class SkippedRecord:
    source: str
    reason: str
    message: str


@dataclass
class VLDataset(Sequence):
    """Records loaded from one file, with the skipped ones counted by reason."""

    records: List[VLRecord]
    skipped: List[SkippedRecord]
    path: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def __iter__(self) -> Iterator[VLRecord]:
        return iter(self.records)

    def skip_counts(self) -> Dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))

    def counts(self) -> Dict[str, int]:
        """Records per ``data_type`` ("text" for none) and per problem type."""
        c = Counter(r.data_type or "text" for r in self.records)
        c.update(r.problem_type for r in self.records)
        return dict(c)

    def skip_report(self, max_lines: int = 5) -> str:
        """"" when nothing was skipped, else the counts by reason and the first few messages."""
        if not self.skipped:
            return ""
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.skip_counts().items()))
        lines = [f"skipped {len(self.skipped)} of {len(self.skipped) + len(self.records)} "
                 f"records in {self.path} ({counts})"]
        lines += [f"  {s.message}" for s in self.skipped[:max_lines]]
        if len(self.skipped) > max_lines:
            lines.append(f"  ... and {len(self.skipped) - max_lines} more")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- parsing records


def _text_field(raw: Mapping, key: str, source: str, required: bool = True) -> Optional[str]:
    value = raw.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        got = "missing" if key not in raw else f"{type(value).__name__} {str(value)[:40]!r}"
        raise RecordError(source, f"bad_{key}", f"{key!r} must be a non-empty string (got {got})")
    return value


def _problem_type(raw: Mapping, source: str) -> str:
    value = _text_field(raw, "problem_type", source)
    canonical = _CANONICAL.get(normalize_problem_type(value))
    if canonical is None:
        raise RecordError(source, "bad_problem_type",
                          f"problem_type {value!r} is not one of {list(PROBLEM_TYPES)}"
                          f"{did_you_mean(value, PROBLEM_TYPES)}")
    return canonical


def _media(raw: Mapping, source: str, base_dir: str, check_media: bool):
    data_type, path = raw.get("data_type"), raw.get("path")
    if data_type is None and path is None:
        return None, None
    if not isinstance(path, str) or not path.strip():
        raise RecordError(source, "bad_path", f"data_type {data_type!r} needs a 'path' string "
                          f"(got {path!r})")
    if data_type is None:
        ext = os.path.splitext(path)[1].lower()
        data_type = "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None
        if data_type is None:
            raise RecordError(source, "bad_data_type", f"no 'data_type' and the extension of "
                              f"{path!r} is neither a video nor an image; add data_type")
    if not isinstance(data_type, str) or data_type.strip().lower() not in DATA_TYPES:
        raise RecordError(source, "bad_data_type", f"data_type {data_type!r} is not 'image' or "
                          f"'video'")
    resolved = os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))
    if check_media and not os.path.exists(resolved):
        raise RecordError(source, "missing_media", f"{data_type} {resolved!r} not found "
                          f"(path {path!r} relative to {base_dir!r}); fix the path, pass root= "
                          f"the folder it is relative to, or check_media=False")
    return data_type.strip().lower(), resolved


def _options(raw: Mapping, problem_type: str, source: str) -> List[str]:
    options = raw.get("options")
    if problem_type != "multiple choice":
        return list(options) if isinstance(options, list) else []
    if not isinstance(options, list) or len(options) < 2 or not all(
            isinstance(o, str) and o.strip() for o in options):
        raise RecordError(source, "bad_options", f"'options' must be a list of at least two "
                          f"non-empty strings for a multiple-choice question (got "
                          f"{str(options)[:60]!r})")
    return list(options)


def _string_list(raw: Mapping, key: str, source: str) -> List[str]:
    """An optional list of non-empty strings (a lone string is a list of one)."""
    value = raw.get(key)
    if value is None:
        return []
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise RecordError(source, f"bad_{key}", f"{key!r} must be a list of non-empty strings "
                          f"(got {str(raw.get(key))[:60]!r})")
    return [v.strip() for v in value]


def _check_solution(raw: Mapping, problem_type: str, options: List[str], source: str) -> None:
    if raw.get("solution") is None:
        raise RecordError(source, "bad_solution", "'solution' is missing")
    meta = {"solution": raw["solution"], "problem_type": problem_type, "options": options}
    try:
        truth = _CHECKER._reward_for(meta).truth(meta)
    except LabelError as err:
        raise RecordError(source, "bad_solution", str(err)) from None
    if problem_type == "multiple choice":
        letters = {letter for letter, _ in option_table(options)}
        if not truth <= letters:
            raise RecordError(source, "bad_solution", f"solution letters {sorted(truth)} are not "
                              f"all among the options' letters {sorted(letters)}")


def parse_record(raw: Any, source: str = "", base_dir: str = ".",
                 check_media: bool = True) -> VLRecord:
    """Check one raw record and return it as a :class:`VLRecord`.

    Raises:
        RecordError: (a ``ValueError``) naming ``source`` and what is wrong: not an object,
            missing/empty ``problem``, unknown ``problem_type`` (with the closest), options
            that are not a list of ≥ 2 strings for multiple choice, a solution that is not
            readable for its type (letters among the options, one number, an interval, text),
            a bad ``data_type`` or a media file that does not exist.
    """
    if not isinstance(raw, Mapping):
        raise RecordError(source, "not_an_object", f"expected a JSON object with fields "
                          f"{list(_FIELDS)}, got {type(raw).__name__}")
    problem = _text_field(raw, "problem", source)
    problem_type = _problem_type(raw, source)
    options = _options(raw, problem_type, source)
    _check_solution(raw, problem_type, options, source)
    data_type, path = _media(raw, source, base_dir, check_media)
    guidance = {k: _string_list(raw, k, source) for k in _GUIDANCE_FIELDS}
    extra = {k: v for k, v in raw.items() if k not in _FIELDS + _GUIDANCE_FIELDS}
    return VLRecord(problem, problem_type, raw["solution"], options, data_type, path, source,
                    extra, **guidance)


def _raw_records(path: str):
    """Yield ``(source, raw or RecordError)`` for every record of a JSONL or JSON-array file.

    JSONL lines are decoded one by one, so a line with invalid UTF-8 is one bad record.
    """
    name = os.path.basename(path)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        f.seek(0)
        if head.startswith(b"["):
            try:
                items = json.loads(f.read().decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
                why = str(err)[:200] or "nested too deeply"
                raise ValueError(f"{path}: not valid JSON ({why}); a JSON-array file must parse "
                                 f"whole (or write one record per line as JSONL)") from None
            for i, item in enumerate(items):
                yield f"{name}[{i}]", item
            return
        for lineno, raw in enumerate(f, 1):
            source = f"{name}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield source, RecordError(source, "invalid_utf8", f"not UTF-8 ({err})")
                continue
            if not line.strip():
                continue
            try:
                yield source, json.loads(line)
            except json.JSONDecodeError as err:
                yield source, RecordError(source, "invalid_json", f"invalid JSON ({err})")


def load_vl_dataset(path: Union[str, os.PathLike], *, root: Optional[str] = None,
                    on_error: str = "skip", check_media: bool = True,
                    problem_types: Optional[Sequence[str]] = None,
                    limit: Optional[int] = None) -> VLDataset:
    """Load a Video-R1-style JSONL (or JSON array) file.

    Args:
        path: the data file.
        root: the folder media paths are relative to (default: the data file's folder).
        on_error: ``"skip"`` (count bad records in ``.skipped`` and go on) or ``"raise"``.
        check_media: check that every media file exists (a missing one is a bad record).
        problem_types: keep only these types (others are left out, not counted as bad).
        limit: stop after this many good records.

    Raises:
        ValueError: unknown ``on_error``/``problem_types``; a JSON array that does not parse;
            with ``"raise"``, the first bad record; a file with no usable record (empty, only
            blank lines, every record malformed, or none of ``problem_types``).
        FileNotFoundError: no such file (``IsADirectoryError`` for a folder).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error={on_error!r}; expected 'skip' or 'raise'")
    keep = None
    if problem_types is not None:
        keep = {_CANONICAL.get(normalize_problem_type(t)) for t in problem_types}
        if None in keep:
            raise ValueError(f"problem_types {list(problem_types)} has an unknown type; known: "
                             f"{list(PROBLEM_TYPES)}")
    path = os.fspath(path)
    base_dir = os.path.abspath(root if root is not None else os.path.dirname(path) or ".")
    records: List[VLRecord] = []
    skipped: List[SkippedRecord] = []
    for source, raw in _raw_records(path):
        try:
            if isinstance(raw, RecordError):
                raise raw
            record = parse_record(raw, source, base_dir, check_media)
        except RecordError as err:
            if on_error == "raise":
                raise
            skipped.append(SkippedRecord(err.source, err.reason, str(err)))
            continue
        if keep is None or record.problem_type in keep:
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    data = VLDataset(records, skipped, path)
    if not records:
        why = data.skip_report() if skipped else (
            f"none of the records has problem_types {list(problem_types)}" if keep is not None
            else "the file holds no record (it is empty or has only blank lines)")
        raise ValueError(f"{path}: no usable record; {why}")
    return data


def save_vl_dataset(records: Sequence[VLRecord], path: Union[str, os.PathLike]) -> str:
    """Write records as JSONL with Video-R1 fields, media paths relative to the file's folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(relative_to=folder), ensure_ascii=False) + "\n")
    return path


# ----------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptTemplate:
    """How a question becomes the user's text.

    Attributes:
        instruction: formatted with ``question=`` (the problem plus its options block).
        type_hints: text appended per canonical problem type (what to put in ``<answer>``).
        options_header: the line before the options of a multiple-choice question.
    """

    instruction: str
    type_hints: Mapping[str, str]
    options_header: str = "Options:"


_THINK = ("Write your reasoning inside <think> </think> tags first, then the final answer inside "
          "<answer> </answer> tags.")
_HINTS = {
    "multiple choice": " In <answer> </answer> give only the letter of the chosen option "
                       "(for example A, B, C or D).",
    "numerical": " In <answer> </answer> give only the number (for example 42 or 3.14).",
    "regression": " In <answer> </answer> give only the number (for example 42 or 3.14).",
    "OCR": " In <answer> </answer> write out the text shown in the image or video.",
    "free-form": " In <answer> </answer> give your answer as text.",
    "temporal grounding": " In <answer> </answer> give the start and end time in seconds as "
                          "[start, end].",
}

PROMPT_TEMPLATES: Registry[PromptTemplate] = Registry("prompt template")
PROMPT_TEMPLATES.register("video_r1", PromptTemplate(
    "{question}\nThink it over the way a person would, in your own words, checking and "
    "questioning your steps as you go. " + _THINK, _HINTS))
PROMPT_TEMPLATES.register("tw_grpo", PromptTemplate(
    "{question}\n" + _THINK, {**_HINTS, "multiple choice":
                              " In <answer> </answer> give the letter of the correct option, or "
                              "the letters separated by commas (for example A,C) if several "
                              "options are correct."}))
PROMPT_TEMPLATES.register("plain", PromptTemplate("{question}", {}))


def _template(template: Union[str, PromptTemplate]) -> PromptTemplate:
    return template if isinstance(template, PromptTemplate) else PROMPT_TEMPLATES.get(template)


def format_question(record: VLRecord, template: Union[str, PromptTemplate] = "video_r1",
                    hint: Optional[str] = None) -> str:
    """The user's text: question (+ ``Options:`` block) in the template, the type's hint, then
    ``hint`` (an easier variant's clue) on its own line when given."""
    t = _template(template)
    question = record.problem.rstrip()
    if record.problem_type == "multiple choice" and record.options:
        question += "\n" + t.options_header + "\n" + "\n".join(o.strip() for o in record.options)
    text = t.instruction.format(question=question) + t.type_hints.get(record.problem_type, "")
    return text + (f"\nHint: {hint.strip()}" if hint else "")


def build_messages(record: VLRecord, template: Union[str, PromptTemplate] = "video_r1", *,
                   system_prompt: Optional[str] = None,
                   media_options: Optional[Mapping[str, Any]] = None, media: Any = None,
                   hint: Optional[str] = None) -> List[Dict[str, Any]]:
    """Chat messages in qwen-vl-utils' format for one record.

    ``[{"role": "user", "content": [{"type": "video", "video": path, **media_options},
    {"type": "text", "text": ...}]}]`` (``"image"`` for an image; no media item for text only),
    preceded by a system message when ``system_prompt`` is given.

    Args:
        record: the question.
        template: a ``PROMPT_TEMPLATES`` name (``"video_r1"``, ``"tw_grpo"``, ``"plain"``) or a
            :class:`PromptTemplate`.
        system_prompt: optional system message.
        media_options: extra keys of the media item (``fps``, ``max_frames``, ``max_pixels``).
        media: replaces the path (frames ``[T, H, W, 3]`` uint8, a ``VideoClip``, an image),
            e.g. a perturbed copy for a harder variant.
        hint: a clue appended to the text (an easier variant).
    """
    content: List[Dict[str, Any]] = []
    if record.data_type is not None:
        src = media if media is not None else record.path
        content.append({"type": record.data_type, record.data_type: src,
                        **dict(media_options or {})})
    content.append({"type": "text", "text": format_question(record, template, hint)})
    messages: List[Dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": content})
    return messages
