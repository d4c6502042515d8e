"""Sampler benchmark: our Sampler vs HF `model.generate`, and both vs the decode ceiling.

    python bench/sampler.py                 # fp32 and bf16, 3 runs each
    python bench/sampler.py --quick         # 1 run, 32 new tokens: a smoke test
    python bench/sampler.py --dtype bf16 --runs 5
    python bench/sampler.py --dtype bf16 --runs 1 --profile   # where a decode step's time goes
    python bench/sampler.py --floor         # also: our decode step with attention taken out (an upper bound)
    python bench/sampler.py --device cuda --dtype bf16 --runs 1   # on a GPU (what bench/gpu_check.sh runs)

Work: SmolLM2-135M-Instruct (load_policy), 16 prompts x 4 samples = 64 rows, 128 new tokens each,
sampling at temperature 1 over the full vocabulary with no stop token, so every row generates exactly
`--new` tokens in both samplers (HF: min_new_tokens = max_new_tokens, top_k=0). Same inputs, same
dtype, one process; the contenders alternate within each run and we report min/median/max tok/s.

Decode ceiling: one decode step's matrix multiplies alone — the model's own weights at batch 64
(q, k, v, o, gate, up, down per layer, then lm_head), no attention, no norms, no sampling — timed
the same way, as tokens/s. A sampler's `ceiling_fraction` is its end-to-end tok/s (prefill
included) over the ceiling's. Peak memory: VmHWM of this process (common.peak_mib).

Decode bandwidth (`decode_gb_s`): the bytes one decode step must read — every weight once (the embedding
matrix only as the LM head: a lookup reads a few rows) and each live row's K and V at the positions it
attends (window-limited per layer) — times the decode steps, over the decode time. It counts what the
step needs, not what a kernel happens to read (the masked SDPA reads padding too; the CPU shared-prompt
decode reads a prompt's KV once for its n rows), so compare it with the device's peak bandwidth.

The last line printed is one JSON object.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rollout  # noqa: E402
from common import peak_mib, stats  # noqa: E402  (bench/common.py)
from data import gen_prompt, load_data  # noqa: E402
from models import load_policy  # noqa: E402
from rollout import Sampler  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def prompts_for(tok, k, seed=0):
    """k generation prompts (token ids): arith questions through data.gen_prompt."""
    return [gen_prompt(tok, r["question"]) for r in load_data("arith", limit=k, seed=seed)]


def _sync(device):
    """Wait for queued GPU work, so wall-clock times are the work's (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def decode_bytes_per_step(sampler, prompts, n, new):
    """Bytes one decode step must read (see the module doc), averaged over the new - 1 decode steps of a run
    where every row generates exactly `new` tokens: decode step t (t = 0 .. new - 2) feeds row r's token at
    position len(prompt) + t, which attends positions 0 .. len(prompt) + t of its row."""
    model, spec = sampler.model, sampler.spec
    size = torch.empty((), dtype=sampler.compute_dtype).element_size()
    embed = model.model.embed_tokens.weight
    weights = sum(p.numel() for p in model.parameters())  # tied weights counted once
    if model.lm_head.weight is not embed:
        weights -= embed.numel()
    positions = 0  # (row, layer, position) triples attended over the whole decode
    for p in prompts:
        for t in range(new - 1):
            seen = len(p) + t + 1
            positions += n * sum(min(seen, w) if w else seen for w in spec["windows"])
    kv = positions * 2 * spec["n_kv"] * spec["head_dim"]  # K and V elements
    return size * (weights + kv / (new - 1))


def run_ours(sampler, prompts, n, new, seed):
    t = time.perf_counter()
    out = sampler.generate(prompts, n=n, max_new_tokens=new, temperature=1.0, stop_ids=[], seed=seed)
    dt = time.perf_counter() - t
    assert all(o["length"] == new for o in out)
    return len(out) * new / dt, sampler.stats["decode_s"], dt


def run_hf(model, tok, prompts, n, new, seed):
    tok.padding_side = "left"
    width = max(map(len, prompts))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    ids, mask = ids.to(model.device), mask.to(model.device)
    torch.manual_seed(seed)
    _sync(model.device)
    t = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         num_return_sequences=n, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad)
    _sync(model.device)
    dt = time.perf_counter() - t
    assert out.shape == (len(prompts) * n, width + new)
    return out.shape[0] * new / dt, dt


def step_matmuls(model, batch, reps):
    """Tokens/s of one decode step's matmuls alone (the model's weights, batch rows, lm_head included)."""
    m = model.model
    kw = dict(dtype=model.dtype, device=model.device)
    x = torch.randn(batch, model.config.hidden_size, **kw)
    xi = torch.randn(batch, model.config.intermediate_size, **kw)
    xo = torch.randn(batch, m.layers[0].self_attn.o_proj.in_features, **kw)

    def step():
        for layer in m.layers:
            a, f = layer.self_attn, layer.mlp
            F.linear(x, a.q_proj.weight), F.linear(x, a.k_proj.weight), F.linear(x, a.v_proj.weight)
            F.linear(xo, a.o_proj.weight)
            F.linear(x, f.gate_proj.weight), F.linear(x, f.up_proj.weight), F.linear(xi, f.down_proj.weight)
        F.linear(x, model.lm_head.weight)

    with torch.inference_mode():
        step()  # warm-up
        _sync(model.device)
        t = time.perf_counter()
        for _ in range(reps):
            step()
        _sync(model.device)
        return batch * reps / (time.perf_counter() - t)


