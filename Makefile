# Two entry points for a new user: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev,triton,redis,langchain,llamaindex,index,corpus,embed

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.13.0            # CPU build; a CUDA machine may install its own torch first
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(BIN)/kvblend models pull smollm2-135m
	$(BIN)/kvblend demo

test: setup
	$(BIN)/kvblend models pull smollm2-135m
	bash scripts/test.sh

clean:
	rm -rf $(VENV) build *.egg-info
