"""The scorer registry, ``load(name, ...)``, text specs (``name:key=value``) and composition.

``load("pickscore", path="/ckpt/PickScore_v1", device="cuda", normalize="div26")`` builds a
scorer; ``compose({"pickscore": 1.0, "hps_v2.1": 0.5})`` builds several as named columns with
weights (an :class:`mmrl.train.reward_fn.CombinedReward`), so the core's multi-reward advantages
(``sum_then_normalize`` / ``normalize_then_sum``) see one column per scorer.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from mmrl.rewards.specs import JUDGES, SCORERS, parse_spec, parse_specs  # noqa: F401
from mmrl.train.reward_fn import CombinedReward

def _entry(name: str):
    """The registry entry of a scorer or, failing that, of a pairwise judge (unknown names get
    the scorer registry's error)."""
    return JUDGES.get(name) if name not in SCORERS and name in JUDGES else SCORERS.get(name)


def scorer_class(name: str):
    """The class behind a registered scorer or judge name (imports its module)."""
    import importlib
    module, attr, _ = _entry(name).target
    return getattr(importlib.import_module(f"mmrl.rewards.{module}"), attr)


def accepted_options(name: str) -> List[str]:
    """Keyword arguments the scorer ``name`` accepts."""
    _, _, fixed = _entry(name).target
    params = inspect.signature(scorer_class(name).__init__).parameters
    return [p for p in params if p not in ("self", *fixed)
            and params[p].kind not in (inspect.Parameter.VAR_KEYWORD,
                                       inspect.Parameter.VAR_POSITIONAL)]


def forwards_options(name: str) -> bool:
    """Whether the scorer ``name`` hands options it does not take to another scorer (its
    ``__init__`` has ``**options``, like ``frames``), which checks them."""
    params = inspect.signature(scorer_class(name).__init__).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def load(name: str, path: Optional[str] = None, device=None, dtype=None, **options):
    """Build the scorer registered as ``name``: ``scorer(images, prompts) -> Tensor[B]``, or the
    pairwise judge registered as ``name`` (``judge.compare(a, b, prompts) -> P(a preferred)``).

    Args:
        name: a registered name (``mmrl.rewards.SCORERS.names()`` or ``JUDGES.names()``).
        path: local weights (directory or file); default: the scorer's public hub id.
        device, dtype: where and in which precision the model runs (default: CUDA if available,
            float32); scorers without a model do not take them.
        **options: scorer-specific options (``normalize=`` for pickscore, ``variant=`` for
            clip_score, ``arch=`` for HPS, ``batch_size=``, ``grad=`` ...).

    Raises:
        ValueError: unknown name (with the registered names and the closest match).
        TypeError: an option the scorer does not take (the message lists the ones it does).
        WeightsNotFoundError: no local weights and the hub is unreachable.
    """
    factory = _entry(name)
    kwargs = dict(options)
    for key, value in (("path", path), ("device", device), ("dtype", dtype)):
        if value is not None:
            kwargs[key] = value
    ok = accepted_options(name)
    bad = [k for k in kwargs if k not in ok]
    if bad and not forwards_options(name):
        raise TypeError(f"scorer {name!r} does not take {', '.join(map(repr, bad))} "
                        f"(it takes: {', '.join(ok)}); remove it or pick another scorer")
    return factory(**kwargs)


class ComposedScorer(CombinedReward):
    """Several scorers as named columns ``{name: Tensor[B]}`` with ``.weights``.

    Built on :class:`mmrl.train.reward_fn.CombinedReward`; adds the scorer call convention
    (``metadata`` optional, ``prompts=None`` when every part is prompt-free) and ``weighted``.
    Columns are float32 on the CPU (no gradient; compose gradients yourself with ``grad=True``
    scorers).
    """

    def __init__(self, scorers: Mapping[str, Union[Any, Tuple[Any, float]]]):
        super().__init__(scorers)
        self.uses_prompts = any(getattr(f, "uses_prompts", True) for f in self.fns.values())
        media = {k: getattr(f, "media", "image") for k, f in self.fns.items()}
        if len(set(media.values())) > 1:
            video = [k for k, m in media.items() if m == "video"]
            image = [k for k, m in media.items() if m != "video"]
            raise ValueError(f"cannot compose image scorers ({', '.join(image)}) with video "
                             f"scorers ({', '.join(video)}): one job scores one kind of "
                             f"sample; for videos lift each image scorer, e.g. "
                             f"frames:scorer={image[0].split('#')[0]}:reduce=mean")
        self.media = next(iter(media.values()))

    def __call__(self, images, prompts=None, metadata=None) -> Dict[str, Any]:
        if prompts is None and not self.uses_prompts:
            prompts = [""] * len(images)
        if prompts is None:
            raise TypeError(f"prompts is None; {self.name} reads prompts: pass one per image")
        return super().__call__(images, prompts, metadata)

    def weighted(self, images, prompts=None, metadata=None):
        """``Σ_k w_k · column_k`` -> ``Tensor[B]`` (sum-then-normalize's input)."""
        cols = self(images, prompts, metadata)
        return sum(self.weights[k] * v for k, v in cols.items())


def compose(spec: Union[str, Mapping[str, Any], Sequence[Tuple[str, Dict[str, Any]]]],
            device=None, dtype=None) -> ComposedScorer:
    """Load several scorers as one :class:`ComposedScorer`.

    ``spec`` is a mapping ``{name: weight}`` or ``{name: {"weight": w, **options}}``, a text spec
    ``"pickscore:weight=1,hps_v2.1:weight=0.5:path=/ckpt"`` or a parsed list. ``device``/``dtype``
    go to every scorer that takes them. A name used twice gets columns ``name``, ``name#2``.
    """
    if isinstance(spec, str):
        items = parse_specs(spec)
    elif isinstance(spec, Mapping):
        items = [(k, dict(v) if isinstance(v, Mapping) else {"weight": v})
                 for k, v in spec.items()]
    else:
        items = list(spec)
    parts: Dict[str, Tuple[Any, float]] = {}
    for name, opts in items:
        opts = dict(opts)
        weight = float(opts.pop("weight", 1.0))
        ok = accepted_options(name)
        for key, value in (("device", device), ("dtype", dtype)):
            if value is not None and key in ok:
                opts.setdefault(key, value)
        col, k = name, 2
        while col in parts:
            col, k = f"{name}#{k}", k + 1
        parts[col] = (load(name, **opts), weight)
    return ComposedScorer(parts)


def candidate_probs(scores: torch.Tensor,
                    groups: Union[torch.Tensor, Sequence[str]]) -> torch.Tensor:
    """``p_i = exp(s_i) / Σ_{j in i's group} exp(s_j)``: softmax over each prompt's candidates.

    PickScore (arXiv 2305.01569 §3) reads its scores this way: with ``normalize="none"`` the
    score is ``logit_scale.exp() · cos``, and ``p_i`` is the predicted probability that image i
    is preferred among the images generated for its prompt. Other scales change the temperature
    (``"div26"`` divides the logits by 26), so pass logits. Differentiable.

    Args:
        scores: ``[B]`` float scores (logits).
        groups: ``[B]`` group ids (LongTensor) or B prompts; images with equal prompts are one
            prompt's candidates.
    Returns:
        ``[B]`` probabilities in ``scores``' dtype (at least float32); each group sums to 1.
    Raises:
        ValueError: ``scores`` not 1-D, or ``groups`` of another length.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores has shape {tuple(scores.shape)}; expected [B]")
    if not isinstance(groups, torch.Tensor):
        first: Dict[str, int] = {}
        groups = torch.tensor([first.setdefault(g, len(first)) for g in groups])
    if groups.shape != scores.shape:
        raise ValueError(f"{len(groups)} groups for {len(scores)} scores; pass one group id or "
                         f"prompt per score")
    s = scores if scores.dtype == torch.float64 else scores.float()
    if s.numel() == 0:
        return s
    g = groups.to(s.device, torch.long)
    n = int(g.max()) + 1
    # Subtract each group's max before exp (no overflow at logit_scale ≈ 100).
    top = torch.full((n,), float("-inf"), dtype=s.dtype, device=s.device)
    top = top.scatter_reduce(0, g, s.detach(), "amax")
    e = (s - top[g]).exp()
    z = torch.zeros(n, dtype=s.dtype, device=s.device).index_add(0, g, e)
    return e / z[g]


__all__ = ["SCORERS", "load", "forwards_options", "compose", "ComposedScorer", "parse_spec",
           "parse_specs",
           "accepted_options", "scorer_class", "candidate_probs"]
