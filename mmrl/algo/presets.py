"""Named algorithms as presets: one choice per axis plus hyper-parameters, never a code branch.

Each preset below carries its paper's arXiv id and key formula. :func:`resolve_algo` turns a
preset name plus keyword overrides into a frozen :class:`AlgoSpec`; :func:`algo_problems` lists
every problem with such a request at once (unknown names, wrong types, bad ranges, combinations
that cannot work), so a config error is reported in one go.

The fields live in :mod:`mmrl.algo.spec` (each declared once), the axes' torch-free registries in
:mod:`mmrl.algo.axes`, the checks in :mod:`mmrl.algo.checks`; this module re-exports their public
names. It imports no torch.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List

from mmrl.algo.axes import _BUILTIN, _STATIC, EMPTY_ROWS, TOKEN_WEIGHTINGS, axis_registry
from mmrl.algo.checks import (_EXTRA_KEYS, _FIELDS, _apply_length_normalize, _axis_problems,
                              _combination_problems, _range_problems, _type_problems)
from mmrl.algo.spec import EXTRA_OVERRIDES, AlgoSpec
from mmrl.fields import problems_error
from mmrl.registry import did_you_mean

__all__ = ["AlgoSpec", "EXTRA_OVERRIDES", "PRESETS", "algo_problems", "axis_registry",
           "resolve_algo", "EMPTY_ROWS", "TOKEN_WEIGHTINGS", "_BUILTIN", "_STATIC"]

PRESETS: Dict[str, AlgoSpec] = {
    # GRPO, arXiv 2402.03300: A = (r − mean)/(std + eps); −min(ρA, clip(ρ, 0.8, 1.2)A);
    # mean over sequences of the mean over tokens.
    "grpo": AlgoSpec(),
    # Dr.GRPO, arXiv 2503.20783: A = r − mean; Σ_i,t ℓ / (B·L_max). Needs max_len.
    "dr_grpo": AlgoSpec(advantage="mean_center", aggregation="fixed_norm"),
    # DAPO, arXiv 2503.14476: clip-higher ε 0.2 / 0.28; token-level mean Σ ℓ / Σ |o_i|.
    "dapo": AlgoSpec(eps_high=0.28, aggregation="token_mean"),
    # GSPO, arXiv 2507.18071: s_i = exp(mean_t x); −min(s A, clip(s, 1−3e-4, 1+4e-4) A).
    "gspo": AlgoSpec(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4, aggregation="seq_mean"),
    # GSPO-token, arXiv 2507.18071 eq. 13: log s_i,t = logp − sg(logp) + sg(log s_i).
    "gspo_token": AlgoSpec(ratio_level="sequence_token", eps_low=3e-4, eps_high=4e-4),
    # SAPO, arXiv 2511.20347: −(4/τ)·sigmoid(τ(ρ − 1))·A, τ 1.0 (A > 0) / 1.05.
    "sapo": AlgoSpec(objective="sapo"),
    # Reg-GRPO (DeepVideo-R1), arXiv 2506.07464: (A_i − ε(ℓr_i − mean_g ℓr))², ℓr = Σ_t x.
    # Override length_normalize=True to use ℓr = mean_t x (ratio_level "sequence").
    "reg_grpo": AlgoSpec(ratio_level="sequence_sum", objective="reg", aggregation="seq_mean"),
    # TW-GRPO, arXiv 2505.24718: token_mean of w_t·ℓ, w from group KL to the mean (α 1.7).
    "tw_grpo": AlgoSpec(eps_high=0.28, aggregation="token_mean", token_weighting="tw"),
    # NGRPO, arXiv 2509.18851: stats over the group + one virtual reward r_max; clip 0.16 / 0.24.
    "ngrpo": AlgoSpec(advantage="ngrpo", eps_low=0.16, eps_high=0.24, aggregation="token_mean"),
    # Lite-PPO, arXiv 2508.08221: group mean, batch std; token-level mean.
    "lite_ppo": AlgoSpec(advantage="batch_std", aggregation="token_mean"),
    # CISPO (MiniMax-M1), arXiv 2506.13585, verl's convention: −sg(clip(ρ, 0.8, 1.2))·A·logp,
    # token mean. The paper leaves the lower bound effectively off; verl's defaults are 0.2/0.2.
    "cispo": AlgoSpec(objective="cispo", aggregation="token_mean"),
    # CISPO, TRL's convention: −sg(min(ρ, 5))·A·logp (cap 5 per ScaleRL, arXiv 2510.13786).
    "cispo_trl": AlgoSpec(objective="cispo_cap", cispo_cap=5.0, aggregation="token_mean"),
    # Clip-Cov, arXiv 2505.22617 (verl clip_cov): PPO clip, plus max(⌊2e-4·N⌋, 1) random tokens
    # with 1 < Cov < 5 detached. verl's recipe widens the PPO clip to ε = 1 (eps_low < 1 here).
    "clip_cov": AlgoSpec(objective="clip_cov", aggregation="token_mean"),
    # KL-Cov, arXiv 2505.22617 (verl kl_cov): −ρA, + 1·|x| on the top 2e-3 of tokens by Cov
    # (the paper's Qwen2.5-7B recipe; 2e-4 for 32B); no PPO clip.
    "kl_cov": AlgoSpec(objective="kl_cov", cov_ratio=2e-3, kl_cov_coef=1.0,
                       aggregation="token_mean"),
    # VESPO, arXiv 2602.10693 (TRL): −sg(φ(W_i))·A·logp, φ(W) = W^k·e^(λ(1−W)), W_i = Π_t ρ_t;
    # k/λ 2/3 (A ≥ 0), 3/2 (A < 0); token mean.
    "vespo": AlgoSpec(objective="vespo", aggregation="token_mean"),
    # REINFORCE++, arXiv 2501.03262: A = whiten(r) over the batch's tokens (γ = 1); PPO clip;
    # token_mean (verl reinforce_plus_plus, loss_agg_mode token-mean).
    "reinforce_pp": AlgoSpec(advantage="reinforce_pp", aggregation="token_mean"),
    # REINFORCE++-baseline (the paper's variant for reasoning): A = whiten(r − mean_g) over tokens.
    "reinforce_pp_baseline": AlgoSpec(advantage="reinforce_pp_baseline", aggregation="token_mean"),
    # ReMax, arXiv 2310.10505: A = r − r(greedy completion of the prompt); needs a policy with
    # the greedy capability. token_mean as verl.
    "remax": AlgoSpec(advantage="remax", aggregation="token_mean"),
    # OPO, arXiv 2505.23585: A = r − Σ_g L r / Σ_g L (length-weighted baseline); token_mean.
    "opo": AlgoSpec(advantage="opo", aggregation="token_mean"),
    # GDPO, arXiv 2601.05242 (TRL normalize_then_sum): each reward column normalized in its
    # group, weighted sum, whitened over the batch; TRL's default aggregation (dapo: token_mean).
    "gdpo": AlgoSpec(multi_reward="gdpo", aggregation="token_mean"),
    # Pass@k training (verl grpo_passk, arXiv 2503.19595): only each group's best row gets
    # (r_max − r_2nd)/(std_g + eps); token_mean.
    "passk": AlgoSpec(advantage="passk", aggregation="token_mean"),
    # GPG, arXiv 2504.02546 (verl gpg): −A·logp, no ratio, no clip; A = α·(r − mean_g) with
    # α = B / #{non-zero rewards} over the batch (F_norm = 1); token_mean as verl.
    "gpg": AlgoSpec(advantage="gpg", objective="gpg", aggregation="token_mean"),
    # DRPO, arXiv 2510.04474 (Optimization-AI/DRPO): binary rewards read by the objective
    # (A = r); J_g = Σ_{r=1} w·s / Σ w − τ·logsumexp_{r=0}(s/τ), s = mean_t logp, w =
    # exp((1 − |o|/L_max)/λ); −Σ_g J_g/Q + sg(β·max(KL − δ, 0))·KL; τ 10, λ 0.1, β 1000, δ 1e-4.
    "drpo": AlgoSpec(advantage="reward", objective="drpo", aggregation="seq_mean_token_sum"),
    # GRPO-Guard, arXiv 2510.22319 (flow_grpo train_sd3_GRPO_Guard.py, config/grpo_guard.py):
    # log ρ̃ = mean_d[ξ·(μ_θ − μ_old)] (RatioNorm), −min(ρ̃A, clip(ρ̃, 1 ± 2e-6)A) / (−dt_j);
    # per-group std, A clipped at ±5; mean over samples of the mean over trained steps.
    # Flow policies only (needs step terms); the pickscore config uses ε = 4e-6.
    "grpo_guard": AlgoSpec(ratio_level="ratio_norm", step_reweight=True, eps_low=2e-6,
                           eps_high=2e-6, adv_clip=5.0),
    # Rewarding the Unlikely, arXiv 2506.02355 (rewarding-unlikely-release examples/lean/grpo.sh):
    # r̃ = r·(1 − 0.25·rank/N) by token-mean old log-prob rank, then GRPO. The release divides
    # by std + 1e-6 and adds a k3 KL of 0.1: override adv_eps / beta to match it exactly.
    "unlikeliness": AlgoSpec(advantage="unlikeliness"),
    # RiskPO, arXiv 2510.00911 (RTkenny/RiskPO MVaR script): bundles of 5 prompts, mixed VaR
    # at α 0.2 / 0.8, w 1.5, batch quantiles (the script's tracked "mix" needs state); no KL.
    "riskpo": AlgoSpec(advantage="mixed_var"),
}


def algo_problems(name: str, **overrides) -> List[str]:
    """Every problem with preset ``name`` plus ``overrides``, as messages; [] when valid.

    Checks the preset name (with did-you-mean), override keys, axis names (via the registries),
    types, ranges and combinations (per-sequence ratio vs token aggregation, ``reg`` without a
    sequence ratio, ``fixed_norm`` without ``max_len``, ``tw`` with a sequence level, ...).
    ``length_normalize`` (bool) maps to ratio_level ``sequence`` (True) / ``sequence_sum`` (False).
    """
    problems: List[str] = []
    if not isinstance(name, str) or name not in PRESETS:
        problems.append(f"unknown preset {name!r} (registered: {', '.join(sorted(PRESETS))})"
                        f"{did_you_mean(name, PRESETS)}")
        base = AlgoSpec()
    else:
        base = PRESETS[name]
    unknown = [k for k in overrides if k not in _FIELDS and k not in _EXTRA_KEYS]
    for k in unknown:
        problems.append(f"unknown override {k!r} (known: {', '.join(sorted(_FIELDS))}, "
                        f"length_normalize){did_you_mean(k, list(_FIELDS) + list(_EXTRA_KEYS))}")
    overrides = {k: v for k, v in overrides.items() if k not in unknown}
    overrides = _apply_length_normalize(base, overrides, problems)
    type_problems = _type_problems(overrides)
    problems += list(type_problems.values())
    # Keep checking the rest with the preset's value in place of each ill-typed override.
    spec = dataclasses.replace(base, **{k: v for k, v in overrides.items()
                                        if k not in type_problems})
    return problems + _axis_problems(spec) + _range_problems(spec) + _combination_problems(spec)


def resolve_algo(name: str, **overrides) -> AlgoSpec:
    """The :class:`AlgoSpec` of preset ``name`` with ``overrides`` applied.

    Args:
        name: a key of :data:`PRESETS`.
        **overrides: ``AlgoSpec`` fields, plus ``length_normalize`` (bool) for Reg-GRPO.

    Returns:
        a frozen, validated ``AlgoSpec``.

    Raises:
        ValueError: listing every problem found by :func:`algo_problems`.
    """
    problems = algo_problems(name, **overrides)
    if problems:
        raise problems_error(f"invalid algorithm {name!r} with overrides {overrides!r}",
                             problems)
    fixed = _apply_length_normalize(PRESETS[name], overrides, [])
    return dataclasses.replace(PRESETS[name], **fixed)
