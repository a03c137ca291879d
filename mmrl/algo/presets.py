"""Named algorithms as presets: one choice per axis plus hyper-parameters, never a code branch.

Each preset below carries its paper's arXiv id and key formula. :func:`resolve_algo` turns a
preset name plus keyword overrides into a frozen :class:`AlgoSpec`; :func:`algo_problems` lists
every problem with such a request at once (unknown names, wrong types, bad ranges, combinations
that cannot work), so a config error is reported in one go.

Every field of :class:`AlgoSpec` is declared once, with :func:`mmrl.fields.cfg` (type, default,
bounds, meaning, source); the config's ``algo:`` section is derived from these declarations. This
module imports no torch: the axis names and flags come from the registries once they are
imported, and from a table of the built-in entries before that (:func:`axis_registry`).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass
from typing import Dict, List, Optional

from mmrl.fields import cfg, range_problem
from mmrl.registry import Registry, did_you_mean

TOKEN_WEIGHTINGS = ("none", "tw")
EMPTY_ROWS = ("count", "skip")

# The built-in entries of each axis and the flags the checks read, without torch: validating a
# config (``mmrl config validate``) must not load it. The registries that hold the
# implementations (mmrl.algo.ratios, objectives, aggregations, kl, advantages) are used instead once they are
# imported, so entries a user registers count too; tests/config/test_algo_fields.py checks that
# this table equals the built-in registries.
_BUILTIN = {
    ("advantage", "mmrl.algo.advantages", "ADVANTAGES"): {
        **{n: dict(needs_lengths=False, needs_baseline=False) for n in (
            "batch_std", "grpo", "mean_center", "ngrpo", "rloo", "passk", "gpg")},
        **{n: dict(needs_lengths=True, needs_baseline=False) for n in (
            "reinforce_pp", "reinforce_pp_baseline", "opo")},
        "remax": dict(needs_lengths=False, needs_baseline=True)},
    ("multi-reward advantage", "mmrl.algo.advantages", "MULTI_REWARD"): {
        "normalize_then_sum": dict(one_column=False), "sum_then_normalize": dict(one_column=False),
        "gdpo": dict(one_column=True)},
    ("ratio level", "mmrl.algo.ratios", "RATIO_LEVELS"): {
        "token": dict(per_sequence=False, whole_sequence=False),
        "sequence": dict(per_sequence=True, whole_sequence=True),
        "sequence_token": dict(per_sequence=False, whole_sequence=True),
        "sequence_sum": dict(per_sequence=True, whole_sequence=True)},
    ("objective", "mmrl.algo.objectives", "OBJECTIVES"): {
        "clip": dict(needs_groups=False, needs_per_sequence=False, needs_token_ratio=False,
                     whole_sequence=False),
        "sapo": dict(needs_groups=False, needs_per_sequence=False, needs_token_ratio=False,
                     whole_sequence=False),
        "reg": dict(needs_groups=True, needs_per_sequence=True, needs_token_ratio=False,
                    whole_sequence=False),
        **{n: dict(needs_groups=False, needs_per_sequence=False, needs_token_ratio=True,
                   whole_sequence=n in ("clip_cov", "kl_cov", "vespo"))
           for n in ("cispo", "cispo_cap", "clip_cov", "gpg", "kl_cov", "vespo")}},
    ("aggregation", "mmrl.algo.aggregations", "AGGREGATIONS"): {
        "token_mean": dict(per_sequence=False, averages_rows=False),
        "seq_mean_token_mean": dict(per_sequence=False, averages_rows=True),
        "seq_mean_token_sum": dict(per_sequence=False, averages_rows=True),
        "fixed_norm": dict(per_sequence=False, averages_rows=True),
        "seq_mean": dict(per_sequence=True, averages_rows=True)},
    ("KL estimator", "mmrl.algo.kl", "KL_ESTIMATORS"): {n: {} for n in ("k1", "k2", "k3")},
    ("rollout correction", "mmrl.algo.offpolicy", "ROLLOUT_CORRECTIONS"): {
        "none": dict(per_sequence=False, needs_rollout_logp=False),
        **{n: dict(per_sequence=n.startswith("sequence"), needs_rollout_logp=True)
           for n in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")}},
}
_AXIS_OF = {"advantage": "ADVANTAGES", "multi_reward": "MULTI_REWARD",
            "ratio_level": "RATIO_LEVELS", "objective": "OBJECTIVES",
            "aggregation": "AGGREGATIONS", "kl": "KL_ESTIMATORS",
            "rollout_is": "ROLLOUT_CORRECTIONS"}


def _static(axis: str, entries: dict) -> Registry:
    table: Registry = Registry(axis)
    for name, flags in entries.items():
        table.register(name, types.SimpleNamespace(**flags))
    return table


_STATIC = {key[2]: (key[1], _static(key[0], entries)) for key, entries in _BUILTIN.items()}


def axis_registry(axis: str) -> Registry:
    """The registry of ``axis`` (``"objective"``, ``"ratio_level"``, ...): the live one when its
    module is imported (user entries included), else the torch-free table of built-in entries
    (same names, flags and error messages)."""
    module, table = _STATIC[_AXIS_OF[axis]]
    live = getattr(sys.modules.get(module), _AXIS_OF[axis], None)
    return live if live is not None else table


def _axis_doc(axis: str) -> str:
    return ", ".join(_STATIC[_AXIS_OF[axis]][1].names())


@dataclass(frozen=True)
class AlgoSpec:
    """One choice per axis and every hyper-parameter of a policy-gradient algorithm.

    Each field is declared once, here (type, default, bounds, meaning, source): the checks of
    :func:`algo_problems`, the ``algo:`` config section (:class:`mmrl.config.schema.AlgoConfig`,
    one optional override per field) and its rows in docs/config.md are derived from it.
    """

    advantage: str = cfg("grpo", "Advantage estimator (single reward; with several reward "
                         "columns the base of algo.multi_reward): " + _axis_doc("advantage")
                         + ".", source="mmrl.algo.advantages")
    ratio_level: str = cfg("token", "Importance-ratio level: token, sequence (GSPO), "
                           "sequence_token (GSPO-token), sequence_sum (Reg-GRPO).",
                           source="GSPO arXiv 2507.18071")
    objective: str = cfg("clip", "Per-token objective: " + _axis_doc("objective") + ".",
                         source="mmrl.algo.objectives")
    aggregation: str = cfg("seq_mean_token_mean", "Loss aggregation: "
                           + _axis_doc("aggregation") + "; per-sequence ratio levels need "
                           "seq_mean.", source="Dr.GRPO arXiv 2503.20783; DAPO arXiv 2503.14476")
    kl: str = cfg("k3", "KL estimator to the reference policy, used when beta > 0: k1, k2, k3 "
                  "(the diffusion job refuses it: see diffusion.kl).",
                  source="Schulman, 'Approximating KL divergence' (2020)")
    token_weighting: str = cfg("none", "Token weighting: none, or tw (TW-GRPO weights from the "
                               "group's full-vocabulary log-probs).",
                               source="TW-GRPO arXiv 2505.24718")
    eps_low: float = cfg(0.2, "Lower clip range: ratio clipped at 1 - eps_low (eps_low >= 1 "
                         "would let the clip range reach ratio <= 0).", minimum=0.0, below=1.0,
                         source="PPO arXiv 1707.06347 (0.2); DAPO clip-higher")
    eps_high: float = cfg(0.2, "Upper clip range: ratio clipped at 1 + eps_high.", minimum=0.0,
                          source="DAPO arXiv 2503.14476 (0.28)")
    dual_clip_c: Optional[float] = cfg(None, "Dual-clip constant c (> 1) bounding the loss for "
                                       "negative advantages (objective clip); null disables.",
                                       above=1.0,
                                       source="Dual-clip PPO arXiv 1912.09729; verl clip_ratio_c")
    tau_pos: float = cfg(1.0, "SAPO temperature for positive advantages.", above=0.0,
                         source="SAPO arXiv 2511.20347 (1.0)")
    tau_neg: float = cfg(1.05, "SAPO temperature for non-positive advantages.", above=0.0,
                         source="SAPO arXiv 2511.20347 (1.05)")
    eps_reg: float = cfg(1.0, "Reg-GRPO scale: predicted advantage = eps_reg * (centered "
                         "sequence log-ratio).", above=0.0,
                         source="DeepVideo-R1 arXiv 2506.07464 (1.0)")
    beta: float = cfg(0.0, "KL coefficient to the reference policy (0 = no reference model "
                      "needed).", minimum=0.0, source="GRPO (0.04); most recent recipes 0")
    max_len: Optional[int] = cfg(None, "Constant L_max of fixed_norm aggregation (the maximum "
                                 "completion length / trained steps).", minimum=1,
                                 source="Dr.GRPO arXiv 2503.20783")
    r_max: float = cfg(1.0, "NGRPO virtual sample's reward (the maximum reward).",
                       source="NGRPO arXiv 2509.18851 (1.0)")
    adv_eps: float = cfg(1e-4, "Epsilon added to the std in advantage normalization.",
                         minimum=0.0, source="1e-4 (flow_grpo, TRL)")
    adv_clip: Optional[float] = cfg(None, "Clip advantages to +-adv_clip; null disables.",
                                    above=0.0, source="flow_grpo (5)")
    multi_reward: str = cfg("sum_then_normalize", "How several reward columns become one "
                            "advantage (each built on `advantage`): " + _axis_doc("multi_reward")
                            + "; gdpo also applies to a single column.",
                            source="flow_grpo multi_score; MixGRPO advantage_aggr; GDPO arXiv "
                            "2601.05242 (TRL normalize_then_sum)")
    tw_alpha: float = cfg(1.7, "TW-GRPO maximum token weight alpha (1 = uniform weights, as "
                          "plain GRPO; below 1 weights high-divergence tokens down).",
                          minimum=0.0, source="TW-GRPO arXiv 2505.24718 (1.7)")
    delta: Optional[float] = cfg(None, "Two-sided clip of objective clip: the unclipped term "
                                 "uses min(ratio, delta), so A < 0 losses are capped at "
                                 "delta*abs(A) and A > 0 ratios at min(delta, 1 + eps_high); null "
                                 "disables. Equals dual_clip_c's value when delta = c >= 1 + "
                                 "eps_high (pass one of them). delta <= 1 would stop learning "
                                 "from A > 0 at ratio 1, so it must exceed 1 (TRL does not "
                                 "check).", above=1.0,
                                 source="INTELLECT-2 arXiv 2505.07291 (4); TRL GRPOConfig.delta")
    cispo_cap: float = cfg(5.0, "Objective cispo_cap (TRL's CISPO): absolute cap on the "
                           "stop-gradient importance weight, min(ratio, cap). TRL reads it from "
                           "epsilon_high and silently falls back to epsilon = 0.2 when unset.",
                           above=0.0, source="ScaleRL arXiv 2510.13786 (5.0); TRL docs")
    cov_ratio: float = cfg(2e-4, "Objectives clip_cov / kl_cov: fraction of a call's valid "
                           "tokens selected by covariance (at least 1): a fraction, not a "
                           "percent (verl clip_cov_ratio / kl_cov_ratio).", above=0.0,
                           maximum=1.0, source="verl 0.9 (2e-4); arXiv 2505.22617 recipes 2e-3 "
                           "(7B) / 2e-4 (32B)")
    clip_cov_lb: float = cfg(1.0, "Objective clip_cov: lower bound (exclusive) of the covariance "
                             "of candidate tokens.", source="verl clip_cov_lb (1.0)")
    clip_cov_ub: float = cfg(5.0, "Objective clip_cov: upper bound (exclusive) of the covariance "
                             "of candidate tokens; must exceed clip_cov_lb.",
                             source="verl clip_cov_ub (5.0)")
    kl_cov_coef: float = cfg(1.0, "Objective kl_cov: coefficient of abs(logp - old_logp) on the "
                             "selected tokens (verl ppo_kl_coef; its config default is 0.1, the "
                             "paper's code and verl's recipes use 1).", minimum=0.0,
                             source="arXiv 2505.22617 code and verl recipes (1.0)")
    vespo_k_pos: float = cfg(2.0, "Objective vespo: exponent k of phi(W) = W^k exp(lambda(1 - W)) "
                             "for A >= 0.", minimum=0.0, source="VESPO arXiv 2602.10693; TRL (2.0)")
    vespo_lambda_pos: float = cfg(3.0, "Objective vespo: rate lambda for A >= 0 (TRL floors it "
                                  "at 1e-4; mmrl needs > 0).", above=0.0,
                                  source="VESPO arXiv 2602.10693; TRL (3.0)")
    vespo_k_neg: float = cfg(3.0, "Objective vespo: exponent k for A < 0.", minimum=0.0,
                             source="VESPO arXiv 2602.10693; TRL (3.0)")
    vespo_lambda_neg: float = cfg(2.0, "Objective vespo: rate lambda for A < 0.", above=0.0,
                                  source="VESPO arXiv 2602.10693; TRL (2.0)")

    rollout_is: str = cfg("none", "Rollout/training mismatch correction from the sampler's "
                          "log-probs (Rollout.rollout_logp): " + _axis_doc("rollout_is")
                          + ". Weights of pi_old/pi_rollout, truncated or masked outside "
                          "[rollout_is_min, rollout_is_max], multiply the objective (not the "
                          "KL, not the normalizers); sequence modes need whole rows.",
                          source="TRL vllm_importance_sampling_mode; verl rollout_correction")
    rollout_is_max: Optional[float] = cfg(3.0, "Upper bound C_max of the rollout correction's "
                                          "weights (null: none; in a config, where null keeps "
                                          "the preset's 3, any value >= 5e8 is none: weights "
                                          "are at most e^20).", above=0.0,
                                          source="TRL vllm_importance_sampling_clip_max (3.0); "
                                          "verl rollout_is_threshold (2.0)")
    rollout_is_min: Optional[float] = cfg(None, "Lower bound C_min of the rollout correction's "
                                          "weights (null: none); both bounds are read only "
                                          "when rollout_is is not none.", minimum=0.0,
                                          source="TRL vllm_importance_sampling_clip_min; verl "
                                          "IcePop 'l_u' threshold")
    off_policy_mask: Optional[float] = cfg(None, "Off-policy sequence mask threshold delta: "
                                           "drop a negative-advantage row whose mean per-token "
                                           "log(pi_rollout/pi_theta) exceeds delta (null "
                                           "disables; needs whole rows).", above=0.0,
                                           source="DeepSeek-V3.2 arXiv 2512.02556 Eq. 9; TRL "
                                           "off_policy_mask_threshold (docs: 0.5)")
    kl_cap: Optional[float] = cfg(None, "Clamp the per-token KL term (beta > 0) to [-kl_cap, "
                                  "kl_cap]; the gradient is 0 where it binds. verl clamps its "
                                  "k3 (low_var_kl) at 10; null disables.", above=0.0,
                                  source="verl kl_penalty low_var_kl (10)")
    kl_bias_correction: bool = cfg(False, "Multiply the per-token KL term by the importance "
                                   "ratio (not detached; s_i for per-sequence ratio levels): "
                                   "an unbiased KL estimate for samples from the old policy. "
                                   "TRL use_bias_correction_kl (its default is true).",
                                   source="DeepSeek-V3.2 arXiv 2512.02556; TRL 1.16")
    entropy_coef: float = cfg(0.0, "Entropy bonus: loss -= entropy_coef * agg(H), the "
                              "temperature-scaled token entropy aggregated like the policy "
                              "term (verl entropy_coeff). Needs a policy with per-token "
                              "entropies (the VLM policy; refused for diffusion).", minimum=0.0,
                              source="verl entropy_coeff; TRL entropy_coef (0)")
    top_entropy_quantile: float = cfg(1.0, "Train only the tokens whose entropy (at the "
                                      "update's start) is in the top quantile of the optimizer "
                                      "mini-batch's valid tokens, all ranks together; 1 keeps "
                                      "all, 0 only the maximum. Masks the policy term and the "
                                      "entropy bonus, not KL or normalizers.",
                                      minimum=0.0, maximum=1.0,
                                      source="arXiv 2506.01939 (0.2); TRL top_entropy_quantile")
    empty_rows: str = cfg("count", "Rows with no valid token in the sequence-averaging "
                          "aggregations (seq_mean_token_mean, seq_mean_token_sum, seq_mean, "
                          "fixed_norm): count (mmrl: they add 0 and count in the row total) or "
                          "skip (verl: divide by the non-empty rows).",
                          source="verl agg_loss (skip)")

    @property
    def sequence_level(self) -> bool:
        """True when the ratio level (GSPO, GSPO-token, Reg-GRPO), the objective (VESPO's
        sequence weight, clip_cov / kl_cov's covariance) or the rollout correction
        (:attr:`rollout_correction_whole_rows`) reads whole sequences.

        Then every row's T tokens must reach the loss in one call: do not chunk the T axis.
        """
        return (axis_registry("ratio_level").get(self.ratio_level).whole_sequence
                or axis_registry("objective").get(self.objective).whole_sequence
                or self.rollout_correction_whole_rows)

    @property
    def rollout_correction_whole_rows(self) -> bool:
        """True when the rollout correction reads whole rows (a sequence weight, or the
        off-policy sequence mask)."""
        return (axis_registry("rollout_is").get(self.rollout_is).per_sequence
                or self.off_policy_mask is not None)

    @property
    def needs_rollout_logp(self) -> bool:
        """True when the loss needs the sampler's log-probs (``rollout_is`` other than none)."""
        return axis_registry("rollout_is").get(self.rollout_is).needs_rollout_logp

    @property
    def per_sequence_loss(self) -> bool:
        """True when the loss is one value per sequence (``[B, 1]``, aggregated by ``seq_mean``)."""
        return axis_registry("ratio_level").get(self.ratio_level).per_sequence

    @property
    def needs_groups(self) -> bool:
        """True when the loss itself needs ``group_ids`` (``reg``)."""
        return axis_registry("objective").get(self.objective).needs_groups

    @property
    def needs_ref(self) -> bool:
        """True when ``ref_logp`` is required (beta > 0)."""
        return self.beta > 0

    @property
    def needs_token_weights(self) -> bool:
        return self.token_weighting == "tw"

    @property
    def needs_lengths(self) -> bool:
        """True when the advantage estimator reads each row's token count (token-weighted
        statistics: REINFORCE++, OPO)."""
        return axis_registry("advantage").get(self.advantage).needs_lengths

    @property
    def needs_baseline(self) -> bool:
        """True when the advantage estimator needs a baseline reward per row: the reward of one
        greedy completion per group (ReMax; policy capability ``greedy``)."""
        return axis_registry("advantage").get(self.advantage).needs_baseline

    @property
    def needs_entropy(self) -> bool:
        """True when the loss reads per-token entropies (entropy bonus or top-entropy mask)."""
        return self.entropy_coef > 0 or self.top_entropy_quantile < 1


EXTRA_OVERRIDES = {
    "length_normalize": (Optional[bool], cfg(
        None, "Reg-GRPO: use the length-normalized sequence log-ratio (the same as "
        "ratio_level=sequence; false: sequence_sum).", source="DeepVideo-R1 arXiv 2506.07464")),
}
"""Overrides that are not :class:`AlgoSpec` fields: ``name -> (type, field)``; each maps onto
fields (see :func:`algo_problems`)."""


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
}

