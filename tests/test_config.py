"""Config: YAML + overrides -> typed sections; every problem reported at once; docs complete."""
from dataclasses import fields
from pathlib import Path

import pytest

from mmrl.config import ConfigError, apply_overrides, field_docs, parse_value
from mmrl.schema import AlgoConfig, TrainConfig, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


def test_parse_value_reads_scientific_notation_and_yaml_scalars():
    assert parse_value("1e-4") == pytest.approx(1e-4)
    assert parse_value("3.0e-3") == pytest.approx(3e-3)
    assert parse_value("null") is None and parse_value("true") is True
    assert parse_value("12") == 12 and parse_value("dapo") == "dapo"
    assert parse_value("[1, 2]") == [1, 2]


def test_overrides_apply_dotted_keys():
    data = {"train": {"lr": 1.0}}
    assert apply_overrides(data, ["train.lr=1e-4", "algo.preset=dapo", "toy.length=3"]) == []
    assert data == {"train": {"lr": 1e-4}, "algo": {"preset": "dapo"}, "toy": {"length": 3}}
    assert "expected key=value" in apply_overrides({}, ["train.lr"])[0]


def test_load_with_overrides_types_and_defaults():
    run = load_config(ROOT / "configs/demo/toy.yaml", ["train.steps=3", "algo.preset=dapo",
                                                       "algo.eps_high=0.3"])
    assert run.job == "toy" and run.train.steps == 3
    assert isinstance(run.train.lr, float)
    spec = run.algo.resolve()
    assert spec.eps_high == pytest.approx(0.3) and spec.eps_low == pytest.approx(0.2)
    assert spec.aggregation == "token_mean"


def test_every_problem_is_reported_at_once():
    data = {"job": "toy",
            "algo": {"preset": "grpoo", "eps_hgh": 0.3},
            "train": {"lr": "fast", "steps": 0, "group_size": 2.5},
            "toy": {"task": "revers", "d_model": 30, "heads": 4},
            "extra": 1}
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, "bad.yaml")
    text = "\n".join(info.value.problems)
    for needle in ["algo.preset: got 'grpoo'", "did you mean 'grpo'",
                   "algo.eps_hgh: unknown key", "did you mean 'eps_high'",
                   "train.lr: got 'fast'", "expected float",
                   "train.steps: got 0; expected a value >= 1",
                   "train.group_size: got 2.5", "expected int",
                   "toy.task: got 'revers'", "did you mean 'reverse'",
                   "extra: unknown section"]:
        assert needle in text, f"missing {needle!r} in:\n{text}"
    assert len(info.value.problems) == 7  # one line per problem, no cascades
    assert str(info.value).startswith("bad.yaml: ")


def test_cross_field_and_algorithm_combinations_are_reported():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"job": "toy", "algo": {"preset": "gspo",
                                                  "aggregation": "token_mean"}})
    assert any("aggregation" in p and "token_mean" in p for p in info.value.problems)
    with pytest.raises(ConfigError) as info:
        config_from_dict({"job": "toy", "toy": {"d_model": 30, "heads": 4}})
    assert any("toy.d_model" in p and "multiple of heads" in p for p in info.value.problems)
    with pytest.raises(ConfigError) as info:
        config_from_dict({"job": "toy", "algo": {"preset": "gspo"}, "train": {"t_chunk": 2}})
    assert any("t_chunk" in p and "sequence-level" in p for p in info.value.problems)


def test_unknown_job_and_missing_file():
    with pytest.raises(ConfigError, match="unknown job 'toyy'.*did you mean 'toy'"):
        config_from_dict({"job": "toyy"})
    with pytest.raises(ConfigError, match="file not found"):
        load_config(ROOT / "configs/nope.yaml")


@pytest.mark.parametrize("cls", [AlgoConfig, TrainConfig])
def test_every_field_is_documented(cls):
    rows = field_docs(cls)
    assert len(rows) == len(fields(cls))
    for key, tp, default, doc, source in rows:
        assert doc and len(doc) > 10, f"{cls.__name__}.{key} has no documentation"
        assert tp


def test_job_sections_are_documented():
    from mmrl.jobs import get_job, job_names
    for name in job_names():
        try:
            section = get_job(name).section
        except ValueError:
            continue  # a job whose extra is not installed here
        for key, tp, default, doc, source in field_docs(section):
            assert doc, f"{name}.{key} has no documentation"


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_config_validates(path):
    run = load_config(path)
    run.algo.resolve()


def test_generated_reference_is_up_to_date():
    from mmrl.core_cli import config_reference
    doc = ROOT / "docs" / "config.md"
    assert doc.exists(), "run: mmrl config docs > docs/config.md"
    assert doc.read_text().strip() == config_reference().strip(), \
        "docs/config.md is stale; regenerate it with: mmrl config docs > docs/config.md"
