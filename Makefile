# Two commands set up everything on a fresh machine: `make demo` and `make test`.
# `make setup` is idempotent: it reinstalls only when pyproject.toml or constraints.txt changes. pyproject.toml
# declares ranges; constraints.txt pins the exact set we test, which setup installs.

PYTHON  ?= python3.11
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# System packages the optional backends build against (FFCV needs these at build time), and FFmpeg's shared
# libraries for SPDL (the bench extra: benchmarks.multicrop compares against it).
APT_PACKAGES := libturbojpeg0-dev libopencv-dev pkg-config libavdevice59 libavfilter8 libavformat59 libavcodec59 \
                libavutil57 libswscale6 libswresample4
EXTRAS  ?= dev,dali,ffcv,bench
DATA    ?= data/synthetic
# make curve/compare/ablations: the budget and seeds (PRESETS in experiments/compare.py); gpu: the larger GPU one
PRESET  ?= cpu

.PHONY: setup apt test demo eval curve compare ablations data bench gpu-bundle gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(MAKE) --no-print-directory apt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or newer"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	@# Numba's on-disk caches name the modules they were compiled in: a reinstall may have renamed them
	@find pipeline benchmarks -name '*.nb[ic]' -delete
	@touch $(STAMP)

# Installs only what is missing; never purges or autoremoves (OpenCV's dev packages depend on libmunge2).
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || printf '%s ' $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  echo "apt: installing $$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# Optional backends are installed by setup, so their tests must run: a missing one fails instead of skipping.
test: setup
	DENSESSL_REQUIRE_BACKENDS=1 $(PY) -m pytest -q

$(DATA)/.complete: | setup
	$(PY) -m densessl.pipeline.synthetic --out $(DATA)

data: $(DATA)/.complete

demo: setup
	$(PY) -m densessl.experiments.demo --synthetic-dir $(DATA) --out runs/demo

# After make demo: segmentation, depth and propagation on the embedded set, demo checkpoint vs random init.
eval: setup
	$(PY) -m densessl.evaluation all --checkpoint runs/demo --root $(DATA) --out runs/demo/eval

# VADeR's margin over random init against pretraining steps (the curve the budget was chosen from), 1 seed.
curve: setup
	$(PY) -m densessl.experiments.compare --curve 200 400 800 1600 --preset $(PRESET) --synthetic-dir $(DATA) --out runs/curve \
	  --runs runs/compare/runs

# VADeR vs DenseCL vs MoCo v2 (PRESET=gpu: and VADeR on multi-crop views) vs random init, 3 pretraining seeds
# each, same budget and protocols (experiments/compare.py).
compare: setup
	$(PY) -m densessl.experiments.compare --preset $(PRESET) --synthetic-dir $(DATA) --out runs/compare

# The reviewers' questions (ABLATIONS in experiments/compare.py), 2 seeds (PRESET=gpu: 3), reusing make
# compare's VADeR and MoCo v2 runs and every model's kept scores.
ablations: setup
	$(PY) -m densessl.experiments.compare --ablations --preset $(PRESET) --synthetic-dir $(DATA) --out runs/ablations \
	  --runs runs/compare/runs

bench: setup data
	$(PY) -m densessl.benchmarks.correspondence
	$(PY) -m densessl.benchmarks.loader --data $(DATA)/train

# For the GPU machine (no network, Python 3.12, its own torch): our wheel and what its image lacks, in
# .gpu-bundle/core; DALI=1 adds DALI in parts under 60 MiB (.gpu-bundle/dali). See benchmarks/gpu.sh.
gpu-bundle: setup
	$(PY) -m densessl.benchmarks.gpu_bundle $(if $(DALI),--dali)

# On a machine with a GPU and the project installed: the prepared GPU run (results in runs/gpu/results.md).
gpu-check: setup
	$(PY) -m densessl.benchmarks.gpu_bundle --out runs/gpu-bundle --python $$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
	BUNDLE=runs/gpu-bundle PYTHON=$(PY) bash benchmarks/gpu.sh

clean:
	rm -rf $(VENV) runs data .pytest_cache .hypothesis
