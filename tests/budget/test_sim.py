"""The rollout-budget simulator (mmrl.budget.sim) and its CLI ``mmrl sim budget``."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from mmrl.cli.app import main
from mmrl.budget.sim import (STRATEGIES, PromptPopulation, SimSettings, format_table, run_strategy,
                      summarize)

SMALL = SimSettings(num_prompts=64, batch_prompts=16, group_size=4, total_rollouts=16 * 4 * 12)


def test_policy_step_is_the_exact_grpo_gradient_of_a_bernoulli_policy():
    s = dataclasses.replace(SMALL, num_prompts=3, lr=0.5)
    pop = PromptPopulation(s, torch.Generator().manual_seed(0))
    pop.logits = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    # prompt 0: 1 of 4 succeed -> A = (r - 0.25) / (0.5 + 1e-4) (unbiased std 0.5), and
    # Σ A (r - p) = A_success = 0.75 / 0.5001 since Σ A = 0. Prompt 1: all fail -> no step.
    pop.train(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
              torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64),
              torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    expected = torch.tensor([0.5 * 0.75 / 0.5001 / 4, 1.0, -2.0], dtype=torch.float64)
    torch.testing.assert_close(pop.logits, expected, rtol=0, atol=1e-12)


def test_effective_ratio_matches_theory_on_a_static_population():
    # every prompt p = 0.5, no learning, no drift: P(group of 4 has a signal) = 1 - 2 / 16
    s = dataclasses.replace(SMALL, difficulty_std=0.0, difficulty_mean=0.0, lr=0.0,
                            drift_std=0.0, batch_prompts=64, total_rollouts=64 * 4 * 40)
    r = run_strategy("uniform", s, seed=0)
    assert r["groups"] == 2560  # standard error of the ratio: 0.0065
    assert r["effective_groups"] / r["groups"] == pytest.approx(0.875, abs=0.02)
    assert r["success_start"] == r["success_end"] == 0.5


def test_runs_are_deterministic_and_spend_equal_budgets():
    a, b = run_strategy("knapsack", SMALL, seed=3), run_strategy("knapsack", SMALL, seed=3)
    assert a == b
    uni = run_strategy("uniform", SMALL, seed=3)
    assert uni["rollouts"] == a["rollouts"] == SMALL.total_rollouts
    assert uni["steps"] == a["steps"] == 12 and uni["success_start"] == a["success_start"]
    dyn = run_strategy("dynamic_sampling", SMALL, seed=3)
    per_try = SMALL.batch_prompts * SMALL.group_size
    budget = SMALL.total_rollouts
    assert budget <= dyn["rollouts"] < budget + SMALL.max_tries * per_try
    assert dyn["tries"] >= dyn["steps"] and dyn["trained_effective"] == dyn["trained_groups"]


def test_learning_raises_success_and_summary_compares_to_uniform():
    results = {name: [run_strategy(name, SMALL, seed=1)] for name in ("uniform", "knapsack")}
    for runs in results.values():
        assert runs[0]["success_end"] > runs[0]["success_start"]
    rows = summarize(results)
    assert rows[0]["eff_ratio_vs_uniform"] == 0.0
    knap = rows[1]
    ratio = results["knapsack"][0]["effective_groups"] / results["knapsack"][0]["groups"]
    base = results["uniform"][0]["effective_groups"] / results["uniform"][0]["groups"]
    assert knap["eff_ratio_vs_uniform"] == pytest.approx(ratio / base - 1)
    assert "| knapsack |" in format_table(rows)


def test_settings_report_every_error_at_once():
    bad = dataclasses.replace(SMALL, batch_prompts=100, group_size=1, lr=-1.0)
    with pytest.raises(ValueError) as err:
        bad.validate()
    msg = str(err.value)
    assert "batch_prompts (100)" in msg and "n_min <= group_size" in msg and "lr" in msg


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "sim"
    code = main(["sim", "budget", "--strategies", "uniform,knapsack,dynamic_sampling",
                 "--seeds", "1", "--prompts", "64", "--batch-prompts", "16",
                 "--group-size", "4", "--budget", "640", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "| knapsack |" in text and "uniform" in text and "budget_sim.png" in text
    data = json.loads((out / "budget_sim.json").read_text())
    assert [r["strategy"] for r in data["table"]] == ["uniform", "knapsack", "dynamic_sampling"]
    assert data["settings"]["total_rollouts"] == 640
    assert (out / "budget_sim.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "budget_sim.md").read_text().startswith("| strategy |")


def test_cli_errors_and_help(capsys):
    assert main(["sim", "budget", "--strategies", "knapsak", "--no-plot"]) == 2
    assert "did you mean 'knapsack'" in capsys.readouterr().err
    assert main(["sim", "budget", "--group-size", "1", "--no-plot"]) == 2
    assert "n_min <= group_size" in capsys.readouterr().err
    assert main(["sim"]) == 2
    assert "budget" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["sim", "budget", "--help"])
    assert "examples:" in capsys.readouterr().out
    assert set(STRATEGIES.names()) >= {"uniform", "dynamic_sampling", "vade", "variance_aware",
                                       "knapsack"}


def test_console_script(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "mmrl")
    proc = subprocess.run([exe, "sim", "budget", "--strategies", "uniform,vade", "--seeds", "1",
                           "--prompts", "32", "--batch-prompts", "8", "--group-size", "4",
                           "--budget", "96", "--no-plot", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| vade |" in proc.stdout and (tmp_path / "budget_sim.json").exists()


def test_cli_without_matplotlib_still_writes_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert main(["sim", "budget", "--strategies", "uniform", "--seeds", "1", "--prompts", "16",
                 "--batch-prompts", "4", "--group-size", "2", "--budget", "16",
                 "--out", str(tmp_path)]) == 0
    assert "plot skipped: matplotlib" in capsys.readouterr().err
    assert (tmp_path / "budget_sim.md").exists() and not (tmp_path / "budget_sim.png").exists()
