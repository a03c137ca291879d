"""Pairwise preference rewards (Pref-GRPO, arXiv 2508.20751): each sample's reward is its win
rate against the other samples of its group, judged in pairs.

A **pairwise judge** has ``compare(a, b, prompts) -> Tensor[n]``: P(``a[k]`` preferred over
``b[k]``) in [0, 1] for n pairs, with ``a``/``b`` images (a ``[n, 3, H, W]`` tensor in [0, 1] or
n PIL images) or videos (``[n, F, 3, H, W]``) as its ``media`` says, plus ``name``. Judges are
registered in :data:`mmrl.rewards.specs.JUDGES` (``vlm_pair``: a VLM asked "which is better",
:mod:`mmrl.rewards.vlm_judge`; ``bradley_terry``: any registered scorer as a judge, below).

``PrefWinRate`` (registered as ``pref_winrate``) is a groupwise reward (``groupwise = True``,
:func:`mmrl.train.reward_fn.is_groupwise`)::

    pref_winrate:judge=vlm_pair:path=/ckpt/UnifiedReward-Think     all pairs, both orders
    pref_winrate:judge=vlm_pair:path=DIR:opponents=4                each sample meets 4 others
    pref_winrate:judge=bradley_terry:scorer=pickscore:hard=true     rank within the group

Groups: ``metadata[i]["group_id"]`` (the training loop sets it), or, when no row has one (a
direct call), the rows with equal prompts. Source: Pref-GRPO @ 3e787f6d
``fastvideo/rewards/unifiedreward_think.py`` (``_pairwise_win_rate``).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Protocol, Sequence, Union

import torch

from mmrl.rewards.base import Scorer, check_images, check_prompts, to_rgb_tensor

Tensor = torch.Tensor


class PairwiseJudge(Protocol):
    """``compare(a, b, prompts) -> Tensor[n]`` = P(a preferred) in [0, 1]; ``media``: "image"
    (``a``, ``b``: ``[n, 3, H, W]`` or n PIL images) or "video" (``[n, F, 3, H, W]``)."""

    name: str
    media: str

    def compare(self, a: Any, b: Any, prompts: List[str]) -> Tensor: ...


# --------------------------------------------------------------------------- the math

def pair_schedule(n: int, opponents: Optional[int] = None) -> Tensor:
    """The judged pairs of one group of ``n`` samples -> ``LongTensor[P, 2]``, rows ``(i, j)``
    with ``i < j`` (``i`` is shown first when one order is judged, as in Pref-GRPO).

    ``opponents`` None (or >= n - 1): all ``n(n-1)/2`` pairs (``itertools.combinations``
    order). ``opponents = k < n - 1``: the circulant schedule, pairs ``{i, i + d mod n}`` for
    ``d = 1 .. k // 2``, plus ``d = n / 2`` when k is odd (n must then be even): every sample
    meets exactly k others, ``n·k/2`` pairs, deterministic.

    Raises:
        ValueError: ``opponents`` not a positive int; odd ``opponents`` with an odd ``n``
            (no schedule gives every sample the same odd number of opponents).
    """
    if opponents is not None and (isinstance(opponents, bool) or not isinstance(opponents, int)
                                  or opponents < 1):
        raise ValueError(f"opponents={opponents!r}; expected a positive int or None (all pairs)")
    if opponents is None or opponents >= n - 1:
        idx = torch.triu_indices(n, n, offset=1)  # [2, P], row-major = combinations order
        return idx.t().contiguous()
    if opponents % 2 and n % 2:
        raise ValueError(f"opponents={opponents} with a group of {n}: an odd number of "
                         f"opponents each needs an even group; use opponents={opponents - 1} or "
                         f"{opponents + 1}, or all pairs")
    i = torch.arange(n)
    pairs = [torch.stack([i, (i + d) % n], 1) for d in range(1, opponents // 2 + 1)]
    if opponents % 2:
        half = torch.arange(n // 2)
        pairs.append(torch.stack([half, half + n // 2], 1))
    p = torch.cat(pairs)
    return torch.stack([p.min(1).values, p.max(1).values], 1)


def hard_outcome(p: Tensor) -> Tensor:
    """``p`` thresholded as a parsed answer: 1 above 0.5, 0 below, 0.5 at 0.5 or NaN (Pref-GRPO
    counts an unparsed answer as a tie)."""
    out = (p > 0.5).to(p.dtype) + 0.5 * (p == 0.5).to(p.dtype)
    return torch.where(torch.isnan(p), torch.full_like(p, 0.5), out)


def win_rates(pairs: Tensor, p_ij: Tensor, num_samples: int, p_ji: Optional[Tensor] = None,
              hard: bool = False) -> Tensor:
    """``w_i = mean_{j: {i, j} judged} P(i beats j)`` -> ``[B]``.

    Pref-GRPO (arXiv 2508.20751; code ``_pairwise_win_rate``): winner +1, tie +0.5 each,
    ``w_i = wins_i / (G - 1)``. A group's wins sum to its number of pairs, so its mean win
    rate is 0.5 whenever every sample meets the same number of others (every schedule here).

    Args:
        pairs: ``[P, 2]`` long row indices ``(i, j)`` into the batch.
        p_ij: ``[P]`` P(i preferred) with i shown first.
        num_samples: B.
        p_ji: ``[P]`` P(j preferred) with j shown first (the swapped query), or None. With it
            ``P(i beats j) = (p_ij + 1 - p_ji) / 2``: a judge's position bias cancels.
        hard: threshold each judged query with :func:`hard_outcome` before averaging (then a
            pair judged in both orders is worth 0, 0.25, 0.5, 0.75 or 1).

    Returns:
        ``[B]`` float win rates in [0, 1]; 0.5 for a sample in no pair (a group of one).
        Differs from Pref-GRPO: no rounding here (its 3 decimals: ``PrefWinRate(decimals=3)``).
    """
    s = hard_outcome(p_ij) if hard else p_ij
    if p_ji is not None:
        s = (s + 1 - (hard_outcome(p_ji) if hard else p_ji)) / 2
    s = s.to(torch.float32)
    wins = torch.zeros(num_samples).index_add(0, pairs[:, 0], s).index_add(0, pairs[:, 1], 1 - s)
    ones = torch.ones(len(pairs))
    games = torch.zeros(num_samples).index_add(0, pairs[:, 0], ones).index_add(0, pairs[:, 1],
                                                                               ones)
    return torch.where(games > 0, wins / games.clamp(min=1), torch.full_like(wins, 0.5))


def group_index(prompts: Sequence[Any], metadata: Optional[Sequence[Any]]) -> Tensor:
    """``[B]`` long group labels 0..G-1: ``metadata[i]["group_id"]`` when every row has one,
    else equal prompts (a direct call without the loop's group ids).

    Raises:
        ValueError: some rows with ``group_id`` and some without.
    """
    metadata = metadata if metadata is not None else [None] * len(prompts)
    has = [isinstance(m, dict) and "group_id" in m for m in metadata]
    if any(has) and not all(has):
        raise ValueError(f"{sum(has)} of {len(has)} rows have metadata['group_id']; give every "
                         f"row its group id or none (then equal prompts form a group)")
    keys = [m["group_id"] for m in metadata] if all(has) and has else [repr(p) for p in prompts]
    first: Dict[Any, int] = {}
    return torch.tensor([first.setdefault(k, len(first)) for k in keys], dtype=torch.long)


def batch_pairs(groups: Tensor, opponents: Optional[int] = None) -> Tensor:
    """Every group's :func:`pair_schedule` in batch row indices -> ``LongTensor[P, 2]``."""
    out = [torch.zeros(0, 2, dtype=torch.long)]
    for g in torch.unique(groups).tolist():
        rows = (groups == g).nonzero().flatten()  # the group's rows, in batch order
        out.append(rows[pair_schedule(len(rows), opponents)])
    return torch.cat(out)


# --------------------------------------------------------------------------- the reward

def load_judge(name: str, device=None, dtype=None, if_taken: Optional[Dict[str, Any]] = None,
               **options) -> PairwiseJudge:
    """Build the pairwise judge registered as ``name`` (:data:`mmrl.rewards.specs.JUDGES`, or a
    scorer registered with a ``compare`` method); ``device``/``dtype`` and the defaults in
    ``if_taken`` go to it when it takes them (and ``options`` does not set them), ``options``
    always.

    Raises:
        ValueError: unknown name. TypeError: an option it does not take; no ``compare``.
    """
    import importlib

    from mmrl.rewards.specs import JUDGES, SCORERS
    if name not in JUDGES and name not in SCORERS:
        JUDGES.get(name)  # raises the registry's unknown-name error (with did-you-mean)
    factory = (JUDGES if name in JUDGES else SCORERS).get(name)
    ok, forwards = list(options), True  # a factory without a target checks its own options
    if hasattr(factory, "target"):  # a lazy registry entry: check against the class
        module, attr, fixed = factory.target
        init = getattr(importlib.import_module(f"mmrl.rewards.{module}"), attr).__init__
        params = inspect.signature(init).parameters
        ok = [p for p in params if p not in ("self", *fixed) and params[p].kind not in
              (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
        forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    bad = [k for k in options if k not in ok]
    if bad and not forwards:
        raise TypeError(f"judge {name!r} does not take {', '.join(map(repr, bad))} (it takes: "
                        f"{', '.join(ok)}); remove it or pick another judge")
    extra = {k: v for k, v in (("device", device), ("dtype", dtype), *(if_taken or {}).items())
             if v is not None and k in ok and k not in options}
    judge = factory(**extra, **options)
    if not callable(getattr(judge, "compare", None)):
        raise TypeError(f"{name!r} is not a pairwise judge (no compare(a, b, prompts)); pick one "
                        f"of {', '.join(JUDGES.names())}")
    return judge


def _take(x, rows: Tensor):
    return x[rows] if isinstance(x, Tensor) else [x[i] for i in rows.tolist()]


class PrefWinRate(Scorer):
    """``w_i = mean_{j in opponents(i)} P(i beats j)``: the win rate of each sample against the
    others of its group, from a pairwise judge. Pref-GRPO, arXiv 2508.20751 (code:
    ``unifiedreward_think.py:_pairwise_win_rate``).

    Every pair of every group is judged in batched ``judge.compare`` calls of at most
    ``pairs_per_call`` queries (not one call per pair). ``groupwise = True``: the training loop
    keeps each group on one rank and passes ``metadata[i]["group_id"]``; called directly
    without it, rows with equal prompts form a group (prompts None with a prompt-free judge:
    the whole batch is one group).

    Output scale: [0, 1], group mean 0.5 (every sample meets the same number of others); 0.5
    for a group of one. Under GRPO's std normalisation (``algo.advantage: grpo``,
    ``adv_eps: 1e-8``) the advantages equal Pref-GRPO's ``use_group`` ones.

    Differs from Pref-GRPO: both orders are judged by default (``both_orders``; Pref-GRPO
    judges each pair once, the lower index shown first: ``both_orders=false`` reproduces it),
    soft probabilities unless ``hard=true``, no rounding unless ``decimals=3``; its judge
    parses sampled text, ``vlm_pair`` reads answer-token probabilities.

    Args:
        judge: a registered pairwise judge (``vlm_pair``, ``bradley_terry``), or (Python) an
            object with ``compare(a, b, prompts)``, ``name`` and ``media``.
        opponents: None: all ``G(G-1)/2`` pairs; k: the circulant schedule where each sample
            meets k others (:func:`pair_schedule`; ``G·k/2`` pairs per group, for large groups).
        both_orders: judge every pair as (i, j) and (j, i) and average (cancels position bias;
            twice the queries).
        hard: threshold each query to {1, 0.5, 0} like Pref-GRPO's parsed answers.
        decimals: round ``w`` like Pref-GRPO (``round(w, 3)``); None: no rounding.
        pairs_per_call: queries per ``judge.compare`` call (bounds the gathered batch).
        device, dtype: passed to the judge when it takes them.
        **options: the judge's own options (``path=``, ``scorer=``, ``batch_size=`` ...).
    """

    name = "pref_winrate"
    groupwise = True
    scale = "win rate in [0, 1] within the group (group mean 0.5)"

    def __init__(self, judge: Union[str, PairwiseJudge], opponents: Optional[int] = None,
                 both_orders: bool = True, hard: bool = False, decimals: Optional[int] = None,
                 pairs_per_call: int = 64, device=None, dtype=None, **options):
        from mmrl.rewards.specs import pref_problems
        built = not isinstance(judge, str)  # a judge object (Python API)
        if built and options:
            raise TypeError(f"{self.name}: a judge object takes no options (got "
                            f"{', '.join(sorted(options))}); build the judge with them, or "
                            f"pass a registered judge's name")
        problems = pref_problems(dict(options, judge=judge, opponents=opponents,
                                      both_orders=both_orders, hard=hard, decimals=decimals,
                                      pairs_per_call=pairs_per_call))
        if problems:
            raise ValueError("; ".join(problems))
        super().__init__(batch_size=pairs_per_call, grad=False)
        # the win rate orders its queries itself (both_orders above, thresholded per query with
        # hard=true): a judge that can also average both orders (vlm_pair) must not, or every
        # pair would be asked four times
        self.judge = judge if built else load_judge(judge, device=device, dtype=dtype,
                                                    if_taken={"both_orders": False}, **options)
        self.media = getattr(self.judge, "media", "image")
        self.uses_prompts = bool(getattr(self.judge, "uses_prompts", True))
        self.opponents, self.both_orders, self.hard = opponents, both_orders, hard
        self.decimals = decimals

    def _check(self, samples):
        if self.media == "video":
            from mmrl.rewards.video import check_videos
            x = check_videos(samples, self.name)
            return x, x.shape[0]
        kind, n = check_images(samples, self.name)
        return (to_rgb_tensor(samples) if kind == "tensor" else list(samples)), n

    def __call__(self, samples, prompts: Optional[Sequence[str]] = None,
                 metadata: Optional[Sequence[Any]] = None) -> Tensor:
        x, n = self._check(samples)
        if prompts is None and not self.uses_prompts:
            prompts = [""] * n
        prompts = check_prompts(prompts, n)
        if metadata is not None and len(metadata) != n:
            raise ValueError(f"{self.name}: got {n} samples but {len(metadata)} metadata rows")
        pairs = batch_pairs(group_index(prompts, metadata), self.opponents)  # [P, 2]
        queries = torch.cat([pairs, pairs.flip(1)]) if self.both_orders else pairs  # [Q, 2]
        probs = self._judge(x, prompts, queries)  # [Q]
        P = len(pairs)
        w = win_rates(pairs, probs[:P], n, probs[P:] if self.both_orders else None, self.hard)
        if self.decimals is not None:
            w = torch.round(w, decimals=self.decimals)
        return w

    def _judge(self, x, prompts: List[str], queries: Tensor) -> Tensor:
        """P(first preferred) for each ``[Q, 2]`` query, in calls of ``batch_size`` queries."""
        out = [torch.zeros(0)]
        with torch.no_grad():
            for s in range(0, len(queries), self.batch_size):
                q = queries[s:s + self.batch_size]
                p = self.judge.compare(_take(x, q[:, 0]), _take(x, q[:, 1]),
                                       [prompts[i] for i in q[:, 0].tolist()])
                p = torch.as_tensor(p).detach().float().cpu().reshape(-1)
                if p.shape[0] != len(q):
                    raise ValueError(f"{self.name}: judge {self.judge.name!r} returned "
                                     f"{p.shape[0]} probabilities for {len(q)} pairs; "
                                     f"expected one P(a preferred) per pair")
                finite = p[torch.isfinite(p)]
                if len(finite) and (finite.min() < 0 or finite.max() > 1):
                    raise ValueError(f"{self.name}: judge {self.judge.name!r} returned values "
                                     f"in [{finite.min():.3g}, {finite.max():.3g}]; expected "
                                     f"probabilities in [0, 1]")
                out.append(p)
        return torch.cat(out)


class BradleyTerryJudge:
    """``P(a ≻ b) = σ((s(a) − s(b)) / temperature)``: any registered pointwise scorer ``s`` as a
    pairwise judge (the Bradley–Terry model of its scores).

    With ``pref_winrate:hard=true`` the win rate is the fraction of the group the sample
    out-scores (ties 0.5): a rank reward that ignores the scorer's scale, like Flow-Factory's
    groupwise rank example (``guidance/rewards.md``). ``bradley_terry:scorer=brightness``
    prefers the brighter image (the tests' rule judge). Each query scores both sides (one
    scorer call per ``compare``); media and prompt use follow the scorer.

    Args:
        scorer: a registered pointwise scorer (image or video).
        temperature: the logistic scale, > 0 (small: nearly hard decisions).
        device, dtype: passed to the scorer when it takes them.
        **options: the scorer's own options.
    """

    name = "bradley_terry"

    def __init__(self, scorer: str, temperature: float = 1.0, device=None, dtype=None,
                 **options):
        from mmrl.rewards.scorers import accepted_options, load
        from mmrl.rewards.specs import GROUPWISE_SCORERS
        if scorer in GROUPWISE_SCORERS:
            raise ValueError(f"bradley_terry: scorer={scorer!r} is groupwise; pick a pointwise "
                             f"scorer (pickscore, brightness, ...)")
        if isinstance(temperature, bool) or not float(temperature) > 0:
            raise ValueError(f"bradley_terry: temperature={temperature!r}; expected a positive "
                             f"number")
        ok = accepted_options(scorer)
        extra = {k: v for k, v in (("device", device), ("dtype", dtype))
                 if v is not None and k in ok}
        self.inner = load(scorer, **extra, **options)
        self.temperature = float(temperature)
        self.media = getattr(self.inner, "media", "image")
        self.uses_prompts = getattr(self.inner, "uses_prompts", True)

    def compare(self, a, b, prompts: List[str]) -> Tensor:
        both = torch.cat([a, b]) if isinstance(a, Tensor) else list(a) + list(b)
        s = self.inner(both, list(prompts) * 2).float()  # [2n]: a's scores, then b's
        n = len(prompts)
        return torch.sigmoid((s[:n] - s[n:]) / self.temperature)
