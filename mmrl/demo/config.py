"""The toy job's config section and its registration, without torch: ``mmrl config validate``
reads a toy config without importing the policy. The job's ``run`` is named
(``"mmrl.demo.toy:run"``) and imported when the job starts, with the policy, prompts and
reward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from mmrl.config.core import cfg
from mmrl.config.jobs import Job, register_job

TASKS = {"reverse": lambda d: d[::-1], "sort": sorted, "copy": lambda d: list(d)}
"""Task name -> the answer to a prompt's digits."""


@dataclass
class ToyConfig:
    """The toy digit-string task and its tiny policy."""

    task: str = cfg("reverse", "What the answer is: reverse, sort or copy of the prompt digits.",
                    choices=sorted(TASKS))
    digits: int = cfg(5, "Digits 0..digits-1 appear in prompts.", minimum=2, maximum=10)
    length: int = cfg(4, "Prompt length in digits.", minimum=1, maximum=16)
    num_prompts: int = cfg(256, "Size of the (fixed, seeded) prompt set.", minimum=1)
    d_model: int = cfg(64, "Transformer width.", minimum=8)
    layers: int = cfg(2, "Transformer layers.", minimum=1)
    heads: int = cfg(4, "Attention heads.", minimum=1)
    temperature: float = cfg(1.0, "Sampling temperature for rollouts.", minimum=1e-3)
    reward: str = cfg("digits", "digits: the fraction of answer positions right (dense); "
                      "exact: 1 for the whole answer right, else 0 (with a long `length`, the "
                      "hard task where groups never succeed).", choices=["digits", "exact"])
    guidance: str = cfg("none", "Round augmenter for all-fail groups (mmrl.train.guidance): "
                        "none, ghpo, keye, scaf, guide (needs algo.rollout_is, e.g. "
                        "token_truncate) or expo; the hints are prefixes of the answer, in a "
                        "hint segment of the prompt.",
                        choices=["none", "ghpo", "keye", "scaf", "guide", "expo"],
                        source="GHPO 2507.10628; Scaf-GRPO 2510.19807; Keye-VL 1.5 "
                        "2509.01563; Guide 2506.13923; ExPO 2507.02834")
    guidance_ratios: List[float] = cfg(doc="GHPO's solution-prefix ratios, tried in order "
                                       "while a group stays all-fail.",
                                       default_factory=lambda: [0.25, 0.5, 0.75],
                                       source="hkgc-1/GHPO ghpo_trainer.py")
    guidance_start: int = cfg(0, "No guidance before this step (Scaf-GRPO's exemption: 15 % "
                              "of the steps in the paper).", minimum=0,
                              source="Scaf-GRPO 2510.19807 §3.2")
    hint_slot: bool = cfg(False, "Reserve a hint segment of `length` tokens in every prompt "
                          "(empty when unhinted); on whenever guidance is not none. Set it for "
                          "a guidance-free baseline with the same model.")

    def problems(self) -> List[str]:
        out = ratio_problems(self.guidance_ratios)
        if self.d_model % self.heads:
            out.append(f"d_model: got {self.d_model}; expected a multiple of heads={self.heads}")
        return out


def ratio_problems(ratios: List[float]) -> List[str]:
    """GHPO's prefix ratios must be in (0, 1]."""
    if ratios and all(0.0 < float(w) <= 1.0 for w in ratios):
        return []
    return [f"guidance_ratios: got {ratios}; expected a non-empty list of values in (0, 1] "
            f"(GHPO: [0.25, 0.5, 0.75])"]


def check(algo, train, c: ToyConfig) -> List[str]:
    """A step draws ``prompts_per_step`` distinct prompts from the ``num_prompts`` set; Guide
    needs the rollout correction."""
    out = guide_problems("toy", c.guidance, algo) + binary_reward_problems(algo, c.reward)
    if c.num_prompts < train.prompts_per_step:
        out.append(f"toy.num_prompts: got {c.num_prompts}, fewer than train.prompts_per_step="
                   f"{train.prompts_per_step} (a step draws that many distinct prompts); raise "
                   f"num_prompts or lower prompts_per_step")
    return out


def binary_reward_problems(algo, reward: str) -> List[str]:
    """An objective that reads rewards r ∈ {0, 1} (``drpo``) skips every row whose reward is
    neither, so the dense ``digits`` reward would train nothing: it needs ``exact``."""
    spec = algo.resolve()
    if spec.binary_rewards and reward != "exact":
        return [f"toy.reward: got {reward!r} with algo.objective={spec.objective!r}, which reads "
                f"binary rewards (1 correct, 0 wrong) and skips every other row; the fraction of "
                f"right digits is not binary: set toy.reward=exact"]
    return []


def guide_problems(section: str, guidance: str, algo) -> List[str]:
    """``guidance: guide`` trains hinted rollouts for the plain prompt; its off-policy correction
    is the rollout correction from the sampler's log-probs, so ``algo.rollout_is`` must be on."""
    if guidance == "guide" and algo.resolve().rollout_is == "none":
        return [f"{section}.guidance=guide corrects the hinted rollouts with the sampler's "
                f"log-probs (algo.rollout_is), got algo.rollout_is=none; set "
                f"algo.rollout_is=token_truncate"]
    return []


# run by name: imported when the job starts (torch, the policy); no import cycle with toy.py
register_job(Job("toy", ToyConfig, "mmrl.demo.toy:run", "a tiny transformer learns to "
                 "reverse/sort digits (pure torch; the demo)", check=check,
                 algo_defaults=lambda c: {"max_len": c.length + 1}))  # answer digits + <eos>
