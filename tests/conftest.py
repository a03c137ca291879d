"""Test-wide settings: offline hubs, deterministic CPU torch."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# pytest-xdist runs one worker per core (make test: -n 2 on 2 cores): one torch thread each, so
# the workers do not oversubscribe the cores (small ops under two threads per worker ran ~10-20x
# slower while the other worker was busy); a single process may use two.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))
