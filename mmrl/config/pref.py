"""The run config's ``pref`` section: preference optimization (DPO family) and the VerIPO loop.

``pref.mode`` picks what a step is: ``off`` (every step a GRPO step, as without the section),
``dpo`` (every step a preference step) or ``veripo`` (cycles of ``grpo_steps`` GRPO steps then
``dpo_steps`` preference steps). A preference step trains the preset's loss
(:class:`mmrl.algo.preference.PreferenceLoss`) on pairs built ``online`` from the step's groups
(best and worst sample of each group by the run's reward, or by ``verifier``) or read from
``pairs_file``. ``docs/preference.md`` describes the modes and what is confirmed from VerIPO's
paper.

Every field is declared once with :func:`mmrl.fields.cfg`: the preset's overrides (``beta``,
``label_smoothing``, ...) are derived from :class:`mmrl.algo.preference.PrefSpec`, as the
``algo`` section's are from ``AlgoSpec``, and checked by
:func:`mmrl.algo.preference.pref_problems` alone; :meth:`PrefConfig.problems` checks the
combinations (all problems at once). Importing this module loads no torch.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import field, fields
from typing import Any, Dict, List, Optional

from mmrl.algo.preference import PREF_PRESETS, PrefSpec, pref_problems, resolve_pref
from mmrl.config.core import cfg, show

PREF_MODES = ("off", "dpo", "veripo")
"""``pref.mode``'s choices."""

PAIR_SOURCES = ("online", "file")
"""``pref.pairs``'s choices."""


_OWN = [
    ("mode", str, cfg("off", "off: every step is a GRPO step; dpo: every step is a preference "
                      "step; veripo: cycles of pref.grpo_steps GRPO steps then pref.dpo_steps "
                      "preference steps (the stage is a function of the step index, so resume "
                      "is exact).", choices=list(PREF_MODES),
                      source="DPO arXiv 2305.18290; VerIPO arXiv 2505.19000 (loop from the "
                      "abstract; cycle lengths unconfirmed)")),
    ("preset", str, cfg("dpo", "Preference loss preset (`mmrl algos`, table 'preference "
                        "losses'); the fields below override it (null keeps the preset's).",
                        choices=lambda: sorted(PREF_PRESETS), source="mmrl.algo.preference")),
]
_SOURCES = [
    ("pairs", str, cfg("online", "Where a preference step's pairs come from: online (per group "
                       "of the step's rollout, its best and worst sample by the run's reward or "
                       "pref.verifier; groups whose scores are all equal give no pair) or file "
                       "(pref.pairs_file).", choices=list(PAIR_SOURCES))),
    ("pairs_file", Optional[str], cfg(None, "JSONL file of pair records, one per line: the "
                                      "job's prompt fields plus chosen and rejected (the toy "
                                      "job: {prompt: [digits], chosen: [digits], rejected: "
                                      "[digits]}); a step reads train.prompts_per_step of "
                                      "them, in shuffled epochs drawn from train.seed and the "
                                      "step index. Only with pairs=file.")),
    ("grpo_steps", Optional[int], cfg(None, "veripo: GRPO steps per cycle (only with "
                                      "mode=veripo, where it is required).", minimum=1,
                                      source="unconfirmed (VerIPO's abstract gives no "
                                      "schedule)")),
    ("dpo_steps", Optional[int], cfg(None, "veripo: preference steps per cycle, after the GRPO "
                                     "steps (only with mode=veripo, where it is required).",
                                     minimum=1, source="unconfirmed (VerIPO's abstract gives "
                                     "no schedule)")),
    ("verifier", Optional[str], cfg(None, "Reward spec NAME[:key=value...][,NAME...] that "
                                    "ranks a group's samples for online pairs (VerIPO's "
                                    "verifier); null = the run's reward. Names: the diffusion "
                                    "job's scorers (as diffusion.reward), the video job's "
                                    "rewards (as video.rewards, e.g. accuracy:answer_source="
                                    "tag_or_text), the toy job's digits (its reward) and exact "
                                    "(1 for a right answer).",
                                    source="VerIPO arXiv 2505.19000 (a rollout-aware "
                                    "verifier; its criteria unconfirmed)")),
    ("eval_pairs", Optional[str], cfg(None, "Held-out JSONL pair file (the pairs_file "
                                      "format): the preference accuracy of the implicit reward "
                                      "beta * (log pi - log pi_ref) on it is logged at the "
                                      "start and the end of the run (any mode; needs the "
                                      "policy's reference).")),
]


def _override(name: str, tp, f) -> tuple:
    """A ``pref:`` override field from a :class:`PrefSpec` field: the same type (or null), doc,
    source and bounds, default null (keep the preset's value); checked by ``pref_problems``."""
    optional = tp if typing.get_origin(tp) is typing.Union else Optional[tp]
    return name, optional, field(default=None, metadata=dict(f.metadata, check=False))


