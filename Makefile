# Set-up is part of each target: a fresh clone needs only Python 3.11+, pip and the package registries.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: demo test lint bench-load bench-gpu gate

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.13.0  # the CPU build; see README
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test,bench,dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(VENV)/bin/gptoss demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check gptoss kernels train tests benchmarks

bench-load: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_load.py

# On a CUDA machine with its own torch and Triton (no network): GPU tests and kernel benchmarks, one results file.
bench-gpu:
	benchmarks/run_gpu.sh

# The kernels compiled for sm_90a and sm_100a on any machine, with the per-variant table.
gate: $(STAMP)
	$(VENV)/bin/python tests/compile_gate.py
