"""Moved: the video job's config section is :mod:`mmrl.video.config` (torch-free) and its run
:mod:`mmrl.video.job`; the names are re-exported here."""
from mmrl.video.config import (VideoConfig, algo_defaults, check, preflight,  # noqa: F401
                               reward_spec_problems)
from mmrl.video.job import (build_augmenters, build_data, build_policy, run,  # noqa: F401
                            _video_kwargs)