_FIELDS = {f.name: f for f in dataclasses.fields(AlgoSpec)}
_HINTS = typing.get_type_hints(AlgoSpec)
_AXES = ("advantage", "ratio_level", "objective", "aggregation", "kl", "multi_reward",
         "rollout_is")
_EXTRA_KEYS = tuple(EXTRA_OVERRIDES)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _value_type(key: str, hints: dict = _HINTS) -> type:
    """``str``, ``int`` or ``float``: the declared type of field ``key`` (None allowed aside)."""
    tp = hints[key]
    return next((a for a in typing.get_args(tp) if a is not type(None)), tp)


def _type_problems(values: dict, hints: dict = _HINTS) -> Dict[str, str]:
    """{key: problem} for overrides of the wrong type (per the field's declared type in
    ``hints``: AlgoSpec's, or another spec's such as :class:`mmrl.algo.pref_presets.PrefSpec`)."""
    problems = {}
    for key, v in values.items():
        tp = _value_type(key, hints)
        if v is None and typing.get_origin(hints[key]) is typing.Union:
            continue
        if tp is bool:
            if not isinstance(v, bool):
                problems[key] = f"{key} must be true or false, got {type(v).__name__} {v!r}"
        elif tp is str and not isinstance(v, str):
            problems[key] = f"{key} must be a name (str), got {type(v).__name__} {v!r}"
        elif tp is int and not (isinstance(v, int) and not isinstance(v, bool)):
            problems[key] = f"{key} must be an int, got {type(v).__name__} {v!r}"
        elif tp is not str and not _is_number(v):
            problems[key] = f"{key} must be a number, got {type(v).__name__} {v!r}"
        elif _is_number(v) and not math.isfinite(v):
            problems[key] = f"{key} must be finite, got {v!r}"
    return problems


