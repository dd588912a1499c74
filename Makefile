# The two commands of the README: `make run` and `make test`. Everything they need installs from here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# On machines that keep a local CPU build of torch on disk, pip must look there first: an unpinned or
# PyPI torch is a multi-GB CUDA build.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
PIP := $(PY) -m pip --disable-pip-version-check
# Every extra (see pyproject.toml): the worker's Triton client, in-process torch detectors with the backbone
# conversion and training, the evaluation harness, a VAE reader for NIRNet's simulator, and what the tests
# and the local services need. A lean worker that judges on Triton needs only `pip install '.[triton-client]'` (no torch).
EXTRAS := triton-client,inprocess,eval,vae,test,dev
DEMO_DIR := .cache/demo
SAMPLES ?= $(DEMO_DIR)

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml plugins/streamguard-provenance/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet $(FIND_LINKS) -e '.[$(EXTRAS)]' -e plugins/streamguard-provenance
	$(VENV)/bin/streamguard backbone fetch
	touch $@

# The main job on the embedded default: a broker and Redis on loopback (`streamguard dev up`), the
# sample images published, the worker judging them, every verdict and dead letter printed, then all
# stopped. The demo set holds bad files on purpose: they come back as dead letters.
run: setup
	$(PY) scripts/demo_images.py $(DEMO_DIR)
	VENV=$(VENV) scripts/run_demo.sh $(SAMPLES)

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/bench_intake.py
	$(PY) bench/bench_decode.py
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_worker.py
	$(PY) bench/bench_features.py
	$(PY) bench/bench_trunk.py
	$(PY) bench/bench_triton.py
	$(PY) bench/bench_banks.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis

deploy-tools: setup ; PROJECT_PYTHON=$(PY) scripts/install_deploy_tools.sh
