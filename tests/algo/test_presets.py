"""Presets: the ALGORITHMS.md table, resolution with overrides, all-at-once problem reports."""
import dataclasses

import pytest

from mmrl.algo.presets import PRESETS, AlgoSpec, algo_problems, resolve_algo

# The Presets table of ALGORITHMS.md, restated: axes and the hyper-parameters it names.
TABLE = {
    "grpo": ("grpo", "token", "clip", "seq_mean_token_mean", "none", dict(eps_low=0.2, eps_high=0.2)),
    "dr_grpo": ("mean_center", "token", "clip", "fixed_norm", "none", dict(eps_low=0.2, eps_high=0.2)),
    "dapo": ("grpo", "token", "clip", "token_mean", "none", dict(eps_low=0.2, eps_high=0.28)),
    "gspo": ("grpo", "sequence", "clip", "seq_mean", "none", dict(eps_low=3e-4, eps_high=4e-4)),
    "gspo_token": ("grpo", "sequence_token", "clip", "seq_mean_token_mean", "none",
                   dict(eps_low=3e-4, eps_high=4e-4)),
    "sapo": ("grpo", "token", "sapo", "seq_mean_token_mean", "none", dict(tau_pos=1.0, tau_neg=1.05)),
    "reg_grpo": ("grpo", "sequence_sum", "reg", "seq_mean", "none", dict(eps_reg=1.0)),
    "tw_grpo": ("grpo", "token", "clip", "token_mean", "tw",
                dict(eps_low=0.2, eps_high=0.28, tw_alpha=1.7)),
    "ngrpo": ("ngrpo", "token", "clip", "token_mean", "none",
              dict(eps_low=0.16, eps_high=0.24, r_max=1.0)),
    "lite_ppo": ("batch_std", "token", "clip", "token_mean", "none", dict(eps_low=0.2, eps_high=0.2)),
    # ALGORITHMS-peers.md (issue 17)
    "cispo": ("grpo", "token", "cispo", "token_mean", "none", dict(eps_low=0.2, eps_high=0.2)),
    "cispo_trl": ("grpo", "token", "cispo_cap", "token_mean", "none", dict(cispo_cap=5.0)),
    "clip_cov": ("grpo", "token", "clip_cov", "token_mean", "none",
                 dict(eps_low=0.2, eps_high=0.2, cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0)),
    "kl_cov": ("grpo", "token", "kl_cov", "token_mean", "none", dict(cov_ratio=2e-3, kl_cov_coef=1.0)),
    "vespo": ("grpo", "token", "vespo", "token_mean", "none",
              dict(vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0)),
    # issue 17, advantage estimators (verl's token-mean aggregation)
    "reinforce_pp": ("reinforce_pp", "token", "clip", "token_mean", "none",
                     dict(eps_low=0.2, eps_high=0.2)),
    "reinforce_pp_baseline": ("reinforce_pp_baseline", "token", "clip", "token_mean", "none",
                              dict(eps_low=0.2, eps_high=0.2)),
    "remax": ("remax", "token", "clip", "token_mean", "none", dict(eps_low=0.2, eps_high=0.2)),
    "opo": ("opo", "token", "clip", "token_mean", "none", dict(eps_low=0.2, eps_high=0.2)),
    "passk": ("passk", "token", "clip", "token_mean", "none", dict(eps_low=0.2, eps_high=0.2)),
    "gdpo": ("grpo", "token", "clip", "token_mean", "none", dict(multi_reward="gdpo")),
    "gpg": ("gpg", "token", "gpg", "token_mean", "none", {}),
    # issue 15, ALGORITHMS-flow.md (flow_grpo's GRPO-Guard configs; the diffusion job)
    "grpo_guard": ("grpo", "ratio_norm", "clip", "seq_mean_token_mean", "none",
                   dict(eps_low=2e-6, eps_high=2e-6, step_reweight=True)),
    # issue 18, lane R (docs/seed_methods.md)
    "unlikeliness": ("unlikeliness", "token", "clip", "seq_mean_token_mean", "none",
                     dict(unlikely_beta=0.25)),
    "riskpo": ("mixed_var", "token", "clip", "seq_mean_token_mean", "none",
               dict(riskpo_alpha_lo=0.2, riskpo_alpha_hi=0.8, riskpo_w_mix=1.5, riskpo_bundle=5)),
    # issue 18, ALGORITHMS-seed.md B (Optimization-AI/DRPO)
    "drpo": ("reward", "token", "drpo", "seq_mean_token_sum", "none",
             dict(drpo_tau=10.0, drpo_lambda=0.1, drpo_beta=1000.0, drpo_delta=1e-4)),
}


def test_presets_are_exactly_the_table():
    assert sorted(PRESETS) == sorted(TABLE)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_preset_axes_and_hyper_parameters(name):
    adv, ratio, obj, agg, tw, hp = TABLE[name]
    spec = PRESETS[name]
    assert (spec.advantage, spec.ratio_level, spec.objective, spec.aggregation,
            spec.token_weighting) == (adv, ratio, obj, agg, tw)
    for key, value in hp.items():
        assert getattr(spec, key) == value, key
    assert spec.kl == "k3" and spec.beta == 0.0 and spec.adv_eps == 1e-4
    assert spec.dual_clip_c is None and spec.adv_clip == (5.0 if name == "grpo_guard" else None)


