"""Guidance in the budget simulator (mmrl.budget.sim_guidance): hand-worked re-rolls at
logits where every hinted sample's outcome is certain, the weighted GRPO step, and a run."""
import dataclasses

import pytest
import torch

from mmrl.budget.sim import PromptPopulation, run_strategy, summarize
from mmrl.budget.sim_guidance import apply_guidance
from mmrl.cli.app import main

from tests.budget.test_sim import SMALL

# prompt 0: θ = 0 (p = 1/2), any hint makes it certain (gain 100); prompt 1: hopeless even at
# level 3 (θ = −1000); prompt 2: solved once. Groups 0 and 1 are all-fail.
S = dataclasses.replace(SMALL, hint_gain=100.0, hint_levels=3, hint_transfer=0.5, is_cap=3.0)
LOGITS = torch.tensor([0.0, -1000.0, 0.0], dtype=torch.float64)
PROMPTS = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
REWARDS = torch.tensor([0.0] * 8 + [1.0, 0, 0, 0], dtype=torch.float64)


def _guide(mode):
    return apply_guidance(mode, LOGITS, PROMPTS, REWARDS, PROMPTS.clone(), S,
                          torch.Generator().manual_seed(0))


def test_ghpo_rescues_at_the_first_stage_or_spends_every_stage():
    r, q, c, stats = _guide("ghpo")
    assert r.tolist() == [1.0] * 4 + [0.0] * 4 + [1.0, 0, 0, 0]
    assert q[:4].tolist() == [1.0] * 4 and c[:8].tolist() == [0.5] * 8  # on-policy, τ
    assert q[8:].tolist() == [0.5] * 4 and c[8:].tolist() == [1.0] * 4  # plain rows untouched
    # group 0: one stage of 4; group 1: three stages of 4
    assert stats == {"guided_groups": 2, "guided_rescued": 1, "guided_rollouts": 16}


def test_scaf_swaps_the_lowest_successful_level_into_the_first_row():
    r, q, c, stats = _guide("scaf")
    assert r.tolist() == [1.0, 0, 0, 0] + [0.0] * 4 + [1.0, 0, 0, 0]
    assert q[0] == 1.0 and c[0] == 0.5 and c[1:].tolist() == [1.0] * 11
    assert stats == {"guided_groups": 2, "guided_rescued": 1, "guided_rollouts": 6}


def test_guide_and_seeding_train_for_the_plain_prompt():
    r, q, c, stats = _guide("guide")
    assert r[:8].tolist() == [1.0] * 4 + [0.0] * 4
    assert q.tolist() == [0.5] * 4 + [0.0] * 4 + [0.5] * 4  # the plain p: score r − p
    # success under the hint: w = p / p_h = 0.5 / 1; failure: (1 − p) / (1 − p_h) = 1
    assert c.tolist() == [0.5] * 4 + [1.0] * 8
    assert stats["guided_rollouts"] == 8 and stats["guided_rescued"] == 1
    r, q, c, _ = _guide("xrpo_seed")  # level 1, no correction
    assert r[:4].tolist() == [1.0] * 4 and c.tolist() == [1.0] * 12 and q[0] == 0.5
    none = _guide("none")
    assert torch.equal(none[0], REWARDS) and none[3]["guided_rollouts"] == 0
    with pytest.raises(ValueError, match="expected one of"):
        _guide("hints")


def test_guided_rows_enter_the_grpo_step_with_their_q_and_c():
    s = dataclasses.replace(SMALL, num_prompts=1, lr=0.5)
    pop = PromptPopulation(s, torch.Generator().manual_seed(0))
    pop.logits = torch.zeros(1, dtype=torch.float64)
    pop.train(torch.tensor([0, 0]), torch.tensor([1.0, 0.0], dtype=torch.float64),
              torch.tensor([0, 0]), q=torch.tensor([0.9, 0.5], dtype=torch.float64),
              c=torch.tensor([0.5, 1.0], dtype=torch.float64))
    a = 0.5 / (2 ** -0.5 + 1e-4)  # GRPO advantage of a 1-of-2 group (unbiased std)
    want = 0.5 * (0.5 * a * (1 - 0.9) + 1.0 * -a * (0 - 0.5)) / SMALL.group_size
    assert pop.logits.item() == pytest.approx(want, abs=1e-12)


def test_a_guided_run_spends_the_same_budget_and_reports_its_rescues():
    plain = run_strategy("uniform", SMALL, seed=2)
    runs = {m: run_strategy("uniform", SMALL, seed=2, guidance=m) for m in ("ghpo", "scaf")}
    for r in runs.values():
        assert r["success_start"] == plain["success_start"]
        assert SMALL.total_rollouts <= r["rollouts"] < SMALL.total_rollouts + 2 * 64 * 3
        assert 0 < r["guided_rescued"] <= r["guided_groups"] and r["guided_rollouts"] > 0
    assert runs["ghpo"] == run_strategy("uniform", SMALL, seed=2, guidance="ghpo")
    rows = summarize({"uniform": [plain], "uniform+ghpo": [runs["ghpo"]]})
    assert rows[1]["eff_ratio"][0] > rows[0]["eff_ratio"][0]  # fewer zero-advantage groups
    assert main(["sim", "budget", "--guidance", "ghpo,hints", "--no-plot"]) == 2
