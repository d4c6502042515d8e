"""A seeded, resumable experiment grid: one cold start, then RL methods x seeds, an eval of each, and a report.

    python experiment.py DIR --methods g,c,gc --seeds 0,1,2 [sizes] [--with-base] [--dry-run] [--train-args ...]
    python experiment.py DIR --report            # only (re)write DIR/results.md and DIR/plots/*.png

Every training and eval run is its own `python train.py ...` / `python eval.py ...` process; its full command
line is printed before it starts (rerun it by hand to debug one run), its output goes to a log next to its
results, and a short progress line is echoed. A failing run stops the grid and names its log.

Layout of DIR:
    cold_start.jsonl         teacher.cold_start_data on arith train questions disjoint from the RL questions
    sft/                     the ONE cold start (train.py --mode sft), shared by every method and seed: "w/o RL"
    critique_test.jsonl      the ONE balanced critique test set (teacher.py critique_test_set, from sft/final)
    <method>/seed<S>/        train.py --out (final/, metrics.jsonl, train.log), eval.json (+ eval.log), run.json
    sft/eval.json, base/eval.json (--with-base); eval-gsm8k.json beside each eval.json with --gsm8k-dir
    grid.json                the methods and seeds asked for so far, the shared settings, every invocation
    results.md, plots/*.png  the report

Seeds: `--seeds S` is train.py's `--seed` (data order, sampling): every method with the same seed sees the same
questions in the same order. The cold start, the critique test set and every eval use `--shared-seed`, so
evals differ only by the model. Resuming: a run whose final/config.json exists is skipped, one with a
checkpoint but no final/ continues with `--resume auto`, an eval whose json exists is skipped; a later
invocation with more methods or seeds (same sizes; checked against grid.json) runs only what is missing.

The evals of the methods in READS_DENOISED pass `--k-ref 1` by default (one refinement per critique): it adds the
denoised reward of Table 5 (arXiv 2602.22765, Appendix B: C-RL vs GC-RL, and the denoising ablation) and changes no
other number (refinements are sampled after the critiques, from their own seed); the other evals skip it, as no
claim reads it. `--k-ref 0` skips it everywhere.

The report (report.report -> results.md): cells are mean +- the 95% half-width of Student's t over seeds, with
the number of seeds; missing seeds are marked, never averaged in as if complete. Each of the paper's claims is a
per-seed paired difference with a paired-t CI (stats.py: the training seed is the unit), called reproduced /
contradicted / inconclusive, "too few seeds" below 3, with its minimum detectable effect; the A/A method
`gc-aa` is the grid's noise floor.
"""
import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import critique  # light: no torch
import data  # light: no torch
import suite  # light: no torch

HERE = Path(__file__).resolve().parent

