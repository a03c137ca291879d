"""Research tools for where rollouts go: prompt selection (uniform, VADE, variance-aware),
rollout budgets (Knapsack allocation, DAPO dynamic sampling) and a simulator comparing them
(``mmrl sim``). See docs/budget.md."""
from mmrl._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports("mmrl.budget", {
    ".allocate": ("DynamicSampling", "DynamicSamplingReport", "allocation_value",
                  "expand_groups", "informative_groups", "knapsack_allocate",
                  "nonzero_gradient_prob", "rollout_value"),
    ".selection": ("PromptSelector", "UniformSelector", "VADESelector",
                   "VarianceAwareSelector", "SELECTORS", "make_selector",
                   "group_success_counts"),
})
