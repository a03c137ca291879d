"""The toy job's config section and its registration, without torch: ``mmrl config validate``
reads a toy config without importing the policy. The job's ``run`` is named
(``"mmrl.demo.toy:run"``) and imported when the job starts, with the policy, prompts and
reward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from mmrl.config.core import cfg
from mmrl.config.jobs import Job, register_job
from mmrl.train.guidance_options import (guidance_exemplar_pool_field, guidance_exemplars_field,
                                          guidance_field, guidance_ratios_field,
                                          guidance_start_field, guide_problems, ratio_problems)

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
                      "hard task where groups never succeed). Several, comma-separated "
                      "(digits,exact), are several reward columns (algo.multi_reward, "
                      "algo.reward_weights, algo.reward_weighting).")
    guidance: str = guidance_field("The toy's hints are prefixes of the answer, in a hint "
                                   "segment of the prompt.")
    guidance_ratios: List[float] = guidance_ratios_field()
    guidance_start: int = guidance_start_field()
    guidance_exemplars: int = guidance_exemplars_field()
    guidance_exemplar_pool: str = guidance_exemplar_pool_field()
    hint_slot: bool = cfg(False, "Reserve a hint segment of `length` tokens in every prompt "
                          "(empty when unhinted); on whenever guidance is not none. Set it for "
                          "a guidance-free baseline with the same model.")

    def problems(self) -> List[str]:
        out = ratio_problems(self.guidance_ratios)
        names = self.reward.split(",")
        if len(set(names)) != len(names) or not set(names) <= {"digits", "exact"}:
            out.append(f"reward: got {self.reward!r}; expected digits, exact, or both "
                       f"comma-separated (digits,exact), each once")
        if self.d_model % self.heads:
            out.append(f"d_model: got {self.d_model}; expected a multiple of heads={self.heads}")
        return out


def check(algo, train, c: ToyConfig) -> List[str]:
    """A step draws ``prompts_per_step`` distinct prompts from the ``num_prompts`` set; Guide
    needs the rollout correction."""
    out = guide_problems("toy", c.guidance, algo) + binary_reward_problems(algo, c.reward)
    if c.num_prompts < train.prompts_per_step:
        out.append(f"toy.num_prompts: got {c.num_prompts}, fewer than train.prompts_per_step="
                   f"{train.prompts_per_step} (a step draws that many distinct prompts); raise "
                   f"num_prompts or lower prompts_per_step")
    step = algo.resolve().step_advantage
    if step not in (None, "none") and "," in c.reward:
        out.append(f"toy.reward: got {c.reward!r} with algo.step_advantage={step!r}, whose step "
                   f"rewards come from one reward; pick toy.reward=digits (dense steps) or exact")
    return out


def binary_reward_problems(algo, reward: str) -> List[str]:
    """An objective that reads rewards r ∈ {0, 1} (``drpo``) skips every row whose reward is
    neither, so the dense ``digits`` reward would train nothing: it needs ``exact``."""
    spec = algo.resolve()
    if spec.binary_rewards and reward.split(",") != ["exact"]:
        return [f"toy.reward: got {reward!r} with algo.objective={spec.objective!r}, which reads "
                f"binary rewards (1 correct, 0 wrong) and skips every other row; the fraction of "
                f"right digits is not binary: set toy.reward=exact"]
    return []


# run by name: imported when the job starts (torch, the policy); no import cycle with toy.py
register_job(Job("toy", ToyConfig, "mmrl.demo.toy:run", "a tiny transformer learns to "
                 "reverse/sort digits (pure torch; the demo)", check=check,
                 algo_defaults=lambda c: {"max_len": c.length + 1},  # answer digits + <eos>
                 steps=True))  # one answer digit = one step (mmrl.demo.toy.toy_step_fn)
