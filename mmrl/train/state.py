"""The policy's part of a checkpoint: its weights (``state_dict``), its optimizer, and its extra
(non-weight) state, under FSDP too.

A policy declaring ``Capabilities(extra_state=True)`` returns ``extra_state() -> dict`` of
JSON-able python scalars (e.g. ``{"rollout_iteration": 3}``); the runner stores it in the
checkpoint's ``state.pt`` under ``"policy_extra"`` and hands it back to ``load_extra_state`` on
resume. ``state_dict()`` holds weights only.

Older checkpoints kept such state as ``mmrl_*`` entries among the weights (a 0-d tensor each).
They still load: the entries are taken out of the weights and, for a policy declaring
``extra_state``, passed to ``load_extra_state`` with the ``mmrl_`` prefix removed and each
tensor turned into a python number (``mmrl_rollout_iteration: tensor(3)`` ->
``{"rollout_iteration": 3}``). A policy that does not declare ``extra_state`` and keeps
``mmrl_*`` entries in its own ``state_dict`` (the older convention) round-trips them through
its ``state_dict``/``load_state_dict`` without FSDP (under FSDP only the module weights are
gathered: declare ``extra_state``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from mmrl.train.distributed import full_state, load_full_state
from mmrl.train.policy import Capabilities

__all__ = ["LEGACY_PREFIX", "policy_weights", "load_policy_weights", "save_policy_state",
           "load_policy_state", "legacy_extra_state", "check_extra_state"]

LEGACY_PREFIX = "mmrl_"
"""Prefix of the non-weight entries older checkpoints kept among the weights."""

_SCALARS = (bool, int, float, str, type(None))


def policy_weights(policy) -> Dict[str, torch.Tensor]:
    """The policy's trainable state, ``policy.state_dict()`` (a required method, see
    :func:`mmrl.train.policy.check_policy`)."""
    return policy.state_dict()


def load_policy_weights(policy, weights: Dict[str, torch.Tensor]) -> None:
    """``policy.load_state_dict(weights)``."""
    policy.load_state_dict(weights)


def check_extra_state(extra: Any, who: str) -> Dict[str, Any]:
    """``extra`` (what ``who.extra_state()`` returned), checked to be a dict of JSON-able python
    scalars keyed by strings.

    Raises:
        TypeError: another type, naming the offending key.
    """
    if not isinstance(extra, dict):
        raise TypeError(f"{who}.extra_state() returned a {type(extra).__name__}; expected a "
                        f"dict of python scalars, e.g. {{'rollout_iteration': 3}}")
    for k, v in extra.items():
        if not isinstance(k, str) or not isinstance(v, _SCALARS):
            raise TypeError(f"{who}.extra_state()[{k!r}] is a {type(v).__name__}; expected "
                            f"str keys and bool/int/float/str/None values (convert tensors "
                            f"with .item())")
    return dict(extra)


def legacy_extra_state(entries: Dict[str, Any]) -> Dict[str, Any]:
    """Older checkpoints' ``mmrl_*`` weight entries as extra state: the prefix removed, each
    one-element tensor a python number (a larger one a list)."""
    out = {}
    for k, v in entries.items():
        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else v.tolist()
        out[k[len(LEGACY_PREFIX):]] = v
    return out


def _split_legacy(weights: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(module weights, ``mmrl_*`` entries) of a checkpoint's weights."""
    legacy = {k: v for k, v in weights.items() if k.startswith(LEGACY_PREFIX)}
    return {k: v for k, v in weights.items() if k not in legacy}, legacy


def save_policy_state(policy, caps: Capabilities, optimizer: torch.optim.Optimizer,
                      fsdp: Optional[torch.nn.Module] = None
                      ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Optional[Dict]]:
    """``(weights, optimizer state, extra state or None)`` to write in a checkpoint. Under FSDP
    (``fsdp``: the root module) the full state is gathered: a collective, every rank calls it
    and rank 0 receives the tensors."""
    if fsdp is not None:
        weights, optim = full_state(fsdp, optimizer)
    else:
        weights, optim = policy.state_dict(), optimizer.state_dict()
    extra = (check_extra_state(policy.extra_state(), type(policy).__name__)
             if caps.extra_state else None)
    return weights, optim, extra


def load_policy_state(policy, caps: Capabilities, optimizer: torch.optim.Optimizer,
                      weights: Dict[str, torch.Tensor], optim: Dict[str, Any],
                      extra: Optional[Dict[str, Any]] = None,
                      fsdp: Optional[torch.nn.Module] = None) -> None:
    """Load what :func:`save_policy_state` wrote (or an older checkpoint, see the module
    docstring) into the policy and its optimizer; ``extra`` is the checkpoint's
    ``"policy_extra"`` (None in older checkpoints and for policies without extra state). A
    policy declaring ``extra_state`` whose checkpoint has none keeps its current extra state."""
    module_weights, legacy = _split_legacy(weights)
    if fsdp is not None:
        load_full_state(fsdp, optimizer, module_weights, optim)
    else:
        policy.load_state_dict(module_weights if caps.extra_state else weights)
        optimizer.load_state_dict(optim)
    if caps.extra_state:
        if extra is None and legacy:
            extra = legacy_extra_state(legacy)
        if extra is not None:
            policy.load_extra_state(dict(extra))
