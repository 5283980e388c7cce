# keras_varinit: the README's two commands are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= cpu,jax,explorer,datasets,dev
# Two test processes, a test file each (a module's fixtures built once; measured faster than
# sharing out single tests, which warms every cache twice), the 25 slowest listed;
# `make test PYTEST_ARGS=` runs serially.
PYTEST_ARGS ?= -n 2 --dist loadfile --durations=25
HOST ?= 127.0.0.1
PORT ?= 8501
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONWARNINGS ?= ignore::DeprecationWarning

.PHONY: setup run test test-tf test-jax bench profile clean help

help:
	@echo "make run    - create .venv if needed, install, start the explorer (http://$(HOST):$(PORT))"
	@echo "make test   - install if needed and run the whole test suite (TensorFlow, then JAX backend)"
	@echo "make bench  - run the benchmarks (ratios against Keras/numpy anchors)"
	@echo "make profile - print the 30-layer Xavier vs Kaiming variance profile"

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the project metadata changed: a second `make setup` takes a second.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/streamlit run explorer/app.py --server.address $(HOST) --server.port $(PORT) --browser.gatherUsageStats false

profile: setup
	$(VENV)/bin/keras-varinit profile --depth 30 --init xavier_normal --init kaiming_normal --activation relu

test: setup test-tf test-jax

test-tf: setup
	KERAS_BACKEND=tensorflow $(PY) -m pytest tests -q $(PYTEST_ARGS)

# Backend-independent parts (initializers, normalization layer, profile, callbacks) again on JAX.
test-jax: setup
	KERAS_BACKEND=jax $(PY) -m pytest tests -q -m backend_independent $(PYTEST_ARGS)

bench: setup
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
