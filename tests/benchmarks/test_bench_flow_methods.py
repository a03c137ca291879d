"""benchmarks/bench_flow_methods.py: every method of flow_methods.yaml is a valid diffusion config
(so a method added by the lead fails here, not an hour into the benchmark), and the crossing
rule behind the printed ratios, by hand."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_flow_methods", ROOT / "benchmarks" / "bench_flow_methods.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_method_is_a_valid_config(bench, tmp_path):
    from mmrl.config.core import apply_overrides
    from mmrl.config.schema import config_from_dict
    base, methods = bench.load_methods(str(ROOT / "benchmarks" / "flow_methods.yaml"), None, [])
    assert list(methods) == ["flow_grpo", "window", "mixgrpo", "tree", "g2rpo", "mixgrpo_flash",
                             "dancegrpo", "grpo_guard", "nft", "awm"]
    samplers = {}
    for name, overrides in methods.items():
        data = bench.base_config(str(tmp_path / "model"), str(tmp_path / name), 8)
        assert apply_overrides(data, base + overrides + ["train.seed=1"]) == []
        config = config_from_dict(data, source=name)  # raises ConfigError listing problems
        assert (config.train.steps, config.train.seed) == (60, 1)
        samplers[name] = (config.task.sampler, config.task.objective)
    assert samplers == {"flow_grpo": ("full", "grpo"), "window": ("window", "grpo"),
                        "mixgrpo": ("sliding", "grpo"), "tree": ("tree", "grpo"),
                        "g2rpo": ("singular", "grpo"), "mixgrpo_flash": ("sliding", "grpo"),
                        "dancegrpo": ("full", "grpo"), "grpo_guard": ("full", "grpo"),
                        "nft": ("full", "nft"), "awm": ("full", "awm")}
    _, extra = bench.load_methods(str(ROOT / "benchmarks" / "flow_methods.yaml"), "tree",
                                  ["nft=diffusion.window=3 train.lr=0.1"])
    assert extra == {"tree": methods["tree"]}  # --only keeps only the named ones
    _, extra = bench.load_methods(str(ROOT / "benchmarks" / "flow_methods.yaml"), "nft",
                                  ["nft=diffusion.window=3 train.lr=0.1"])
    assert extra == {"nft": ["diffusion.window=3", "train.lr=0.1"]}
    with pytest.raises(SystemExit, match=r"unknown method\(s\) \['spo'\]"):
        bench.load_methods(str(ROOT / "benchmarks" / "flow_methods.yaml"), "spo", [])


def test_reach_and_seed_mean_by_hand(bench):
    runs = [[{"step": 0, "nfe": 0, "time": 0.0, "cpu": 0.0, "reward": -0.5},
             {"step": 10, "nfe": 100, "time": 2.0, "cpu": 1.0, "reward": -0.4}],
            [{"step": 0, "nfe": 0, "time": 0.0, "cpu": 0.0, "reward": -0.7},
             {"step": 10, "nfe": 100, "time": 4.0, "cpu": 2.0, "reward": -0.2}]]
    curve = bench.seed_mean(runs)
    assert curve[1] == pytest.approx({"step": 10, "nfe": 100, "time": 3.0, "cpu": 1.5,
                                      "reward": -0.3, "lo": -0.4, "hi": -0.2})
    # -0.6 -> -0.3 over 100 NFE: -0.45 is reached half-way
    assert bench.reach(curve, -0.45, "nfe") == pytest.approx(50.0)
    assert bench.reach(curve, -0.45, "time") == pytest.approx(1.5)
    assert bench.reach(curve, -0.6, "nfe") == 0  # already there at the start
    assert bench.reach(curve, -0.1, "nfe") is None