def _range_problems(spec: AlgoSpec) -> List[str]:
    """Numbers outside their field's declared bounds (:func:`mmrl.fields.range_problem`)."""
    problems = [range_problem(f.name, getattr(spec, f.name), f.metadata) for f in _FIELDS.values()]
    return [p for p in problems if p is not None]


def _axis_problems(spec: AlgoSpec) -> List[str]:
    problems = []
    for axis in _AXES:
        name, registry = getattr(spec, axis), axis_registry(axis)
        if not isinstance(name, str):
            continue
        if axis == "advantage" and name in axis_registry("multi_reward"):
            problems.append(f"advantage {name!r} combines reward columns; the advantage axis "
                            f"takes a single-reward estimator ({', '.join(registry.names())}) "
                            f"that the loop's multi-reward method uses as its base")
        elif name not in registry:
            problems.append(registry.unknown_message(name))
    if isinstance(spec.token_weighting, str) and spec.token_weighting not in TOKEN_WEIGHTINGS:
        hint = did_you_mean(spec.token_weighting, TOKEN_WEIGHTINGS)
        problems.append(f"unknown token_weighting {spec.token_weighting!r} (expected one of "
                        f"{', '.join(TOKEN_WEIGHTINGS)}){hint}")
    if isinstance(spec.empty_rows, str) and spec.empty_rows not in EMPTY_ROWS:
        hint = did_you_mean(spec.empty_rows, EMPTY_ROWS)
        problems.append(f"unknown empty_rows {spec.empty_rows!r} (expected one of "
                        f"{', '.join(EMPTY_ROWS)}){hint}")
    return problems