def profile_ours(sampler, prompts, n, new):
    """Where one generate() spends its time (torch.profiler, self CPU time): matmuls, attention, the rest,
    in ms per decode step (prefill included, it is ~10% of the total). Printed per op to stderr."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sampler.generate(prompts, n=n, max_new_tokens=new, temperature=1.0, stop_ids=[], seed=99)
    ops = prof.key_averages()
    print(ops.table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)
    part = dict(matmul=0.0, attention=0.0, other=0.0)
    for e in ops:
        kind = ("matmul" if e.key in ("aten::mm", "aten::addmm", "aten::bmm") else
                "attention" if "scaled_dot_product" in e.key else "other")
        part[kind] += e.self_cpu_time_total / 1e3 / new  # us -> ms per step
    return {k: round(v, 1) for k, v in part.items()}


def decode_without_attention(sampler, prompts, n, new, seed):
    """Decode tok/s of our sampler with CPU attention replaced by a no-op (output = query): everything
    a decode step does but attention. Its tokens are meaningless; its speed bounds what any attention
    kernel could give (`--floor`). CPU only (on CUDA the Sampler does not call rollout._attention)."""
    real, share = rollout._attention, sampler.share_prompts
    rollout._attention = lambda q, k, v, mask, scale: (q, q.new_zeros(q.shape[:-1], dtype=torch.float32))
    sampler.share_prompts = False  # one attention call per layer, no merge
    try:
        run_ours(sampler, prompts, n, new, seed)
    finally:
        rollout._attention, sampler.share_prompts = real, share
    return len(prompts) * n * (new - 1) / sampler.stats["decode_s"]


def bench_dtype(name, args):
    model, tok = load_policy(args.model, dtype=DTYPES[name], device=args.device)
    prompts = prompts_for(tok, args.prompts)
    sampler = Sampler(model, max_batch=args.prompts * args.n, max_len=max(map(len, prompts)) + args.new + 1)
    rows = args.prompts * args.n
    step_bytes = decode_bytes_per_step(sampler, prompts, args.n, args.new)
    # warm-up (allocations, MKL/oneDNN kernel selection) on a short run of each
    run_ours(sampler, prompts, args.n, 4, 0)
    run_hf(model, tok, prompts, args.n, 4, 0)
    ours, ours_decode, hf, ceil, floor, gbs = [], [], [], [], [], []
    for r in range(args.runs):
        tps, dec_s, _ = run_ours(sampler, prompts, args.n, args.new, r)
        ours.append(tps)
        ours_decode.append(rows * (args.new - 1) / dec_s)  # decode steps only (first token comes from prefill)
        gbs.append(step_bytes * (args.new - 1) / dec_s / 1e9)
        hf.append(run_hf(model, tok, prompts, args.n, args.new, r)[0])
        ceil.append(step_matmuls(model, rows, args.ceiling_reps))
        if args.floor:
            floor.append(decode_without_attention(sampler, prompts, args.n, args.new, r))
        print(f"[{name}] run {r + 1}/{args.runs}: ours {tps:.1f} tok/s (decode-only {ours_decode[-1]:.1f}, "
              f"{gbs[-1]:.1f} GB/s of weights + KV), "
              f"generate {hf[-1]:.1f} tok/s, ceiling {ceil[-1]:.1f} tok/s"
              + (f", no-attention decode {floor[-1]:.1f} tok/s" if floor else ""), file=sys.stderr, flush=True)
    med = statistics.median
    prof = {f"profile_ms_per_step_{name}": profile_ours(sampler, prompts, args.n, args.new)} if args.profile else {}
    if floor:  # decode-only tok/s without attention, and its fraction of the ceiling: what attention costs us
        prof.update({f"no_attention_decode_tok_s_{name}": stats(floor),
                     f"no_attention_ceiling_fraction_decode_{name}": round(med(floor) / med(ceil), 3)})
    return {**prof,
        f"ours_tok_s_{name}": stats(ours), f"ours_decode_tok_s_{name}": stats(ours_decode),
        f"decode_gb_s_{name}": stats(gbs), f"decode_mb_per_step_{name}": round(step_bytes / 1e6, 2),
        f"attention_{name}": sampler.attention_path(),
        f"generate_tok_s_{name}": stats(hf), f"ceiling_tok_s_{name}": stats(ceil),
        f"ratio_{name}": round(med(ours) / med(hf), 3),
        f"ceiling_fraction_{name}": round(med(ours) / med(ceil), 3),
        f"ceiling_fraction_decode_{name}": round(med(ours_decode) / med(ceil), 3),
        f"generate_ceiling_fraction_{name}": round(med(hf) / med(ceil), 3),
        f"prompt_tokens_{name}": sum(map(len, prompts)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="alias, HF id or checkpoint dir")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (then --floor and --profile do not apply)")
    ap.add_argument("--dtype", default="both", choices=["fp32", "bf16", "both"], help="model/compute dtype")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per contender (median reported)")
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt (rows = prompts * n)")
    ap.add_argument("--new", type=int, default=128, help="new tokens per row")
    ap.add_argument("--ceiling-reps", type=int, default=20, help="decode steps timed for the ceiling")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 run, 32 new tokens")
    ap.add_argument("--profile", action="store_true", help="also profile one run of ours: ms per decode step in "
                    "matmuls, attention and the rest (the profiler slows it; not used for the tok/s)")
    ap.add_argument("--floor", action="store_true", help="also time our decode with attention replaced by a no-op "
                    "(each run): the best any CPU attention kernel could do inside this sampler")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.new, args.ceiling_reps = 1, 32, 5
    res = dict(model=args.model, rows=args.prompts * args.n, new_tokens=args.new, runs=args.runs,
               threads=torch.get_num_threads(), cpu_count=os.cpu_count(), torch=torch.__version__)
    for name in (["fp32", "bf16"] if args.dtype == "both" else [args.dtype]):
        res.update(bench_dtype(name, args))
    res["peak_rss_mib"] = peak_mib()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
