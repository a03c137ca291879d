"""The ``pref`` section: every combination that cannot run is refused with its fix, all at once;
the stage and the file slice are functions of the step index; a config without preference
steps validates without torch."""
import subprocess
import sys

import pytest

from mmrl.config.core import ConfigError
from mmrl.config.pref import PrefConfig
from mmrl.config.schema import config_from_dict


def _cfg(pref, **train):
    return config_from_dict({"job": "toy", "pref": pref,
                             "train": {"group_size": 4, "prompts_per_step": 2, **train}})


def _problems(pref, **train):
    with pytest.raises(ConfigError) as err:
        _cfg(pref, **train)
    return err.value.problems


def test_default_is_off_and_every_step_is_grpo():
    c = _cfg({})
    assert c.pref == PrefConfig() and c.pref.mode == "off"
    assert [c.pref.stage(s) for s in range(3)] == ["grpo"] * 3
    assert c.to_dict()["pref"]["mode"] == "off"


def test_off_refuses_every_field_that_would_have_no_effect_at_once():
    got = _problems({"pairs": "file", "pairs_file": "p.jsonl", "grpo_steps": 2,
                     "verifier": "digits", "preset": "ipo", "beta": 0.2})
    keys = sorted(p.split(":")[0] for p in got)
    assert keys == ["pref.beta", "pref.grpo_steps", "pref.pairs", "pref.pairs_file",
                    "pref.preset", "pref.verifier"]
    assert all("mode is off" in p and "pref.mode=dpo or veripo" in p for p in got)


def test_eval_pairs_alone_is_allowed_with_mode_off():
    assert _cfg({"eval_pairs": "held.jsonl"}).pref.eval_pairs == "held.jsonl"


def test_file_pairs_need_a_file_and_online_pairs_refuse_one():
    (p,) = _problems({"mode": "dpo", "pairs": "file"})
    assert p.startswith("pref.pairs_file: missing") and "pref.pairs_file=PATH" in p
    (p,) = _problems({"mode": "dpo", "pairs_file": "p.jsonl"})
    assert "read only with pairs=file" in p


def test_the_verifier_ranks_online_pairs_only():
    (p,) = _problems({"mode": "dpo", "pairs": "file", "pairs_file": "p", "verifier": "exact"})
    assert p.startswith("pref.verifier: got 'exact'") and "pairs=online" in p


def test_veripo_needs_both_cycle_lengths_and_dpo_takes_none():
    got = _problems({"mode": "veripo"})
    assert [p.split(":")[0] for p in got] == ["pref.grpo_steps", "pref.dpo_steps"]
    assert "e.g. 4 and 1" in got[0]
    (p,) = _problems({"mode": "dpo", "dpo_steps": 2})
    assert p.startswith("pref.dpo_steps: got 2, read only with mode=veripo")
    (p,) = _problems({"mode": "veripo", "grpo_steps": 0, "dpo_steps": 1})
    assert p == "pref.grpo_steps: got 0; expected a value >= 1"


def test_choices_empty_paths_and_group_size():
    got = _problems({"mode": "ppo", "pairs": "disk"})
    assert any(p.startswith("pref.mode: got 'ppo'; expected one of off, dpo, veripo")
               for p in got)
    assert any(p.startswith("pref.pairs: got 'disk'; expected one of online, file")
               for p in got)
    (p,) = _problems({"eval_pairs": " "})
    assert p.startswith("pref.eval_pairs: got ' '; expected a file path")
    got = _problems({"mode": "dpo"}, group_size=1)  # GRPO's own group-of-one problem too
    assert any(p.startswith("train.group_size: got 1 with pref.pairs=online") for p in got)


def test_unknown_key_names_the_section_fields():
    (p,) = _problems({"mdoe": "dpo"})
    assert p.startswith("pref.mdoe: unknown key") and "did you mean 'mode'" in p


def test_stage_and_pref_index_follow_the_cycle():
    c = PrefConfig(mode="veripo", grpo_steps=2, dpo_steps=3)
    stages = [c.stage(s) for s in range(10)]
    assert stages == ["grpo", "grpo", "pref", "pref", "pref"] * 2
    assert [c.pref_index(s) for s in range(10) if stages[s] == "pref"] == [0, 1, 2, 3, 4, 5]
    assert [PrefConfig(mode="dpo").pref_index(s) for s in range(3)] == [0, 1, 2]


def test_preset_and_overrides_are_checked_by_pref_problems():
    (p,) = _problems({"mode": "dpo", "preset": "dpoo"})
    assert p.startswith("pref.preset: got 'dpoo'; expected one of") and "'dpo'" in p
    (p,) = _problems({"mode": "dpo", "beta": -1.0})
    assert p.startswith("pref: (preset 'dpo') beta=-1.0 is out of range"), p
    (p,) = _problems({"mode": "dpo", "preset": "ipo", "label_smoothing": 0.1})
    assert "label_smoothing" in p and "drop label_smoothing" in p
    c = _cfg({"mode": "dpo", "preset": "simpo", "beta": 1.5})
    assert c.pref.overrides() == {"beta": 1.5}
    spec = c.pref.resolve()
    assert (spec.beta, spec.reference_free, spec.length_normalize) == (1.5, True, True)


def test_losses_that_need_inputs_the_runner_does_not_build_are_refused():
    for preset, what in (("tgdpo", "guide"), ("trpa", "pair scales")):
        (p,) = _problems({"mode": "dpo", "preset": preset})
        assert p.startswith(f"pref.preset: '{preset}' needs") and what in p, p
    assert _cfg({"mode": "dpo", "preset": "sppo"}).pref.resolve().loss == "sppo"  # online
    (p,) = _problems({"mode": "dpo", "preset": "sppo_single", "pairs": "file",
                      "pairs_file": "p.jsonl"})
    assert "needs win rates" in p and "pref.pairs=online" in p


def test_validating_a_config_without_preference_steps_loads_no_torch():
    code = ("import sys\nfrom mmrl.config.schema import config_from_dict\n"
            "c = config_from_dict({'job': 'toy', 'pref': {'eval_pairs': 'x.jsonl'}})\n"
            "print('TORCH', 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "TORCH False", done.stderr[-1000:]