# the named methods -> train.py flags (arXiv 2602.22765; Table 1 rows, then the ablations of §5)
METHODS = {
    "g": ["--mode", "g"],  # G-RL: vanilla GRPO, first-order rollout only (Table 1)
    "c": ["--mode", "c"],  # C-RL: critiques only, on static pairs from the cold-start model (Table 1)
    "gc": ["--mode", "gc"],  # GC-RL: responses + critiques of the label-balanced cache (Table 1)
    # the A/A control: GC-RL again with the same question order and independent sampling randomness; the grid's
    # noise floor (its claims must come out inconclusive)
    "gc-aa": ["--mode", "gc", "--sampling-seed-offset", "1"],
    "gc-random": ["--mode", "gc", "--pair-filter", "random"],  # Table 2 "random sampling": no balance filter
    # Table 2 middle row: random sampling + the reweighted critique reward of Eq. 3
    "gc-random-reweight": ["--mode", "gc", "--pair-filter", "random", "--critique-reward", "reweight"],
    "gc-static": ["--mode", "gc", "--pairs", "static"],  # §5.3: GC-RL on static pairs
    "c-dynamic": ["--mode", "c", "--pairs", "dynamic"],  # §5.3: C-RL on its own fresh pairs (reward hacking)
    "gc-precision": ["--mode", "gc", "--critique-reward", "precision"],  # §5.4, Eq. 5
    "gc-recall": ["--mode", "gc", "--critique-reward", "recall"],  # §5.4, Eq. 6
    "gc-denoise": ["--mode", "gc", "--denoise", "1"],  # §5.2, Eq. 4 with n = 1 refinement, as in the paper
    "c-denoise": ["--mode", "c", "--denoise", "1"],  # §5.2, Eq. 4 with n = 1 refinement, C-RL
    # the GRPO grouping as a finding (§3 "mixed into the same group"; the grid's --group-mode is question)
    "gc-per-prompt": ["--mode", "gc", "--group-mode", "per-prompt"],  # a group per question's responses, per pair
    "gc-shared": ["--mode", "gc", "--group-mode", "shared"],  # every sample of a step in one group
}
LABELS = {"base": "base model", "sft": "w/o RL (cold start)", "c": "C-RL", "g": "G-RL", "gc": "GC-RL",
          "gc-aa": "GC-RL, A/A (other sampling seeds)",
          "gc-random": "GC-RL, random sampling", "gc-random-reweight": "GC-RL, random sampling + reweight",
          "gc-static": "GC-RL, static pairs", "c-dynamic": "C-RL, dynamic pairs", "gc-precision": "GC-RL, Eq. 5",
          "gc-recall": "GC-RL, Eq. 6", "gc-denoise": "GC-RL, denoised", "c-denoise": "C-RL, denoised",
          "gc-per-prompt": "GC-RL, per-pair groups", "gc-shared": "GC-RL, one group per step"}
EVALS = {"eval": "arith", "eval-gsm8k": "GSM8K dev"}  # eval json name -> what the table calls its data


class ExperimentError(RuntimeError):
    """A bad flag, a grid that does not match DIR, or a failed run; the message names the flag, file or log."""


# ============================================================================ the plan: every command of the grid

def run_dir(root, method, seed):
    return Path(root) / method / f"seed{seed}"


def train_sizes(args):
    """train.py flags shared by the cold start and every RL run (the Makefile's CPU_TRAIN sizes by default)."""
    return ["--mixed-precision", args.mixed_precision, "--num-generations", str(args.num_generations),
            "--pairs-per-step", str(args.pairs_per_step), "--critiques-per-pair", str(args.critiques_per_pair),
            "--max-completion-length", str(args.max_new_tokens),
            "--max-critique-length", str(args.critique_max_new_tokens),
            "--static-questions", str(args.static_questions), "--static-k", str(args.static_k),
            "--grad-accum", str(args.grad_accum), "--prompt-style", args.prompt_style]


def train_py(args):
    """How train.py is started: `python train.py`, or `--launch` (e.g. accelerate launch ... for many GPUs)."""
    return (shlex.split(args.launch) if args.launch else [sys.executable]) + [str(HERE / "train.py")]


def save_every(args, steps):
    """--save-every, or by default a checkpoint every 5% of the run's steps (a killed run loses at most that), at
    least 5 steps apart: a CPU step of the demo takes ~20 s, a checkpoint of SmolLM2-135M ~5 s."""
    return str(args.save_every if args.save_every is not None else max(5, math.ceil(steps / 20)))


def sft_argv(args, resume=False):
    root = Path(args.dir)
    return (train_py(args) + ["--mode", "sft", "--model", args.model,
                              "--data", f"jsonl:{cold_start_path(args)}", "--out", str(root / "sft"),
                              "--max-steps", str(args.sft_steps), "--questions-per-step", str(args.sft_batch),
                              "--lr", str(args.sft_lr), "--seed", str(args.shared_seed)] + train_sizes(args)
            + ["--save-every", save_every(args, args.sft_steps)] + (["--resume", "auto"] if resume else [])
            + args.train_args)


