"""Data parallelism for the shared loop: torchrun / accelerate launch, gloo or NCCL.

The loop shards a step's samples across ranks (a prompt's group may span ranks), gathers rewards
before computing advantages, normalizes the loss by the **global** token/sequence counts and sums
gradients across ranks, so a step on W ranks equals the same global batch on one process.

Gradient synchronization modes:

- ``ddp``: after the micro-batches of an optimizer step, every gradient is summed across ranks
  with one flattened all-reduce (DDP's result, without its hooks: works for any policy object,
  LoRA or full weights, with no wrapper around the model).
- ``fsdp``: the policy's model is sharded with FSDP2 ``fully_shard``; FSDP reduce-scatters the
  gradients itself and the loop sets its divide factor to 1 (the loss is already globally
  normalized).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional

import torch
import torch.distributed as dist

from mmrl.train.policy import capabilities_of


@dataclass
class Dist:
    """This process's place in the job (``world == 1``: a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    grad_sync: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over ranks (a new tensor; the input is not modified)."""
        if not self.active:
            return t
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate ``t`` (any number of rows per rank) over ranks along dim 0, rank order."""
        if not self.active:
            return t
        n = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        longest = int(max(s.item() for s in sizes))
        pad = torch.zeros((longest - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype,
                          device=t.device)
        padded = torch.cat([t, pad])
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])

    def all_gather_object(self, obj: Any) -> List[Any]:
        if not self.active:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum ``.grad`` across ranks in place (one flattened all-reduce; ``ddp`` mode)."""
        if not self.active or self.grad_sync != "ddp":
            return
        params = [p for p in params if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).clone()
            offset += n

    def broadcast_parameters(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Copy rank 0's parameters to every rank (identical starting weights)."""
        if not self.active or self.grad_sync != "ddp":
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_distributed(grad_sync: str = "ddp") -> Dist:
    """Join the process group that torchrun / accelerate launch describe in the environment.

    Single process when ``WORLD_SIZE`` is unset or 1. Backend: NCCL on CUDA, gloo on CPU.

    Raises:
        ValueError: unknown ``grad_sync``.
    """
    if grad_sync not in ("ddp", "fsdp"):
        raise ValueError(f"grad_sync={grad_sync!r}; expected 'ddp' or 'fsdp'")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(grad_sync=grad_sync)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return Dist(rank, world, local, grad_sync)


def shard_samples(counts: List[int], d: Dist) -> List[int]:
    """This rank's share of each prompt's samples, from the global per-prompt ``counts``.

    The B = Σ counts samples, laid out prompt after prompt, are cut into W contiguous, nearly
    equal slices; a group may therefore span two ranks. Returns per-prompt local counts (0 for
    prompts this rank does not touch).
    """
    total = sum(counts)
    lo, hi = total * d.rank // d.world, total * (d.rank + 1) // d.world
    out, start = [], 0
    for c in counts:
        out.append(max(0, min(hi, start + c) - max(lo, start)))
        start += c
    return out


def shard_whole_groups(num_prompts: int, d: Dist) -> List[bool]:
    """Which prompts this rank owns when groups must stay whole (round-robin by prompt)."""
    return [i % d.world == d.rank for i in range(num_prompts)]


def check_fsdp_settings(t, world: int, whole_groups: bool) -> None:
    """Refuse train settings (``t``: a TrainConfig) under which FSDP ranks would not run the
    same forwards.

    Raises:
        ValueError: naming the setting and what to change.
    """
    if t.t_chunk:
        raise ValueError(f"train.parallel=fsdp needs train.t_chunk=0 (got {t.t_chunk}): "
                         f"ranks' responses differ in length, so their T chunks would "
                         f"differ in number; bound memory with micro_batch_size instead")
    if (t.prompts_per_step * t.group_size) % world:
        raise ValueError(f"train.parallel=fsdp runs the same number of forwards on every "
                         f"rank: prompts_per_step * group_size = "
                         f"{t.prompts_per_step * t.group_size} must be divisible by the "
                         f"{world} ranks")
    if whole_groups and t.prompts_per_step % world:
        raise ValueError(f"train.parallel=fsdp with whole groups per rank (this preset, "
                         f"sampler or groupwise reward): train.prompts_per_step="
                         f"{t.prompts_per_step} must be divisible by the {world} ranks")
    if t.dynamic_sampling_tries:
        raise ValueError("train.parallel=fsdp cannot use dynamic_sampling_tries (a rank "
                         "may keep no group at all, and every rank must run the same "
                         "forwards); use parallel=ddp")


def shard_policy(policy) -> torch.nn.Module:
    """FSDP2-shard the policy's model (``policy.apply_fsdp()`` if it has one, else
    ``fully_shard(policy.model)``) and return the root FSDP module.

    The loss is normalized by global counts, so FSDP must sum gradients, not average them:
    the divide factor is set to 1.

    Raises:
        ValueError: the policy exposes no module to shard.
    """
    from torch.distributed.fsdp import fully_shard
    hook = policy.apply_fsdp if capabilities_of(policy).fsdp else None
    module = hook() if hook is not None else None
    if module is None:
        module = getattr(policy, "model", None)
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"train.parallel=fsdp needs the policy's trainable model as "
                             f"`policy.model` (an nn.Module) or a `policy.apply_fsdp()` method; "
                             f"{type(policy).__name__} has neither. Use train.parallel=ddp")
        fully_shard(module)
    # FSDP2 picks its root at the first forward; make it this module even when a policy's first
    # call goes to a submodule (a decoder layer during sampling)
    root_forward(module, lambda: None)
    module.reshard()  # the optimizer must see the sharded parameters
    for unit in fsdp_units(module):  # not recursive: every unit (blocks too) must sum
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return module


