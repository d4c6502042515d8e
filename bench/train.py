"""Training benchmark: the trainer's forward+backward throughput and MFU, and where a GC-RL step's time goes.

    python bench/train.py                  # throughput fp32 + bf16 (5 runs each), then 3 GC-RL steps
    python bench/train.py --quick          # smoke test: 1 run, 8 x (prompt + 16) tokens, 1 short GC-RL step
    python bench/train.py --skip-phases    # throughput only
    python bench/train.py --packing --phase-model runs/experiment/sft/final   # --share-prompts A/B (section 3)

1. Throughput. The trainer's own loss path: train.collate -> train.Policy (HF forward, fp32 LM head on the
   completion positions only) -> train.grpo_loss (token-mean, one update on fresh samples) -> backward, on
   `--batch` arith prompts (data.gen_prompt, ~90 tokens) each with `--completion` completion tokens; fp32, and
   bf16 autocast (fp32 master weights, as --mixed-precision bf16). fp32 and bf16 runs alternate. The optimizer
   step (grad clip + AdamW) is timed apart. tokens/s counts prompt + completion tokens (no padding).
   MFU = model FLOPs / s over a matmul peak measured in the same process on the model's own shape,
   (tokens x 576) @ (576 x 1536) for SmolLM2-135M. Model FLOPs of forward+backward = 3 x forward, forward =
   2 x (block linear weights) per token + causal attention (2 x 2 x ctx x heads x head_dim per token and
   layer) + 2 x hidden x vocab per completion token (the LM head runs on completions only). `gemm_fraction`:
   the same fwd+bwd matmuls (every linear layer's forward, input-grad and weight-grad GEMM) run alone, over
   the measured step time: how close the step is to its own matmul time.
2. Phases. `python train.py --mode gc` for `--steps` steps in a subprocess from the bench's cold-start
   checkpoint (vs_trl.cold_start: SFT on program-written solutions and critiques, built once into
   runs/bench/cold, so responses are mixed right/wrong and critiques get sampled); seconds per phase from its
   metrics.jsonl (time/rollout1, time/rollout2, time/score, time/update), the first step reported apart.
Peak memory: VmHWM (resource.getrusage maxrss where there is no /proc) of this process (throughput) and of the
training subprocess (phases).
The last line printed is one JSON object.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0:0] = [str(ROOT)]  # the repo's train.py, not this file, is `train`
import torch  # noqa: E402

import config  # noqa: E402
import data  # noqa: E402
import grpo  # noqa: E402
import models  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
from common import peak_mib, stats  # noqa: E402  (bench/common.py)


def timeit(fn, min_s=0.3):
    """Seconds per call of fn(): one warm-up call, then repeats until min_s has passed."""
    fn()
    n, t = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t
        if dt >= min_s:
            return dt / n


# ----------------------------------------------------------------------------- FLOPs and matmul peak

def linear_shapes(lm):
    """(in, out) of every linear layer of one decoder block (q, k, v, o, gate, up, down)."""
    b = lm.model.layers[0]
    mods = [b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj, b.self_attn.o_proj,
            b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj]
    return [(m.in_features, m.out_features) for m in mods]


def model_flops(lm, prompt_lens, completion):
    """Forward+backward FLOPs of the trainer's loss path on these sequences (see module doc)."""
    cfg = lm.config
    L, D, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or D // cfg.num_attention_heads
    per_tok = 2 * L * sum(i * o for i, o in linear_shapes(lm))
    fwd = 0
    for p in prompt_lens:
        T = p + completion
        fwd += per_tok * T
        fwd += L * 4 * cfg.num_attention_heads * hd * T * (T + 1) / 2  # QK^T and AV over the causal context
        fwd += 2 * D * V * completion
    return 3 * fwd


def gemm_peak(M, K, N, dtype):
    """FLOP/s of (M x K) @ (K x N) in `dtype` (the matmul peak MFU is measured against)."""
    a, b = torch.randn(M, K, dtype=dtype), torch.randn(K, N, dtype=dtype)
    return 2 * M * K * N / timeit(lambda: a @ b)