def _combination_problems(spec: AlgoSpec) -> List[str]:
    levels, aggregations, objectives = (axis_registry(a) for a in
                                        ("ratio_level", "aggregation", "objective"))
    if not (spec.ratio_level in levels and spec.aggregation in aggregations
            and spec.objective in objectives):
        return []  # already reported as unknown names
    problems = []
    per_seq = levels.get(spec.ratio_level).per_sequence
    if per_seq and not aggregations.get(spec.aggregation).per_sequence:
        problems.append(f"ratio_level {spec.ratio_level!r} gives one loss per sequence but "
                        f"aggregation {spec.aggregation!r} averages tokens; use aggregation "
                        f"'seq_mean'")
    if not per_seq and aggregations.get(spec.aggregation).per_sequence:
        problems.append(f"aggregation {spec.aggregation!r} needs a per-sequence ratio level "
                        f"(sequence, sequence_sum), got {spec.ratio_level!r}; use a token "
                        f"aggregation such as 'token_mean'")
    if objectives.get(spec.objective).needs_per_sequence and not per_seq:
        problems.append(f"objective {spec.objective!r} regresses one value per sequence and "
                        f"needs ratio_level 'sequence_sum' or 'sequence', got {spec.ratio_level!r}")
    if spec.aggregation == "fixed_norm" and spec.max_len is None:
        problems.append("aggregation 'fixed_norm' needs max_len (the max completion length "
                        "L_max); pass max_len=<int>")
    if spec.token_weighting == "tw" and per_seq:
        problems.append(f"token_weighting 'tw' weights tokens but ratio_level "
                        f"{spec.ratio_level!r} is per sequence; use a token-level ratio")
    if spec.dual_clip_c is not None and spec.objective != "clip":
        problems.append(f"dual_clip_c only applies to objective 'clip', got objective "
                        f"{spec.objective!r}; drop dual_clip_c")
    return (problems + _objective_problems(spec, per_seq)
            + _rollout_correction_problems(spec, per_seq) + _kl_entropy_problems(spec, per_seq))