def rl_argv(args, method, seed, resume=False):
    """train.py for one method and seed, from the cold start; --train-args come last so they override."""
    root = Path(args.dir)
    flags = METHODS[method]
    flags = flags if "--group-mode" in flags else flags + ["--group-mode", args.group_mode]
    static = (["--static-pairs", args.static_pairs] if args.static_pairs and flags[1] == "c"
              and "dynamic" not in flags else [])
    return (train_py(args) + flags
            + ["--model", str(root / "sft" / "final"), "--data", args.data, "--limit", str(args.train_limit),
               "--seed", str(seed), "--max-steps", str(args.rl_steps), "--questions-per-step", str(args.questions),
               "--lr", str(args.rl_lr), "--out", str(run_dir(root, method, seed))]
            + train_sizes(args) + static + ["--save-every", save_every(args, args.rl_steps)]
            + (["--resume", "auto"] if resume else []) + args.train_args)


# the methods whose denoised critique reward (Table 5, §5.2) a claim or table of the report reads: only their evals
# write the refinements it needs (a quarter of an eval's time), the rest pass --k-ref 0
READS_DENOISED = {"c", "gc", "c-denoise", "gc-denoise"}


def eval_flags(args, k_ref=None):
    """eval.py flags shared by every eval (and the critique test set): the same sizes and seed for all."""
    return (["--k", str(args.k), "--max-new-tokens", str(args.max_new_tokens),
             "--critique-max-new-tokens", str(args.critique_max_new_tokens),
             "--k-ref", str(args.k_ref if k_ref is None else k_ref),
             "--dtype", args.dtype, "--seed", str(args.shared_seed), "--batch", str(args.eval_batch),
             "--prompt-style", args.prompt_style] + ([] if args.selection else ["--no-selection"]))


def critique_set_argv(args):
    root = Path(args.dir)
    return [sys.executable, str(HERE / "teacher.py"), "--out", str(root / "critique_test.jsonl"),
            "--model", str(root / "sft" / "final"), "--data", args.eval_data or args.data,
            "--limit", str(args.critique_questions),
            "--k", str(args.k), "--max-new-tokens", str(args.max_new_tokens), "--dtype", args.dtype,
            "--seed", str(args.shared_seed), "--batch", str(args.eval_batch), "--prompt-style", args.prompt_style]


def eval_argv(args, model, label, out, name="eval"):
    """eval.py of one model: `name` eval = --data + the grid's critique test set; eval-gsm8k = the GSM8K files."""
    root = Path(args.dir)
    if name == "eval":
        data = ["--data", args.eval_data or args.data, "--critique-data", f"jsonl:{root / 'critique_test.jsonl'}"]
    else:
        g = Path(args.gsm8k_dir)
        data = ["--data", f"gsm8k:{g / 'test_dev.jsonl'}",
                "--critique-data", f"gsm8k-solutions:{g / 'model_solutions_dev.jsonl'}",
                "--critique-limit", str(args.critique_questions)]
    k_ref = args.k_ref if label.split("/")[0] in READS_DENOISED else 0
    return ([sys.executable, str(HERE / "eval.py"), "--model", str(model)] + data + ["--limit", str(args.limit)]
            + eval_flags(args, k_ref) + ["--label", label, "--out", str(out)])


def cold_start_path(args):
    return Path(args.cold_start_data) if args.cold_start_data else Path(args.dir) / "cold_start.jsonl"


def _checkpointed(out):
    return any(p.is_dir() and p.name.split("-")[-1].isdigit() for p in Path(out).glob("checkpoint-*"))


