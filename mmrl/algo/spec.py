"""The fields of an algorithm: :class:`AlgoSpec`, one choice per axis and every hyper-parameter,
each declared once with :func:`mmrl.fields.cfg` (type, default, bounds, meaning, source). The
config's ``algo:`` section and its rows in docs/config.md are derived from these declarations.
Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mmrl.algo.axes import STEP_ADVANTAGES, _axis_doc, axis_registry
from mmrl.fields import cfg

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
    step_advantage: str = cfg("none", "Token advantages from below the row, replacing "
                              "`advantage` (the job must give its rollouts steps, e.g. the toy "
                              "job): none; gigpo (A^E + omega*A^S, step groups by identical "
                              "state); spo_chain (V(c_k) - V(c_(k-1)) between Monte-Carlo values "
                              "at low-probability cut points).",
                              source="GiGPO arXiv 2505.10978; SPO arXiv 2505.23564")
    gigpo_gamma: float = cfg(0.95, "GiGPO: discount of the step returns R_t.", minimum=0.0,
                             maximum=1.0, source="GiGPO arXiv 2505.10978 (0.95)")
    gigpo_omega: float = cfg(1.0, "GiGPO: weight of the step advantage A^S.", minimum=0.0,
                             source="GiGPO arXiv 2505.10978 (1.0)")
    gigpo_mode: str = cfg("mean_std_norm", "GiGPO normalization: mean_std_norm ((x - mean) / "
                          "(std + 1e-6)) or mean_norm (x - mean).",
                          source="verl-agent gigpo (example scripts: mean_std_norm)")
    spo_interval: int = cfg(5, "SPO-chain: keep every K-th low-probability cut point.",
                            minimum=1, source="AIFrameResearch/SPO cutpoint_interval")
    spo_samples: int = cfg(4, "SPO-chain: Monte-Carlo continuations M per cut point (its value "
                           "V is their mean reward).", minimum=1, source="SPO arXiv 2505.23564")
    spo_threshold: float = cfg(0.9, "SPO-chain: a token with sampling probability below this "
                               "is a cut point (its prefix gets a value).", above=0.0,
                               maximum=1.0, source="SPO arXiv 2505.23564 (0.9)")
    ratio_level: str = cfg("token", "Importance-ratio level: token, sequence (GSPO), "
                           "sequence_token (GSPO-token), sequence_sum (Reg-GRPO), ratio_norm "
                           "(GRPO-Guard's RatioNorm of a Gaussian denoising step; the "
                           "diffusion job).",
                           source="GSPO arXiv 2507.18071; GRPO-Guard arXiv 2510.22319")
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
    off_policy_shaping: str = cfg("none", "Guide's ratio shaping of the rows flagged "
                                  "Rollout.off_policy (guidance: guide's hinted rows, trained "
                                  "for the plain prompt): " + _axis_doc("off_policy_shaping")
                                  + ". Their loss is -A*s(r), r = pi_theta(o_t|q)/"
                                  "pi_sampler(o_t|q,h), unclipped and without rollout_is "
                                  "weight; percentile: s(r) = r/(r + gamma_i), gamma_i the "
                                  "off_policy_gamma-quantile of r over the row (detached); "
                                  "constant: r/(r + off_policy_gamma); power: "
                                  "r^off_policy_gamma. Other rows keep the objective.",
                                  source="Guide arXiv 2506.13923; guide_rl "
                                  "core_algos.compute_policy_loss (gamma_strategy)")
    off_policy_gamma: float = cfg(0.9, "off_policy_shaping's gamma: the quantile (percentile, "
                                  "in (0, 1]), the constant, or the exponent (power).",
                                  above=0.0, source="guide_rl guide_grpo_*.sh gamma_value=0.9")
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
    step_reweight: bool = cfg(False, "Divide each trained denoising step's objective (not the "
                              "KL) by its sigma gap -dt_j = sigma_j - sigma_{j+1}, GRPO-Guard's "
                              "gradient reweighting; needs a policy with step terms (the "
                              "diffusion job).", source="GRPO-Guard arXiv 2510.22319; flow_grpo "
                              "train_sd3_GRPO_Guard.py (policy_loss / sqrt_dt**2)")

    # Issue 18, lane R: hyper-parameters of the likelihood-reading and gated advantages
    unlikely_beta: float = cfg(0.25, "Advantage unlikeliness: rank penalty beta; a correct "
                               "sample of likelihood rank k among N gets reward "
                               "1 - beta*k/N.", minimum=0.0, maximum=1.0,
                               source="arXiv 2506.02355; rewarding-unlikely-release "
                               "lean.rank_penalty (0.25)")
    novelty_lambda: float = cfg(1.0, "Advantage novelty_sharpen: positive advantages scale by "
                                "1 + lambda*max(z, 0), z = how far the row's mean log-prob "
                                "lies below its group's (unconfirmed; mmrl's default).",
                                minimum=0.0, source="XRPO arXiv 2510.06672 (abstract)")
    posterior_threshold: float = cfg(1.0, "multi_reward posterior_gate: the process reward "
                                     "columns count only where the first (outcome) column is "
                                     ">= this (unconfirmed; mmrl's default: full success).",
                                     source="Posterior-GRPO arXiv 2508.05170 (abstract)")
    riskpo_alpha_lo: float = cfg(0.2, "Advantage mixed_var: lower quantile level alpha_lo of "
                                 "the bundle's paper scores.", above=0.0, below=1.0,
                                 source="RiskPO arXiv 2510.00911; RTkenny/RiskPO scripts (0.2)")
    riskpo_alpha_hi: float = cfg(0.8, "Advantage mixed_var: upper quantile level alpha_hi "
                                 "(> alpha_lo).", above=0.0, below=1.0,
                                 source="RiskPO scripts (0.8)")
    riskpo_w_mix: float = cfg(1.5, "Advantage mixed_var: weight w of the lower-tail term, "
                              "A = (w*A_C + A_R)/(w + 1).", minimum=0.0,
                              source="RiskPO scripts (1.5)")
    riskpo_bundle: int = cfg(5, "Advantage mixed_var: prompts (groups) per bundle; paper k "
                             "sums the k-th rollout of each.", minimum=1,
                             source="RiskPO scripts (5)")
    riskpo_quantile_mode: str = cfg(
        "mix", "Advantage mixed_var: the quantiles q_lo, q_hi it uses: batch (each bundle's "
        "own); tracked (q̂, SGD-tracked over the run's steps, kept in checkpoints); mix "
        "((q̂ + batch)/2). Before the first step's update q̂ is the batch's.",
        choices=["batch", "tracked", "mix"], source="RiskPO scripts (use_q_track_mode mix)")
    riskpo_quantile_lr: float = cfg(0.1, "Advantage mixed_var: step lr_q of the tracked "
                                    "quantiles, q̂_α += lr_q*(α − mean(S < q̂_α)).", above=0.0,
                                    source="RiskPO scripts (lr_q 0.1)")
    drpo_tau: float = cfg(10.0, "Objective drpo: temperature tau of the log-sum-exp over a "
                          "group's wrong responses.", above=0.0,
                          source="DRPO arXiv 2510.04474; Optimization-AI/DRPO run_drpo_1.5b_8k.sh")
    drpo_lambda: float = cfg(0.1, "Objective drpo: length weight exp((1 - |o|/max_len)/lambda) of "
                             "correct responses (larger: weaker length reward).", above=0.0,
                             source="DRPO arXiv 2510.04474 (0.1)")
    drpo_beta: float = cfg(1000.0, "Objective drpo: coefficient of the KL-to-old constraint "
                           "sg(beta*max(KL - delta, 0))*KL.", minimum=0.0,
                           source="DRPO arXiv 2510.04474 (1000)")
    drpo_delta: float = cfg(1e-4, "Objective drpo: KL budget delta below which the constraint "
                            "is off.", minimum=0.0, source="DRPO arXiv 2510.04474 (1e-4)")

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
        """True when the rollout correction reads whole rows (a sequence weight, the
        off-policy sequence mask, or a per-row shaping γ)."""
        return (axis_registry("rollout_is").get(self.rollout_is).per_sequence
                or self.off_policy_mask is not None
                or axis_registry("off_policy_shaping").get(self.off_policy_shaping).whole_rows)

    @property
    def needs_rollout_logp(self) -> bool:
        """True when the loss needs the sampler's log-probs (``rollout_is`` or
        ``off_policy_shaping`` other than none)."""
        return (axis_registry("rollout_is").get(self.rollout_is).needs_rollout_logp
                or self.off_policy_shaping != "none")

    @property
    def needs_step_terms(self) -> bool:
        """True when the loss reads the per-step terms of a Gaussian transition (``step_std``,
        ``mean_shift``, ``step_gap``): the ``ratio_norm`` level or ``step_reweight``."""
        return (axis_registry("ratio_level").get(self.ratio_level).needs_step_terms
                or self.step_reweight)

    @property
    def per_sequence_loss(self) -> bool:
        """True when the loss is one value per sequence (``[B, 1]``, aggregated by ``seq_mean``)."""
        return axis_registry("ratio_level").get(self.ratio_level).per_sequence

    @property
    def needs_groups(self) -> bool:
        """True when the loss itself needs ``group_ids`` (``reg``, ``drpo``): whole groups in
        one call (a micro-batch must not split a group)."""
        return axis_registry("objective").get(self.objective).needs_groups

    @property
    def binary_rewards(self) -> bool:
        """True when the objective reads each row's reward r ∈ {0, 1} ``[B]`` instead of an
        advantage (``drpo``): a dense reward is a misuse, and the loss is no surrogate of A."""
        return axis_registry("objective").get(self.objective).binary_rewards

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
    def needs_seq_logp(self) -> bool:
        """True when the advantage estimator reads each row's token-mean old log-prob
        (unlikeliness, novelty_sharpen)."""
        return bool(getattr(axis_registry("advantage").get(self.advantage), "needs_seq_logp",
                            False))

    @property
    def needs_steps(self) -> bool:
        """True when the advantages are token advantages from below the row
        (``step_advantage`` other than none, :mod:`mmrl.train.steps`)."""
        return self.step_advantage != "none"

    def step_needs(self, flag: str) -> bool:
        """The step advantage's flag ``job_steps`` (per-step rewards and anchor states from the
        job) / ``mc_values`` (Monte-Carlo values from the policy's continuations); False when
        unknown."""
        return bool(STEP_ADVANTAGES.get(self.step_advantage, {}).get(flag, False))

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
