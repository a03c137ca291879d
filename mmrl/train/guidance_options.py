"""The config fields and checks of the guidance round augmenters (:mod:`mmrl.train.guidance`),
declared once for every job section that offers them (the toy job, the video job). Torch-free:
``mmrl config validate`` reads it."""
from __future__ import annotations

from typing import List

from mmrl.config.core import cfg

GUIDANCE_NAMES = ["none", "ghpo", "keye", "scaf", "guide", "expo", "xrpo_seed"]


def guidance_field(hints: str):
    """``<section>.guidance``: which augmenter; ``hints`` says where the job's hints come from."""
    return cfg("none", "Round augmenter for groups whose every sample fails (accuracy <= 0; "
               "mmrl.train.guidance): none, ghpo (solution prefix), keye / scaf (hint levels), "
               "guide / expo (hinted samples trained for the plain prompt; guide needs "
               "algo.off_policy_shaping: percentile, its authors' correction, or "
               "algo.rollout_is, e.g. token_truncate), xrpo_seed (solved exemplars of other "
               "records in the prompt, trained for the plain prompt; unconfirmed). " + hints,
               choices=GUIDANCE_NAMES,
               source="GHPO 2507.10628; Scaf-GRPO 2510.19807; Keye-VL 1.5 2509.01563; Guide "
               "2506.13923; ExPO 2507.02834; XRPO 2510.06672 (unconfirmed)")


def guidance_exemplars_field():
    """``<section>.guidance_exemplars``: XRPO seeding's K."""
    return cfg(2, "guidance=xrpo_seed: exemplars shown per re-rolled prompt (the most similar "
               "records of the corpus; the toy's hint segment holds one).", minimum=1,
               source="XRPO 2510.06672 (K = 2 per its public reviews; unconfirmed)")


def guidance_exemplar_pool_field():
    """``<section>.guidance_exemplar_pool``: where XRPO seeding's exemplars come from."""
    return cfg("solved", "guidance=xrpo_seed: the exemplar corpus: solved (records the run has "
               "solved without help, XRPO's verified successes) or dataset (every record drawn "
               "so far; its reference solution is shown).", choices=["solved", "dataset"],
               source="XRPO 2510.06672 (unconfirmed)")


def guidance_ratios_field():
    """``<section>.guidance_ratios``: GHPO's prefix ratios."""
    return cfg(doc="GHPO's solution-prefix ratios, tried in order while a group stays all-fail.",
               default_factory=lambda: [0.25, 0.5, 0.75], source="hkgc-1/GHPO ghpo_trainer.py")


def guidance_start_field():
    """``<section>.guidance_start``: Scaf-GRPO's exemption."""
    return cfg(0, "No guidance before this step (Scaf-GRPO's exemption: 15 % of the steps in "
               "the paper, 50 in its script).", minimum=0, source="Scaf-GRPO 2510.19807 §3.2")


def ratio_problems(ratios: List[float]) -> List[str]:
    """GHPO's prefix ratios must be a non-empty list in (0, 1]."""
    if ratios and all(0.0 < float(w) <= 1.0 for w in ratios):
        return []
    return [f"guidance_ratios: got {ratios}; expected a non-empty list of values in (0, 1] "
            f"(GHPO: [0.25, 0.5, 0.75])"]


def guide_problems(section: str, guidance: str, algo) -> List[str]:
    """``guidance: guide`` trains hinted rollouts for the plain prompt and needs an off-policy
    correction: Guide's shaping (``algo.off_policy_shaping``) or the rollout correction
    (``algo.rollout_is``); the shaping acts on the rows only ``guide`` flags."""
    spec = algo.resolve()
    shaping = spec.off_policy_shaping not in (None, "none")
    if guidance == "guide" and spec.rollout_is == "none" and not shaping:
        return [f"{section}.guidance=guide corrects the hinted rollouts with the sampler's "
                f"log-probs, got algo.rollout_is=none and algo.off_policy_shaping=none; set "
                f"algo.off_policy_shaping=percentile (Guide's) or algo.rollout_is=token_truncate"]
    if shaping and guidance != "guide":
        return [f"algo.off_policy_shaping={spec.off_policy_shaping} shapes the hinted rows that "
                f"{section}.guidance=guide flags, got {section}.guidance={guidance} (no row is "
                f"flagged: it would do nothing); set {section}.guidance=guide or "
                f"algo.off_policy_shaping=none"]
    return []