def plan(args):
    """Every step of the grid in order: dicts {name, argv, done (skip it), log, record (run.json), key}.
    Cold start, critique test set, the cold start's (and base's) evals, then seed by seed every method's
    training and evals, so a grid stopped half-way has whole seeds. A run whose evals all exist counts as
    trained even without its checkpoints (a fresh clone carries the small results, not the models)."""
    root = Path(args.dir)
    evals = ["eval"] + (["eval-gsm8k"] if args.gsm8k_dir else [])
    steps = []

    def add(name, argv, done, log, run, key, prune=None, committed=None):
        steps.append(dict(name=name, argv=argv, done=done, log=Path(log), record=Path(run) / "run.json", key=key,
                          prune=prune, committed=committed))

    def add_evals(tag, model, run):
        for e in evals:
            out = Path(run) / f"{e}.json"
            add(f"{tag} {e}", eval_argv(args, model, tag, out, e), out.is_file(), Path(run) / f"{e}.log", run, e,
                prune=Path(run) if e == evals[-1] else None)

    def evals_done(run):
        return all((Path(run) / f"{e}.json").is_file() for e in evals)

    def trained(run):  # a model to evaluate, or nothing left to evaluate it for (results kept, checkpoints not)
        return (Path(run) / "final" / "config.json").is_file() or evals_done(run)

    sft = root / "sft"
    runs = [(m, seed, run_dir(root, m, seed)) for seed in args.seeds for m in args.methods]
    # the cold start is needed while any RL run or its own eval still has to be made
    sft_done = (sft / "final" / "config.json").is_file() or (evals_done(sft) and all(trained(r) for _, _, r in runs))
    for pre in suite.pre_steps(args, cold_start_path(args)) if not sft_done else []:  # --teacher: distillation
        add(**pre)
    add("sft train", sft_argv(args, resume=not sft_done and _checkpointed(sft)), sft_done, sft / "train.log", sft,
        "train", committed=None if sft_done else committed_sft(sft))
    crit = root / "critique_test.jsonl"
    add("critique test set", suite.critique_set_argv(args) or critique_set_argv(args), crit.is_file(),
        root / "critique_test.log", sft, "critique-set")
    add_evals("sft", sft / "final", sft)
    if args.with_base:
        add_evals("base", args.model, root / "base")
    for m, seed, run in runs:
        done = trained(run)
        add(f"{m}/seed{seed} train", rl_argv(args, m, seed, resume=not done and _checkpointed(run)), done,
            run / "train.log", run, "train")
        add_evals(f"{m}/seed{seed}", run / "final", run)
    return steps


# ============================================================================ running

