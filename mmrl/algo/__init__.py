"""The math of group-relative RL, shared by every domain: advantages, policy losses (ratio level
x objective x aggregation, KL), named presets, TW-GRPO token weights, reward shaping, and the
preference losses (DPO family, :mod:`mmrl.algo.preference`), and the weighted matching losses
of flow models (DiffusionNFT, AWM: :mod:`mmrl.algo.matching`, presets in
:mod:`mmrl.algo.match_presets`).

Pure torch; names are imported on first use (``mmrl.algo.presets`` itself needs no torch).
"""
from mmrl._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports("mmrl.algo", {
    ".advantages": ("ADVANTAGES", "MULTI_REWARD", "group_advantages", "group_stats"),
    ".losses": ("AGGREGATIONS", "KL_ESTIMATORS", "OBJECTIVES", "RATIO_LEVELS", "PolicyLoss",
                "kl_penalty", "policy_loss"),
    ".offpolicy": ("OFF_POLICY_SHAPINGS", "ROLLOUT_CORRECTIONS", "off_policy_mask",
                   "rollout_weights", "shape_off_policy"),
    ".presets": ("PRESETS", "AlgoSpec", "algo_problems", "resolve_algo"),
    ".shaping": ("soft_overlong_penalty",),
    ".token_weights": ("tw_token_weights",),
    ".entropy": ("logp_and_entropy", "token_entropy", "top_entropy_mask"),
    ".pref_presets": ("PREF_PRESETS", "PrefSpec", "pref_problems", "resolve_pref"),
    ".pref_losses": ("PREF_LOSSES", "PreferenceLoss"),
    ".pref_pairs": ("best_worst_pairs", "level_pairs", "win_rates"),
    ".match_presets": ("MATCH_PRESETS", "MatchSpec", "match_problems", "resolve_match"),
    ".matching": ("MATCHING_LOSSES", "MatchTerms", "matching_loss"),
})
