# Two commands do all setup on a fresh machine:
#   make demo   - a virtual environment with the demo extra, then `trainwire demo`
#   make test   - the whole suite: node tests of the dashboard's pure modules, then pytest
#                 (browser test included: needs Debian's chromium, see .ci/run)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

# torch==2.13.0 goes in first: on our machines that version is a CPU build on local
# disk, while any other torch request downloads a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test style types check clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.demo: pyproject.toml | $(VENV)/bin/python
	$(PIP) $(TORCH)
	$(PIP) -e '.[demo]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(VENV)/bin/python
	$(PIP) $(TORCH)
	$(PIP) -e '.[demo,dev]'
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/trainwire demo

test: $(VENV)/.dev
	node --test tests/dashboard/*.test.mjs
	$(PY) -m pytest

style: $(VENV)/.dev
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/ruff check src tests bench

types: $(VENV)/.dev
	$(VENV)/bin/mypy

check: style types test

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
