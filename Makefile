PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LATEST := .venv-latest
# The tested set of every dependency (see README, "Tested versions").
CONSTRAINTS := constraints.txt
# The CPU build of torch on this project's machines; elsewhere pip takes the release of that number.
TORCH := torch==2.13.0
PYTEST := HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2

.PHONY: install demo test test-fast test-gpu test-latest quality style benchmark clean

$(VENV)/.installed: setup.cfg $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH) || $(BIN)/pip install --quiet torch
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/register-adapter demo

test: install
	$(PYTEST) -m "not gpu"

test-fast: install
	$(PYTEST) -m "not gpu and not slow"

test-gpu: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m gpu

# The newest releases that setup.cfg allows, without constraints.txt: a breaking release shows here first.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet $(TORCH) || $(LATEST)/bin/pip install --quiet torch
	$(LATEST)/bin/pip install --quiet -e ".[dev]"
	$(LATEST)/bin/pip list --format=freeze | grep -iE '^(torch|transformers|peft|huggingface.hub|datasets|accelerate|evaluate|safetensors)='
	HF_HUB_OFFLINE=1 $(LATEST)/bin/python -m pytest -q -n 2 -m "not gpu"

quality: install
	$(BIN)/ruff check register_adapter tests benchmarks examples model_cards
	$(BIN)/ruff format --check register_adapter tests benchmarks examples model_cards

style: install
	$(BIN)/ruff check --fix register_adapter tests benchmarks examples model_cards
	$(BIN)/ruff format register_adapter tests benchmarks examples model_cards

benchmark: install
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/diagnose_throughput.py
	$(BIN)/python benchmarks/test_time_overhead.py
	$(BIN)/python benchmarks/distill_throughput.py

clean:
	rm -rf $(VENV) $(LATEST) build dist *.egg-info .pytest_cache .ruff_cache
