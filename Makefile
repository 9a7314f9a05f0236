# `make demo` and `make test` work on a fresh clone: both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.palign-setup

.PHONY: setup demo paper-demo test test-fast lint bench clean

$(STAMP): pyproject.toml scripts/setup_env.sh requirements/cpu.lock requirements/gpu.lock
	bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/palign run configs/demo.yaml

# The paper's experiment (every arm, then the comparison with its table) at demo scale.
paper-demo: $(STAMP)
	PALIGN=$(VENV)/bin/palign bash scripts/run_paper.sh configs/paper/demo

test: $(STAMP)
	$(VENV)/bin/ruff check palign tests benchmarks
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -rfEs --durations=30

# The pure tests: no Ray, no model, no GPU, no pip install (pyproject.toml's pytest markers).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not ray and not model and not gpu and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check palign tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

bench: $(STAMP)
	$(PY) benchmarks/judge_throughput.py --cache
	$(PY) benchmarks/align_overlap.py

clean:
	rm -rf runs
