#!/usr/bin/env bash
# The first run on a CUDA machine, in one go (under 8 minutes on one GPU): `make gpu-check` or
# `bash bench/gpu_check.sh`. Prints, in order: the GPU and torch build; whether flash-attn imports (and the
# error if not); the CUDA tests; the sampler benchmark with flash-attn, then with SDPA (flash-attn hidden), each
# against HF generate, with the decode's achieved bandwidth (GB/s of weights + KV per decode step); 3 GC-RL steps
# in bf16 on the built-in model. Paste the output into BENCHMARKS.md.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/gcrl-gpu-check}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null));"
  echo "gpu-check: run it on a GPU machine with the CUDA build of torch (requirements.txt, then requirements-gpu.txt)."
  exit 2
fi
failed=0
step() { echo; echo "=== $1"; }
run() { "$@" || { echo "gpu-check: FAILED ($?): $*"; failed=1; }; }

step "device"
run "$PY" - <<'PY'
import torch
p = torch.cuda.get_device_properties(0)
print(f"{torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} GPU(s); "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")
PY

step "flash-attn"
run "$PY" - <<'PY'
import rollout
if rollout.flash_attn_with_kvcache is None:
    print(f"flash-attn NOT importable: {rollout.FLASH_ERROR}")
    print("(the sampler uses SDPA with a mask; pip install -r requirements-gpu.txt builds flash-attn for this torch)")
else:
    import flash_attn
    print(f"flash-attn {flash_attn.__version__} importable: the bf16 sampler decodes with flash_attn_with_kvcache")
PY

step "CUDA tests"
run timeout 240 "$PY" -m pytest tests/test_rollout.py -k cuda -q

step "sampler benchmark: ours (flash-attn if importable) vs HF generate, bf16"
run timeout 150 "$PY" bench/sampler.py --device cuda --dtype bf16 --runs 1

step "sampler benchmark: ours with SDPA (flash-attn hidden) vs HF generate, bf16"
run timeout 150 "$PY" - <<'PY'
import runpy, sys
sys.path.insert(0, ".")
import rollout
rollout.flash_attn_with_kvcache, rollout.FLASH_ERROR = None, "hidden by gpu_check.sh"
sys.argv = ["bench/sampler.py", "--device", "cuda", "--dtype", "bf16", "--runs", "1"]
runpy.run_path("bench/sampler.py", run_name="__main__")
PY

step "GC-RL: 3 steps, bf16, smollm2-135m, arith:1"
rm -rf "$OUT"
run timeout 240 "$PY" train.py --mode gc --model smollm2-135m --data arith:1 --max-steps 3 --questions-per-step 8 \
  --num-generations 4 --pairs-per-step 8 --critiques-per-pair 4 --max-completion-length 128 --max-critique-length 128 \
  --mixed-precision bf16 --learning-rate 5e-6 --log-every 1 --out "$OUT"

echo
[ "$failed" = 0 ] && echo "gpu-check: all passed" || echo "gpu-check: some steps FAILED (see above)"
exit "$failed"
