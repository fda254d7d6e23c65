# param-decomp-jax: every target works on a fresh machine with Python 3.11 and PyPI access.
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tms_5-2.yaml

.PHONY: install run test test-all test-slow check bench clean

install:  ## create .venv from the lock file (uv is installed with pip if missing)
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
	uv sync --frozen

run: install  ## install, then decompose the default toy model (TMS 5-2) on CPU
	$(VENV)/bin/jsp-train $(CONFIG)

test:  ## the test suite without the long end-to-end runs
	$(PY) -m pytest -q -m "not slow"

test-slow:  ## only the long end-to-end runs
	$(PY) -m pytest -q -m slow

test-all:  ## everything
	$(PY) -m pytest -q

check:  ## lint + type check
	$(VENV)/bin/ruff check param_decomp_config param_decomp_jax tests bench
	$(VENV)/bin/ruff format --check param_decomp_config param_decomp_jax
	$(VENV)/bin/mypy

bench:  ## benchmarks; results in bench/results/*.json, summary in BENCHMARKS.md
	$(PY) -m bench.run_all

clean:
	rm -rf .jax_cache runs .pytest_cache .mypy_cache .ruff_cache
