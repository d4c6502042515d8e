"""Decode-attention benchmark: why the Sampler's CPU attention is what it is.

    python bench/attention.py          # both parts, fp32 and bf16

1. Kernels alone, on one decode step's shapes for SmolLM2-135M at 64 rows (3 KV heads x 3 query heads each,
   head dim 64, 200 cached tokens), median of 30 calls: torch's CPU flash-attention kernel (what the Sampler
   calls) over the cache's own (B, T, H, D) layout as strided views, the same kernel over a head-major
   (B, H, T, D) copy, and plain matmul + softmax attention over each layout.
2. Inside the Sampler: `rollout._FLASH_CPU` on (flash kernel) vs off (rollout._attention's matmul path),
   64 rows x 64 new tokens, alternating, 3 runs each: decode ms per step.
The last line printed is one JSON object.
"""
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sampler import DTYPES, prompts_for  # noqa: E402  (bench/sampler.py)

import models  # noqa: E402
import rollout  # noqa: E402
from common import stats  # noqa: E402  (bench/common.py)

A, HKV, G, D, T = 64, 3, 3, 64, 200


def per_call_us(fn, reps=30):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def kernels(dtype):
    k, v = torch.randn(A, T, HKV, D, dtype=dtype), torch.randn(A, T, HKV, D, dtype=dtype)  # the cache's layout
    kh, vh = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # head-major copies
    q = torch.randn(A, HKV, G, D, dtype=dtype)  # G query heads of a KV head as the query axis (as the Sampler)
    mask = torch.zeros(A, 1, 1, T, dtype=dtype)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def matmul(kt, vt):
        s = torch.matmul(q, kt.transpose(-1, -2)).float().mul_(D ** -0.5).add_(mask)
        return torch.matmul(torch.softmax(s, -1).to(dtype), vt)

    cases = {"flash_cache_layout": lambda: flash(q, k.transpose(1, 2), v.transpose(1, 2), 0.0, False, attn_mask=mask),
             "flash_head_major": lambda: flash(q, kh, vh, 0.0, False, attn_mask=mask),
             "matmul_cache_layout": lambda: matmul(k.transpose(1, 2), v.transpose(1, 2)),
             "matmul_head_major": lambda: matmul(kh, vh)}
    flops = 4 * A * HKV * G * T * D
    with torch.inference_mode():
        return {name: dict(us=round(us), gflop_s=round(flops / us / 1e3, 1))
                for name, us in ((n, per_call_us(f)) for n, f in cases.items())}


def in_sampler(dtype, new=64, runs=3):
    model, tok = models.load_policy("smollm2-135m", dtype=dtype)
    prompts = prompts_for(tok, 16)
    s = rollout.Sampler(model, max_batch=64, max_len=max(map(len, prompts)) + new + 1)
    s.generate(prompts, n=4, max_new_tokens=4, stop_ids=[], seed=0)  # warm-up
    ms, flash_cpu = {True: [], False: []}, rollout._FLASH_CPU
    try:
        for r in range(runs):
            for flash in (True, False):
                rollout._FLASH_CPU = flash
                s.generate(prompts, n=4, max_new_tokens=new, stop_ids=[], seed=r)
                ms[flash].append(s.stats["decode_s"] / (new - 1) * 1e3)
    finally:
        rollout._FLASH_CPU = flash_cpu
    return dict(flash_ms_per_step=stats(ms[True], 1), matmul_ms_per_step=stats(ms[False], 1),
                matmul_over_flash=round(statistics.median(ms[False]) / statistics.median(ms[True]), 3))


def main():
    res = dict(threads=torch.get_num_threads(), torch=torch.__version__)
    for name, dtype in DTYPES.items():
        res[f"kernels_{name}"] = kernels(dtype)
        print(f"[attention] {name} kernels: {res[f'kernels_{name}']}", file=sys.stderr, flush=True)
        res[f"sampler_{name}"] = in_sampler(dtype)
        print(f"[attention] {name} in the sampler: {res[f'sampler_{name}']}", file=sys.stderr, flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
