"""The reward interface every trainer and scorer in mmrl shares.

A reward is any callable ``fn(samples, prompts, metadata)`` where

- ``samples``: the batch's B outputs (strings for a language model, PIL images or a float tensor
  ``[B, 3, H, W]`` for an image model, anything the policy produces);
- ``prompts``: B prompts, one per sample (a group's samples repeat their prompt);
- ``metadata``: B dicts of per-sample facts (ground truth, task type, lengths, ...).

It returns float rewards ``[B]`` (a tensor, numpy array or list), a ``[B, K]`` tensor whose
columns are named by the callable's ``names`` attribute, or a mapping ``{name: [B] values}``.
:func:`evaluate_reward` turns any of these into a :class:`RewardBatch` of float32 ``[B, K]``
columns and reports NaN/inf entries instead of letting them reach the advantages.

A **groupwise** reward (one that scores a group's samples together, e.g. the pairwise win rate
``pref_winrate``) declares ``groupwise = True``. The loop then keeps each group on one rank
(:func:`mmrl.train.rounds.needs_whole_groups`), hands it each row's group id as
``metadata[i]["group_id"]`` (in copies of the metadata: see :func:`evaluate_reward`'s
``group_ids``) and, when a batch call fails, isolates the failure by group instead of by sample.
Wrappers (:class:`CombinedReward`, the jobs' adapters) pass the flag on.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import torch

RewardValues = Union[torch.Tensor, np.ndarray, Sequence[float], Mapping[str, Any]]


class RewardFn(Protocol):
    """``fn(samples, prompts, metadata) -> [B] | [B, K] | {name: [B]}`` (see module docstring)."""

    def __call__(self, samples: Sequence[Any], prompts: Sequence[Any],
                 metadata: Sequence[Mapping[str, Any]]) -> RewardValues: ...


@dataclass
class RewardBatch:
    """Rewards of one batch as named float32 columns.

    Attributes:
        values: ``[B, K]`` float32; non-finite entries are kept as they came (see ``valid``).
        names: K column names.
        valid: ``[B]`` bool, True where every column is finite.
    """

    values: torch.Tensor
    names: list
    valid: torch.Tensor

    @property
    def num_invalid(self) -> int:
        return int((~self.valid).sum())

    def column(self, name: str) -> torch.Tensor:
        """The ``[B]`` column called ``name``."""
        if name not in self.names:
            raise ValueError(f"no reward column {name!r} (columns: {', '.join(self.names)})")
        return self.values[:, self.names.index(name)]

    def weighted_sum(self, weights: Optional[Mapping[str, float]] = None) -> torch.Tensor:
        """``Σ_k w_k r_k`` -> ``[B]``; missing weights default to 1."""
        w = torch.tensor([float((weights or {}).get(n, 1.0)) for n in self.names])
        return self.values @ w

    def invalid_report(self) -> str:
        """A human-readable list of the non-finite entries ("" when there are none)."""
        bad = ~torch.isfinite(self.values)
        if not bad.any():
            return ""
        rows = bad.any(1).nonzero().flatten().tolist()
        parts = []
        for i in rows[:10]:
            cols = [self.names[k] for k in bad[i].nonzero().flatten().tolist()]
            parts.append(f"sample {i}: {', '.join(cols)} = "
                         f"{[float(self.values[i, self.names.index(c)]) for c in cols]}")
        more = f" (+{len(rows) - 10} more)" if len(rows) > 10 else ""
        return f"{len(rows)} sample(s) with non-finite rewards: " + "; ".join(parts) + more

    def select(self, keep: torch.Tensor) -> "RewardBatch":
        """Rows where ``keep`` ([B] bool) is True."""
        return RewardBatch(self.values[keep], list(self.names), self.valid[keep])


def is_groupwise(fn) -> bool:
    """Whether the reward ``fn`` scores a group's samples together (``fn.groupwise``)."""
    return bool(getattr(fn, "groupwise", False))


def with_group_ids(metadata: Sequence[Mapping[str, Any]], group_ids) -> list:
    """Copies of the B metadata dicts with ``"group_id"`` set to ``int(group_ids[i])``.

    Raises:
        ValueError: ``group_ids`` of another length than ``metadata``.
    """
    ids = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    if len(ids) != len(metadata):
        raise ValueError(f"got {len(ids)} group ids for {len(metadata)} samples; pass one "
                         f"group id per sample")
    return [{**(m or {}), "group_id": int(g)} for m, g in zip(metadata, ids)]


def _to_tensor(x, who: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(x, dtype=np.float64))
    except (TypeError, ValueError):
        raise TypeError(f"reward {who!r} returned {type(x).__name__} {str(x)[:80]!r}; expected "
                        f"numbers: a [B] list/array/tensor, a [B, K] tensor or "
                        f"{{name: [B] values}}") from None


