"""The video job's round augmenters: difficulty-aware re-rolls and T-GRPO temporal contrast.

Both plug into the shared runner's round collection (:class:`mmrl.train.rounds.Rounds`, which
calls ``aug(rounds, round)`` on every :class:`mmrl.train.rounds.Round`): after a round of group
rollouts is collected and scored, an augmenter may re-roll some groups or add a reward column.
Every rank sees the same gathered rewards and draws the same variants (seeds from
:meth:`mmrl.train.rounds.Rounds.round_seed`), so groups spread over ranks stay consistent and a
resumed run redraws the same variants.

- :class:`DifficultyRounds` (DeepVideo-R1, arXiv 2506.07464): a group whose rewards are all
  equal (no advantage) is re-rolled once as a harder variant (frames dropped / noised) when its
  mean is above the moving reference, or an easier one (a hint in the prompt) when below; the
  variant's rows replace the group's rows. Metrics: ``aug_harder``, ``aug_easier`` (groups).
- :class:`TemporalContrast` (Video-R1's T-GRPO, arXiv 2503.21776): every video group is also
  rolled out on shuffled frames; those rollouts are only scored; when the ordered group's
  accuracy p ≥ μ·p̃ of the shuffled one, its correct samples get +α in a ``temporal`` reward
  column. Metrics: ``temporal_groups`` (video groups), ``temporal_applied`` (groups rewarded),
  ``shuffled_accuracy``.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .augment import DifficultyAugmenter, shuffle_frames, temporal_contrast_bonus
from .data import VLRecord, build_messages, format_question
from .io import VideoError, read_video

__all__ = ["DifficultyRounds", "TemporalContrast", "TEMPORAL_COLUMN"]

TEMPORAL_COLUMN = "temporal"


class _Media:
    """Builds a record's prompt and messages, with replaced media or a hint."""

    def __init__(self, records: Sequence[VLRecord], template: str, system_prompt: Optional[str],
                 fps: float, max_frames: Optional[int]):
        self.records, self.template, self.system_prompt = list(records), template, system_prompt
        self.fps, self.max_frames = fps, max_frames

    def record(self, meta: Dict[str, Any]) -> VLRecord:
        if "record_index" not in meta:
            raise ValueError("round augmenters need metadata['record_index'] (the video job's "
                             "build_data sets it)")
        return self.records[int(meta["record_index"])]

    def clip(self, record: VLRecord):
        """The record's video as the policy would sample it (None if unreadable)."""
        try:
            return read_video(record.path, fps=self.fps, max_frames=self.max_frames)
        except (VideoError, OSError, RuntimeError, ValueError):
            return None  # the policy skips and counts unreadable media itself

    def prompt(self, record: VLRecord, meta: Dict[str, Any], *, media=None, hint=None,
               tag: str = ""):
        messages = build_messages(record, self.template, system_prompt=self.system_prompt,
                                  media=media, hint=hint)
        return (format_question(record, self.template, hint),
                {**meta, "messages": messages, "augmented": tag})


