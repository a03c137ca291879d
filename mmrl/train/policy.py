"""The policy contract: what the loop, the rounds and the runner need from a model, a language
model or a flow-matching model alike.

A policy subclasses :class:`GroupPolicy` (or provides the same methods) and *declares* what it
can do beyond the required methods in ``capabilities`` (a :class:`Capabilities`); the training
code reads the declaration and never probes for methods. :func:`check_policy` verifies, before a
run starts, that every declared capability has its methods and that the run's algorithm gets
what it needs (e.g. ``token_weighting: tw`` needs ``token_weights``), and names what is missing.

Required::

    rollout(prompts, metadata, group_size, generator) -> Rollout    (under torch.no_grad)
        group_size: an int, or one count per prompt
    logp(rollout, rows, t0, t1) -> [len(rows), t1 - t0]            with gradient
    parameters()                                                   the trainable parameters
    state_dict() / load_state_dict(sd)                             the trainable state

Needed by ``algo.beta > 0`` unless the policy declares ``own_kl``::

    ref_logp(rollout, rows, t0, t1) -> [len(rows), t1 - t0]        the reference policy's

Optional, each declared by a :class:`Capabilities` flag (the method names are in ``HOOKS``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from mmrl.train.rollout import Rollout

__all__ = ["Capabilities", "GroupPolicy", "HOOKS", "StepTerms", "capabilities_of",
           "check_policy"]


@dataclass(frozen=True)
class Capabilities:
    """What a policy can do beyond the required methods. Every flag defaults to False.

    Attributes:
        token_weights: ``token_weights(rollout) -> [B, T]`` weights of each token in the loss
            (``algo.token_weighting: tw``, TW-GRPO).
        own_kl: ``logp_and_kl(rollout, rows, t0, t1) -> (logp, kl)``, each
            ``[len(rows), t1 - t0]`` with gradient: the policy's own per-step KL to the
            reference (a closed form, e.g. the Gaussian KL of a flow-matching step), used when
            ``beta > 0`` instead of ``ref_logp`` and the preset's estimator.
        row_advantages: ``advantages(rollout, rewards) -> [R]`` (or ``[R, T]`` token
            advantages): the advantages of the training rows when they are not the reward rows
            (tree edges, G²RPO branches). The policy
            handles invalid (NaN) rewards itself, e.g. by giving their rows advantage 0. Implies
            whole groups per rank.
        whole_groups: a group's samples must stay on one rank (e.g. they share one initial
            noise).
        concat_rollouts: ``concat_rollouts(parts) -> Rollout`` joins rollouts whose ``data``
            needs more than :func:`mmrl.train.rollout.concat_rollouts` (left-padded prompts).
        chunked_rollout: ``rollout_chunks(prompts, metadata, counts, generator, bounds) ->
            iterator of Rollout``: one rollout round sampled in chunks (``bounds``: ``[(a, b)]``
            prompt runs), each chunk's rollout yielded as soon as it is sampled, its group ids
            local to the chunk (0..b-a-1) as ``rollout`` gives them; the policy's per-round state
            (a rollout counter, a periodic evaluation) advances once per round, not per chunk
            (``train.reward_chunks``, :mod:`mmrl.train.async_reward`). Without it each chunk is
            one ``rollout`` call.
        export: ``export_pretrained(path, merge_lora=False, state_dict=None) -> str`` writes the
            model in its library's format (``train.export``).
        fsdp: ``apply_fsdp() -> nn.Module`` shards the model with FSDP2 and returns the root;
            without it ``policy.model`` is sharded whole.
        extra_state: ``extra_state() -> dict`` / ``load_extra_state(dict)``: state that is not
            weights (e.g. a rollout counter), JSON-able python scalars, saved in the
            checkpoint's state as ``policy_extra`` and handed back on resume
            (:mod:`mmrl.train.state`; ``state_dict`` then holds weights only).
        greedy: ``greedy_rollout(prompts, metadata, generator) -> Rollout``: one greedy (argmax)
            completion per prompt, group ids 0..P-1 (a prompt the policy cannot use may have no
            row), called under ``torch.no_grad``; its reward is the baseline of advantage
            estimators flagged ``needs_baseline`` (ReMax).
        rollout_logp: its rollouts carry ``Rollout.rollout_logp``, the sampler's log-probs of
            what it sampled, under the distribution ``logp`` scores (``algo.rollout_is``).
        entropy: ``logp_and_entropy(rollout, rows, t0, t1) -> (logp, entropy)``, each
            ``[len(rows), t1 - t0]`` with gradient: the sampled tokens' log-probs and the
            per-position entropy of the same (temperature-scaled) distribution, from one forward
            (``algo.entropy_coef > 0``, ``algo.top_entropy_quantile < 1``).
        preference: ``pair_rollout(records) -> (Rollout, chosen_rows, rejected_rows)`` and
            ``pair_scores(rollout, chosen_rows, rejected_rows, generator, with_ref) ->
            PrefScores``: the scores preference losses (DPO family, Diffusion-DPO) train on
            (:mod:`mmrl.train.preference`).
        step_terms: ``logp_and_step_terms(rollout, rows, t0, t1, with_kl) -> (logp, StepTerms)``
            with gradient: a Gaussian denoising step's std, mean shift and σ gap beside the
            log-probs, for ratio level ``ratio_norm`` and ``step_reweight`` (GRPO-Guard); the KL
            too when ``with_kl`` (``own_kl`` policies, beta > 0).
        matching: the policy trains with a weighted matching loss
            (:mod:`mmrl.algo.matching`, e.g. DiffusionNFT, AWM) instead of re-scored log-probs:
            ``match_spec() -> MatchSpec``, ``match_grid_size() -> int`` (the T its times index),
            ``match_terms(rollout, rows, times [b, K], seeds [b, K]) -> MatchTerms`` and
            ``match_after_update(optimizer_steps)`` (the old model's soft update); the runner
            then trains with :func:`mmrl.train.matching.train_matching`.
        retarget: ``retarget(rollout, prompts, metadata) -> Rollout``: the same completions,
            to be scored (``logp``, ``ref_logp``, token weights) under other prompts, one per
            row; ``rollout_logp`` keeps the sampler's log-probs under the prompts they were
            sampled with (hint-guided rollouts trained for the plain prompt: Guide, ExPO,
            :mod:`mmrl.train.guidance`).
        sft: ``target_rollout(examples) -> Rollout``: one row per example (a job's prompt and
            target text), the target's tokens as the response, scored by ``logp`` for the SFT
            stage (:mod:`mmrl.train.sft_stage`).
        continuations: ``continue_from(rollout, rows, keep, m, generator) -> Rollout``: ``m``
            sampled completions of prompt ⊕ the first ``keep[i]`` response tokens of row
            ``rows[i]`` (``rows``, ``keep``: ``[N]`` long), N·m rows in pair order, group id i
            for pair i, each sample the whole response (kept prefix + continuation) with its
            row's prompt and metadata, called under ``torch.no_grad``: SPO's Monte-Carlo values
            (``algo.step_advantage: spo_chain``, :mod:`mmrl.train.steps`).
        why_not: ``{capability: reason}`` for capabilities a policy lacks on purpose; the
            reason is part of :func:`check_policy`'s error when an algorithm needs one.
    """

    token_weights: bool = False
    own_kl: bool = False
    row_advantages: bool = False
    whole_groups: bool = False
    concat_rollouts: bool = False
    chunked_rollout: bool = False
    export: bool = False
    fsdp: bool = False
    extra_state: bool = False
    greedy: bool = False
    rollout_logp: bool = False
    entropy: bool = False
    preference: bool = False
    step_terms: bool = False
    matching: bool = False
    retarget: bool = False
    sft: bool = False
    continuations: bool = False
    why_not: Mapping[str, str] = field(default_factory=dict, hash=False)

    def declared(self) -> List[str]:
        """The names of the flags that are on."""
        return [f.name for f in fields(self) if f.name in HOOKS and getattr(self, f.name)]

    def missing(self, capability: str, policy: str, needed_by: str) -> str:
        """The error message for ``capability`` that ``needed_by`` needs and ``policy`` lacks
        (with the policy's reason when it gives one)."""
        reason = self.why_not.get(capability)
        return (f"{needed_by} needs Capabilities({capability}=True), which {policy} does not "
                f"declare" + (f": {reason}" if reason else ""))


HOOKS: Dict[str, Sequence[str]] = {
    "token_weights": ("token_weights",),
    "own_kl": ("logp_and_kl",),
    "row_advantages": ("advantages",),
    "whole_groups": (),
    "concat_rollouts": ("concat_rollouts",),
    "chunked_rollout": ("rollout_chunks",),
    "export": ("export_pretrained",),
    "fsdp": ("apply_fsdp",),
    "extra_state": ("extra_state", "load_extra_state"),
    "greedy": ("greedy_rollout",),
    "rollout_logp": (),
    "entropy": ("logp_and_entropy",),
    "preference": ("pair_rollout", "pair_scores"),
    "step_terms": ("logp_and_step_terms",),
    "matching": ("match_spec", "match_grid_size", "match_terms", "match_after_update"),
    "retarget": ("retarget",),
    "sft": ("target_rollout",),
    "continuations": ("continue_from",),
}
"""capability -> the methods a policy declaring it must have."""

REQUIRED = ("rollout", "logp", "parameters", "state_dict", "load_state_dict")


@dataclass
class StepTerms:
    """What ``logp_and_step_terms`` gives beside the log-probs, each ``[len(rows), t1 − t0]``
    (0 where the mask is False): the loss's keyword arguments of the same names
    (:meth:`mmrl.algo.losses.PolicyLoss.__call__`).

    Attributes:
        step_std: the step's transition std s_j (detached).
        mean_shift: mean_d (μ_θ − μ_old)², μ_old the mean stored at sampling (with gradient).
        step_gap: σ_j − σ_{j+1} > 0 (detached).
        kl: the policy's own KL to the reference (with gradient), when asked for; else None.
    """

    step_std: torch.Tensor
    mean_shift: torch.Tensor
    step_gap: torch.Tensor
    kl: Optional[torch.Tensor] = None

    def loss_kwargs(self, like: torch.Tensor) -> dict:
        """The loss's keyword arguments (``step_std``, ``mean_shift``, ``step_gap``) on
        ``like``'s dtype and device."""
        return {k: getattr(self, k).to(like) for k in ("step_std", "mean_shift", "step_gap")}


class GroupPolicy:
    """Base class of a policy (see the module docstring). Subclasses implement the required
    methods and set ``capabilities`` (a class attribute, or an instance attribute when it
    depends on the configuration)."""

    capabilities: Capabilities = Capabilities()

    def rollout(self, prompts: Sequence[Any], metadata: Sequence[Dict[str, Any]],
                group_size, generator: torch.Generator) -> Rollout:
        """Sample ``group_size`` completions per prompt (called under ``torch.no_grad``)."""
        raise NotImplementedError

    def logp(self, rollout: Rollout, rows: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """``[len(rows), t1 - t0]`` log-probs of the stored completions, with gradient."""
        raise NotImplementedError

    def ref_logp(self, rollout: Rollout, rows: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """The same under the reference policy (called when ``beta > 0`` without ``own_kl``)."""
        raise NotImplementedError(f"{type(self).__name__} has no reference policy; set "
                                  f"algo.beta=0")

    def parameters(self):
        """The parameters (trainable ones have ``requires_grad``)."""
        return self.model.parameters()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The trainable state written to checkpoints (default: ``self.model``'s)."""
        return self.model.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


def capabilities_of(policy) -> Capabilities:
    """The policy's declared capabilities (none for an object that declares nothing)."""
    caps = getattr(policy, "capabilities", None)
    if caps is None:
        return Capabilities()
    if not isinstance(caps, Capabilities):
        raise TypeError(f"{type(policy).__name__}.capabilities is a {type(caps).__name__}; "
                        f"expected mmrl.train.policy.Capabilities(...)")
    return caps


def check_policy(policy, spec: Optional[Any] = None) -> Capabilities:
    """The policy's capabilities, after checking that it has the required methods, the methods
    of every declared capability, and what the algorithm ``spec`` (a resolved
    :class:`mmrl.algo.presets.AlgoSpec`) needs from it.

    Raises:
        TypeError: a missing method or a capability the algorithm needs, named.
    """
    caps = capabilities_of(policy)
    name = type(policy).__name__
    missing = [m for m in REQUIRED if not callable(getattr(policy, m, None))]
    for cap in caps.declared():
        missing += [m for m in HOOKS[cap] if not callable(getattr(policy, m, None))]
    if missing:
        raise TypeError(f"policy {name} lacks {', '.join(missing)} (see mmrl.train.policy: "
                        f"required methods, and those of its declared capabilities "
                        f"{caps.declared()})")
    if spec is not None:
        _check_algo(policy, caps, name, spec)
        _check_entropy(caps, name, spec)
    return caps


def _check_algo(policy, caps: Capabilities, name: str, spec) -> None:
    """What the algorithm needs from the policy beyond the entropy (token weights, a
    reference, a greedy completion, the sampler's log-probs)."""
    if spec.needs_token_weights and not caps.token_weights:
        raise TypeError(f"algo.token_weighting=tw needs token weights from the policy, and "
                        f"{name} does not declare Capabilities(token_weights=True); use "
                        f"token_weighting=none")
    if spec.needs_ref and not caps.own_kl and not callable(getattr(policy, "ref_logp", None)):
        raise TypeError(f"algo.beta > 0 needs {name}.ref_logp (or own_kl); set algo.beta=0")
    if spec.needs_baseline and not caps.greedy:
        raise TypeError(f"algo.advantage={spec.advantage!r} needs a greedy completion per "
                        f"prompt as its baseline, and {name} does not declare "
                        f"Capabilities(greedy=True) with greedy_rollout(prompts, metadata, "
                        f"generator); pick another advantage (e.g. rloo) or implement it")
    if spec.needs_step_terms and not caps.step_terms:
        raise TypeError(caps.missing("step_terms", name, "algo.ratio_level=ratio_norm / "
                                     "algo.step_reweight") + "; these read a Gaussian "
                        "denoising step (the diffusion job): use ratio_level=token and "
                        "step_reweight=false")
    if spec.needs_rollout_logp and not caps.rollout_logp:
        which = [f"algo.{k}={v!r}" for k, v in (("rollout_is", spec.rollout_is),
                                                  ("off_policy_shaping", spec.off_policy_shaping))
                 if v not in (None, "none")]
        raise TypeError(f"{' and '.join(which)} weights by the sampler's log-probs, and {name} "
                        f"does not report them (it does not declare "
                        f"Capabilities(rollout_logp=True)); set "
                        f"{'them' if len(which) > 1 else 'it'} to none, or set "
                        f"Rollout.rollout_logp in {name}.rollout and declare it")


def _check_entropy(caps: Capabilities, name: str, spec) -> None:
    if not spec.needs_entropy:
        return
    if not caps.entropy:
        raise TypeError(caps.missing("entropy", name, "algo.entropy_coef > 0 / "
                                     "algo.top_entropy_quantile < 1")
                        + "; set algo.entropy_coef=0 and algo.top_entropy_quantile=1")
    if spec.needs_step_terms:
        raise TypeError("the entropy options with step terms (ratio_norm / step_reweight) would "
                        "need logp, entropy and the step terms from one forward, which the "
                        "policy contract has no method for; drop one")
    if caps.own_kl and spec.needs_ref:
        raise TypeError(f"{name} declares own_kl and entropy, and beta > 0 with the entropy "
                        f"options would need logp, its KL and the entropy from one forward, "
                        f"which the policy contract has no method for; drop beta or the "
                        f"entropy options")
