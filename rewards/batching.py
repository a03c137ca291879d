"""Request batching for the reward server: requests that arrive together are scored in one call.

A :class:`Job` is one decoded request: its inputs as fields that concatenate (lists, or tensors
along dim 0) and a model function. :class:`Batcher` runs one worker thread: it takes the oldest
pending job, waits until ``window`` seconds after that job arrived (or until ``max_items`` items
are pending), merges it with the pending jobs of the same ``key`` (same function, same tensor
shapes) within ``max_items`` items and ``max_pixels`` pixels, calls the function once on the
concatenation and hands each job its own rows of the output. When a merged call fails, every
job of the batch is re-run alone, so one bad request fails only itself. A model that is busy
lets requests accumulate: the next batch takes everything pending at once (the window is already
over), so batches grow with load and a lone request waits at most ``window``. With
``window = 0`` (the server's default: continuous batching) nothing waits: a lone request is
scored at once, and what queued during a model call goes together into the next.

Differs from a dynamic batcher with padding (e.g. Triton's): inputs of different tensor shapes
are never padded together; they wait for the next batch of their own shape.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Hashable, List, Optional, Tuple, Union

import torch

from mmrl.rewards.wire import RequestError

Output = Union[torch.Tensor, Dict[str, torch.Tensor]]


class Job:
    """One request for :class:`Batcher` (or a direct :meth:`run`).

    Args:
        fn: ``fn(*inputs.values()) -> Tensor[n] | {column: Tensor[n]}``, one row per item.
        inputs: fields that concatenate across jobs: lists of length ``n`` or tensors ``[n, ...]``
            (passed to ``fn`` positionally, in order).
        n: items (images, videos or pairs).
        pixels: decoded pixels held, for the batch's pixel cap.
        key: jobs merge only with equal keys (the function and every tensor field's shape).
    """

    def __init__(self, fn: Callable[..., Output], inputs: Dict[str, Any], n: int, pixels: int,
                 key: Hashable):
        self.fn, self.inputs, self.n, self.pixels, self.key = fn, inputs, n, pixels, key
        self.arrived = time.monotonic()
        self.done = threading.Event()
        self.result: Optional[Output] = None
        self.error: Optional[BaseException] = None

    def run(self) -> Output:
        """This job alone: its output, checked to hold one row per item."""
        return _rows(self.fn(*self.inputs.values()), self.n)

    def wait(self) -> Output:
        """Block until the worker finished this job; its output, or raise its error."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


def _rows(out: Any, n: int) -> Output:
    """``out`` detached on the CPU, checked to be ``Tensor[n]`` or ``{column: Tensor[n]}``."""
    cols = out if isinstance(out, dict) else {"": out}
    for k, v in cols.items():
        if not isinstance(v, torch.Tensor) or v.shape[:1] != (n,) or v.dim() != 1:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise RuntimeError(f"the scorer returned {got}{f' for column {k!r}' if k else ''} "
                               f"for {n} inputs; expected a tensor [{n}]")
    if isinstance(out, dict):
        return {k: v.detach().float().cpu() for k, v in out.items()}
    return out.detach().float().cpu()


def _merge(jobs: List[Job]) -> Dict[str, Any]:
    """The jobs' inputs concatenated field by field."""
    merged = {}
    for k, first in jobs[0].inputs.items():
        parts = [j.inputs[k] for j in jobs]
        if isinstance(first, torch.Tensor):
            merged[k] = torch.cat(parts)
        elif isinstance(first, list):
            merged[k] = [x for p in parts for x in p]
        else:
            merged[k] = first  # a setting shared by the jobs (part of the key)
    return merged


def _split(out: Output, jobs: List[Job]) -> List[Output]:
    bounds, lo = [], 0
    for j in jobs:
        bounds.append((lo, lo + j.n))
        lo += j.n
    if isinstance(out, dict):
        return [{k: v[a:b] for k, v in out.items()} for a, b in bounds]
    return [out[a:b] for a, b in bounds]


class Batcher:
    """Merge concurrent jobs into one model call (see module docstring).

    Args:
        window: seconds a batch stays open after its oldest job arrived (>= 0; 0: continuous
            batching, no wait: a job goes at once with whatever is pending, so a lone request
            is never delayed and requests that queue while the model is busy go together).
        max_items: items per merged call (a larger single job still runs, alone).
        max_pixels: decoded pixels per merged call (idem).
        lock: held around every model call (shared with any direct caller of the model).
    """

    def __init__(self, window: float, max_items: int, max_pixels: int,
                 lock: Optional[threading.Lock] = None):
        if not window >= 0:
            raise ValueError(f"batch window {window!r} s; expected >= 0 (0: continuous "
                             f"batching, no wait)")
        self.window, self.max_items, self.max_pixels = float(window), int(max_items), max_pixels
        self.lock = lock or threading.Lock()
        self.stats = {"requests": 0, "batches": 0, "model_calls": 0, "isolated_reruns": 0}
        self._queue: Deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="reward-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Output:
        """Queue ``job`` and wait for its output (or its error)."""
        with self._cv:
            if self._stopped:
                raise RequestError(503, "the reward server is stopping; retry later")
            self._queue.append(job)
            self._cv.notify()
        return job.wait()

    def stop(self):
        """Finish the running batch, fail the pending jobs, end the worker."""
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _select(self) -> Tuple[List[Job], bool]:
        """The oldest job and the pending ones that merge with it; whether the batch is full."""
        head = self._queue[0]
        batch, n, px = [head], head.n, head.pixels
        for j in list(self._queue)[1:]:
            if j.key != head.key:
                continue
            if n + j.n > self.max_items or px + j.pixels > self.max_pixels:
                return batch, True
            batch.append(j)
            n, px = n + j.n, px + j.pixels
        return batch, n >= self.max_items

    def _next(self) -> Optional[List[Job]]:
        with self._cv:
            while not self._queue and not self._stopped:
                self._cv.wait()
            if self._stopped:
                for j in self._queue:
                    j.error = RequestError(503, "the reward server stopped before scoring "
                                                "this request; retry later")
                    j.done.set()
                self._queue.clear()
                return None
            deadline = self._queue[0].arrived + self.window
            while True:
                batch, full = self._select()
                left = deadline - time.monotonic()
                if full or left <= 0 or self._stopped:
                    break
                self._cv.wait(left)
            for j in batch:
                self._queue.remove(j)
            return batch

    def _loop(self):
        while True:
            batch = self._next()
            if batch is None:
                return
            try:
                self._run(batch)
            finally:  # never leave a client waiting, whatever happened
                for j in batch:
                    if j.result is None and j.error is None:
                        j.error = RuntimeError("the batch worker lost this request; retry")
                    j.done.set()

    def _call(self, jobs: List[Job]) -> List[Output]:
        with self.lock:
            self.stats["model_calls"] += 1
            if len(jobs) == 1:
                return [jobs[0].run()]
            out = jobs[0].fn(*_merge(jobs).values())
        return _split(_rows(out, sum(j.n for j in jobs)), jobs)

    def _run(self, batch: List[Job]):
        self.stats["requests"] += len(batch)
        self.stats["batches"] += 1
        try:
            outs = self._call(batch)
        except Exception as err:  # noqa: BLE001 - handed to the request(s) that caused it
            if len(batch) == 1:
                batch[0].error = err
                return
            # isolate: one bad request (a prompt, an image the model rejects) fails only itself
            self.stats["isolated_reruns"] += len(batch)
            for j in batch:
                try:
                    j.result = self._call([j])[0]
                except Exception as one:  # noqa: BLE001
                    j.error = one
            return
        for j, out in zip(batch, outs):
            j.result = out