class DifficultyRounds:
    """Round augmenter for :class:`~mmrl.video.augment.DifficultyAugmenter` (see the module)."""

    def __init__(self, augmenter: DifficultyAugmenter, media: _Media,
                 reward_weights: Optional[Dict[str, float]] = None):
        self.aug, self.media, self.weights = augmenter, media, reward_weights

    def state_dict(self) -> Dict[str, Any]:
        return {"reference": self.aug.reference}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.aug.reference = state["reference"]

    def _variant(self, record: VLRecord, kind: str, rng: random.Random):
        frames, clip = None, None
        if kind == "harder" and record.data_type == "video":
            clip = self.media.clip(record)
            if clip is None:
                return None
            frames = clip.frames
        elif kind == "harder" and record.data_type == "image":
            from PIL import Image
            try:
                frames = np.asarray(Image.open(record.path).convert("RGB"))
            except (OSError, ValueError):
                return None
        v = self.aug.variant(record, kind, rng, frames=frames)
        if v.kind == "keep":
            return None
        media = v.media
        if v.kind == "harder" and clip is not None:
            idx = list(v.frame_index)
            media = dataclasses.replace(
                clip, frames=v.media, timestamps=np.asarray(clip.timestamps)[idx],
                frame_indices=[clip.frame_indices[i] for i in idx],
                sample_fps=clip.sample_fps * len(idx) / max(1, clip.num_frames))
        elif v.kind == "harder":
            from PIL import Image
            media = Image.fromarray(np.asarray(v.media))
        return v.kind, media, v.hint

    def _informative(self, values: torch.Tensor, gids: torch.Tensor) -> Dict[int, bool]:
        """Per group, from the gathered valid rows' reward columns: does it carry an advantage?
        It does when it has fewer than 2 valid samples (nothing to re-roll for) or any reward
        column varies in it (with normalize_then_sum a constant weighted sum can still hide
        varying columns)."""
        out = {}
        for g in gids.unique().tolist():
            v = values[gids == g]
            out[g] = len(v) < 2 or bool((v.amax(0) - v.amin(0) > self.aug.tol).any())
        return out

    def __call__(self, rounds, rnd):
        from mmrl.train.reward_fn import RewardBatch
        r = rnd.rewards
        cols = torch.where(r.valid[:, None], r.values.double(),
                           torch.full_like(r.values, float("nan")).double())
        values, gids = rounds.gathered(rnd.rollout, cols)  # one gather: columns, all ranks' rows
        ok = torch.isfinite(values).all(1)
        if not bool(ok.any()):
            return rnd
        values, gids = values[ok], gids[ok]
        every = torch.ones(len(values), dtype=torch.bool)
        total = RewardBatch(values.float(), list(r.names), every).weighted_sum(self.weights)
        decisions = self.aug.decide(total, gids)  # moves the reference too
        informative = self._informative(values, gids)
        built = []
        for j, g in enumerate(rnd.group_ids):
            kind = decisions.get(g, "keep")
            if kind == "keep" or informative.get(g, True):
                continue
            record = self.media.record(rnd.metadata[j])
            out = self._variant(record, kind, random.Random(rounds.round_seed(1, g)))
            built.append((j, g, record, out))
        # a variant every rank could build (a file readable on one node only is skipped)
        agreed = rounds.all_agree([out is not None for *_, out in built])
        redo = {"prompts": [], "metadata": [], "counts": [], "group_ids": []}
        made = {"harder": 0, "easier": 0}
        for (j, g, record, out), ok_everywhere in zip(built, agreed):
            if not ok_everywhere:
                continue
            kind, media, hint = out
            prompt, meta = self.media.prompt(record, rnd.metadata[j], media=media, hint=hint,
                                             tag=kind)
            for key, value in (("prompts", prompt), ("metadata", meta),
                               ("counts", rnd.counts[j]), ("group_ids", g)):
                redo[key].append(value)
            made[kind] += 1
        rounds.add_round_metrics({"aug_harder": made["harder"], "aug_easier": made["easier"]})
        if not redo["prompts"]:
            return rnd
        return rounds.replace_groups(rnd, rounds.collect_groups(**redo))


