# The two front-door commands: `make test` and `make demo`. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Pinned so pip takes the CPU build (a bare `torch` can pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0

.PHONY: test test-fast demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[edge,trainer,dev]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

demo:
	@echo "make demo: not available yet (tracked by the demo issue)"; exit 2

bench: $(VENV)/.installed
	$(PY) bench/model_cost.py
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