class _PrefMethods:
    """What :class:`PrefConfig` does with its fields."""

    def overrides(self) -> Dict[str, Any]:
        """The non-null preset overrides, as keyword arguments for ``resolve_pref``."""
        return {f.name: getattr(self, f.name) for f in fields(PrefSpec)
                if getattr(self, f.name) is not None}

    def resolve(self) -> PrefSpec:
        """The resolved :class:`mmrl.algo.preference.PrefSpec` (raises on problems)."""
        return resolve_pref(self.preset, **self.overrides())

    def problems(self) -> List[str]:
        """Every combination that cannot run, each with its fix."""
        out = [f"{k}: got {show(v)}; expected a file path (or null)"
               for k in ("pairs_file", "eval_pairs", "verifier")
               if (v := getattr(self, k)) is not None and not v.strip()]
        if self.mode == "off":
            unused = [k for k, bad in (
                ("preset", self.preset != "dpo"), ("pairs", self.pairs != "online"),
                ("pairs_file", self.pairs_file is not None),
                ("grpo_steps", self.grpo_steps is not None),
                ("dpo_steps", self.dpo_steps is not None),
                ("verifier", self.verifier is not None)) if bad] + list(self.overrides())
            return out + [f"{k}: set, but mode is off (no preference step runs); set "
                          f"pref.mode=dpo or veripo, or drop pref.{k}" for k in unused]
        out += self._source_problems() + self._cycle_problems()
        loss = [f"(preset {self.preset!r}) {p}"
                for p in pref_problems(self.preset, **self.overrides())]
        return out + (loss or self._input_problems())

    def _input_problems(self) -> List[str]:
        """Losses that read inputs the runner's preference step does not build yet."""
        spec, out = self.resolve(), []
        if spec.needs_win and self.pairs == "file":
            out.append(f"preset: {self.preset!r} needs win rates, which come from a group's "
                       f"rewards: set pref.pairs=online, or pick a pair loss (e.g. dpo)")
        for needs, what in ((spec.needs_guide, "a guide model's token log-ratios (TGDPO)"),
                            (spec.needs_pair_scale, "reward-level pair scales (TRPA)")):
            if needs:
                out.append(f"preset: {self.preset!r} needs {what}, which the runner's "
                           f"preference step does not build; call PreferenceLoss from your own "
                           f"loop, or pick dpo, ipo, cdpo, robust_dpo, simpo, sppo or "
                           f"diffusion_dpo")
        return out

    def _source_problems(self) -> List[str]:
        out = []
        if self.pairs == "file" and self.pairs_file is None:
            out.append("pairs_file: missing; pairs=file reads the pairs from a JSONL file: set "
                       "pref.pairs_file=PATH, or pref.pairs=online")
        if self.pairs == "online" and self.pairs_file is not None:
            out.append(f"pairs_file: got {show(self.pairs_file)}, read only with pairs=file; "
                       f"set pref.pairs=file, or drop pairs_file")
        if self.pairs == "file" and self.verifier is not None:
            out.append(f"verifier: got {show(self.verifier)}, which ranks online pairs only "
                       f"(pairs=file reads them ranked); drop verifier or set pairs=online")
        return out

    def _cycle_problems(self) -> List[str]:
        if self.mode == "veripo":
            return [f"{k}: missing; mode=veripo alternates pref.grpo_steps GRPO steps and "
                    f"pref.dpo_steps preference steps; set both (e.g. 4 and 1)"
                    for k in ("grpo_steps", "dpo_steps") if getattr(self, k) is None]
        return [f"{k}: got {getattr(self, k)}, read only with mode=veripo (mode=dpo: every "
                f"step is a preference step); drop it or set pref.mode=veripo"
                for k in ("grpo_steps", "dpo_steps") if getattr(self, k) is not None]

    def stage(self, step: int) -> str:
        """``"grpo"`` or ``"pref"``: what step ``step`` (0-based) trains; a function of the
        step index alone, so a resumed run repeats the uninterrupted run's stages."""
        if self.mode == "off":
            return "grpo"
        if self.mode == "dpo":
            return "pref"
        cycle = self.grpo_steps + self.dpo_steps
        return "grpo" if step % cycle < self.grpo_steps else "pref"

    def pref_index(self, step: int) -> int:
        """How many preference steps come before step ``step`` (which slice of the pair file
        it reads)."""
        if self.mode != "veripo":
            return step if self.mode == "dpo" else 0
        cycles, pos = divmod(step, self.grpo_steps + self.dpo_steps)
        return cycles * self.dpo_steps + max(0, pos - self.grpo_steps)

    @property
    def online(self) -> bool:
        """Do preference steps build their pairs from the step's groups?"""
        return self.mode != "off" and self.pairs == "online"


def _pref_config() -> type:
    hints = typing.get_type_hints(PrefSpec)
    rows = _OWN + [_override(f.name, hints[f.name], f) for f in fields(PrefSpec)] + _SOURCES
    doc = """Preference steps: DPO-family losses on online or file pairs; VerIPO's cycles.

    A preference step trains a preference loss on pairs built online from the step's groups or
    read from a file; ``veripo`` alternates GRPO steps and such steps (docs/preference.md).

    The loss is a preset plus overrides, like the ``algo`` section: every override defaults to
    null (keep the preset's value); ``mmrl algos`` shows what each preference preset picks.
    """
    return dataclasses.make_dataclass("PrefConfig", rows, bases=(_PrefMethods,),
                                      namespace={"__doc__": doc, "__module__": __name__})


PrefConfig = _pref_config()


def pref_train_problems(pref: PrefConfig, train) -> List[str]:
    """Combinations of the ``pref`` and ``train`` sections that cannot train."""
    if pref.online and train.group_size < 2:
        return [f"train.group_size: got {train.group_size} with pref.pairs=online, which pairs "
                f"the best and the worst sample of a group: a group of one gives no pair. Use "
                f"group_size >= 2, or pref.pairs=file"]
    return []
