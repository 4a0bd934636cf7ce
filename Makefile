PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-gpu quality style benchmark clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 || $(BIN)/pip install --quiet torch
	$(BIN)/pip install --quiet -e ".[dev]"

install: $(BIN)/python

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/register-adapter demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 -m "not gpu"

test-gpu: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m gpu

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

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
