#!/bin/bash
# One experiment-grid eval, old code vs new, wall time, alone on the machine (BENCHMARKS.md, "Evals").
#   bench/evals.sh OLD_CHECKOUT NEW_CHECKOUT DEMO_DIR [PAUSE_PGID]
# OLD/NEW_CHECKOUT: git worktrees (`git worktree add /tmp/old <commit>`), each with .venv (a symlink to this
# one's); DEMO_DIR: a `make demo` dir (its sft/final and critique_test.jsonl). PAUSE_PGID: a process group to
# stop meanwhile (e.g. a running grid: kill -STOP, then -CONT), so that nothing else runs. The eval.json of each
# run is kept beside the times (compare their `items` for the same outcomes).
set -euo pipefail
OLD=$1 NEW=$2 DEMO=$3 PAUSE=${4:-}
OUT=${OUT:-/tmp/gcrl-evals}; mkdir -p "$OUT"
COMMON="--model $DEMO/sft/final --data arith:1 --critique-data jsonl:$DEMO/critique_test.jsonl --limit 256 --k 2
  --max-new-tokens 96 --critique-max-new-tokens 128 --dtype bf16 --seed 0 --prompt-style plain --no-selection"
[ -n "$PAUSE" ] && kill -STOP -- "-$PAUSE"
trap '[ -n "$PAUSE" ] && kill -CONT -- "-$PAUSE"' EXIT
run() {  # NAME CHECKOUT FLAGS...: one eval, its wall time appended to $OUT/times.txt
  local t0; t0=$(date +%s.%N)
  (cd "$2" && .venv/bin/python eval.py $COMMON "${@:3}" --out "$OUT/$1.json" > "$OUT/$1.log" 2>&1)
  echo "$1 $(echo "$(date +%s.%N) - $t0" | bc)" | tee -a "$OUT/times.txt"
}
for round in 1 2; do  # interleaved, the order reversed in round 2: the machine's speed drifts
  names=(old newk1 newk0); [ $round = 2 ] && names=(newk0 newk1 old)
  for w in "${names[@]}"; do
    case $w in
      old) run "old$round" "$OLD" --batch 32 --k-ref 1 ;;  # what the grid ran for every method before
      newk1) run "newk1_$round" "$NEW" --batch 256 --k-ref 1 ;;  # c, gc, c-denoise, gc-denoise
      newk0) run "newk0_$round" "$NEW" --batch 256 --k-ref 0 ;;  # every other method
    esac
  done
done