def _read_json(path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return default


def launch(argv, log, label):
    """Run argv with stdout + stderr appended to `log` (a resumed run keeps the earlier attempts' output) and
    its latest output line echoed in place. Returns {rc, wall_s, peak_rss_mib, interrupted} of the child
    (os.wait4: its own rusage, so the peak is this run's alone). Ctrl-C reaches the child too (same process
    group): train.py then finishes its step and saves a checkpoint, so we wait for it instead of leaving it."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    tty = sys.stdout.isatty()
    width = shutil.get_terminal_size((100, 20)).columns - 1
    t0 = time.time()
    with open(log, "ab") as f:
        f.write(f"\n$ {shlex.join(argv)}\n".encode())
        f.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))

        def drain(last=t0, tail=b""):
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    return
                f.write(chunk)
                f.flush()
                tail = (tail + chunk)[-4096:]
                now = time.time()
                if now - last >= (0.5 if tty else 60):  # off a terminal: a line a minute, not every bar refresh
                    lines = [x for x in re.split(rb"[\r\n]", tail) if x.strip()]
                    latest = lines[-1].decode(errors="replace").strip() if lines else ""
                    msg = f"  [{label} {now - t0:.0f}s] {latest}"
                    print("\r" + msg[:width].ljust(width) if tty else msg[:width], end="" if tty else "\n", flush=True)
                    last = now

        interrupted = False
        try:
            drain()
        except KeyboardInterrupt:
            interrupted = True
            print(f"\n[experiment] Ctrl-C: waiting for {label} to checkpoint and exit (Ctrl-C again: stop waiting)",
                  file=sys.stderr, flush=True)
            drain()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if tty:
        print("\r" + " " * width + "\r", end="", flush=True)
    return dict(rc=proc.returncode, wall_s=round(time.time() - t0, 1), peak_rss_mib=round(usage.ru_maxrss / 1024, 1),
                interrupted=interrupted)


def record_run(step, res):
    """Add one attempt to the run's run.json: wall time summed over attempts, peak RSS the max."""
    rec = _read_json(step["record"], {})
    r = rec.get(step["key"]) or dict(wall_s=0.0, peak_rss_mib=0.0, attempts=0)
    r.update(wall_s=round(r["wall_s"] + res["wall_s"], 1), peak_rss_mib=max(r["peak_rss_mib"], res["peak_rss_mib"]),
             attempts=r["attempts"] + 1, rc=res["rc"], argv=step["argv"])  # argv: the latest attempt's
    rec[step["key"]] = r
    data.write_json(step["record"], rec)


def write_cold_start(args, dry_run=False):
    """DIR/cold_start.jsonl: program-written solutions and critiques (teacher.cold_start_data) on the arith
    train questions after the first --train-limit ones (the RL questions), so the two sets are disjoint."""
    path = cold_start_path(args)
    if path.exists() or args.teacher:  # --teacher: a step of the plan distils it (suite.pre_steps)
        return
    if not str(args.data).startswith("arith"):
        raise ExperimentError(f"--data {args.data}: the cold start's program teacher needs arith data; pass "
                              "--cold-start-data PATH.jsonl of {question, response, critique?} rows instead")
    print(f"[experiment] cold-start data: teacher.cold_start_data on {args.data} train questions "
          f"{args.train_limit}..{args.train_limit + args.cold_start_n - 1} -> {path}", flush=True)
    if dry_run:
        return
    import data
    import teacher
    recs = data.load_data(args.data, split="train", limit=args.train_limit + args.cold_start_n, seed=args.shared_seed)
    print(f"[experiment] {teacher.cold_start_data(recs[args.train_limit:], path, seed=args.shared_seed)}", flush=True)


# settings that must agree across the invocations on one DIR (the rest: which methods, seeds, rows, report)
# (--eval-batch: speed only; the sampler's draws do not depend on its chunking; --save-every, --launch, --recipe: how
# a run is started and checkpointed, not what it computes)
NOT_SETTINGS = {"dir", "methods", "seeds", "with_base", "dry_run", "report", "gsm8k_dir", "eval_batch", "save_every",
                "launch", "recipe"}


def resolve_auto_precision(args):
    """--dtype / --mixed-precision auto -> bf16 where the training device computes it natively (a CUDA GPU with
    bf16; a CPU with AVX512-BF16 or AMX), else fp32. A CPU without them emulates bf16: on an AVX2 EPYC a bf16
    matmul took 28.5x an fp32 one (745 vs 26 ms, 512x576 @ 576x1536, one thread), where a CPU with them runs
    bf16 ~4x faster. Resolved before the grid's settings are compared, so one DIR never mixes the two."""
    if "auto" not in (args.dtype, args.mixed_precision):
        return
    import torch
    if torch.cuda.is_available() and "--cpu" not in args.train_args:
        native = torch.cuda.is_bf16_supported()
    else:
        native = any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))
    if args.dtype == "auto":
        args.dtype = "bf16" if native else "fp32"
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if native else "no"
    if not native:
        print("[experiment] no native bf16 on this machine: --dtype auto -> fp32, --mixed-precision auto -> no",
              flush=True)


def update_grid(args, argv):
    """Merge this invocation into DIR/grid.json: the methods and seeds asked for so far and the command.
    Different sizes than earlier invocations would mix incomparable runs into one table: an error."""
    path = Path(args.dir) / "grid.json"
    grid = _read_json(path, {}) or {}
    settings = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    old = {k: v for k, v in grid["settings"].items() if k not in NOT_SETTINGS} if grid.get("settings") else None
    if old is not None and old != settings:
        diff = ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r} then, {settings.get(k)!r} now"
                         for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
        raise ExperimentError(f"{path}: this grid was run with other settings ({diff}); one grid needs the same "
                              "sizes for every run: use those flags, or another DIR (or delete its grid.json if "
                              "nothing has run yet)")
    methods = grid.get("methods", {})
    for m in args.methods:
        methods[m] = sorted(set(methods.get(m, [])) | set(args.seeds))
    command = shlex.join(["python", "experiment.py"] + list(argv))
    commands = grid.get("commands", [])
    grid.update(settings=settings, methods=methods, with_base=bool(grid.get("with_base")) or args.with_base,
                commands=commands + ([command] if command not in commands else []))
    if not args.dry_run:
        data.write_json(path, grid)
    return grid


def run_grid(args):
    write_cold_start(args, args.dry_run)
    steps = plan(args)
    todo = [s for s in steps if not s["done"]]
    print(f"[experiment] {len(steps)} runs in the grid, {len(steps) - len(todo)} done, {len(todo)} to run", flush=True)
    for step in steps:
        if step["done"]:
            print(f"[experiment] skip {step['name']}: done", flush=True)
            prune_checkpoints(step, args.dry_run)
            continue
        print(f"[experiment] {step['name']} ({todo.index(step) + 1}/{len(todo)}), log {step['log']}\n"
              f"$ {shlex.join(step['argv'])}", flush=True)
        if args.dry_run:
            continue
        res = launch(step["argv"], step["log"], step["name"])
        record_run(step, res)
        if step["committed"] and res["rc"] == 0:
            same_cold_start(step["record"].parent, step["committed"])
        if res["interrupted"]:
            raise ExperimentError(f"interrupted during {step['name']} (log {step['log']}); rerun the same command "
                                  "to continue: finished runs are skipped, a checkpointed one resumes")
        if res["rc"] != 0:
            text = step["log"].read_bytes().decode(errors="replace").replace("\r", "\n")
            tail = "\n".join([x for x in text.splitlines() if x.strip()][-15:])
            raise ExperimentError(f"{step['name']} failed (exit code {res['rc']}); its log: {step['log']}\n"
                                  f"--- last lines of {step['log']}:\n{tail}\n--- rerun this command to continue "
                                  "the grid (finished runs are skipped)")
        print(f"[experiment] done {step['name']}: {res['wall_s']:.0f} s, peak RSS {res['peak_rss_mib'] / 1024:.1f} GiB",
              flush=True)
        prune_checkpoints(step)


def committed_sft(sft):
    """The SFT metrics rows of a cold start that results were already made from (its eval exists), or None.
    Their per-step losses and grad norms identify it once its weights are gone (models are not committed)."""
    if not (sft / "eval.json").is_file() or not (sft / "metrics.jsonl").is_file():
        return None
    return data.read_jsonl(sft / "metrics.jsonl", "the cold start's metrics")


def same_cold_start(sft, committed):
    """A cold start retrained for a clone must be the one the finished runs came from: a run from another one
    would be compared, seed by seed, with runs from a different model. Same seed and data give the same weights
    on one machine; another CPU (or bf16 kernel) need not. If it differs, keep the old record, drop the new
    weights and stop."""
    def trace(rows):  # (step, loss, grad_norm) of each logged step
        return [(r.get("step"), r.get("loss"), r.get("grad_norm")) for r in rows]

    old, new = trace(committed), trace(data.read_jsonl(sft / "metrics.jsonl"))
    if old == new:
        return
    i = next((i for i, (o, n) in enumerate(zip(old, new)) if o != n), min(len(old), len(new)))
    diff = [r[i] if i < len(r) else "no such step" for r in (old, new)]
    os.replace(sft / "metrics.jsonl", sft / "metrics.retrained.jsonl")
    data.write_jsonl(sft / "metrics.jsonl", committed)
    shutil.rmtree(sft / "final", ignore_errors=True)
    raise ExperimentError(
        f"the retrained cold start is not the one this grid's results came from: {sft}/metrics.jsonl has (step, "
        f"loss, grad_norm) {diff[0]}, the retrain {diff[1]} (kept in {sft}/metrics.retrained.jsonl; its weights "
        f"deleted). Runs from it would not be comparable with the finished ones. Restore the original {sft}/final "
        "(train.py --out), or start the grid again in a new DIR")


def prune_checkpoints(step, dry_run=False):
    """After a run's last eval: its checkpoints (2 GiB each for SmolLM2-135M, optimizer state included; the grid
    filled a 100 GiB disk with them) are only for resuming its training, which is done. final/ stays."""
    if step["prune"] is None or dry_run or not (step["prune"] / "final" / "config.json").is_file():
        return
    for ck in sorted(step["prune"].glob("checkpoint-*")):
        shutil.rmtree(ck, ignore_errors=True)


# ============================================================================ CLI

def _methods(s):
    names = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in names if x not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(bad) or repr(s)}; valid: {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def _seeds(s):
    try:
        seeds = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("no seeds given")
    return list(dict.fromkeys(seeds))


def build_parser():
    p = argparse.ArgumentParser(prog="experiment.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("dir", help="experiment directory (created; reused by later invocations)")
    a("--methods", type=_methods, default=["g", "c", "gc"], help="comma list of: " + ", ".join(METHODS))
    a("--seeds", type=_seeds, default=[0], help="comma list of train.py --seed values")
    a("--with-base", action="store_true", help="also evaluate --model itself (before the cold start)")
    a("--dry-run", action="store_true", help="print every command (and which are done) without running any")
    a("--report", action="store_true", help="only write DIR/results.md and DIR/plots/ from what exists")
    g = p.add_argument_group("shared stages")
    g.add_argument("--model", default="smollm2-135m", help="model to cold-start from (train.py --model)")
    g.add_argument("--data", default="arith:1", help="data SPEC of RL and eval (arith: train / test splits)")
    g.add_argument("--shared-seed", type=int, default=0,
                   help="seed of the cold-start data, the SFT run, the critique test set and every eval")
    g.add_argument("--cold-start-n", type=int, default=128, help="arith train questions for the cold-start data "
                                                                  "(after the --train-limit RL questions)")
    g.add_argument("--cold-start-data", default=None, help="use this {question, response, critique?} jsonl instead")
    g.add_argument("--sft-steps", type=int, default=24, help="cold-start SFT steps")
    g.add_argument("--sft-batch", type=int, default=8, help="SFT examples per step")
    g.add_argument("--sft-lr", type=float, default=5e-5, help="SFT learning rate")
    g = p.add_argument_group("RL runs (train.py)")
    g.add_argument("--train-limit", type=int, default=256, help="RL questions: the first N of --data")
    g.add_argument("--rl-steps", type=int, default=12, help="steps of every RL run (paper: ~310)")
    g.add_argument("--questions", type=int, default=4, help="first-order questions per step (paper: 512)")
    g.add_argument("--rl-lr", type=float, default=5e-6, help="RL learning rate (paper: 1e-6 over ~310 steps)")
    g.add_argument("--num-generations", type=int, default=4, help="responses per question (paper: 5)")
    g.add_argument("--pairs-per-step", type=int, default=4, help="critique pairs per step")
    g.add_argument("--critiques-per-pair", type=int, default=4, help="critiques per pair")
    g.add_argument("--static-questions", type=int, default=32, help="C-RL: questions for its static pairs")
    g.add_argument("--static-k", type=int, default=4, help="C-RL: responses per question for its static pairs")
    g.add_argument("--static-pairs", default=None, help="C-RL (static) pair set jsonl instead of building it")
    g.add_argument("--grad-accum", type=int, default=4,
                   help="micro-batches per update, at most (less memory, same update)")
    g.add_argument("--mixed-precision", choices=("auto", "no", "bf16"), default="auto",
                   help="train.py --mixed-precision; auto: bf16 where the hardware has it natively, else no")
    g.add_argument("--group-mode", choices=critique.GROUP_MODES, default="question",
                   help="train.py --group-mode of every method that does not set its own (gc-per-prompt, gc-shared)")
    g.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="everything after this is appended to every train.py call (so it overrides), e.g. "
                        "--train-args --beta 1e-3 (see python train.py --help)")
    g = p.add_argument_group("evals (eval.py)")
    g.add_argument("--limit", type=int, default=256, help="held-out generation questions")
    g.add_argument("--critique-questions", type=int, default=64,
                   help="test questions of the critique test set (one right + one wrong response each: 2 pairs)")
    g.add_argument("--k", type=int, default=2, help="samples per question (pass@1, maj@k; the critique set's samples)")
    g.add_argument("--k-ref", type=int, default=1, help="refinements per critique for the denoised reward "
                                                        "(Table 5) in the evals of " + ", ".join(sorted(READS_DENOISED))
                                                        + "; 0 = skip")
    g.add_argument("--selection", action="store_true", help="also run critique-guided best-of-k (k critiques "
                                                            "per question more)")
    g.add_argument("--max-new-tokens", type=int, default=96, help="response budget (train and eval)")
    g.add_argument("--critique-max-new-tokens", type=int, default=128, help="critique budget (train and eval)")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="eval.py --dtype; auto: bf16 where the hardware has it natively, else fp32")
    g.add_argument("--eval-batch", type=int, default=256,
                   help="eval.py --batch (sampler rows at once; speed only, the samples do not depend on it)")
    g.add_argument("--prompt-style", default="plain", help="generation prompt of train and eval (data.PROMPT_STYLES)")
    g.add_argument("--gsm8k-dir", default=None, help="also eval on DIR/test_dev.jsonl + DIR/model_solutions_dev.jsonl")
    g = p.add_argument_group("long runs")
    g.add_argument("--save-every", type=int, default=None, help="train.py --save-every (default: every 5%% of a "
                   "run's steps, at least 5: a killed run loses at most that; rerun the command to resume); 0 = at the "
                   "end only")
    g.add_argument("--launch", default=None, help="start train.py with this instead of python, e.g. 'accelerate "
                   "launch --config_file configs/accelerate/fsdp2.yaml --num_processes 8'")
    suite.add_experiment_flags(p)
    return p


def main(argv=None):
    import report  # it imports this file's tables: imported here, not at the top
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe = build_parser().parse_known_args(argv)[0].recipe  # --recipe: its flags first, so argv's win
    args = build_parser().parse_args(suite.recipe_argv(recipe, argv) if recipe else argv)
    try:
        if args.gsm8k_dir and not args.report:
            for f in ("test_dev.jsonl", "model_solutions_dev.jsonl"):
                if not (Path(args.gsm8k_dir) / f).is_file():
                    raise ExperimentError(f"--gsm8k-dir {args.gsm8k_dir}: no {f} in it")
        if args.static_pairs and not Path(args.static_pairs).is_file():
            raise ExperimentError(f"--static-pairs {args.static_pairs}: no such file")
        if not args.report:
            if not args.dry_run:
                Path(args.dir).mkdir(parents=True, exist_ok=True)
            resolve_auto_precision(args)
            update_grid(args, argv)
            try:
                run_grid(args)
            finally:
                if not args.dry_run:
                    try:
                        report.report(args.dir)  # also after a failed run: what is there so far
                    except Exception as e:  # never hide the run's own error behind the report's
                        print(f"[experiment] report failed: {type(e).__name__}: {e}", file=sys.stderr)
        else:
            report.report(args.dir)
    except (ExperimentError, report.ReportError) as e:
        print(f"experiment.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
