# Every target runs from a local .venv, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamp of the last editable install; pyproject.toml changes trigger a re-install.
STAMP := $(VENV)/.qllm-jax-installed

.PHONY: test demo lint format install clean

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python experiments/reproduce_paper.py --backend real --quick
	$(BIN)/python experiments/reproduce_paper.py --backend sim --profile mixtral-a100-paper --lengths paper --quick

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,experiments]'
	touch $@

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
