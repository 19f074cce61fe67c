# The two commands of the README:
#   make demo   set up (first time) and run the main job on the embedded toy data
#   make test   set up (first time) and run the test suite (what CI runs)
# Bring your own torch (e.g. CUDA): install it into .venv first, or set
# TORCH_SPEC to what pip should install, e.g. TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124".

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-fault test-all bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first: installing the package first would make pip pull a multi-GB CUDA build.
$(VENV)/.setup-done: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.setup-done

demo: setup
	$(BIN)/segsynth run --method all --preset demo --out runs/demo

# Two workers: the suite's tiny models keep about one core busy, and many tests wait on subprocesses
# (SIGKILL resumes, torchrun), so two workers finish it in about 60 % of the serial time on 2 cores.
test: setup
	$(BIN)/python -m pytest tests -n 2

# The fault-injection tier: 20 seeded SIGKILLs per stage, a real full tmpfs (root), a killed rank.
test-fault: setup
	$(BIN)/python -m pytest tests -m fault -s

test-all: setup
	$(BIN)/python -m pytest tests -m "slow or fault or not slow"

bench: setup
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
