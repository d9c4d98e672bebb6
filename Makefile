# Set-up is part of each target: a fresh clone needs only Python 3.11+, pip and the package registries.
# The versions come from constraints.txt, the lock the suite last passed with (`make lock` refreshes it);
# pyproject.toml keeps open ranges for users. Without constraints.txt, the latest releases are taken.
PY ?= python3
VENV := .venv
LOCK := $(wildcard constraints.txt)
PIP := $(VENV)/bin/pip install --quiet --disable-pip-version-check $(if $(LOCK),-c $(LOCK))
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)

.PHONY: demo test lint lock bench-load bench-gpu gate

$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0 'setuptools>=68'  # the CPU build of torch (see README); setuptools builds the package below
	$(PIP) --no-build-isolation -e '.[test,bench,dev,app]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(VENV)/bin/gptoss demo

# Test files run in TEST_WORKERS processes (pytest-xdist), each file whole in one of them: a file's fixtures
# (the compile gate's compiles, the app's server) are made once. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=12

lint: $(STAMP)
	$(VENV)/bin/ruff check gptoss kernels train tests benchmarks
	$(VENV)/bin/ruff format --check gptoss kernels train tests benchmarks

# A deliberate refresh of the lock: the extras resolved afresh (the latest releases) in a scratch venv,
# frozen into constraints.txt. Commit it when `make test` passes with it; CI then installs exactly that.
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 'setuptools>=68'
	.venv-lock/bin/pip install --quiet --disable-pip-version-check --no-build-isolation -e '.[test,bench,dev,app]'
	{ echo "# The exact versions \`make test\` last passed with (pip constraints; refresh: make lock)."; \
	  echo "# pyproject.toml keeps open ranges for users; this file only pins what CI and make install."; \
	  .venv-lock/bin/pip freeze --all --exclude-editable --disable-pip-version-check | grep -v -i '^pip==' | sed 's/+cpu$$//'; \
	} > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt
	rm -rf .venv-lock

bench-load: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_load.py

# On a CUDA machine with its own torch and Triton (no network): GPU tests and kernel benchmarks, one results file.
bench-gpu:
	benchmarks/run_gpu.sh

# The kernels compiled for sm_90a and sm_100a on any machine, with the per-variant table.
gate: $(STAMP)
	$(VENV)/bin/python tests/compile_gate.py