def _objective_problems(spec: AlgoSpec, per_seq: bool) -> List[str]:
    """Combinations of the objectives added after the first three (CISPO, Clip/KL-Cov, VESPO,
    GPG, TRL's delta)."""
    problems = []
    if axis_registry("objective").get(spec.objective).needs_token_ratio and per_seq:
        problems.append(f"objective {spec.objective!r} weights each token's log-prob and needs a "
                        f"token ratio level, got per-sequence {spec.ratio_level!r}; use "
                        f"ratio_level 'token' (or 'sequence_token' for a sequence ratio)")
    if spec.delta is not None and spec.objective != "clip":
        problems.append(f"delta only applies to objective 'clip', got objective "
                        f"{spec.objective!r}; drop delta")
    if spec.delta is not None and spec.dual_clip_c is not None:
        problems.append(f"delta={spec.delta} and dual_clip_c={spec.dual_clip_c} both cap the "
                        f"A < 0 loss (they coincide when delta = c >= 1 + eps_high); pass one")
    if _is_number(spec.clip_cov_lb) and _is_number(spec.clip_cov_ub) \
            and spec.clip_cov_lb >= spec.clip_cov_ub:
        problems.append(f"clip_cov_lb={spec.clip_cov_lb} must be below clip_cov_ub="
                        f"{spec.clip_cov_ub} (candidates satisfy lb < Cov < ub); lower lb or "
                        f"raise ub")
    return problems