def _as_column(x, n: int, who: str, col: str) -> torch.Tensor:
    t = _to_tensor(x, who)
    if not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64, torch.bool,
                                                      torch.int16, torch.int8, torch.uint8)):
        raise TypeError(f"reward {who!r} column {col!r} has dtype {t.dtype}; expected numbers")
    t = t.to(torch.float32).reshape(-1) if t.dim() <= 1 else t.to(torch.float32)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"reward {who!r} column {col!r} returned shape {tuple(t.shape)} for {n} "
                         f"samples; expected [{n}] (one float per sample)")
    return t


def evaluate_reward(fn: Callable, samples: Sequence[Any], prompts: Sequence[Any],
                    metadata: Optional[Sequence[Mapping[str, Any]]] = None, *,
                    name: Optional[str] = None, on_invalid: str = "drop",
                    group_ids=None) -> RewardBatch:
    """Call a reward and return its output as a checked :class:`RewardBatch`.

    Args:
        fn: the reward callable (see module docstring).
        samples, prompts: B each.
        metadata: B dicts, or None for empty dicts.
        name: the column name for a single-column reward (default: ``fn.name``, ``fn.__name__``).
        on_invalid: ``"drop"`` marks NaN/inf rows in ``valid`` (the trainer drops and counts
            them); ``"raise"`` raises ``ValueError`` naming every bad sample and column.
        group_ids: ``[B]`` group ids (LongTensor or ints), or None. A groupwise ``fn``
            (:func:`is_groupwise`) then gets them as ``metadata[i]["group_id"]`` in copies of
            the metadata; other rewards are called as before.

    Raises:
        ValueError: mismatched lengths, wrong output shape, or (``on_invalid="raise"``) NaN/inf.
        TypeError: output that is not numeric.
    """
    n = len(samples)
    if len(prompts) != n:
        raise ValueError(f"got {n} samples but {len(prompts)} prompts; pass one prompt per sample")
    if metadata is None:
        metadata = [{} for _ in range(n)]
    if len(metadata) != n:
        raise ValueError(f"got {n} samples but {len(metadata)} metadata dicts; pass one per sample")
    if on_invalid not in ("drop", "raise"):
        raise ValueError(f"on_invalid={on_invalid!r}; expected 'drop' or 'raise'")
    who = name or _name(fn)
    if group_ids is not None and is_groupwise(fn):
        metadata = with_group_ids(metadata, group_ids)
    out = fn(samples, prompts, metadata)
    if isinstance(out, Mapping):
        names = [str(k) for k in out]
        cols = [_as_column(v, n, who, k) for k, v in out.items()]
    else:
        t = _to_tensor(out, who)
        if t.dim() == 2:
            names = list(getattr(fn, "names", None) or [f"{who}_{k}" for k in range(t.shape[1])])
            if len(names) != t.shape[1]:
                raise ValueError(f"reward {who!r} returned {t.shape[1]} columns but names "
                                 f"{names}; give one name per column")
            cols = [_as_column(t[:, k], n, who, names[k]) for k in range(t.shape[1])]
        else:
            names, cols = [str(who)], [_as_column(t, n, who, str(who))]
    if not cols:
        raise ValueError(f"reward {who!r} returned no columns")
    values = torch.stack(cols, dim=1)  # K x [B] -> [B, K]
    batch = RewardBatch(values, names, torch.isfinite(values).all(dim=1))
    if on_invalid == "raise" and batch.num_invalid:
        raise ValueError(f"reward {who!r}: {batch.invalid_report()}; fix the reward or use "
                         f"on_invalid='drop' to skip those samples")
    return batch


class CombinedReward:
    """Several rewards as named columns, with weights for the multi-reward advantages.

    ``CombinedReward({"format": (fmt_fn, 0.5), "accuracy": (acc_fn, 1.0)})`` returns
    ``{"format": [B], "accuracy": [B]}``; ``.weights`` gives ``{name: weight}`` for
    ``group_advantages(..., method="normalize_then_sum" | "sum_then_normalize")``.
    """

    def __init__(self, rewards: Mapping[str, Union[Callable, tuple]]):
        if not rewards:
            raise ValueError("CombinedReward needs at least one reward; got none")
        self.fns: Dict[str, Callable] = {}
        self.weights: Dict[str, float] = {}
        for name, spec in rewards.items():
            fn, w = spec if isinstance(spec, tuple) else (spec, 1.0)
            if not callable(fn):
                raise TypeError(f"reward {name!r} is {type(fn).__name__}, not a callable")
            self.fns[name], self.weights[name] = fn, float(w)
        self.names = list(self.fns)
        self.name = "+".join(self.names)
        # one groupwise part makes the whole groupwise (it reads metadata[i]["group_id"])
        self.groupwise = any(is_groupwise(fn) for fn in self.fns.values())

    def __call__(self, samples, prompts, metadata):
        out = {}
        for name, fn in self.fns.items():
            sub = evaluate_reward(fn, samples, prompts, metadata, name=name)
            for k, col in zip(sub.names, sub.values.unbind(1)):
                out[name if len(sub.names) == 1 else f"{name}.{k}"] = col
        return out


