"""The toy job: a pure-torch policy on a bandit-like task, trained by the shared runner in
seconds (``mmrl train configs/demo/toy.yaml``; ``make demo`` runs it)."""
