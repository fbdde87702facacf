# The two front-door commands: `make test` and `make demo`. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Pinned so pip takes the CPU build (a bare `torch` can pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0
DEMO_TRAIN_TIME ?= 20m
BENCH_ARGS ?=

.PHONY: test test-fast demo demo-model bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[edge,trainer,dev,demo]"
	# OpenVINO's converter and NNCF report usage to Google Analytics unless told not to.
	$(VENV)/bin/opt_in_out --opt_out
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

# The demo replays the in-repo sample demo/hazelnut through the kept model demo/bundle.
demo: $(VENV)/.installed
	$(PY) -m harness.demo --bundle demo/bundle --images demo/hazelnut/test --out demo-output

# Retrains and re-exports demo/bundle (kept in the repository) from the sample's good images.
demo-model: $(VENV)/.installed
	rm -rf build/demo-run demo/bundle
	$(PY) -m trainer fit demo/hazelnut --out build/demo-run --config configs/demo.toml --time-limit $(DEMO_TRAIN_TIME)
	$(PY) -m trainer eval build/demo-run demo/hazelnut --out build/demo-run/eval
	$(PY) -m trainer export build/demo-run --out demo/bundle --target portable --max-batch 8

# Every benchmark in one run (12 min here); writes docs/benchmarks.md. BENCH_ARGS="--run RUN"
# serves a trained run in the daemon benchmark instead of a 2-step model; "--soak-minutes 30" adds
# the soak (a fixed frame rate through the daemon, its memory watched).
bench: $(VENV)/.installed
	$(PY) bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
