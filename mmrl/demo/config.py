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

    def problems(self) -> List[str]:
        if self.d_model % self.heads:
            return [f"d_model: got {self.d_model}; expected a multiple of heads={self.heads}"]
        return []


def check(algo, train, c: ToyConfig) -> List[str]:
    """A step draws ``prompts_per_step`` distinct prompts from the ``num_prompts`` set."""
    if c.num_prompts < train.prompts_per_step:
        return [f"toy.num_prompts: got {c.num_prompts}, fewer than train.prompts_per_step="
                f"{train.prompts_per_step} (a step draws that many distinct prompts); raise "
                f"num_prompts or lower prompts_per_step"]
    return []


# run by name: imported when the job starts (torch, the policy); no import cycle with toy.py
register_job(Job("toy", ToyConfig, "mmrl.demo.toy:run", "a tiny transformer learns to "
                 "reverse/sort digits (pure torch; the demo)", check=check,
                 algo_defaults=lambda c: {"max_len": c.length + 1}))  # answer digits + <eos>
