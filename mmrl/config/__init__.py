"""Configuration: typed, documented fields (declared with :func:`mmrl.fields.cfg`; built and
checked by :mod:`.core`), the safe YAML reader (:mod:`.yaml_safe`), the run config's sections
and checks (:mod:`.schema`) and the job registry (:mod:`.jobs`). Importing it loads no torch:
``mmrl config validate`` stays fast."""
from mmrl.config.core import (MAX_SHOWN, ConfigError, UserError, apply_overrides, build, cfg,
                              field_docs, load_yaml, parse_value, parse_yaml, show, to_dict)

__all__ = ["MAX_SHOWN", "ConfigError", "UserError", "apply_overrides", "build", "cfg",
           "field_docs", "load_yaml", "parse_value", "parse_yaml", "show", "to_dict"]
