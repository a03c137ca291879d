"""The algorithm's fields are declared once (mmrl.algo.presets.AlgoSpec): the config's ``algo:``
section is derived from them, and both refuse the same values with the same message."""
import dataclasses
import typing

import pytest

from mmrl.algo import presets
from mmrl.algo.presets import EXTRA_OVERRIDES, AlgoSpec, algo_problems, resolve_algo
from mmrl.config.core import ConfigError, field_docs
from mmrl.config.schema import AlgoConfig, config_from_dict
from mmrl.fields import BOUND_KEYS

SPEC_FIELDS = {f.name: f for f in dataclasses.fields(AlgoSpec)}
CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(AlgoConfig)}


def _outside(meta):
    """A value just outside each declared bound of a field."""
    out = []
    if meta["min"] is not None:
        out.append(meta["min"] - 1)
    if meta["above"] is not None:
        out.append(meta["above"])
    if meta["max"] is not None:
        out.append(meta["max"] + 1)
    if meta["below"] is not None:
        out.append(meta["below"])
    return out


BOUNDED = [(name, value) for name, f in SPEC_FIELDS.items() for value in _outside(f.metadata)]
EDGES = [(name, f.metadata[k]) for name, f in SPEC_FIELDS.items() for k in ("min", "max")
         if f.metadata[k] is not None]


def test_every_spec_field_is_an_optional_override_with_the_same_declaration():
    assert set(CONFIG_FIELDS) == {"preset", "multi_reward", "reward_weights", "reward_weighting",
                                  "reward_minimize", "reward_weighting_lr"} | set(SPEC_FIELDS) \
        | set(EXTRA_OVERRIDES)
    spec_hints, config_hints = typing.get_type_hints(AlgoSpec), typing.get_type_hints(AlgoConfig)
    for name, f in SPEC_FIELDS.items():
        c = CONFIG_FIELDS[name]
        assert c.default is None, name
        assert config_hints[name] == typing.Optional[spec_hints[name]], name
        for key in ("doc", "source") + BOUND_KEYS:
            assert c.metadata[key] == f.metadata[key], (name, key)
        assert c.metadata["check"] is False  # algo_problems checks it: one message


def test_bounds_written_once_documented_in_the_reference():
    rows = {key: tp for key, tp, _, _, _ in field_docs(AlgoConfig, "algo")}
    assert rows["algo.eps_low"] == "float or null; 0 <= eps_low < 1"
    assert rows["algo.tau_pos"] == "float or null; tau_pos > 0"
    assert rows["algo.tw_alpha"] == "float or null; tw_alpha >= 0"
    assert rows["algo.max_len"] == "int or null; max_len >= 1"
    assert rows["algo.r_max"] == "float or null"


def test_the_issue_example_tw_alpha_has_one_bound():
    assert resolve_algo("tw_grpo", tw_alpha=0.5).tw_alpha == 0.5  # >= 0 everywhere
    assert config_from_dict({"job": "toy", "algo": {"preset": "tw_grpo", "tw_alpha": 0.5}}
                            ).algo.resolve().tw_alpha == 0.5
    assert algo_problems("grpo", tw_alpha=-0.5) == [
        "tw_alpha=-0.5 is out of range; expected tw_alpha >= 0"]


@pytest.mark.parametrize("name, value", BOUNDED, ids=[f"{n}={v}" for n, v in BOUNDED])
def test_out_of_bounds_is_refused_with_the_same_message_by_both(name, value):
    with pytest.raises(ValueError) as by_spec:
        resolve_algo("grpo", **{name: value})
    (message,) = algo_problems("grpo", **{name: value})
    assert message.startswith(f"{name}={value!r} is out of range; expected ")
    assert message in str(by_spec.value)
    with pytest.raises(ConfigError) as by_config:
        config_from_dict({"job": "toy", "algo": {name: value}})
    assert by_config.value.problems == [f"algo: (preset 'grpo') {message}"]


@pytest.mark.parametrize("name, edge", EDGES, ids=[f"{n}={v}" for n, v in EDGES])
def test_a_value_on_an_inclusive_bound_passes_both(name, edge):
    assert algo_problems("grpo", **{name: edge}) == []
    spec = config_from_dict({"job": "toy", "algo": {name: edge}}).algo.resolve()
    assert getattr(spec, name) == getattr(resolve_algo("grpo", **{name: edge}), name) == edge


def test_the_torch_free_axis_table_equals_the_registries():
    import importlib
    for _, module, registry in presets._BUILTIN:
        live = getattr(importlib.import_module(module), registry)
        _, table = presets._STATIC[registry]
        assert table.names() == live.names() and table.axis == live.axis, registry
        for name in live.names():
            flags = vars(table.get(name))
            assert flags == {k: getattr(live.get(name), k) for k in flags}, (registry, name)