def fsdp_units(root: torch.nn.Module) -> list:
    """The FSDP2 modules under ``root`` (itself included), root first."""
    from torch.distributed.fsdp import FSDPModule
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_parameters(root: Optional[torch.nn.Module]):
    """Every FSDP2 unit under ``root`` holds its full parameters inside the block.

    For rollouts and other no-grad passes: one all-gather per unit on entry (collective: every
    rank enters at the same point), then any number of forwards, on any submodule, with no
    collective, so ranks may generate different lengths; resharded on exit. ``root=None``: no-op.
    The memory of the full weights is held meanwhile (as verl does for its rollout engine).
    On exit every unit gets FSDP2's default back (reshard after forward, except the root), so a
    policy's own per-unit ``reshard_after_forward`` choice does not survive a rollout.
    """
    if root is None:
        yield
        return
    units = fsdp_units(root)
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:  # FSDP2's defaults: the root keeps its parameters after forward
            unit.set_reshard_after_forward(unit is not root, recurse=False)
            unit.reshard()


def root_forward(root: torch.nn.Module, fn: Callable[[], Any]) -> Any:
    """``fn()`` run as ``root``'s forward, so FSDP2's hooks gather the root unit's parameters
    before it and reduce-scatter their gradients in backward, even when ``fn`` calls submodules
    (embeddings, lm head) directly. Submodules that are FSDP units gather their own."""
    own = root.__dict__.get("forward")  # an instance-level forward someone else set, if any
    root.forward = fn  # instance attribute: nn.Module.__call__ runs the hooks around it
    try:
        return root()
    finally:
        if own is None:
            del root.forward
        else:
            root.forward = own


def fsdp_lockstep(d: Dist, n_rows: int, t_chunk: int) -> Optional[Dist]:
    """``d`` when FSDP needs every rank to run the same forwards (each is a collective), else
    None. Ranks may hold different row counts (a skipped video, Knapsack budgets); the update
    pads the shorter ranks with idle forwards."""
    if not (d.active and d.grad_sync == "fsdp"):
        return None
    if t_chunk:
        raise ValueError("train.parallel=fsdp needs train.t_chunk=0 (ranks' responses differ "
                         "in length, so T chunks would differ in number)")
    if most_over_ranks(-n_rows, d) == 0:  # some rank has no row to run an idle pass on
        raise RuntimeError("train.parallel=fsdp: a rank has no rows this step (every prompt it "
                           "drew was skipped); raise prompts_per_step or use parallel=ddp")
    return d


def most_over_ranks(n: int, d: Dist) -> int:
    """The largest ``n`` over the ranks."""
    return int(d.all_gather_rows(torch.tensor([n])).max())


def idle_pass(policy, rollout) -> None:
    """A forward and backward that change no gradient (FSDP: keeps this rank's collectives in
    step with ranks that have more micro-batches)."""
    (policy.logp(rollout, torch.arange(1), 0, rollout.mask.shape[1]).sum() * 0.0).backward()


def full_state(module: torch.nn.Module, optimizer) -> tuple:
    """(model, optimizer) full state dicts of an FSDP module, on CPU (collective: every rank
    calls it; rank 0 receives the tensors)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(module, options=opts),
            get_optimizer_state_dict(module, optimizer, options=opts))


def load_full_state(module: torch.nn.Module, optimizer, weights, optim_state) -> None:
    """Load full (unsharded) state dicts into an FSDP module and its optimizer on every rank."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, weights, options=opts)
    set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state, options=opts)


def maybe_destroy(d: Optional[Dist]) -> None:
    """Leave the process group cleanly: wait for every rank first (a rank that tears down while
    a peer is still in a collective makes gloo abort the peer)."""
    if d is not None and d.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