class TemporalContrast:
    """T-GRPO round augmenter (see the module): adds the ``temporal`` reward column."""

    def __init__(self, media: _Media, *, alpha: float = 0.3, mu: float = 0.8,
                 accuracy: str = "accuracy", correct_threshold: float = 0.1):
        if alpha < 0 or mu < 0:
            raise ValueError(f"alpha={alpha}, mu={mu}; expected both >= 0 (Video-R1: 0.3, 0.8)")
        self.media, self.alpha, self.mu = media, alpha, mu
        self.accuracy, self.threshold = accuracy, correct_threshold

    def _accuracy(self, rewards) -> torch.Tensor:
        if self.accuracy not in rewards.names:
            raise ValueError(f"temporal contrast needs the {self.accuracy!r} reward column "
                             f"(columns: {', '.join(rewards.names)}); add it to video.rewards")
        acc = rewards.column(self.accuracy).double()
        return torch.where(rewards.valid, acc, torch.full_like(acc, float("nan")))

    def _shuffled_group(self, rounds, rnd, j: int, g: int):
        """(prompt, metadata) of group ``g``'s shuffled-frame copy, or None (not a video, or
        unreadable here)."""
        record = self.media.record(rnd.metadata[j])
        if record.data_type != "video":
            return None
        src = rnd.metadata[j]["messages"]
        clip = _video_item(src)
        if not hasattr(clip, "frames"):  # the record's path: decode it as the policy would
            clip = self.media.clip(record)
        if clip is None or clip.num_frames < 2:
            return None
        frames, _ = shuffle_frames(clip.frames, random.Random(rounds.round_seed(2, g)))
        media = dataclasses.replace(clip, frames=frames)
        # the same text (an easier variant's hint included), the frames out of order
        return rnd.prompts[j], {**rnd.metadata[j], "messages": _with_video(src, media),
                                "augmented": "shuffled"}

    def __call__(self, rounds, rnd):
        built = [(j, g, self._shuffled_group(rounds, rnd, j, g))
                 for j, g in enumerate(rnd.group_ids)]
        agreed = rounds.all_agree([out is not None for *_, out in built])  # same calls on all ranks
        shuffled = {"prompts": [], "metadata": [], "counts": [], "group_ids": []}
        for (j, g, out), ok_everywhere in zip(built, agreed):
            if ok_everywhere:
                for key, value in (("prompts", out[0]), ("metadata", out[1]),
                                   ("counts", rnd.counts[j]), ("group_ids", g)):
                    shuffled[key].append(value)
        acc = self._accuracy(rnd.rewards)
        bonus = torch.zeros(len(acc))
        applied, error = {}, rnd.error
        if shuffled["prompts"]:
            sh = rounds.collect_groups(**shuffled)
            error = error or sh.error
            s_acc, s_gid = rounds.gathered(sh.rollout, self._accuracy(sh.rewards))
            keep = torch.isfinite(s_acc)
            a_all, g_all = rounds.gathered(rnd.rollout, acc)
            ok = torch.isfinite(a_all)
            _, applied = temporal_contrast_bonus(
                a_all[ok], g_all[ok], s_acc[keep], s_gid[keep], alpha=self.alpha, mu=self.mu,
                correct_threshold=self.threshold)
            gids = rnd.rollout.sample_group_ids.tolist()
            on = torch.tensor([applied.get(g, False) for g in gids], dtype=torch.bool)
            bonus = torch.where(on & (acc.nan_to_num(0.0) > self.threshold),
                                torch.tensor(float(self.alpha)), torch.tensor(0.0))
            rounds.add_round_metrics({}, means={"shuffled_accuracy": (
                float(s_acc[keep].sum()), float(keep.sum()))})
        rounds.add_round_metrics({"temporal_groups": len(shuffled["prompts"]),
                               "temporal_applied": sum(bool(applied.get(g)) for g in
                                                       shuffled["group_ids"])})
        from mmrl.train.reward_fn import RewardBatch
        rewards = RewardBatch(torch.cat([rnd.rewards.values, bonus[:, None].to(
            rnd.rewards.values.dtype)], 1), list(rnd.rewards.names) + [TEMPORAL_COLUMN],
            rnd.rewards.valid)
        return dataclasses.replace(rnd, rewards=rewards, error=error)


def _video_item(messages) -> Any:
    for m in messages:
        if isinstance(m.get("content"), list):
            for item in m["content"]:
                if isinstance(item, dict) and item.get("type") == "video":
                    return item.get("video")
    return None


def _with_video(messages, media) -> List[Dict[str, Any]]:
    """A copy of ``messages`` with the video item's source replaced by ``media``."""
    out = []
    for m in messages:
        if isinstance(m.get("content"), list):
            m = {**m, "content": [{**item, "video": media} if isinstance(item, dict) and
                                  item.get("type") == "video" else item for item in m["content"]]}
        out.append(m)
    return out
