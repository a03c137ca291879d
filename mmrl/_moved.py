"""Old module paths of the flat ``mmrl/`` folder, still importable (with a DeprecationWarning)
from where they moved when the core was split into layers (``algo``, ``train``, ``config``,
``cli``, ``budget``, ``demo``): ``import mmrl.losses`` gives ``mmrl.algo.losses``."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "mmrl.advantages": "mmrl.algo.advantages", "mmrl.losses": "mmrl.algo.losses",
    "mmrl.presets": "mmrl.algo.presets", "mmrl.token_weights": "mmrl.algo.token_weights",
    "mmrl.shaping": "mmrl.algo.shaping",
    "mmrl.loop": "mmrl.train.loop", "mmrl.rounds": "mmrl.train.rounds",
    "mmrl.runner": "mmrl.train.runner", "mmrl.distributed": "mmrl.train.distributed",
    "mmrl.checkpoint": "mmrl.train.checkpoint", "mmrl.observe": "mmrl.train.observe",
    "mmrl.export_io": "mmrl.train.export_io", "mmrl.reward_fn": "mmrl.train.reward_fn",
    "mmrl.run_folder": "mmrl.train.run_folder",
    "mmrl.schema": "mmrl.config.schema", "mmrl.yaml_safe": "mmrl.config.yaml_safe",
    "mmrl.jobs": "mmrl.config.jobs", "mmrl.core_cli": "mmrl.cli.core",
    "mmrl.selection": "mmrl.budget.selection", "mmrl.sim": "mmrl.budget.sim",
    "mmrl.toy": "mmrl.demo.toy",
}
"""old module path -> new module path."""


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to the new module object (the same object: no second copy)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning,
                      stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):  # already executed as its new name
        pass


def install() -> None:
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
