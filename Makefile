# make demo / make test each set themselves up on a fresh machine: a .venv made with pip,
# the pinned stack from constraints.txt (torch and torchvision pinned together), then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmrl-installed
PEERS  := .peers
# hpsv3 1.0.0 and the transformers 4.45.2 stack it pins: a separate folder, read only by the
# subprocess of tests/rewards/hpsv3_peer.py (with it first on sys.path).
PEERS_HPSV3 := .peers-hpsv3
export HF_HUB_OFFLINE := 1

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt peers.txt peers-hpsv3.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt torch torchvision
	$(PY) -m pip install -c constraints.txt -e '.[all,dev]'
	rm -rf $(PEERS)
	$(PY) -m pip install -q --no-deps --target $(PEERS) -r peers.txt
# verl's wheel also installs top-level packages named tests and scripts: drop them, so that
# they can never shadow this repository's tests/ once .peers/ is on sys.path.
	rm -rf $(PEERS)/tests $(PEERS)/scripts
	rm -rf $(PEERS_HPSV3)
	$(PY) -m pip install -q --no-deps --target $(PEERS_HPSV3) -r peers-hpsv3.txt
# the hpsv3 wheel also installs top-level packages named evaluate and generate: drop them.
	rm -rf $(PEERS_HPSV3)/evaluate $(PEERS_HPSV3)/generate
	touch $(STAMP)

# Four tiny runs, each a few minutes at most on 2 CPU cores: the pure-torch toy task, a video
# QA task on a tiny Qwen2.5-VL, prompt-following text-to-image GRPO on a tiny SD3 (grids in
# runs/demo-diffusion/eval) and text-to-video GRPO on a tiny Wan (runs/demo-diffusion-video/eval).
# train.overwrite=true: a second `make demo` replaces the last demo runs (resume: never).
demo: $(STAMP)
	$(VENV)/bin/mmrl train configs/demo/toy.yaml train.overwrite=true
	$(VENV)/bin/mmrl train configs/demo/video_tiny.yaml train.overwrite=true
	$(VENV)/bin/mmrl diffusion tiny-pipeline runs/tiny-sd3-demo --demo --overwrite
	$(VENV)/bin/mmrl train configs/demo/diffusion_tiny.yaml train.overwrite=true
	$(VENV)/bin/mmrl diffusion tiny-pipeline runs/tiny-wan --family wan --size 32 --demo --overwrite
	$(VENV)/bin/mmrl train configs/demo/diffusion_video_tiny.yaml train.overwrite=true

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) $(PEERS) $(PEERS_HPSV3) runs build *.egg-info
