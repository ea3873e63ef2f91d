# Two commands do all set-up on a fresh Linux machine with Python 3.11:
#   make demo   the default MGS recipe on the real SmolLM2-135M: dense and sparse answers side by side
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

install: $(VENV)/.installed

# torch is pinned first so pip takes the local CPU wheel instead of a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(BIN)/treeffn demo --overwrite

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache
