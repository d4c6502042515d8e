"""The paper's setting (arXiv 2602.22765 §4.1, Table 1): the five generation benchmarks as one suite, the critique
benchmark built from models' own answers to them, and the GPU recipes that run the whole pipeline.

    python eval.py --model M --data suite[:DIR] [--critique-data jsonl:CRIT.jsonl] --out FILE.json
    python suite.py critique-bench --models M1,M2 --k 10 [--data suite[:DIR]] --out CRIT.jsonl
    python suite.py table A.json B.json ...          # Table 1's layout, one row per eval json
    python suite.py download DIR                     # every paper set from the hub into DIR/<name>/<split>.jsonl
    python suite.py estimate                         # each recipe's sizes, memory and time per step (estimated)
    python experiment.py DIR --recipe qwen2.5-0.5b [--dry-run]   # the whole pipeline at one scale

- The suite: MATH-500, GSM8K, Minerva, AMC23, OlympiadBench (data.py's specs; `suite:DIR` reads local copies),
  each evaluated by eval.evaluate (greedy accuracy of the last \\boxed{} answer, math-verify) with its per-item
  outcomes. The result's top-level blocks are the unweighted means over the benchmarks (Table 1's "Avg", what the
  experiment report's statistics read); `benchmarks` holds each one's own eval.py result.
- The critique benchmark (§4.1): k responses per question from each model, responses without \\boxed{} dropped,
  questions whose remaining responses are all right or all wrong dropped, one right and one wrong kept per question.
  Rows {benchmark, question, response, label, answer, model, id}: what `--critique-data jsonl:` reads.
Not done: unbiased pass@k; the paper's 72B critique model (our sampler runs on one GPU); judge-model grading.
"""
import copy
import json
import random
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import data
import reward

HERE = Path(__file__).resolve().parent
BENCHMARKS = {"math500": "M500", "gsm8k": "GSM8k", "minerva": "Minerva", "amc23": "AMC23", "olympiadbench": "Olymp"}
SPLITS = dict({name: data.PAPER_SETS[name][2] for name in BENCHMARKS if name in data.PAPER_SETS}, gsm8k="test")


def is_suite(spec):
    return str(spec) == "suite" or str(spec).startswith("suite:")


def benchmark_specs(spec):
    """`suite` -> {name: data spec} from the hub; `suite:DIR` -> the local copies DIR/<name>/<split>.{jsonl,parquet}
    (as `python suite.py download DIR` writes them) or DIR/<name>.{jsonl,parquet}; a missing one is named."""
    root = str(spec).partition(":")[2]
    if not root:
        return {name: name for name in BENCHMARKS}
    out = {}
    for name in BENCHMARKS:
        tried = [Path(root) / name / f"{SPLITS[name]}{ext}" for ext in (".jsonl", ".parquet")]
        tried += [Path(root) / f"{name}{ext}" for ext in (".jsonl", ".parquet")]
        path = next((p for p in tried if p.is_file()), None)
        if path is None:
            raise data.DataError(f"{spec}: no local copy of {name}; looked for {', '.join(map(str, tried))}")
        out[name] = f"{name}:{path}"
    return out


# ============================================================================ the suite: evaluate, combine, tabulate
COUNTS = ("n_questions", "n_pairs", "n_right", "n_wrong", "n_critiques")  # summed over benchmarks; the rest averaged


def _critique_by_benchmark(spec):
    """The rows of a critique benchmark jsonl, by their `benchmark` field."""
    import critique
    kind, _, path = str(spec).partition(":")
    if kind != "jsonl" or not path:
        raise data.DataError(f"--critique-data {spec}: a suite reads jsonl:PATH (python suite.py critique-bench)")
    by = defaultdict(list)
    for i, p in enumerate(critique.load_pairs(path), 1):
        if p.get("benchmark") not in BENCHMARKS:
            raise data.DataError(f"{path} row {i}: 'benchmark' must be one of {', '.join(BENCHMARKS)}, got "
                                 f"{p.get('benchmark')!r} (python suite.py critique-bench writes it)")
        by[p["benchmark"]].append(p)
    return by


def evaluate_suite(model, tok, args, log=print):
    """{name: eval.evaluate result} over the suite's benchmarks with one loaded model; `args` as eval.py parses them
    (--limit: questions per benchmark, 0 / unset = all). --critique-data: its pairs of each benchmark."""
    from tqdm import tqdm

    import eval as ev
    specs = benchmark_specs(args.data)
    pairs = _critique_by_benchmark(args.critique_data) if args.critique_data else None
    results = {}
    with tempfile.TemporaryDirectory() as tmp, tqdm(list(specs.items()), desc="suite", unit="benchmark") as bar:
        for name, spec in bar:
            bar.set_postfix_str(name)
            a = copy.copy(args)
            a.data, a.split, a.limit = spec, "test", args.limit or 10**9
            # room for the longest critique prompt (question + response) and its critique; the cache is sized by need
            a.max_len = max(args.max_len, 2 * args.max_new_tokens + args.critique_max_new_tokens + 1024)
            if args.save_samples:
                a.save_samples = str(Path(args.save_samples).with_suffix(f".{name}.jsonl"))
            if pairs is not None:
                a.critique_data = f"jsonl:{Path(tmp) / name}.jsonl"
                data.write_jsonl(Path(tmp) / f"{name}.jsonl", pairs.get(name, []))
            res = ev.evaluate(model, tok, a, log)
            if pairs is not None:
                res["critique"]["source"] = f"{args.critique_data}[{name}]"
            results[name] = dict(data=spec, **res)
            bar.write(f"[suite] {name}: generation {_pct(res['generation'].get('accuracy'))}, critique "
                      f"{_pct(res['critique'].get('accuracy'))}")
    return results


def _mean_block(blocks):
    """One block from the benchmarks' blocks: counts summed, other numbers averaged over the benchmarks that have
    them (Table 1's Avg), the rest from the first; `averaged_over` names the benchmarks; null when none has one."""
    have = {n: b for n, b in blocks.items() if b and b.get("reason") is None}
    if not have:
        first = next(iter(blocks.values()), {}) or {}
        return dict({k: None for k in first}, reason="; ".join(f"{n}: {b.get('reason')}" for n, b in blocks.items()))
    out = dict(next(iter(have.values())))
    for k, v in out.items():
        vals = [b.get(k) for b in have.values()]
        nums = [x for x in vals if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if k in COUNTS:
            out[k] = sum(nums)
        elif nums and k not in ("k", "samples_per_pair", "k_ref", "critique_samples"):
            out[k] = sum(nums) / len(nums)
    if "undefined" in out:
        out["undefined"] = {f"{n}.{k}": why for n, b in have.items() for k, why in (b.get("undefined") or {}).items()}
    out["averaged_over"] = list(have)
    return out


def combine(results):
    """Top-level generation / critique / selection blocks (means over the benchmarks) and items concatenated in
    benchmark order: question ids "name/id", critique pair indices offset, so paired statistics see every item."""
    items = dict(question_ids=[], greedy=[], samples=[], majority=[], critique=[])
    for name, res in results.items():
        it, base = res["items"], 1 + max((x["pair"] for x in items["critique"]), default=-1)
        items["question_ids"] += [f"{name}/{q}" for q in it["question_ids"]]
        items["greedy"] += it["greedy"]
        for key in ("samples", "majority"):
            items[key] = None if items[key] is None or it[key] is None else items[key] + it[key]
        items["critique"] += [dict(x, pair=x["pair"] + base, benchmark=name) for x in it["critique"]]
    blocks = {b: _mean_block({n: r.get(b) for n, r in results.items()})
              for b in ("generation", "critique", "selection")}
    verdicts = [x["verdict"] for x in items["critique"]]
    if verdicts and blocks["critique"].get("collapsed") is not None:  # one verdict on >= 95% of all the critiques
        import eval as ev
        blocks["critique"]["collapsed"] = max(map(verdicts.count, ("right", "wrong"))) / len(verdicts) >= ev.COLLAPSED
    return dict(blocks, items=items)


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}"


def table1(rows, metric="accuracy"):
    """Table 1's layout: {row label: suite result} -> markdown, generation accuracy then critique accuracy, one
    column per benchmark and Avg (the unweighted mean of the benchmarks present; "(n/5)" when some are missing)."""
    out = []
    for block, title in (("generation", "Generation accuracy (%)"), ("critique", "Critique accuracy (%), balanced")):
        out += [f"**{title}**", "", "| model | " + " | ".join(BENCHMARKS.values()) + " | Avg |",
                "|---|" + "---|" * (len(BENCHMARKS) + 1)]
        for label, res in rows.items():
            vals = [((res.get("benchmarks") or {}).get(n) or {}).get(block, {}).get(metric) for n in BENCHMARKS]
            have = [v for v in vals if v is not None]
            avg = _pct(sum(have) / len(have)) + ("" if len(have) in (0, len(vals)) else f" ({len(have)}/{len(vals)})") \
                if have else "–"
            out.append(f"| {label} | " + " | ".join(map(_pct, vals)) + f" | {avg} |")
        out.append("")
    return "\n".join(out)


def run_eval(args):
    """eval.py's run for `--data suite[:DIR]`: load the model once, evaluate every benchmark, print Table 1's two
    rows, write --out (eval.py's schema plus `benchmarks` and `table`). Returns the result dict."""
    import eval as ev
    import rollout
    model, tok, device = ev.load_model(args)
    results = evaluate_suite(model, tok, args)
    config = {k: v for k, v in vars(args).items() if k not in ("compare", "plot")}
    config.update(device=device, model_path=rollout.resolve_model(args.model),
                  time_s=round(sum(r.pop("time_s", 0.0) for r in results.values()), 1))
    result = dict(model=args.model, data=args.data, critique_data=args.critique_data, label=args.label,
                  **combine(results), benchmarks=results, config=config)
    result["table"] = table1({args.label or args.model: result})
    print(result["table"])
    if args.out:
        data.write_json(args.out, result)
        print(f"[eval] wrote {args.out}")
    return result


def report_tables(evals, order, labels, mean_ci):
    """experiment.py's report: Table 1's two tables over methods, each cell the mean ± 95% half-width over seeds
    (`mean_ci`) of that benchmark's accuracy; only when the evals are suite results. Returns markdown lines."""
    if not any("benchmarks" in r for g in evals.values() for r in g.values()):
        return []
    out = ["## Table 1 per benchmark (the suite; mean ± 95% CI over seeds)", ""]
    for block, title in (("generation", "Generation accuracy (%)"), ("critique", "Critique accuracy (%)")):
        out += [f"**{title}**", "", "| method | " + " | ".join(BENCHMARKS.values()) + " | Avg |",
                "|---|" + "---|" * (len(BENCHMARKS) + 1)]
        for m in [m for m in order if m in evals]:
            cells = []
            for name in list(BENCHMARKS) + [None]:
                vals = [(r[block] if name is None else r.get("benchmarks", {}).get(name, {}).get(block, {}))
                        .get("accuracy") for r in evals[m].values()]
                mu, hw = mean_ci([v for v in vals if v is not None])
                cells.append("–" if mu is None else _pct(mu) + ("" if hw is None else f" ± {100 * hw:.1f}"))
            out.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
        out.append("")
    return out


# ============================================================================ the critique benchmark (§4.1)
def critique_bench_pairs(samples, seed=0):
    """The paper's critique benchmark from sampled responses, dicts {benchmark, id, question, answer, model, text}:
    drop responses without \\boxed{}; label the rest (reward.is_correct, boxed only); drop questions whose labelled
    responses are all right or all wrong; keep one random right and one random wrong response of each other question
    (reward.balance, seeded). Returns (pairs, counts per benchmark: questions, responses, unboxed responses, questions
    left without a boxed response, all-right and all-wrong questions dropped, pairs)."""
    groups, counts = {}, {}  # (benchmark, id) -> its boxed responses, labelled, in sample order
    for s in samples:
        c = counts.setdefault(s["benchmark"], dict(questions=0, responses=0, unboxed=0, no_boxed=0, all_right=0,
                                                   all_wrong=0, pairs=0))
        key = (s["benchmark"], s["id"])
        c["responses"] += 1
        if key not in groups:
            c["questions"] += 1
            groups[key] = []
        if reward.extract_answer(s["text"], ()) is None:
            c["unboxed"] += 1
        else:
            groups[key].append(dict(s, label=reward.is_correct(s["text"], s["answer"], strict=True)))
    for (b, _), g in groups.items():
        labels = {r["label"] for r in g}
        c = counts[b]
        c["no_boxed"] += not labels
        c["all_right"] += labels == {True}
        c["all_wrong"] += labels == {False}
    keys = list(groups)
    keep = reward.balance([[1.0 if r["label"] else 0.0 for r in groups[k]] for k in keys], random.Random(seed))
    pairs = []
    for qi, ri, label in keep:
        (b, qid), r = keys[qi], groups[keys[qi]][ri]
        pairs.append(dict(benchmark=b, question=r["question"], response=r["text"], label=bool(label),
                          answer=str(r["answer"]), model=r["model"], id=f"{b}/{qid}:{r['model']}#{ri}"))
        counts[b]["pairs"] += 1
    return pairs, counts


def _slug(model):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(model)).strip("_")[-80:]


def build_critique_bench(argv=None):
    """CLI: sample --k responses per question of every suite benchmark from each of --models (eval.py's sampling
    flags), keep them per model in OUT.samples-MODEL.jsonl (a rerun skips models already sampled), then write the
    balanced benchmark to --out and its counts per benchmark to OUT.counts.json. Returns the counts."""
    import eval as ev
    import rollout
    p = ev.build_parser()
    p.description = build_critique_bench.__doc__.split("\n")[0]
    p.add_argument("--models", required=True, help="comma list of models whose responses make the benchmark")
    p.set_defaults(data="suite", k=10)
    args = p.parse_args(argv)
    if not args.out:
        raise data.DataError("critique-bench: --out OUT.jsonl is required")
    args.max_len = max(args.max_len, args.max_new_tokens + 1024)
    out, samples = Path(args.out), []
    specs = benchmark_specs(args.data) if is_suite(args.data) else {str(args.data).partition(":")[0]: args.data}
    recs = {n: data.load_data(s, split="test", limit=args.limit or None) for n, s in specs.items()}
    for m in [m.strip() for m in args.models.split(",") if m.strip()]:
        path = out.with_name(f"{out.stem}.samples-{_slug(m)}.jsonl")
        if not path.is_file():
            args.model = m
            model, tok, _ = ev.load_model(args)
            sampler = rollout.Sampler(model, max_batch=args.batch, max_len=args.max_len)
            rows = []
            for name, records in recs.items():
                groups = ev.sample_responses(sampler, tok, args, records, args.k, f"{name} x{args.k} ({m})",
                                             args.temperature, args.seed)
                rows += [dict(benchmark=name, id=r["id"], question=r["question"], answer=r["answer"], model=m,
                              text=o["text"]) for r, g in zip(records, groups) for o in g]
            data.write_jsonl(path, rows)
            del model, sampler
            _free_memory()
        samples += data.read_jsonl(path)
    pairs, counts = critique_bench_pairs(samples, args.seed)
    data.write_jsonl(out, pairs)
    data.write_json(out.with_suffix(".counts.json"), counts)
    print(counts_table(counts) + f"\n[suite] critique benchmark: {len(pairs)} pairs -> {out}")
    return counts


def _free_memory():
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def counts_table(counts):
    lines = ["| benchmark | questions | responses | responses without \\boxed{} | questions dropped: no boxed / all "
             "right / all wrong | pairs (1 right + 1 wrong per question) |", "|---|---|---|---|---|---|"]
    for b, c in counts.items():
        lines.append(f"| {b} | {c['questions']} | {c['responses']} | {c['unboxed']} | {c['no_boxed']} / "
                     f"{c['all_right']} / {c['all_wrong']} | {c['pairs']} |")
    return "\n".join(lines)


# ============================================================================ recipes: one command per scale
# Qwen2.5 base shapes (config.json): hidden, layers, intermediate, heads, kv heads, vocab, tied embeddings
SHAPES = {"Qwen/Qwen2.5-0.5B": (896, 24, 4864, 14, 2, 151936, True),
          "Qwen/Qwen2.5-1.5B": (1536, 28, 8960, 12, 2, 151936, True),
          "Qwen/Qwen2.5-7B": (3584, 28, 18944, 28, 4, 152064, False)}
_COMMON = ["--data", "dapo-rl", "--eval-data", "suite", "--prompt-style", "qwen-boxed", "--dtype", "bf16",
           "--mixed-precision", "bf16", "--num-generations", "5", "--critiques-per-pair", "5", "--rl-lr", "1e-6",
           "--train-limit", "0", "--limit", "0", "--critique-questions", "0", "--k", "0", "--k-ref", "1",
           "--static-k", "10", "--sft-lr", "1e-5", "--critique-k", "10",
           "--critique-models", "Qwen/Qwen2.5-1.5B-Instruct,Qwen/Qwen2.5-7B-Instruct", "--methods", "g,c,gc"]
# name -> (model, GPUs, launch config, experiment.py sizes, train.py extras); the paper (Table 3): 512 questions per
# step x rollout n = 5, lr 1e-6, KL 1e-3, 4096 tokens, 10 epochs of 16k questions (~310 steps)
RECIPES = {
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B", 1, "single_gpu.yaml",
                     ["--teacher", "Qwen/Qwen2.5-7B-Instruct", "--questions", "128", "--pairs-per-step", "64",
                      "--rl-steps", "250", "--sft-steps", "120", "--sft-batch", "32", "--max-new-tokens", "2048",
                      "--critique-max-new-tokens", "2048", "--grad-accum", "64", "--eval-batch", "256",
                      "--static-questions", "4096"],
                     ["--sampler-batch", "320", "--max-seq-len", "8192"]),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B", 1, "single_gpu.yaml",
                     ["--teacher", "Qwen/Qwen2.5-7B-Instruct", "--questions", "128", "--pairs-per-step", "64",
                      "--rl-steps", "250", "--sft-steps", "120", "--sft-batch", "32", "--max-new-tokens", "2048",
                      "--critique-max-new-tokens", "2048", "--grad-accum", "64", "--eval-batch", "256",
                      "--static-questions", "4096"],
                     ["--sampler-batch", "128", "--max-seq-len", "8192", "--gradient-checkpointing"]),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", 8, "fsdp2.yaml",
                   ["--teacher", "Qwen/Qwen2.5-14B-Instruct", "--questions", "512", "--pairs-per-step", "256",
                    "--rl-steps", "310", "--sft-steps", "120", "--sft-batch", "32", "--max-new-tokens", "4096",
                    "--critique-max-new-tokens", "4096", "--grad-accum", "64", "--eval-batch", "256",
                    "--static-questions", "0"],
                   ["--sampler-batch", "40", "--max-seq-len", "12288", "--gradient-checkpointing"]),
}


def recipe_argv(name, argv):
    """experiment.py's argv for `--recipe NAME`: the recipe's flags first (the user's own flags come after them, so
    they win), --train-args merged last: the recipe's, then the user's."""
    if name not in RECIPES:
        raise SystemExit(f"experiment.py: error: --recipe {name!r}: known recipes: {', '.join(RECIPES)}")
    model, gpus, config, sizes, train = RECIPES[name]
    argv = list(argv)
    user_train = argv[argv.index("--train-args") + 1:] if "--train-args" in argv else []
    argv = argv[:argv.index("--train-args")] if "--train-args" in argv else argv
    launch = ["--launch", f"accelerate launch --config_file {HERE / 'configs' / 'accelerate' / config} "
                          f"--num_processes {gpus}"] if gpus > 1 else []
    return (["--model", model] + _COMMON + sizes + launch + argv
            + ["--train-args", "--beta", "1e-3"] + train + user_train)


def add_experiment_flags(p):
    """experiment.py's flags for the paper's setting (its parser calls this)."""
    g = p.add_argument_group("the paper's setting (suite.py; teacher.py distill)")
    g.add_argument("--recipe", choices=tuple(RECIPES), help="preset flags of one scale (python suite.py estimate); "
                   "flags given after it override them")
    g.add_argument("--eval-data", help="eval.py --data (default: --data); suite[:DIR] = the five benchmarks")
    g.add_argument("--teacher", help="distil the cold start: this model critiques the policy's own responses "
                                     "(teacher.py distill) instead of the arith program teacher")
    g.add_argument("--teacher-data", help="questions of the distilled cold start (default: dapo-cold[:PATH] with "
                                          "--data dapo-rl[:PATH]: disjoint from the RL questions)")
    g.add_argument("--teacher-k", type=int, default=2, help="policy responses per cold-start question")
    g.add_argument("--critique-models", help="comma list: the critique test set is the paper's critique benchmark "
                   "from these models' responses to --eval-data (default with a suite: the cold-start model)")
    g.add_argument("--critique-k", type=int, default=10, help="responses per question of each critique model")


def _teacher_data(args):
    if args.teacher_data:
        return args.teacher_data
    kind, sep, path = str(args.data).partition(":")
    if kind != "dapo-rl":
        raise SystemExit("experiment.py: error: --teacher needs --teacher-data SPEC (questions disjoint from --data)")
    return "dapo-cold" + sep + path


def pre_steps(args, cold_start):
    """Steps before the cold start's SFT: the distillation writing `cold_start` (with --teacher). Dicts of
    experiment.plan's add(): name, argv, done, log, run, key."""
    if not args.teacher:
        return []
    root = Path(args.dir)
    argv = [sys.executable, str(HERE / "teacher.py"), "distill", "--model", args.model, "--teacher", args.teacher,
            "--data", _teacher_data(args), "--k", str(args.teacher_k), "--max-new-tokens", str(args.max_new_tokens),
            "--critique-max-new-tokens", str(args.critique_max_new_tokens), "--dtype", args.dtype,
            "--seed", str(args.shared_seed), "--batch", str(args.eval_batch), "--prompt-style", args.prompt_style,
            "--out", str(cold_start)]
    return [dict(name="cold-start distillation", argv=argv, done=Path(cold_start).is_file(),
                 log=root / "cold_start.log", run=root / "sft", key="distill")]


def critique_set_argv(args):
    """The critique test set as the paper's critique benchmark (suite.py critique-bench), or None (experiment.py's
    own: the cold-start model's samples, topped up with program-written pairs)."""
    if not (args.critique_models or is_suite(args.eval_data or args.data)):
        return None  # experiment.py's own set
    root = Path(args.dir)
    return [sys.executable, str(HERE / "suite.py"), "critique-bench",
            "--models", args.critique_models or str(root / "sft" / "final"), "--data", args.eval_data or args.data,
            "--limit", str(args.critique_questions), "--k", str(args.critique_k),
            "--max-new-tokens", str(args.max_new_tokens), "--dtype", args.dtype, "--seed", str(args.shared_seed),
            "--batch", str(args.eval_batch), "--prompt-style", args.prompt_style,
            "--out", str(root / "critique_test.jsonl")]


PEAK_TFLOPS, MFU_TRAIN, MFU_SAMPLE = 989.0, 0.35, 0.05  # H100 / H200 bf16 dense peak; assumed utilisations
MEAN_TOKENS = dict(question=150, response=600, critique=500, template=100)  # assumed mean lengths (tokens)


def n_params(shape):
    """Parameter count from the shapes (q/k/v biases included, norms left out)."""
    d, layers, f, heads, kv, vocab, tied = shape
    head_dim = d // heads
    attn = d * d * 2 + 2 * d * kv * head_dim + d + 2 * kv * head_dim  # q, o; k, v; their biases
    return vocab * d * (1 if tied else 2) + layers * (attn + 3 * d * f)


def estimate(name):
    """Memory (GiB per GPU) and time (s per GC-RL step) of a recipe, from its shapes, NOT measured. Tokens per step:
    Q questions x n responses and P pairs x m critiques at MEAN_TOKENS lengths. FLOPs: sampling 2N per token (prompt
    and completion), the update 6N per trained token (each prompt once per group) + 2N for the old log-probs + 2N
    for the reference (beta > 0) + 2N recomputation (gradient checkpointing); time = FLOPs / (GPUs x PEAK_TFLOPS x
    MFU), MFU_SAMPLE for sampling (decode is bound by memory bandwidth), MFU_TRAIN for the update. Memory: 16 B /
    param (fp32 weights, grads, AdamW; sharded over GPUs under FSDP2) + 2 (the bf16 copy the sampler reads) + the
    reference (fp32 on one GPU, bf16 under FSDP2), the KV cache of a --sampler-batch chunk at full length (critique
    prompt + critique), a micro-batch's activations (layer inputs kept under checkpointing, or ~34 d bytes per token
    and layer without) and its fp32 logits with their gradient."""
    model, gpus, _, sizes, train = RECIPES[name]
    def get(flags, k, default=None):
        return (flags[flags.index(k) + 1] if k in flags else default)
    shape, t = SHAPES[model], MEAN_TOKENS
    d, layers, f, heads, kv, vocab, _ = shape
    n = n_params(shape)
    q, p, gen = int(get(sizes, "--questions")), int(get(sizes, "--pairs-per-step")), 5
    resp, crit_prompt = t["question"] + t["template"], t["question"] + t["response"] + t["template"]
    sampled = q * gen * (resp + t["response"]) + p * gen * (crit_prompt + t["critique"])
    trained = q * (resp + gen * t["response"]) + p * (crit_prompt + gen * t["critique"])
    ckpt = "--gradient-checkpointing" in train
    flops_sample, flops_train = 2 * n * sampled, (6 + 2 + 2 + 2 * ckpt) * n * trained
    sample_s = flops_sample / (gpus * PEAK_TFLOPS * 1e12 * MFU_SAMPLE)
    train_s = flops_train / (gpus * PEAK_TFLOPS * 1e12 * MFU_TRAIN)
    states = (16 / gpus + 2 + (2 if gpus > 1 else 4)) * n
    max_len = int(get(sizes, "--max-new-tokens")) * 2 + crit_prompt
    kv_cache = int(get(train, "--sampler-batch")) * max_len * layers * 2 * kv * (d // heads) * 2
    micro = trained / gpus / int(get(sizes, "--grad-accum"))  # tokens of one micro-batch on one GPU
    acts = micro * d * 2 * layers + (micro * 34 * d if ckpt else micro * 34 * d * layers) + micro * vocab * 4 * 2
    gib = 2 ** 30
    return dict(recipe=name, model=model, gpus=gpus, params_b=round(n / 1e9, 2),
                tokens_sampled=sampled, tokens_trained=trained, states_gib=round(states / gib, 1),
                kv_gib=round(kv_cache / gib, 1), activations_gib=round(acts / gib, 1),
                memory_gib=round((states + kv_cache + acts) / gib, 1), sample_s=round(sample_s),
                update_s=round(train_s), step_s=round(sample_s + train_s),
                run_h=round((sample_s + train_s) * int(get(sizes, "--rl-steps")) / 3600, 1))


def estimate_table():
    lines = ["| recipe | GPUs | params | tokens sampled / trained per step | memory per GPU (states + KV + "
             "activations) | s per step (sampling + update) | one RL run |", "|---|---|---|---|---|---|---|"]
    for name in RECIPES:
        e = estimate(name)
        lines.append(f"| {name} | {e['gpus']} | {e['params_b']} B | {e['tokens_sampled'] / 1e6:.2f} M / "
                     f"{e['tokens_trained'] / 1e6:.2f} M | {e['memory_gib']} GiB ({e['states_gib']} + {e['kv_gib']} "
                     f"+ {e['activations_gib']}) | {e['step_s']} ({e['sample_s']} + {e['update_s']}) | "
                     f"{e['run_h']} h |")
    return "\n".join(lines)


# ============================================================================ CLI
def download(root):
    """Every paper set from the hub (needs network or a warm HF cache) into ROOT/<name>/<split>.jsonl, the layout
    `suite:ROOT` and NAME:PATH read offline, as normalised rows in the fields the loaders read (DAPO: one row per
    problem, its wrapper already stripped; GSM8K: the gold after `#### `)."""
    for name in list(BENCHMARKS) + ["dapo"]:
        split = SPLITS.get(name, "train")
        q_key, a_key = ("question", "answer") if name == "gsm8k" else (data.PAPER_SETS[name][3],
                                                                       data.PAPER_SETS[name][4][-1])
        rows = [{"id": r["id"], q_key: r["question"], a_key: f"#### {r['answer']}" if name == "gsm8k" else r["answer"]}
                for r in data.load_data(name, split=split)]
        data.write_jsonl(Path(root) / name / f"{split}.jsonl", rows)
        print(f"[suite] {name}: {len(rows)} rows -> {Path(root) / name / f'{split}.jsonl'}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cmd, rest = (argv[0], argv[1:]) if argv else ("", [])
    try:
        if cmd == "critique-bench":
            build_critique_bench(rest)
        elif cmd == "table":
            rows = {}
            for path in rest:
                res = json.loads(Path(path).read_text())
                rows[res.get("label") or Path(path).parent.name or path] = res
            print(table1(rows))
        elif cmd == "download" and len(rest) == 1:
            download(rest[0])
        elif cmd == "estimate":
            print(estimate_table())
        else:
            print(__doc__.split("\n\n")[1], file=sys.stderr)
            return 2
    except data.DataError as e:
        print(f"suite.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