def gemm_time(lm, tokens, completion_tokens, dtype):
    """Seconds of the loss path's matmuls alone: each block linear's forward (x W^T), input grad (dy W) and
    weight grad (dy^T x) on `tokens` rows, times the layers; the fp32 LM head's three on the completion rows."""
    def three(M, i, o, dt):
        x, w, dy = torch.randn(M, i, dtype=dt), torch.randn(o, i, dtype=dt), torch.randn(M, o, dtype=dt)
        return timeit(lambda: (x @ w.T, dy @ w, dy.T @ x), min_s=0.1)

    block = sum(three(tokens, i, o, dtype) for i, o in linear_shapes(lm))
    head = three(completion_tokens, lm.config.hidden_size, lm.config.vocab_size, torch.float32)
    return lm.config.num_hidden_layers * block + head


# ----------------------------------------------------------------------------- 1. throughput

def throughput(args):
    lm, tok = models.load_policy(args.model, dtype=torch.float32)
    policy = grpo.Policy(lm).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    recs = data.load_data("arith", limit=args.batch, seed=0)
    g = torch.Generator().manual_seed(0)
    seqs = [grpo.Completion(prompt_ids=data.gen_prompt(tok, r["question"]),
                            tokens=torch.randint(0, lm.config.vocab_size, (args.completion,), generator=g).tolist())
            for r in recs]
    inputs, mask = grpo.collate(seqs, tok.pad_token_id, "cpu")  # distinct prompts: one row each, no packing
    adv = torch.randn(len(seqs), generator=g)
    plens = [len(s.prompt_ids) for s in seqs]
    tokens = sum(plens) + len(seqs) * args.completion
    flops = model_flops(lm, plens, args.completion)

    def fwd_bwd(bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logp, _ = policy(**inputs)
            loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, mask)  # token-mean, ratio 1 (fresh samples)
        loss.backward()

    def opt_step():
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    names = {"fp32": False, "bf16": True}
    times = {k: [] for k in names}
    opt_s = []
    for k, bf16 in names.items():  # warm-up (allocator, oneDNN kernel choice)
        fwd_bwd(bf16)
        opt_step()
    for r in range(args.runs):
        for k, bf16 in names.items():  # alternate fp32 / bf16
            t = time.perf_counter()
            fwd_bwd(bf16)
            times[k].append(time.perf_counter() - t)
            t = time.perf_counter()
            opt_step()
            opt_s.append(time.perf_counter() - t)
            print(f"[throughput] run {r + 1}/{args.runs} {k}: fwd+bwd {times[k][-1]:.2f} s "
                  f"({tokens / times[k][-1]:.0f} tok/s), optimizer {opt_s[-1]:.2f} s", file=sys.stderr, flush=True)
    D, d_ff = lm.config.hidden_size, lm.config.intermediate_size
    res = dict(batch=len(seqs), prompt_tokens_mean=round(sum(plens) / len(plens), 1), completion_tokens=args.completion,
               tokens=tokens, model_tflop=round(flops / 1e12, 3), optimizer_s=stats(opt_s, 3))
    for k, bf16 in names.items():
        dtype = torch.bfloat16 if bf16 else torch.float32
        peak = gemm_peak(tokens, D, d_ff, dtype)
        med = statistics.median(times[k])
        res[f"fwd_bwd_s_{k}"] = stats(times[k], 3)
        res[f"tokens_per_s_{k}"] = stats([tokens / t for t in times[k]], 0)
        res[f"completion_tokens_per_s_{k}"] = round(len(seqs) * args.completion / med)
        res[f"tflops_{k}"] = round(flops / med / 1e12, 3)
        res[f"gemm_peak_tflops_{k}"] = round(peak / 1e12, 3)
        res[f"mfu_{k}"] = round(flops / med / peak, 3)
        res[f"gemm_fraction_{k}"] = round(gemm_time(lm, tokens, len(seqs) * args.completion, dtype) / med, 3)
    res["peak_rss_mib_throughput"] = peak_mib()
    return res


# ----------------------------------------------------------------------------- 2. phases of a GC-RL step

PHASE_OUT = ROOT / "runs" / "bench" / "phases"