def _name(fn) -> str:
    return str(getattr(fn, "name", None) or getattr(fn, "__name__", type(fn).__name__))


def _call(fn, timeout: Optional[float], *args):
    """``fn(*args)``, abandoned after ``timeout`` seconds (TimeoutError). The call runs in a
    daemon thread: a reward that never returns cannot keep the process from exiting."""
    if not timeout:
        return fn(*args)
    box: Dict[str, Any] = {}

    def target():
        try:
            box["out"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            box["err"] = err
    thread = threading.Thread(target=target, name="mmrl-reward", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no result after {timeout:g}s (train.reward_timeout)")
    if "err" in box:
        raise box["err"]
    return box["out"]


def robust_reward(reward_fn, samples: Sequence[Any], prompts: Sequence[Any],
                  metadata: Sequence[Mapping[str, Any]], retries: int = 2,
                  timeout: Optional[float] = None, *,
                  group_ids=None) -> Tuple[RewardBatch, Optional[str]]:
    """Rewards of a batch as a :class:`RewardBatch`; a reward that raises or times out never stops the run.

    The batch call is tried ``1 + retries`` times; if it still fails, each sample is scored on
    its own so that only the samples that fail get NaN (and are then dropped and counted); a
    groupwise reward (:func:`is_groupwise`) is retried group by group instead (``group_ids``, or
    equal prompts without them), since a sample alone has no group to be scored against.
    A call past ``timeout`` seconds is abandoned (it keeps running in a daemon thread, which
    does not hold up the process's exit). ``group_ids``: ``[B]`` (see :func:`evaluate_reward`).

    Returns:
        the :class:`RewardBatch` and the last error as ``"reward 'name' raised Type: message"``
        (None when nothing failed).
    """
    who = _name(reward_fn)
    if not len(samples):  # nothing to score (e.g. every input of the step was skipped)
        return RewardBatch(torch.zeros(0, 1), [who], torch.zeros(0, dtype=torch.bool)), None
    error = None
    for _ in range(retries + 1):
        try:
            return _call(_evaluate, timeout, reward_fn, samples, prompts, metadata,
                         group_ids), error
        except Exception as err:  # noqa: BLE001 - any reward failure is retried, then isolated
            error = f"reward {who!r} raised {type(err).__name__}: {err}"
    rows: list = [None] * len(samples)
    names = None
    for unit in _units(reward_fn, prompts, group_ids):
        ids = None if group_ids is None else [group_ids[i] for i in unit]
        try:
            one = _call(_evaluate, timeout, reward_fn, _take(samples, unit),
                        _take(prompts, unit), _take(metadata, unit), ids)
            names = names or one.names
            for k, i in enumerate(unit):
                rows[i] = one.values[k]
        except Exception as err:  # noqa: BLE001
            error = f"reward {who!r} raised {type(err).__name__}: {err}"
    names = names or [getattr(reward_fn, "name", "reward")]
    nan = torch.full((len(names),), float("nan"))
    values = torch.stack([nan if r is None or r.shape != nan.shape else r for r in rows]) \
        if rows else torch.zeros(0, len(names))
    return RewardBatch(values, names, torch.isfinite(values).all(1)), error


def _evaluate(fn, samples, prompts, metadata, group_ids):
    return evaluate_reward(fn, samples, prompts, metadata, group_ids=group_ids)


def _take(seq, rows: list):
    """``seq``'s rows ``rows``, a tensor for a tensor (the type a batch call received)."""
    if isinstance(seq, (torch.Tensor, np.ndarray)):
        return seq[rows]
    return [seq[i] for i in rows]


def _units(fn, prompts: Sequence[Any], group_ids) -> list:
    """The row lists scored on their own after a failed batch call: one per sample, or one per
    group for a groupwise reward (by ``group_ids``, else by equal prompts)."""
    if not is_groupwise(fn):
        return [[i] for i in range(len(prompts))]
    keys = [int(g) for g in group_ids] if group_ids is not None else [repr(p) for p in prompts]
    units: Dict[Any, list] = {}
    for i, key in enumerate(keys):
        units.setdefault(key, []).append(i)
    return list(units.values())
