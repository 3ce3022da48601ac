# Two entry points (see README): `make demo` and `make test` (the whole suite, slow tests included:
# wheel build and install, NetPyNE on 1 and 2 MPI ranks; `make test PYTEST_ARGS="-m 'not slow'"` skips them).
# Both create the virtual environment if it is missing and install the package; so does `make corpus`, which
# builds the training corpus (hours; README, "Ground truth").
PYTHON ?= python3
VENV ?= .venv
VENV_OPTS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lfdeep-installed
PYTEST_ARGS ?=

.PHONY: setup demo test corpus clean-cache

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_OPTS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Keep a torch that is already importable (e.g. a CUDA build on a GPU machine,
	# via VENV_OPTS=--system-site-packages); otherwise take the CPU wheel.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lfdeep-neuron demo

test: setup
	# pytest exit code 5 (no tests collected) is a failure too.
	$(PY) -m pytest -q -ra $(PYTEST_ARGS) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

# The training corpus of README's "Ground truth", folder after folder; every command resumes where it stopped,
# so `make corpus` after an interruption (or on a new machine) continues or rebuilds it. Check each folder
# against README with `lfdeep-neuron generate --status DIR --digest`.
MORPHOLOGY ?= ../shared/hay/cell1.asc
WORKERS ?= 2
GEN = $(VENV)/bin/lfdeep-neuron generate --morphology $(MORPHOLOGY) --duration-ms 6000 --workers $(WORKERS)
corpus: setup
	$(GEN) --out data/corpus/published --n-sims 600 --seed 2027
	$(GEN) --out data/corpus/excited --n-sims 400 --seed 2028 --generator excited --splits 1,0,0
	$(GEN) --out data/corpus/published_b --n-sims 1000 --seed 2029 --splits 1,0,0
	$(GEN) --out data/corpus/volleys --n-sims 1000 --seed 2031 --generator volleys --splits 1,0,0

clean-cache:
	rm -rf $${LFDEEP_CACHE_DIR:-$$HOME/.cache/lfdeep_neuron}
