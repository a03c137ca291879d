"""Data augmentation for video GRPO: QA inversion, difficulty-aware variants, T-GRPO contrast.

- **Question–answer inversion** (TW-GRPO, arXiv 2505.24718): negate a multiple-choice question;
  the formerly wrong options become the correct set; keep a random non-empty subset of them
  plus the original answer as a distractor; shuffle and re-letter. Single-answer data becomes
  multi-answer data for the soft multi-choice reward.
- **Difficulty-aware augmentation** (DeepVideo-R1, arXiv 2506.07464): a moving reference of the
  group-mean reward; a group whose rewards are all equal (no advantage) and above the reference
  gets a harder variant (noisy, dropped or shuffled frames), below it an easier one (a hint in
  the prompt); the loop re-rolls that prompt.
- **T-GRPO temporal contrast** (Video-R1, arXiv 2503.21776): rollouts on shuffled frames; the
  ordered group's correct answers get +α when its accuracy p ≥ μ·p̃ of the shuffled group.

Frames are uint8 ``[T, H, W, 3]`` (numpy or torch, returned as given). Randomness comes from
an explicit seed or ``random.Random``, so every function is reproducible.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .data import VLRecord
from .vl_rewards import (option_table, parse_choice_letters, parse_interval, parse_number,
                         solution_text)

__all__ = ["negate_question", "invert_choices", "invert_record", "qa_inversion",
           "add_frame_noise", "drop_frames", "shuffle_frames", "harder_frames", "easier_hint",
           "Variant", "DifficultyAugmenter", "temporal_contrast_bonus"]

Rng = Union[int, random.Random, None]


def _rng(rng: Rng) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


# ----------------------------------------------------------------------------- QA inversion

_NEGATE_AUX = {"is": "isn't", "are": "aren't", "was": "wasn't", "were": "weren't",
               "do": "don't", "does": "doesn't", "did": "didn't", "can": "can't",
               "could": "couldn't", "will": "won't", "would": "wouldn't", "should": "shouldn't",
               "has": "hasn't", "have": "haven't", "had": "hadn't", "might": "might not",
               "may": "may not", "must": "mustn't"}
_NEGATION = re.compile(r"\b(?:not|never|none|nothing|no)\b|n't\b", re.I)
_FALLBACK = "Select every option that does NOT correctly answer this question: {question}"


def negate_question(question: str) -> str:
    """The negated question: ``"What did the man take?"`` -> ``"What didn't the man take?"``.

    A question starting with what/which/who gets its first auxiliary verb (within four words)
    contracted with "not"; any other question (yes/no, "how many", one already negated) is
    wrapped: "Select every option that does NOT correctly answer this question: …", which is
    right for every question.
    Differs from TW-GRPO: its rules lower-case the question and leave unmatched questions
    unchanged (making the inverted answer set wrong for them).
    """
    words = question.strip().split(" ")
    if words and words[0].lower() in ("what", "which", "who") and not _NEGATION.search(question):
        for i, word in enumerate(words[1:4], 1):
            if word.lower() in _NEGATE_AUX:
                words[i] = _NEGATE_AUX[word.lower()]
                return " ".join(words)
    return _FALLBACK.format(question=question.strip())


def invert_choices(options: Sequence[str], answer: Sequence[str], rng: Rng = None,
                   keep: Optional[int] = None) -> Tuple[List[str], List[str], List[int]]:
    """Inverted options and answer letters (TW-GRPO QA inversion).

    Args:
        options: option strings (``"A. red"`` or bare text).
        answer: the correct letters.
        rng: seed or ``random.Random``.
        keep: how many formerly wrong options to keep (default: uniform in [1, #wrong]).

    Returns:
        ``(new_options, new_answer, order)``: re-lettered options ``"A. text"``, the new correct
        letters (the kept formerly wrong options), and ``order[j]`` = the original index of new
        option j.

    Raises:
        ValueError: no correct or no wrong option, answer letters not among the options, or
            ``keep`` outside [1, #wrong].
    """
    r = _rng(rng)
    table = option_table(options)
    letters = [letter for letter, _ in table]
    truth = set(answer)
    if not truth or not truth <= set(letters) or truth == set(letters):
        raise ValueError(f"cannot invert: answer {sorted(truth)} must be a non-empty proper "
                         f"subset of the option letters {letters}")
    right = [i for i, letter in enumerate(letters) if letter in truth]
    wrong = [i for i, letter in enumerate(letters) if letter not in truth]
    keep = r.randint(1, len(wrong)) if keep is None else int(keep)
    if not 1 <= keep <= len(wrong):
        raise ValueError(f"keep={keep}; expected 1..{len(wrong)} (the number of wrong options)")
    kept = r.sample(wrong, keep)
    order = kept + right
    r.shuffle(order)
    new_options = [f"{chr(ord('A') + j)}. {table[i][1]}" for j, i in enumerate(order)]
    new_answer = [chr(ord("A") + j) for j, i in enumerate(order) if i in kept]
    return new_options, new_answer, order


def invert_record(record: VLRecord, rng: Rng = None, keep: Optional[int] = None) -> VLRecord:
    """A QA-inverted copy of a multiple-choice record: negated question, re-lettered options,
    ``solution`` ``"<answer>A,C</answer>"``, ``extra["qa_inverted"] = True``. Train it with the
    ``tw_grpo`` prompt template and ``Accuracy(choice="subset")`` / ``ChoiceSubset``.

    Raises:
        ValueError: the record is not multiple choice or cannot be inverted.
    """
    if record.problem_type != "multiple choice":
        raise ValueError(f"{record.source}: QA inversion needs a multiple-choice record, got "
                         f"problem_type {record.problem_type!r}")
    letters = parse_choice_letters(solution_text(record.solution), record.options) or frozenset()
    options, answer, _ = invert_choices(record.options, sorted(letters), rng, keep)
    extra = {**record.extra, "qa_inverted": True}
    return record.replace(problem=negate_question(record.problem), options=options,
                          solution=f"<answer>{','.join(answer)}</answer>", extra=extra)


def qa_inversion(records: Sequence[VLRecord], prob: float = 0.5, seed: int = 0,
                 mode: str = "replace") -> List[VLRecord]:
    """Invert each invertible multiple-choice record with probability ``prob``.

    ``mode="replace"`` swaps the record for its inversion (TW-GRPO's mixed data);
    ``"append"`` keeps the original and adds the inversion after it. Other records pass through.
    """
    if mode not in ("replace", "append"):
        raise ValueError(f"mode={mode!r}; expected 'replace' or 'append'")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob={prob!r}; expected a probability in [0, 1]")
    r = random.Random(seed)
    out: List[VLRecord] = []
    for rec in records:
        letters = (parse_choice_letters(solution_text(rec.solution), rec.options)
                   if rec.problem_type == "multiple choice" else None)
        invertible = bool(letters) and len(letters) < len(rec.options)
        if invertible and r.random() < prob:
            inverted = invert_record(rec, r)
            out.extend([rec, inverted] if mode == "append" else [inverted])
        else:
            out.append(rec)
    return out


# ----------------------------------------------------------------------------- frames


def _as_frames(frames, who: str) -> Tuple[np.ndarray, bool]:
    is_torch = isinstance(frames, torch.Tensor)
    arr = frames.detach().cpu().numpy() if is_torch else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"{who}: frames {arr.dtype} {tuple(arr.shape)}; expected uint8 "
                         f"[T, H, W, 3] with T >= 1 (e.g. VideoClip.frames)")
    return arr, is_torch


def _back(arr: np.ndarray, is_torch: bool):
    return torch.from_numpy(np.ascontiguousarray(arr)) if is_torch else arr


def add_frame_noise(frames, std: float = 25.0, rng: Rng = None):
    """Frames + N(0, std²) per pixel (std in uint8 units), rounded and clipped to [0, 255]."""
    arr, is_torch = _as_frames(frames, "add_frame_noise")
    if std < 0:
        raise ValueError(f"std={std}; expected >= 0 (uint8 units, e.g. 25)")
    gen = np.random.default_rng(_rng(rng).getrandbits(64))
    noisy = arr.astype(np.float32) + gen.normal(0.0, std, arr.shape).astype(np.float32)
    return _back(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), is_torch)


def drop_frames(frames, ratio: float = 0.25, rng: Rng = None, multiple_of: int = 2,
                min_frames: int = 2):
    """Drop about ``ratio`` of the frames at random, keeping order.

    The kept count is rounded down to a multiple of ``multiple_of`` (Qwen2.5-VL's temporal patch
    is 2) and is at least ``min_frames`` (or T when the clip is shorter).

    Returns:
        ``(frames, kept)``: the kept frames and their indices (to pick their timestamps).
    """
    arr, is_torch = _as_frames(frames, "drop_frames")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio={ratio}; expected a fraction in [0, 1)")
    t = arr.shape[0]
    n = int(round(t * (1.0 - ratio)))
    n = max(min(min_frames, t), n - n % max(1, multiple_of))
    kept = sorted(_rng(rng).sample(range(t), n))
    return _back(arr[kept], is_torch), kept


def shuffle_frames(frames, rng: Rng = None):
    """Frames in a random order that differs from the original (T ≥ 2; T = 1 is returned as is).

    Returns:
        ``(frames, order)`` with ``out[j] = frames[order[j]]``.
    """
    arr, is_torch = _as_frames(frames, "shuffle_frames")
    r = _rng(rng)
    order = list(range(arr.shape[0]))
    if len(order) >= 2:
        while order == sorted(order):
            r.shuffle(order)
    return _back(arr[order], is_torch), order


def harder_frames(frames, rng: Rng = None, noise_std: float = 25.0, drop_ratio: float = 0.25,
                  shuffle: bool = False):
    """A harder copy of a clip: frames dropped, optionally shuffled, then noised.

    Returns:
        ``(frames, index)`` with ``out[j]`` made from ``frames[index[j]]``.
    """
    r = _rng(rng)
    out, index = (drop_frames(frames, drop_ratio, r) if drop_ratio > 0
                  else (frames, list(range(_as_frames(frames, "harder_frames")[0].shape[0]))))
    if shuffle:
        out, order = shuffle_frames(out, r)
        index = [index[k] for k in order]
    if noise_std > 0:
        out = add_frame_noise(out, noise_std, r)
    return out, index


# ----------------------------------------------------------------------------- hints


def _choice_hint(record: VLRecord, r: random.Random, eliminate: int) -> Optional[str]:
    truth = parse_choice_letters(solution_text(record.solution), record.options) or frozenset()
    wrong = [letter for letter, _ in option_table(record.options) if letter not in truth]
    n = min(eliminate, len(wrong) - 1)  # never rule out every wrong option
    if n <= 0:
        return None
    out = sorted(r.sample(wrong, n))
    return (f"option {out[0]} is not correct." if n == 1
            else f"options {', '.join(out[:-1])} and {out[-1]} are not correct.")


def easier_hint(record: VLRecord, rng: Rng = None, eliminate: int = 1) -> Optional[str]:
    """A clue that makes a question easier without giving the answer away, or None.

    The record's own ``extra["hint"]`` when it has one; multiple choice: ``eliminate`` wrong
    options ruled out (never all of them); numbers: a range that contains the answer (its width
    the answer's size, the answer at a random place inside); OCR/free-form: the first word;
    temporal grounding: a window twice the segment's length around it.
    """
    r = _rng(rng)
    if isinstance(record.extra.get("hint"), str) and record.extra["hint"].strip():
        return record.extra["hint"].strip()
    kind = record.problem_type
    if kind == "multiple choice":
        return _choice_hint(record, r, eliminate)
    if kind in ("numerical", "regression"):
        value = parse_number(solution_text(record.solution))
        if value is None:
            return None
        width = abs(value) if value else 1.0
        low = value - r.uniform(0.1, 0.9) * width
        return f"the answer is between {low:.4g} and {low + width:.4g}."
    if kind in ("OCR", "free-form"):
        words = solution_text(record.solution).split()
        return f"the answer begins with \"{words[0]}\"." if len(words) > 1 else None
    if kind == "temporal grounding":
        sol = record.solution
        span = parse_interval(sol if isinstance(sol, (list, tuple)) else solution_text(sol))
        if span is None:
            return None
        pad = (span[1] - span[0]) / 2 or 1.0
        return (f"the segment lies between {max(0.0, span[0] - pad):.4g} s and "
                f"{span[1] + pad:.4g} s.")
    return None


# ----------------------------------------------------------------------------- difficulty


@dataclass
class Variant:
    """A prompt to re-roll: ``build_messages(v.record, hint=v.hint, media=v.media)``.

    Attributes:
        record: the question.
        kind: "harder", "easier" or "keep".
        hint: the clue of an easier variant (else None).
        media: the perturbed frames of a harder variant (else None: use the record's path).
        frame_index: for ``media``, the source frame of each output frame (timestamps).
    """

    record: VLRecord
    kind: str
    hint: Optional[str] = None
    media: Any = None
    frame_index: Optional[List[int]] = None


@dataclass
class DifficultyAugmenter:
    """DeepVideo-R1's difficulty-aware augmentation (arXiv 2506.07464, Sec. 4.2).

    ``decide(rewards, group_ids)`` labels each group: rewards all equal (within ``tol``: no
    advantage) and mean above the reference -> "harder"; below -> "easier"; else "keep". Then the
    reference moves: ref ← m·ref + (1 − m)·(batch mean of group means); it starts at
    ``reference`` or, when None, at the first batch's mean. ``variant(record, kind, ...)`` builds
    the variant to re-roll.
    Differs from paper: only groups with no advantage are augmented (ALGORITHMS.md), and the
    easier variant's hint is built from the ground truth by rule, not by a model.

    Attributes:
        momentum: m of the moving reference.
        reference: the current reference (None until the first batch).
        tol: rewards within ``tol`` of each other count as equal.
        noise_std, drop_ratio, shuffle: the harder variant (:func:`harder_frames`).
        eliminate: options ruled out by a multiple-choice hint (:func:`easier_hint`).
    """

    momentum: float = 0.9
    reference: Optional[float] = None
    tol: float = 1e-6
    noise_std: float = 25.0
    drop_ratio: float = 0.25
    shuffle: bool = False
    eliminate: int = 1

    def __post_init__(self):
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum}; expected a value in [0, 1)")

    def decide(self, rewards, group_ids) -> Dict[int, str]:
        """``{group id: "harder" | "easier" | "keep"}`` for a batch; updates the reference."""
        r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
        g = torch.as_tensor(group_ids).reshape(-1)
        if r.shape != g.shape or r.numel() == 0:
            raise ValueError(f"rewards {tuple(r.shape)} and group_ids {tuple(g.shape)}; expected "
                             f"two non-empty [B] tensors of the same length")
        uniq, inv = torch.unique(g, return_inverse=True)
        count = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
        mean = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r) / count
        hi = torch.full((len(uniq),), -torch.inf, dtype=torch.float64).scatter_reduce(
            0, inv, r, "amax")
        lo = torch.full((len(uniq),), torch.inf, dtype=torch.float64).scatter_reduce(
            0, inv, r, "amin")
        batch_mean = float(mean.mean())
        ref = batch_mean if self.reference is None else self.reference
        flat = (hi - lo) <= self.tol
        out = {}
        for k, gid in enumerate(uniq.tolist()):
            m = float(mean[k])
            out[gid] = ("harder" if flat[k] and m > ref + self.tol else
                        "easier" if flat[k] and m < ref - self.tol else "keep")
        self.reference = self.momentum * ref + (1.0 - self.momentum) * batch_mean
        return out

    def variant(self, record: VLRecord, kind: str, rng: Rng = None, frames=None) -> Variant:
        """The variant of ``record`` for a decision; "harder" needs the decoded ``frames`` of a
        video (an image is noised, a text-only record is kept); "easier" without a possible hint
        is kept."""
        r = _rng(rng)
        if kind == "easier":
            hint = easier_hint(record, r, self.eliminate)
            return Variant(record, "easier", hint=hint) if hint else Variant(record, "keep")
        if kind == "harder" and record.data_type is not None:
            if frames is None:
                raise ValueError(f"{record.source}: a harder variant needs the decoded frames; "
                                 f"pass frames=read_video(record.path).frames (uint8 [T,H,W,3])")
            if record.data_type == "image":
                img = frames if frames.ndim == 4 else frames[None]
                noisy = add_frame_noise(img, self.noise_std, r)
                return Variant(record, "harder", media=noisy[0] if frames.ndim == 3 else noisy)
            media, index = harder_frames(frames, r, self.noise_std, self.drop_ratio, self.shuffle)
            return Variant(record, "harder", media=media, frame_index=index)
        if kind not in ("harder", "easier", "keep"):
            raise ValueError(f"kind={kind!r}; expected 'harder', 'easier' or 'keep'")
        return Variant(record, "keep")


# ----------------------------------------------------------------------------- T-GRPO


def _group_means(values: torch.Tensor, ids: torch.Tensor) -> Dict[int, float]:
    uniq, inv = torch.unique(ids, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, values.double())
    counts = torch.bincount(inv, minlength=len(uniq)).double()
    return dict(zip(uniq.tolist(), (sums / counts).tolist()))


def temporal_contrast_bonus(acc: torch.Tensor, group_ids: torch.Tensor,
                            shuffled_acc: torch.Tensor, shuffled_group_ids: torch.Tensor, *,
                            alpha: float = 0.3, mu: float = 0.8,
                            correct_threshold: float = 0.1) -> Tuple[torch.Tensor, Dict[int, bool]]:
    """T-GRPO's temporal bonus (Video-R1, arXiv 2503.21776, Sec. 3) per ordered sample ``[B]``.

    For each group g with shuffled-frame rollouts: p = mean accuracy on ordered frames,
    p̃ = mean on shuffled frames; if p ≥ μ·p̃, every ordered sample with accuracy >
    ``correct_threshold`` gets +α (α 0.3, μ 0.8, threshold 0.1 as Video-R1's code). Groups
    without shuffled rollouts (images) get nothing. Add the bonus to the accuracy column.
    Differs from Video-R1: compared per group (it compares per device batch, one prompt each).

    Returns:
        ``(bonus [B] float32, applied {group id: bool})``.
    """
    acc, group_ids = torch.as_tensor(acc).reshape(-1), torch.as_tensor(group_ids).reshape(-1)
    shuffled_acc = torch.as_tensor(shuffled_acc).reshape(-1)
    shuffled_group_ids = torch.as_tensor(shuffled_group_ids).reshape(-1)
    if acc.shape != group_ids.shape or shuffled_acc.shape != shuffled_group_ids.shape:
        raise ValueError(f"acc {tuple(acc.shape)} vs group_ids {tuple(group_ids.shape)}, "
                         f"shuffled_acc {tuple(shuffled_acc.shape)} vs shuffled_group_ids "
                         f"{tuple(shuffled_group_ids.shape)}; expected equal [B] shapes")
    p = _group_means(acc, group_ids)
    p_shuf = _group_means(shuffled_acc, shuffled_group_ids) if shuffled_acc.numel() else {}
    applied = {g: g in p_shuf and p[g] >= mu * p_shuf[g] for g in p}
    on = torch.tensor([applied[g] for g in group_ids.tolist()], dtype=torch.bool)
    bonus = torch.where(on & (acc > correct_threshold), torch.tensor(float(alpha)),
                        torch.tensor(0.0))
    return bonus.to(torch.float32), applied
