"""Preference optimization's math, one import for every piece (the contract of issue 19).

    PrefSpec, PREF_PRESETS, resolve_pref(name, **overrides), pref_problems(name, **overrides)
        the spec and its presets (mmrl.algo.pref_presets; no torch)
    PREF_LOSSES, PreferenceLoss(preset="dpo", **overrides), side_scores
        the loss registry and the loss (mmrl.algo.pref_losses)
    best_worst_pairs, win_rates, level_pairs
        pairs and win rates from a rollout's groups (mmrl.algo.pref_pairs)

The spec names are imported here directly; the torch ones on first use, so that the config
(``pref:`` section) can import this module without loading torch.

    loss = PreferenceLoss("dpo", beta=0.1)
    value, stats = loss(chosen_logp, rejected_logp, chosen_mask, rejected_mask,
                        chosen_ref=chosen_ref, rejected_ref=rejected_ref, num_pairs=P_global)
"""
from mmrl._lazy import lazy_exports
from mmrl.algo.pref_presets import PREF_PRESETS, PrefSpec, pref_problems, resolve_pref

__getattr__, __dir__, _lazy = lazy_exports("mmrl.algo.preference", {
    "mmrl.algo.pref_losses": ("PREF_LOSSES", "PreferenceLoss", "side_scores"),
    "mmrl.algo.pref_pairs": ("best_worst_pairs", "level_pairs", "win_rates"),
})
__all__ = sorted(_lazy + ["PREF_PRESETS", "PrefSpec", "pref_problems", "resolve_pref"])
