"""Preference pairs for the video job: a pair file's records, checked, and their completions as
the tokens :meth:`mmrl.video.policy.VLMPolicy.pair_rollout` scores.

A pair record is one of the job's usual records (:mod:`mmrl.video.data`: ``problem``,
``problem_type``, ``solution``, ``options``, ``data_type``, ``path``, ...) plus two completion
strings, ``"chosen"`` (preferred) and ``"rejected"``, answers to that prompt as the model would
write them after the chat template's generation prompt (e.g. ``"<think>...</think><answer>B
</answer>"``). A JSONL file holds one record a line (or a JSON array, as the job's data files).

Errors: every malformed record of a file is reported at once, each with its line (``ValueError``
listing them: bad JSON, a bad record field, a missing / empty / non-string ``chosen`` or
``rejected``, identical completions). A media file that does not exist is not an error: the
record is skipped and counted with its line (:attr:`PairSet.skipped`), and a file that exists
but cannot be decoded is skipped and counted when the pair is encoded (``Rollout.skipped``), as
the job's rollouts skip unreadable videos.

Completions are tokenized on their own (``add_special_tokens=False``, special-token text such as
``<|im_end|>`` is read as the token) and end with the family's end-of-turn token
(:meth:`mmrl.video.models.base.VLMAdapter.turn_end_id`) unless they already end with an end
token, so a completion is scored exactly as a sampled one that stopped there.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from .data import RecordError, SkippedRecord, VLRecord, _raw_records, parse_record

__all__ = ["PairRecord", "PairSet", "PairRecordError", "parse_pair", "load_pairs",
           "as_pair_records", "completion_tokens", "text_tokens"]

_COMPLETIONS = ("chosen", "rejected")
_MAX_LISTED = 50  # problems listed one a line; the rest are counted by reason


class PairRecordError(ValueError):
    """Malformed pair records, all of them: ``problems`` is a list of :class:`RecordError`
    (each with its ``source``, e.g. ``"pairs.jsonl:7"``, and ``reason``)."""

    def __init__(self, where: str, problems: Sequence[RecordError], fix: str):
        self.problems = list(problems)
        listed = [f"  {p}" for p in self.problems[:_MAX_LISTED]]
        rest = self.problems[_MAX_LISTED:]
        if rest:
            counts = Counter(p.reason for p in rest)
            listed.append(f"  ... and {len(rest)} more (" + ", ".join(
                f"{k}: {v}" for k, v in sorted(counts.items())) + ")")
        super().__init__(f"{where}: {len(self.problems)} bad pair record"
                         f"{'s' if len(self.problems) != 1 else ''}; {fix}:\n"
                         + "\n".join(listed))


@dataclass
class PairRecord:
    """One preference pair: the prompt's record and two completions of it.

    Attributes:
        record: the prompt (a :class:`~mmrl.video.data.VLRecord`; its ``source`` names the line).
        chosen, rejected: the preferred and the dispreferred completion (non-empty, different).
    """

    record: VLRecord
    chosen: str
    rejected: str

    @property
    def source(self) -> str:
        return self.record.source


@dataclass
class PairSet(Sequence):
    """The pairs of one file, with the records skipped for a missing media file."""

    records: List[PairRecord]
    skipped: List[SkippedRecord] = field(default_factory=list)
    path: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def __iter__(self) -> Iterator[PairRecord]:
        return iter(self.records)

    def skip_counts(self) -> Dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))


def _completion_problems(raw: Mapping, source: str) -> List[RecordError]:
    out = []
    for key in _COMPLETIONS:
        value = raw.get(key)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if key not in raw else f"{type(value).__name__} {str(value)[:40]!r}"
            out.append(RecordError(source, f"bad_{key}", f"{key!r} must be a non-empty "
                                   f"completion string (got {got})"))
    if not out and raw["chosen"] == raw["rejected"]:
        out.append(RecordError(source, "same_completions", "'chosen' and 'rejected' are the "
                               "same text, which states no preference"))
    return out


def _record_problems(raw: Any, source: str, base_dir: str) -> Tuple[Optional[PairRecord],
                                                                     List[RecordError]]:
    """``(pair or None, every problem found)`` of one raw record (media existence unchecked)."""
    if isinstance(raw, RecordError):  # a line that is not JSON
        return None, [raw]
    if not isinstance(raw, Mapping):
        return None, [RecordError(source, "not_an_object", f"expected a JSON object with the "
                                  f"job's record fields plus 'chosen' and 'rejected', got "
                                  f"{type(raw).__name__}")]
    problems = _completion_problems(raw, source)
    fields = {k: v for k, v in raw.items() if k not in _COMPLETIONS}
    try:
        record = parse_record(fields, source, base_dir, check_media=False)
    except RecordError as err:
        problems.insert(0, err)
    if problems:
        return None, problems
    return PairRecord(record, raw["chosen"], raw["rejected"]), []


def parse_pair(raw: Any, source: str = "", base_dir: str = ".") -> PairRecord:
    """One raw pair record (a JSON object) as a :class:`PairRecord`; media paths resolved
    against ``base_dir`` and not opened.

    Raises:
        PairRecordError: (a ``ValueError``) naming ``source`` and every problem of the record.
    """
    pair, problems = _record_problems(raw, source, base_dir)
    if problems:
        raise PairRecordError(source or "pair record", problems, "fix the record")
    return pair


def as_pair_records(records: Sequence[Union[PairRecord, Mapping]],
                    base_dir: Optional[str] = None) -> List[PairRecord]:
    """``records`` as :class:`PairRecord` s: a :class:`PairRecord` is kept, a mapping (a raw
    JSON record) is parsed (named ``records[i]``, media relative to ``base_dir``, default the
    working directory).

    Raises:
        PairRecordError: every malformed mapping, at once.
    """
    base = os.path.abspath(base_dir or ".")
    out, problems = [], []
    for i, rec in enumerate(records):
        if isinstance(rec, PairRecord):
            out.append(rec)
            continue
        pair, bad = _record_problems(rec, f"records[{i}]", base)
        out.append(pair)
        problems += bad
    if problems:
        raise PairRecordError("pair records", problems, "fix them (see "
                              "mmrl.video.pairs for the record format)")
    return out


def load_pairs(path: Union[str, os.PathLike], *, root: Optional[str] = None,
               check_media: bool = True) -> PairSet:
    """A pair file (JSONL, or a JSON array) -> :class:`PairSet`.

    Args:
        path: the file.
        root: the folder media paths are relative to (default: the file's folder).
        check_media: skip (and count, with the line) records whose media file does not exist.

    Raises:
        PairRecordError: (a ``ValueError``) every malformed record of the file, each with its
            line, at once.
        ValueError: a file with no usable pair (empty, or every record's media missing).
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    base_dir = os.path.abspath(root if root is not None else os.path.dirname(path) or ".")
    pairs: List[PairRecord] = []
    skipped: List[SkippedRecord] = []
    problems: List[RecordError] = []
    for source, raw in _raw_records(path):
        pair, bad = _record_problems(raw, source, base_dir)
        problems += bad
        if pair is None:
            continue
        media = pair.record.path
        if check_media and media is not None and not os.path.exists(media):
            skipped.append(SkippedRecord(source, "missing_media", f"{source}: "
                                         f"{pair.record.data_type} {media!r} not found"))
            continue
        pairs.append(pair)
    if problems:
        raise PairRecordError(path, problems, "fix or remove these lines")
    if not pairs:
        why = (f"all {len(skipped)} records' media files are missing (e.g. "
               f"{skipped[0].message})" if skipped else "the file holds no record")
        raise ValueError(f"{path}: no usable pair; {why}; fix the paths, or pass root= the "
                         f"folder they are relative to")
    return PairSet(pairs, skipped, path)


def completion_tokens(pairs: Sequence[PairRecord], tokenizer, end_id: int,
                      end_ids: Sequence[int], never: Sequence[int],
                      allowed: Optional[Sequence[int]] = None) -> List[Tuple[List[int],
                                                                              List[int]]]:
    """``[(chosen ids, rejected ids)]``: each completion tokenized on its own, ``end_id``
    appended unless it already ends with one of ``end_ids``.

    Args:
        pairs: the pairs.
        tokenizer: the policy's tokenizer.
        end_id: the end-of-turn token appended.
        end_ids: the tokens that end a completion (the policy's end tokens).
        never: tokens the policy never emits (vision placeholders): a completion holding one
            is an error (its log-prob is −inf).
        allowed: when the policy restricts decoding (``allowed_answers``), the tokens it may
            emit; a completion with another token is an error.

    Raises:
        PairRecordError: every completion the policy cannot emit, at once.
    """
    ids = text_tokens([(p.source, key, getattr(p, key)) for p in pairs for key in _COMPLETIONS],
                      tokenizer, end_id, end_ids, never, allowed, where="pair completions")
    return [(ids[2 * k], ids[2 * k + 1]) for k in range(len(pairs))]


def text_tokens(items: Sequence[Tuple[str, str, str]], tokenizer, end_id: int,
                end_ids: Sequence[int], never: Sequence[int],
                allowed: Optional[Sequence[int]] = None,
                where: str = "completions") -> List[List[int]]:
    """The ids of completions ``(source, key, text)`` as :func:`completion_tokens` makes them
    (pair completions, SFT targets: ``key`` names the field in errors).

    Raises:
        PairRecordError: every completion the policy cannot emit, at once.
    """
    never_set = set(int(i) for i in never)
    allowed_set = None if allowed is None else set(int(i) for i in allowed) | {end_id}
    out, problems = [], []
    for source, key, text in items:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids or ids[-1] not in end_ids:
            ids.append(end_id)
        bad = sorted({i for i in ids if i in never_set or (allowed_set is not None
                                                           and i not in allowed_set)})
        if bad:
            toks = tokenizer.convert_ids_to_tokens(bad)
            problems.append(RecordError(source, f"bad_{key}", (
                f"{key!r} holds token(s) {toks} the policy never emits (vision placeholders"
                + (", or outside video.allowed_answers" if allowed_set is not None else "")
                + "); its log-prob would be -inf")))
        out.append(ids)
    if problems:
        raise PairRecordError(where, problems, "remove those tokens from the "
                              "completions (or widen video.allowed_answers)")
    return out
