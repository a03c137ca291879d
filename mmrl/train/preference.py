"""Preference optimization on the shared contracts: what a policy gives the preference losses.

A preference step trains on P pairs (chosen, rejected) of completions of the same prompt. The
pairs come from a file (``pref.pairs_file``) or are built online from a rollout's groups (the
best and the worst sample of each group by the run's reward, or by a verifier in VerIPO's loop).
A policy that declares ``Capabilities(preference=True)`` provides:

    pair_rollout(records) -> (Rollout, chosen_rows, rejected_rows)
        the completions of pair records (a file's), ready to be scored; records whose inputs
        are unusable are left out and counted in ``Rollout.skipped``
    pair_scores(rollout, chosen_rows, rejected_rows, generator, with_ref) -> PrefScores
        with gradient on the policy's side

For a language model the scores are the completion tokens' log-probs (``T`` = tokens). For a
flow-matching model they are Diffusion-DPO's pseudo log-likelihoods −½·e, e the mean squared
error of the predicted velocity on a forward-noised copy of the sample (``T`` = 1, one noise
level and one noise shared by the two samples of a pair): DPO's loss on these scores is
Diffusion-DPO's (arXiv 2311.12908; flow_grpo's flow-matching form).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["PrefScores"]


@dataclass
class PrefScores:
    """Scores of P pairs under the policy (with gradient) and the reference (without).

    Attributes:
        chosen_logp, rejected_logp: ``[P, T]`` float, with gradient.
        chosen_mask, rejected_mask: ``[P, T]`` bool, True where a token / step counts.
        chosen_ref, rejected_ref: ``[P, T]`` the reference policy's, detached; None when the
            step did not ask for them (``with_ref=False``: reference-free losses).
    """

    chosen_logp: torch.Tensor
    rejected_logp: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_mask: torch.Tensor
    chosen_ref: Optional[torch.Tensor] = None
    rejected_ref: Optional[torch.Tensor] = None