def phases(args):
    """Run the GC-RL steps in a child process (its own memory peak) and read its metrics.jsonl."""
    model = args.phase_model
    if model is None:
        from vs_trl import cold_start  # bench/vs_trl.py: builds runs/bench/cold once
        model = cold_start(quick=args.quick)
    argv = ["--mode", "gc", "--model", model, "--data", "arith", "--limit", "256", "--out", str(PHASE_OUT),
            "--max-steps", str(args.steps), "--seed", "0", "--log-every", "0", "--lr", "5e-6",
            "--questions-per-step", "4", "--num-generations", "4", "--pairs-per-step", "4", "--critiques-per-pair", "4",
            "--max-completion-length", str(args.max_new), "--max-critique-length", str(args.max_new),
            "--log-samples", "1000"]  # every response and critique into samples.jsonl: we count them
    print("[phases] train.py " + " ".join(argv), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, __file__, "--phase-worker", json.dumps(argv)], check=True, cwd=ROOT)
    rows = [json.loads(line) for line in (PHASE_OUT / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (PHASE_OUT / "samples.jsonl").read_text().splitlines()]
    keys = ("time/rollout1", "time/rollout2", "time/score", "time/update", "time/step")
    later = rows[1:] or rows
    return dict(phase_model=model, phase_steps=len(rows),
                phase_first_step={k: round(rows[0].get(k, 0.0), 2) for k in keys},
                phase_s={k: stats([r.get(k, 0.0) for r in later]) for k in keys},  # steps after the first
                phase_critiques=[sum(x["kind"] == "critique" and x["step"] == r["step"] for x in samples)
                                 for r in rows],
                phase_reward_response=[round(r["reward/response"], 3) for r in rows],
                phase_len_response=[round(r["len/response"], 1) for r in rows],
                phase_len_critique=[round(r.get("len/critique", 0.0), 1) for r in rows],
                phase_gen_tokens_per_s=stats([r["tokens_per_s"] for r in later], 1),
                peak_rss_mib_phases=json.loads((PHASE_OUT / "peak.json").read_text())["peak_rss_mib"])


# ----------------------------------------------------------------------------- 3. shared-prompt packing A/B

PACK_OUT = ROOT / "runs" / "bench" / "packing"
DEMO_GC = ["--mode", "gc", "--data", "arith:1", "--limit", "256", "--seed", "0", "--questions-per-step", "4",
           "--lr", "5e-6", "--mixed-precision", "bf16", "--num-generations", "4", "--pairs-per-step", "4",
           "--critiques-per-pair", "4", "--max-completion-length", "96", "--max-critique-length", "128",
           "--grad-accum", "4", "--log-every", "0"]  # the demo's GC-RL step (Makefile CPU_TRAIN)


def mean_of(xs, nd=1):
    return round(statistics.mean(xs or [0]), nd)


def packing(args):
    """Record a real GC-RL step of the demo's shapes (the fullest of the first 3 steps from the cold start), then
    time the trainer's update on exactly those sequences with --share-prompts true and false, each in its own
    process (its own memory peak), alternating true / false / false / true, --pack-updates timed updates per
    process after one warm-up. The whole step = the recorded step's rollout + scoring time + the update."""
    model = args.phase_model
    if model is None:
        from vs_trl import cold_start
        model = cold_start(quick=args.quick)
    argv = DEMO_GC + ["--model", model, "--out", str(PACK_OUT / "record"), "--max-steps", "3"]
    if args.quick:
        argv += ["--max-completion-length", "48", "--max-critique-length", "48"]
    print("[packing] recording: train.py " + " ".join(argv), file=sys.stderr, flush=True)
    tr = train.Trainer(config.build_parser().parse_args(argv))
    best, real_update = None, tr.update
    for _ in range(3):
        got = {}
        tr.update = lambda seqs, m: (got.setdefault("seqs", seqs), real_update(seqs, m))
        m = tr.rl_step().reduce(tr.runtime.accelerator)
        tr.step += 1
        rollout_s = sum(m.get(k, 0.0) for k in ("time/rollout1", "time/rollout2", "time/score"))
        if best is None or m.get("update/seqs", 0) > best[3]:  # the most sequences in the loss
            best = (got["seqs"], rollout_s, tr.step, m.get("update/seqs", 0))
    seqs, rollout_s, step, trained = best
    PACK_OUT.mkdir(parents=True, exist_ok=True)
    keep = ("prompt_ids", "tokens", "logprobs", "reward", "truncated", "kind", "source", "label")
    (PACK_OUT / "seqs.json").write_text(json.dumps([{k: getattr(s, k) for k in keep} for s in seqs]))
    del tr
    runs = {"true": [], "false": []}
    for share in ("true", "false", "false", "true")[:2 if args.quick else 4]:
        cmd = [sys.executable, __file__, "--packing-worker", json.dumps(argv + ["--share-prompts", share]),
               "--pack-updates", str(1 if args.quick else args.pack_updates)]
        proc = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
        res = json.loads(proc.stdout.splitlines()[-1])
        print(f"[packing] share-prompts {share}: update {res['update_s']} s, {res['tokens']} tokens, "
              f"peak {res['peak_rss_mib']} MiB", file=sys.stderr, flush=True)
        runs[share].append(res)
    out = dict(pack_model=model, pack_step=step, pack_seqs=len(seqs), pack_seqs_trained=trained,
               pack_responses=sum(s.kind == "response" for s in seqs),
               pack_critiques=sum(s.kind == "critique" for s in seqs),
               pack_prompt_tokens_mean={k: mean_of([len(s.prompt_ids) for s in seqs if s.kind == k])
                                        for k in ("response", "critique")},
               pack_completion_tokens_mean={k: mean_of([s.length for s in seqs if s.kind == k])
                                            for k in ("response", "critique")},
               pack_rollout_s=round(rollout_s, 2))
    for share, rs in runs.items():
        ups = [t for r in rs for t in r["update_s"]]
        out[f"pack_{share}"] = dict(update_s=stats(ups, 2), tokens=rs[0]["tokens"],
                                    peak_rss_mib=max(r["peak_rss_mib"] for r in rs),
                                    step_s=round(rollout_s + statistics.median(ups), 2))
    on, off = out["pack_true"], out["pack_false"]
    out["pack_update_ratio"] = round(on["update_s"]["median"] / off["update_s"]["median"], 3)
    out["pack_step_ratio"] = round(on["step_s"] / off["step_s"], 3)
    out["pack_tokens_ratio"] = round(on["tokens"] / off["tokens"], 3)
    return out


def packing_worker(argv, n):
    """One --share-prompts setting: the update on the recorded sequences, once to warm up, then n times timed."""
    tr = train.Trainer(config.build_parser().parse_args(argv))
    recorded = json.loads((PACK_OUT / "seqs.json").read_text())
    times, tokens = [], None
    for i in range(n + 1):
        seqs = [grpo.Completion(**s) for s in recorded]  # fresh records: the update sets their group and advantage
        m = runtime.Metrics()
        t = time.perf_counter()
        tr.update(seqs, m)
        dt = time.perf_counter() - t
        if i:
            times.append(round(dt, 3))
        tokens = m.get("update/tokens", [0])[0]
    print(json.dumps(dict(update_s=times, tokens=int(tokens), peak_rss_mib=peak_mib())))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="throughput model: alias, HF id or checkpoint dir")
    ap.add_argument("--batch", type=int, default=16, help="sequences per forward+backward")
    ap.add_argument("--completion", type=int, default=64, help="completion tokens per sequence")
    ap.add_argument("--runs", type=int, default=5, help="timed forward+backward runs per dtype (median reported)")
    ap.add_argument("--steps", type=int, default=3, help="GC-RL steps for the phase timings")
    ap.add_argument("--max-new", type=int, default=128, help="max response / critique tokens in the GC-RL steps")
    ap.add_argument("--phase-model", default=None, help="model of the GC-RL steps (default: the bench cold start)")
    ap.add_argument("--skip-phases", action="store_true", help="throughput only")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny shapes, 1 run, 1 short step")
    ap.add_argument("--packing", action="store_true", help="only the --share-prompts A/B on a recorded GC-RL step")
    ap.add_argument("--pack-updates", type=int, default=2, help="timed updates per process in the packing A/B")
    ap.add_argument("--phase-worker", help=argparse.SUPPRESS)  # JSON argv for train.main, run in this process
    ap.add_argument("--packing-worker", help=argparse.SUPPRESS)  # JSON argv for train.Trainer
    args = ap.parse_args()
    if args.packing_worker:
        return packing_worker(json.loads(args.packing_worker), args.pack_updates)
    if args.phase_worker:
        train.main(json.loads(args.phase_worker))
        (PHASE_OUT / "peak.json").write_text(json.dumps(dict(peak_rss_mib=peak_mib())))
        return
    if args.quick:
        args.batch, args.completion, args.runs, args.steps, args.max_new = 8, 16, 1, 1, 16
    res = dict(model=args.model, threads=torch.get_num_threads(), cpu_count=os.cpu_count(), torch=torch.__version__,
               load_avg_start=round(os.getloadavg()[0], 2))
    if args.packing:
        res.update(packing(args))
    else:
        res.update(throughput(args))
        if not args.skip_phases:
            res.update(phases(args))
    res["load_avg_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