def test_spec_properties():
    assert resolve_algo("reg_grpo").needs_groups and not resolve_algo("grpo").needs_groups
    assert resolve_algo("grpo", beta=0.04).needs_ref and not resolve_algo("grpo").needs_ref
    assert resolve_algo("tw_grpo").needs_token_weights
    seq = {n for n in PRESETS if PRESETS[n].sequence_level}
    # T may not be chunked for these (a sequence ratio, VESPO's W_i, the call's covariance)
    assert seq == {"gspo", "gspo_token", "reg_grpo", "clip_cov", "kl_cov", "vespo", "drpo"}
    assert {n for n in PRESETS if PRESETS[n].per_sequence_loss} == {"gspo", "reg_grpo"}


def test_resolve_with_overrides_and_frozen():
    spec = resolve_algo("dapo", eps_high=0.3, beta=0.04, kl="k2")
    assert (spec.eps_high, spec.beta, spec.kl, spec.aggregation) == (0.3, 0.04, "k2", "token_mean")
    assert PRESETS["dapo"].eps_high == 0.28  # the preset itself is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.beta = 1.0
    assert resolve_algo("dr_grpo", max_len=1024).max_len == 1024


def test_reg_grpo_length_normalize():
    assert resolve_algo("reg_grpo", length_normalize=True).ratio_level == "sequence"
    assert resolve_algo("reg_grpo", length_normalize=False).ratio_level == "sequence_sum"
    with pytest.raises(ValueError, match="length_normalize applies"):
        resolve_algo("grpo", length_normalize=True)
    assert any("True or False" in p for p in algo_problems("reg_grpo", length_normalize="yes"))
    assert any("contradicts" in p for p in algo_problems(
        "reg_grpo", length_normalize=True, ratio_level="sequence_sum"))
    assert resolve_algo("reg_grpo", length_normalize=True, ratio_level="sequence").ratio_level \
        == "sequence"


def test_every_problem_is_reported_at_once():
    problems = algo_problems("gspoo", eps_hgh=0.1, eps_low=-1.0, objective="sapo2", beta="x",
                             dual_clip_c=0.5, max_len=3.5)
    text = "\n".join(problems)
    for words in ["unknown preset 'gspoo'", "did you mean 'gspo'", "unknown override 'eps_hgh'",
                  "did you mean 'eps_high'", "eps_low=-1.0 is out of range", "did you mean 'sapo'",
                  "beta must be a number", "dual_clip_c=0.5", "max_len must be an int"]:
        assert words in text, words
    assert len(problems) == 7
    with pytest.raises(ValueError) as info:
        resolve_algo("gspoo", eps_hgh=0.1, eps_low=-1.0)
    assert "3 problem(s)" in str(info.value) and "eps_hgh" in str(info.value)


@pytest.mark.parametrize("name, overrides, words", [
    ("gspo", {"aggregation": "token_mean"}, "use aggregation 'seq_mean'"),
    ("grpo", {"aggregation": "seq_mean"}, "needs a per-sequence ratio level"),
    ("grpo", {"objective": "reg"}, "needs ratio_level 'sequence_sum' or 'sequence'"),
    ("dr_grpo", {}, "needs max_len"),
    ("tw_grpo", {"ratio_level": "sequence", "aggregation": "seq_mean"}, "is per sequence"),
    ("sapo", {"dual_clip_c": 3.0}, "only applies to objective 'clip'"),
    ("grpo", {"token_weighting": "tww"}, "did you mean 'tw'"),
    ("grpo", {"advantage": "grp"}, "did you mean 'grpo'"),
    ("grpo", {"kl": "k4"}, "unknown KL estimator"),
    ("grpo", {"eps_low": 1.0}, "0 <= eps_low < 1"),
    ("grpo", {"tau_pos": 0.0}, "tau_pos=0.0 is out of range"),
    ("grpo", {"max_len": 0}, "max_len=0 is out of range"),
    ("grpo", {"adv_clip": -1.0}, "adv_clip=-1.0 is out of range"),
    ("grpo", {"beta": float("nan")}, "must be finite"),
    ("grpo", {"eps_high": True}, "must be a number"),
    ("grpo", {"objective": 3}, "must be a name"),
])
def test_each_invalid_request_is_named(name, overrides, words):
    problems = algo_problems(name, **overrides)
    assert any(words in p for p in problems), problems
    with pytest.raises(ValueError, match="problem"):
        resolve_algo(name, **overrides)


def test_multi_reward_method_is_not_an_advantage_axis_value():
    problems = algo_problems("grpo", advantage="sum_then_normalize")
    assert len(problems) == 1 and "single-reward estimator" in problems[0]


def test_default_spec_is_grpo():
    assert AlgoSpec() == PRESETS["grpo"]


def test_resolve_errors_list_every_problem_in_one_message():
    """resolve_algo and resolve_pref raise the same shape of error (mmrl.fields.problems_error)."""
    from mmrl.algo.preference import resolve_pref
    with pytest.raises(ValueError) as err:
        resolve_algo("grpo", eps_low=2.0, objective="clipp")
    head, *lines = str(err.value).split("\n")
    assert head == ("invalid algorithm 'grpo' with overrides {'eps_low': 2.0, 'objective': "
                    "'clipp'}: 2 problem(s):")
    assert len(lines) == 2 and all(line.startswith("  - ") for line in lines)
    with pytest.raises(ValueError, match=r"^invalid preference loss 'dpo' with overrides "
                                         r"\{'beta': -1.0\}: 1 problem\(s\):\n  - "):
        resolve_pref("dpo", beta=-1.0)