def _rollout_correction_problems(spec: AlgoSpec, per_seq: bool) -> List[str]:
    corrections = axis_registry("rollout_is")
    if spec.rollout_is not in corrections:
        return []  # already reported as an unknown name
    problems = []
    lo, hi = spec.rollout_is_min, spec.rollout_is_max
    if _is_number(lo) and _is_number(hi) and lo >= hi:
        problems.append(f"rollout_is_min={lo!r} must be below rollout_is_max={hi!r}; lower "
                        f"rollout_is_min or raise rollout_is_max")
    if per_seq and not corrections.get(spec.rollout_is).per_sequence and \
            corrections.get(spec.rollout_is).needs_rollout_logp:
        problems.append(f"rollout_is {spec.rollout_is!r} weights tokens but ratio_level "
                        f"{spec.ratio_level!r} gives one loss per sequence; use "
                        f"sequence_truncate or sequence_mask")
    return problems


def _kl_entropy_problems(spec: AlgoSpec, per_seq: bool) -> List[str]:
    """Options that would be silently ignored: KL options without a KL term, a top-entropy
    mask on a per-sequence loss, ``empty_rows: skip`` with an aggregation that counts tokens."""
    problems = []
    for key, on in (("kl_cap", _is_number(spec.kl_cap) and spec.kl_cap > 0),  # else: range
                    ("kl_bias_correction", spec.kl_bias_correction is True)):
        if on and not spec.beta > 0:
            problems.append(f"{key} shapes the KL term, which beta={spec.beta} leaves out; set "
                            f"beta > 0 or drop {key}")
    if per_seq and spec.top_entropy_quantile < 1:
        problems.append(f"top_entropy_quantile={spec.top_entropy_quantile} masks tokens but "
                        f"ratio_level {spec.ratio_level!r} gives one loss per sequence; use a "
                        f"token-level ratio (token, sequence_token) or top_entropy_quantile=1")
    aggregation = axis_registry("aggregation").get(spec.aggregation)
    if spec.empty_rows == "skip" and not aggregation.averages_rows:
        problems.append(f"empty_rows='skip' changes how rows are counted, and aggregation "
                        f"{spec.aggregation!r} counts tokens (an empty row adds nothing to it); "
                        f"drop empty_rows or use a sequence-mean aggregation")
    return problems


def _apply_length_normalize(base: AlgoSpec, overrides: dict, problems: List[str]) -> dict:
    if "length_normalize" not in overrides:
        return overrides
    overrides = dict(overrides)
    flag = overrides.pop("length_normalize")
    level = overrides.get("ratio_level", base.ratio_level)
    if not isinstance(flag, bool):
        problems.append(f"length_normalize must be True or False, got {flag!r}")
    elif level not in ("sequence", "sequence_sum"):
        problems.append(f"length_normalize applies to a sequence log-ratio (reg_grpo, gspo); "
                        f"got ratio_level {level!r}; drop length_normalize")
    elif "ratio_level" in overrides and level != ("sequence" if flag else "sequence_sum"):
        problems.append(f"length_normalize={flag} contradicts ratio_level={level!r}; "
                        f"pass only one of them")
    else:
        overrides["ratio_level"] = "sequence" if flag else "sequence_sum"
    return overrides


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
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(f"invalid algorithm {name!r} with overrides {overrides!r}: "
                         f"{len(problems)} problem(s):\n{lines}")
    fixed = _apply_length_normalize(PRESETS[name], overrides, [])
    return dataclasses.replace(PRESETS[name], **fixed)
