"""Does this CPU run bf16 natively? One GEMM of SmolLM2's MLP at 512 rows (512x576 @ 576x1536), fp32 vs bf16,
one thread, median of 7 repeats of 5 calls after 3 warm-up calls; prints one JSON line.

    python bench/cpu_bf16.py

Without AVX512-BF16 or AMX, torch emulates bf16 (an AVX2 EPYC: 28.5x slower than fp32), which is why
experiment.py's --dtype / --mixed-precision auto pick fp32 there."""
import json
import statistics
import time

import torch


def gemm_ms(dtype, repeats=7, calls=5):
    a, b = torch.randn(512, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            a @ b
        times.append((time.perf_counter() - t) / calls * 1e3)
    return statistics.median(times)


if __name__ == "__main__":
    torch.set_num_threads(1)
    fp32, bf16 = gemm_ms(torch.float32), gemm_ms(torch.bfloat16)
    print(json.dumps(dict(fp32_ms=round(fp32, 1), bf16_ms=round(bf16, 1), bf16_over_fp32=round(bf16 / fp32, 1),
                          capability=torch.backends.cpu.get_cpu_capability(),
                          avx512_bf16=torch.cpu._is_avx512_bf16_supported(), amx=torch.cpu._is_amx_tile_supported())))
