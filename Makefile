# easgd-mpi: the two commands a fresh machine needs are `make demo` and `make test`.
# Both create .venv first (the package, mpi4py and MPICH from PyPI wheels; no system MPI).

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
MPIEXEC := $(VENV)/bin/mpiexec
NP      ?= 5
# Per-launch limit for MPI test runs: a hung rank must fail the run, not stall CI.
MPI_TEST_TIMEOUT ?= 300
# pytest-xdist workers for the unit and CLI tests: one per core (auto), at most 4 (each CLI test
# launches up to 5 MPI ranks). TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= auto
ARGS    ?=

.PHONY: venv demo test lint test-unit test-mpi test-tools test-slurm bench clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[mpich,test,plot]'
	# PyTorch for the torch models and their tests: the CPU-only build where the index has it
	# (0.7 GB installed instead of 5.5 GB with CUDA), else whatever build the index offers.
	$(PY) -m pip install --quiet 'torch==2.13.0+cpu' 2>/dev/null \
	  || $(PY) -m pip install --quiet --index-url https://download.pytorch.org/whl/cpu torch 2>/dev/null \
	  || $(PY) -m pip install --quiet 'torch>=2.1'
	touch $@

venv: $(VENV)/.installed

## demo: the main job: 4 workers + master, async EASGD on the digits MLP (about 20 s)
demo: venv
	$(MPIEXEC) -n $(NP) $(VENV)/bin/easgd train $(ARGS)

## test: lint, unit tests, CLI tests, then the MPI tests at 2, 3 and 5 ranks
test: lint test-unit test-mpi

## lint: ruff (pinned in the test extra): the rules and the formatting of pyproject.toml
lint: venv
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

test-tools:
	bash tools/install-test-tools.sh

## test-unit: the unit, CLI and GPU tests in parallel (pytest-xdist; a group that shares a
## module fixture or the GPU stays in one worker), then the `serial` ones alone: they bound in
## seconds how a run they signal or kill ends, which a busy machine would break. The CLI tests
## (MPI launches, seconds each) are handed out first, the short unit tests fill the last gaps.
test-unit: venv test-tools
	timeout 1500 $(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses=4 --dist loadgroup \
	  -m "not serial" tests/cli tests/gpu tests/unit
	timeout 600 $(PY) -m pytest -q -m serial tests/unit tests/cli tests/gpu

test-mpi: venv
	@for n in 2 3 5; do \
	  echo "== MPI tests with $$n ranks"; \
	  timeout $(MPI_TEST_TIMEOUT) $(MPIEXEC) -n $$n $(PY) -m pytest --with-mpi -q tests/mpi \
	    || exit 1; \
	done

## test-slurm: the jobs/ templates on a private local Slurm cluster (tests/slurm; root: installs
## Debian's slurmctld, slurmd and munge when missing; about 1-2 minutes)
test-slurm: venv
	timeout 600 $(PY) -m pytest -q tests/slurm

## bench: the exchange benchmark (writes bench/results/exchange.json)
bench: venv
	$(PY) bench/bench_exchange.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
