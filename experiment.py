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

Evals pass `--k-ref 1` by default (one refinement per critique): it adds the denoised reward of Table 5
(arXiv 2602.22765, Appendix B: C-RL vs GC-RL, and the denoising ablation) to every eval and changes no other
number (refinements are sampled after the critiques, from their own seed). `--k-ref 0` skips it.

The report (results.md): cells are mean +- the 95% half-width of Student's t over seeds, with the number of
seeds; missing seeds are marked, never averaged in as if complete. Differences between methods are paired
bootstrap CIs over seeds and eval items; each of the paper's claims is called reproduced / not reproduced /
inconclusive from that CI alone.
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

import data  # light: no torch
import suite  # light: no torch

HERE = Path(__file__).resolve().parent

# the named methods -> train.py flags (arXiv 2602.22765; Table 1 rows, then the ablations of §5)
METHODS = {
    "g": ["--mode", "g"],  # G-RL: vanilla GRPO, first-order rollout only (Table 1)
    "c": ["--mode", "c"],  # C-RL: critiques only, on static pairs from the cold-start model (Table 1)
    "gc": ["--mode", "gc"],  # GC-RL: responses + critiques of the label-balanced cache (Table 1)
    "gc-random": ["--mode", "gc", "--pair-filter", "random"],  # Table 2 "random sampling": no balance filter
    # Table 2 middle row: random sampling + the reweighted critique reward of Eq. 3
    "gc-random-reweight": ["--mode", "gc", "--pair-filter", "random", "--critique-reward", "reweight"],
    "gc-static": ["--mode", "gc", "--pairs", "static"],  # §5.3: GC-RL on static pairs
    "c-dynamic": ["--mode", "c", "--pairs", "dynamic"],  # §5.3: C-RL on its own fresh pairs (reward hacking)
    "gc-precision": ["--mode", "gc", "--critique-reward", "precision"],  # §5.4, Eq. 5
    "gc-recall": ["--mode", "gc", "--critique-reward", "recall"],  # §5.4, Eq. 6
    "gc-denoise": ["--mode", "gc", "--denoise", "1"],  # §5.2, Eq. 4 with n = 1 refinement, as in the paper
    "c-denoise": ["--mode", "c", "--denoise", "1"],  # §5.2, Eq. 4 with n = 1 refinement, C-RL
}
LABELS = {"base": "base model", "sft": "w/o RL (cold start)", "c": "C-RL", "g": "G-RL", "gc": "GC-RL",
          "gc-random": "GC-RL, random sampling", "gc-random-reweight": "GC-RL, random sampling + reweight",
          "gc-static": "GC-RL, static pairs", "c-dynamic": "C-RL, dynamic pairs", "gc-precision": "GC-RL, Eq. 5",
          "gc-recall": "GC-RL, Eq. 6", "gc-denoise": "GC-RL, denoised", "c-denoise": "C-RL, denoised"}
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
    static = (["--static-pairs", args.static_pairs] if args.static_pairs and flags[1] == "c"
              and "dynamic" not in flags else [])
    return (train_py(args) + flags
            + ["--model", str(root / "sft" / "final"), "--data", args.data, "--limit", str(args.train_limit),
               "--seed", str(seed), "--max-steps", str(args.rl_steps), "--questions-per-step", str(args.questions),
               "--lr", str(args.rl_lr), "--out", str(run_dir(root, method, seed))]
            + train_sizes(args) + static + ["--save-every", save_every(args, args.rl_steps)]
            + (["--resume", "auto"] if resume else []) + args.train_args)


def eval_flags(args):
    """eval.py flags shared by every eval (and the critique test set): the same sizes and seed for all."""
    return (["--k", str(args.k), "--max-new-tokens", str(args.max_new_tokens),
             "--critique-max-new-tokens", str(args.critique_max_new_tokens), "--k-ref", str(args.k_ref),
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
    return ([sys.executable, str(HERE / "eval.py"), "--model", str(model)] + data + ["--limit", str(args.limit)]
            + eval_flags(args) + ["--label", label, "--out", str(out)])


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

    def add(name, argv, done, log, run, key):
        steps.append(dict(name=name, argv=argv, done=done, log=Path(log), record=Path(run) / "run.json", key=key))

    def add_evals(tag, model, run):
        for e in evals:
            out = Path(run) / f"{e}.json"
            add(f"{tag} {e}", eval_argv(args, model, tag, out, e), out.is_file(), Path(run) / f"{e}.log", run, e)

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
        "train")
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
NOT_SETTINGS = {"dir", "methods", "seeds", "with_base", "dry_run", "report", "n_boot", "gsm8k_dir", "save_every",
                "launch", "recipe"}  # how a run is started and checkpointed, not what it computes


def update_grid(args, argv):
    """Merge this invocation into DIR/grid.json: the methods and seeds asked for so far and the command.
    Different sizes than earlier invocations would mix incomparable runs into one table: an error."""
    path = Path(args.dir) / "grid.json"
    grid = _read_json(path, {}) or {}
    settings = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    old = grid.get("settings")
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
            continue
        print(f"[experiment] {step['name']} ({todo.index(step) + 1}/{len(todo)}), log {step['log']}\n"
              f"$ {shlex.join(step['argv'])}", flush=True)
        if args.dry_run:
            continue
        res = launch(step["argv"], step["log"], step["name"])
        record_run(step, res)
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


# ============================================================================ statistics (pure)

# Student t quantiles t_{0.975, df}, df = 1..30; 1.96 (the normal's) beyond
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_ci(xs):
    """(mean, 95% CI half-width) over xs with Student t (sample std, n - 1 df); half-width None for n = 1,
    (None, None) for n = 0."""
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        return None, None
    m = sum(xs) / n
    if n == 1:
        return m, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return m, t * sd / math.sqrt(n)


def paired_bootstrap(a, b, n_boot=2000, seed=0, stat=None):
    """Paired bootstrap of method a vs method b. a, b: seed -> per-item values (0/1 per question, or per
    critique) over the SAME items in the same order. Only seeds present in both are used. Each replicate
    resamples seeds with replacement and items with replacement (one item draw shared by the drawn seeds,
    as the items are the same questions for every seed), keeping a and b paired; the statistic is
    mean(a - b) unless `stat(A, B)` (arrays seeds x items) is given. Returns {diff (on the data), lo, hi
    (2.5 / 97.5 percentiles), seeds, n_items}, or None without a common seed."""
    import numpy as np
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    A = np.array([a[s] for s in seeds], dtype=float)
    B = np.array([b[s] for s in seeds], dtype=float)
    if A.shape != B.shape or A.ndim != 2 or A.shape[1] == 0:
        raise ValueError(f"paired_bootstrap: a and b must give the same number of items for every seed "
                         f"(got {A.shape} and {B.shape})")
    f = stat or (lambda x, y: float((x - y).mean()))
    rng = np.random.default_rng(seed)
    S, N = A.shape
    boots = np.empty(n_boot)
    for i in range(n_boot):
        ix = np.ix_(rng.integers(0, S, S), rng.integers(0, N, N))
        boots[i] = f(A[ix], B[ix])
    with np.errstate(all="ignore"):
        lo, hi = (np.nanpercentile(boots, [2.5, 97.5]) if np.isfinite(boots).any() else (math.nan, math.nan))
    return dict(diff=f(A, B), lo=float(lo), hi=float(hi), seeds=seeds, n_items=N)


def precision_stat(A, B):
    """stat for paired_bootstrap on critique codes (1 = "right" on a right response, 2 = "right" on a wrong
    one, 0 = anything else): precision("right") of A minus that of B; nan when one has no "right" verdict."""
    def prec(X):
        called = (X > 0).sum()
        return (X == 1).sum() / called if called else math.nan
    return float(prec(A) - prec(B))


def verdict(res, sign):
    """The paper's claim "a - b has sign `sign`" against a bootstrap CI, mechanically."""
    if res is None or not (math.isfinite(res["lo"]) and math.isfinite(res["hi"])):
        return "not run"
    lo, hi = sorted((sign * res["lo"], sign * res["hi"]))
    if lo > 0:
        return "reproduced"
    if hi < 0:
        return "not reproduced (CI excludes 0, other direction)"
    return "inconclusive (CI includes 0)"


# ============================================================================ the report

def _seed_of(path):
    m = re.fullmatch(r"seed(-?\d+)", path.name)
    return int(m.group(1)) if m else None


def collect(root, grid):
    """Everything on disk: evals[name][method][seed] (seed None for base / sft), metrics[method][seed] (rows of
    metrics.jsonl), runs[(method, seed)] (run.json), expected[method] (seeds asked for or found)."""
    root = Path(root)
    evals = {e: {} for e in EVALS}
    metrics, runs = {}, {}
    expected = {m: set(s) for m, s in (grid.get("methods") or {}).items()}
    for m in METHODS:
        for d in sorted((root / m).glob("seed*")) if (root / m).is_dir() else []:
            s = _seed_of(d)
            if s is None:
                continue
            expected.setdefault(m, set()).add(s)
            rows = []
            if (d / "metrics.jsonl").is_file():
                for line in (d / "metrics.jsonl").read_text().splitlines():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut short by a killed run
            if rows:
                metrics.setdefault(m, {})[s] = rows
            if (d / "run.json").is_file():
                runs[(m, s)] = _read_json(d / "run.json", {})
    for m in ("base", "sft"):
        if (root / m / "run.json").is_file():
            runs[(m, None)] = _read_json(root / m / "run.json", {})
    for e in EVALS:
        for m in list(expected) + ["base", "sft"]:
            for s in sorted(expected.get(m, [])) if m in METHODS else [None]:
                path = (run_dir(root, m, s) if s is not None else root / m) / f"{e}.json"
                res = _read_json(path)
                if isinstance(res, dict) and "generation" in res:
                    evals[e].setdefault(m, {})[s] = res
    return evals, metrics, runs, {m: sorted(s) for m, s in expected.items()}


def _metric(res, block, key):
    v = (res.get(block) or {}).get(key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# (column title, block, key, percent?)
TABLE1_COLS = [("gen. greedy", "generation", "accuracy", True), ("pass@1", "generation", "mean_accuracy", True),
               ("maj@k", "generation", "majority_accuracy", True), ("crit. accuracy", "critique", "accuracy", True),
               ("crit. F1", "critique", "f1", True), ('says "wrong"', "critique", "wrong_rate", True)]
DENOISED_COL = ("denoised reward (Table 5)", "critique", "denoised_reward", False)


def _num(v, pct):
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def cell(by_seed, expected, pct=True):
    """One table cell from {seed: value or None (the metric is undefined there)} of the seeds that ran, out of
    `expected` seeds: "61.2 ± 3.1 (3 seeds)"; marks missing and undefined seeds; "not run" for none."""
    if not by_seed:
        return "not run"
    vals = [v for v in by_seed.values() if v is not None]
    m, hw = mean_ci(vals)
    missing = [s for s in expected if s not in by_seed]
    undef = [s for s, v in by_seed.items() if v is None]
    count = f"{len(vals)}/{len(expected)} seeds" if missing or undef else f"{len(vals)} seed" + "s" * (len(vals) != 1)
    notes = [count + (", no CI" if m is not None and hw is None else "")]
    if missing:
        notes.append("missing " + ", ".join(map(str, missing)))
    if undef:
        notes.append("undefined in " + ", ".join(map(str, undef)))
    if m is None:
        return "– (" + "; ".join(notes) + ")"
    txt = _num(m, pct) + (f" ± {_num(hw, pct)}" if hw is not None else "")
    return f"{txt} ({'; '.join(notes)})"


def single_cell(res, block, key, pct=True):
    """A cell of the one cold start / the base model (one model, no seeds)."""
    if res is None:
        return "not run"
    v = _metric(res, block, key)
    return "–" if v is None else _num(v, pct)


def table(rows, cols, evals, expected, extra=None):
    """Markdown: one row per method (if it is in the grid or has results), one column per (title, block, key,
    pct); `extra` maps a title to a function (method) -> cell text for columns not in eval.json."""
    head = ["method"] + [c[0] for c in cols] + list(extra or {})
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in rows:
        if m in ("base", "sft"):
            res = evals.get(m, {}).get(None)
            if res is None and m == "base":
                continue
            cells = [single_cell(res, b, k, p) for _, b, k, p in cols]
        else:
            if m not in expected and m not in evals:
                continue
            got = evals.get(m, {})
            cells = [cell({s: _metric(r, b, k) for s, r in got.items()}, expected.get(m, sorted(got)), p)
                     for _, b, k, p in cols]
        cells += [f(m) for f in (extra or {}).values()]
        lines.append("| " + " | ".join([LABELS.get(m, m)] + cells) + " |")
    return "\n".join(lines)


def item_values(res, metric):
    """Per-item values of one eval result for paired_bootstrap, or None without per-item outcomes."""
    items = res.get("items") or {}
    crit = items.get("critique") or []
    if metric == "greedy":
        return items.get("greedy") or None
    if metric in ("critique", "wrong", "recall", "precision", "denoised") and not crit:
        return None
    if metric == "critique":
        return [x["correct"] for x in crit]
    if metric == "wrong":
        return [int(x["verdict"] == "wrong") for x in crit]
    if metric == "recall":
        return [int(x["verdict"] == "right") for x in crit if x["label"]]
    if metric == "precision":
        return [0 if x["verdict"] != "right" else 1 if x["label"] else 2 for x in crit]
    if metric == "denoised":
        vals = [x.get("denoised") for x in crit]
        return None if any(v is None for v in vals) else vals
    raise ValueError(f"unknown item metric {metric!r}")


# the paper's claims: (claim, a, b, item metric, expected sign of a - b, where in arXiv 2602.22765)
CLAIMS = [
    ("GC-RL generates better than G-RL", "gc", "g", "greedy", +1, "Table 1"),
    ("GC-RL critiques better than C-RL", "gc", "c", "critique", +1, "Table 1"),
    ("G-RL generates better than C-RL", "g", "c", "greedy", +1, "Table 1"),
    ("C-RL generates better than the cold start", "c", "sft", "greedy", +1, "Table 1"),
    ("GC-RL's denoised critique reward is above C-RL's", "gc", "c", "denoised", +1, "Table 5"),
    ("the filter beats random sampling (generation)", "gc", "gc-random", "greedy", +1, "Table 2"),
    ("the filter beats random sampling (critique)", "gc", "gc-random", "critique", +1, "Table 2"),
    ("reweighting (Eq. 3) beats plain random sampling (generation)", "gc-random-reweight", "gc-random", "greedy", +1,
     "Table 2"),
    ("reweighting (Eq. 3) beats plain random sampling (critique)", "gc-random-reweight", "gc-random", "critique", +1,
     "Table 2"),
    ("the filter beats random sampling + reweight (generation)", "gc", "gc-random-reweight", "greedy", +1, "Table 2"),
    ("the filter beats random sampling + reweight (critique)", "gc", "gc-random-reweight", "critique", +1, "Table 2"),
    ("GC-RL: dynamic pairs beat static ones (generation)", "gc", "gc-static", "greedy", +1, "§5.3, Fig. 4"),
    ("GC-RL: dynamic pairs beat static ones (critique)", "gc", "gc-static", "critique", +1, "§5.3, Fig. 4"),
    ("C-RL: static pairs beat dynamic ones (critique)", "c", "c-dynamic", "critique", +1, "§5.3, Fig. 4"),
    ('C-RL on dynamic pairs says "wrong" more (reward hacking)', "c-dynamic", "c", "wrong", +1, "§5.3"),
    ("Eq. 5 raises precision", "gc-precision", "gc", "precision", +1, "§5.4, Fig. 5"),
    ("Eq. 5 lowers recall", "gc-precision", "gc", "recall", -1, "§5.4, Fig. 5"),
    ("Eq. 6 raises recall", "gc-recall", "gc", "recall", +1, "§5.4, Fig. 5"),
    ("Eq. 6 lowers precision", "gc-recall", "gc", "precision", -1, "§5.4, Fig. 5"),
    ("denoising (Eq. 4) improves GC-RL's generation", "gc-denoise", "gc", "greedy", +1, "§5.2, Fig. 3"),
    ("denoising (Eq. 4) improves GC-RL's critique", "gc-denoise", "gc", "critique", +1, "§5.2, Fig. 3"),
    ("denoising (Eq. 4) improves C-RL's generation", "c-denoise", "c", "greedy", +1, "§5.2, Fig. 3"),
    ("denoising (Eq. 4) improves C-RL's critique", "c-denoise", "c", "critique", +1, "§5.2, Fig. 3"),
]
METRIC_NAMES = {"greedy": "gen. greedy", "critique": "crit. accuracy", "wrong": 'says "wrong"',
                "recall": "recall", "precision": "precision", "denoised": "denoised reward"}


def compare(evals, a, b, metric, n_boot=2000):
    """paired_bootstrap of method a vs b on an item metric; the cold start / base (one model) pairs with every
    seed of the other method. Returns (result or None, why not)."""
    def per_seed(m, other):
        got = evals.get(m, {})
        if m in ("sft", "base"):
            res = got.get(None)
            return {s: res for s in evals.get(other, {})} if res else {}
        return got
    ra, rb = per_seed(a, b), per_seed(b, a)
    if not ra or not rb:
        return None, "not run: " + " and ".join(LABELS.get(m, m) for m, r in ((a, ra), (b, rb)) if not r)
    va = {s: item_values(r, metric) for s, r in ra.items()}
    vb = {s: item_values(r, metric) for s, r in rb.items()}
    va, vb = {s: v for s, v in va.items() if v}, {s: v for s, v in vb.items() if v}
    if not set(va) & set(vb):
        return None, "no per-item outcomes for a common seed (eval.json without `items`, or the metric is undefined)"
    common = set(va) & set(vb)
    if len({len(v) for s, v in list(va.items()) + list(vb.items()) if s in common}) != 1:
        return None, "the evals have different items (different --limit or critique set): not comparable"
    stat = precision_stat if metric == "precision" else None
    return paired_bootstrap(va, vb, n_boot=n_boot, seed=0, stat=stat), None


def claims_table(evals, n_boot, in_grid, claims=CLAIMS):
    """One line per claim whose two methods are in the grid (`in_grid`; the cold start always is), then one
    line naming the claims this grid does not test."""
    pct = lambda m: m != "denoised"  # noqa: E731
    lines = ["| claim (arXiv 2602.22765) | a − b | metric | diff | 95% CI | seeds used | this grid |",
             "|---|---|---|---|---|---|---|"]
    absent = [f"{claim} ({where})" for claim, a, b, *_, where in claims
              if not {a, b} <= set(in_grid) | {"sft"}]
    for claim, a, b, metric, sign, where in claims:
        if not {a, b} <= set(in_grid) | {"sft"}:
            continue
        res, why = compare(evals, a, b, metric, n_boot)
        names = f"{LABELS.get(a, a)} − {LABELS.get(b, b)}"
        if res is None:
            lines.append(f"| {claim} ({where}) | {names} | {METRIC_NAMES[metric]} | – | – | – | {why} |")
            continue
        s = (lambda v: f"{100 * v:+.1f}") if pct(metric) else (lambda v: f"{v:+.3f}")
        ci = f"[{s(res['lo'])}, {s(res['hi'])}]" if math.isfinite(res["lo"]) else "–"
        lines.append(f"| {claim} ({where}) | {names} | {METRIC_NAMES[metric]} | "
                     f"{s(res['diff']) if math.isfinite(res['diff']) else '–'} | {ci} | "
                     f"{', '.join(map(str, res['seeds']))} ({res['n_items']} items) | {verdict(res, sign)} |")
    if absent:
        lines += ["", "Not tested by this grid (a method is not in it): " + "; ".join(absent) + "."]
    return "\n".join(lines)


def train_series(rows, key):
    return [(r.get("step", i + 1), r[key]) for i, r in enumerate(rows)
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]


def train_cell(metrics, expected, m, key, which):
    """The first or last logged value of a training metric, mean ± CI over seeds."""
    by_seed = {}
    for s, rows in metrics.get(m, {}).items():
        pts = train_series(rows, key)
        by_seed[s] = (pts[0][1] if which == "first" else pts[-1][1]) if pts else None
    return cell(by_seed, expected.get(m, sorted(by_seed)))


CURVES = ["reward/response", "acc/response", "reward/critique", "acc/critique", "critic/wrong_rate"]
# one figure per comparison, plots/<name>.png: the Table 1 methods, then each ablation beside its baseline(s)
PLOT_GROUPS = {"table1": ["g", "c", "gc"], "filter": ["gc", "gc-random", "gc-random-reweight"],
               "static_vs_dynamic": ["gc", "gc-static", "c", "c-dynamic"],
               "reward_steering": ["gc", "gc-precision", "gc-recall"], "denoise": ["c", "c-denoise", "gc", "gc-denoise"]}


def plot_curves(root, metrics, expected):
    """plots/<group>.png: one panel per CURVES metric, each method's mean over seeds per step with a min–max
    band. An ablation group is drawn once one of its ablations is in the grid. Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    out = Path(root) / "plots"
    written = []
    for name, group in PLOT_GROUPS.items():
        methods = [m for m in group if metrics.get(m)]
        if not methods or (name != "table1" and not any(m in expected for m in group if m not in ("c", "gc"))):
            continue
        fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
        for ax, key in zip(axes.flat, CURVES):
            if not any(train_series(rows, key) for m in methods for rows in metrics[m].values()):
                ax.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=ax.transAxes)
            for m in methods:
                per_step = {}
                for rows in metrics[m].values():
                    for step, v in train_series(rows, key):
                        per_step.setdefault(step, []).append(v)
                if not per_step:
                    continue
                steps = sorted(per_step)
                vals = [np.array(per_step[s]) for s in steps]
                line, = ax.plot(steps, [v.mean() for v in vals], label=f"{LABELS.get(m, m)} ({len(metrics[m])} seeds)",
                                marker="." if len(steps) < 30 else None)
                ax.fill_between(steps, [v.min() for v in vals], [v.max() for v in vals], color=line.get_color(),
                                alpha=0.2)
            ax.set_title(key, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        for ax in axes.flat[1:len(CURVES)]:  # a g-only panel has no critique lines: collect every label once
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        axes.flat[-1].axis("off")
        axes.flat[-1].legend(handles, labels, loc="center", fontsize=9)
        fig.suptitle(f"{name}: mean over training seeds, band = min–max")
        fig.tight_layout()
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def runs_table(runs):
    lines = ["| run | train wall | train peak RSS | eval wall | eval peak RSS |", "|---|---|---|---|---|"]
    total, peak = 0.0, 0.0
    for (m, s), rec in sorted(runs.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])):
        cells = []
        for key in ("train", "eval"):
            r = rec.get(key)
            cells += ([f"{r['wall_s'] / 60:.1f} min", f"{r['peak_rss_mib'] / 1024:.1f} GiB"] if r else ["–", "–"])
        for r in rec.values():
            if isinstance(r, dict) and "wall_s" in r:
                total += r["wall_s"]
                peak = max(peak, r["peak_rss_mib"])
        lines.append(f"| {m if s is None else f'{m}/seed{s}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines), total, peak


def report(root, n_boot=2000):
    """DIR/results.md and DIR/plots/*.png from whatever the grid has finished. Returns the markdown."""
    root = Path(root)
    if not root.is_dir():
        raise ExperimentError(f"{root}: no such directory (run the grid first)")
    grid = _read_json(root / "grid.json", {}) or {}
    evals_all, metrics, runs, expected = collect(root, grid)
    methods = [m for m in METHODS if m in expected]
    out = [f"# Results: {root}", "", "Commands (every invocation of the runner on this directory, in order):", "",
           "```"] + (grid.get("commands") or ["(no grid.json: runs found on disk)"]) + ["```", ""]
    out += ["Cells: mean ± 95% CI half-width (Student t over training seeds), in % (rewards: raw), with the "
            "number of seeds; "
            "missing or undefined seeds are named and left out of the mean. The cold start and the base model are "
            "one model each (no seeds). Every eval uses the same questions, critique pairs and sampling seed, so "
            "the CIs measure training variability only; the differences below are paired bootstrap CIs "
            "(2.5 / 97.5 percentiles of mean(a − b), resampling seeds and eval items). Each run's exact commands "
            "are in its run.json and log.", ""]
    for e, data in EVALS.items():
        evals = evals_all[e]
        if not evals:
            continue
        any_denoised = any(_metric(r, "critique", "denoised_reward") is not None for g in evals.values()
                           for r in g.values())
        cols = TABLE1_COLS + ([DENOISED_COL] if any_denoised else [])
        out += [f"## Table 1 ({data}): the cold start, C-RL, G-RL, GC-RL", "",
                table(["base", "sft", "c", "g", "gc"], cols, evals, expected), ""]
        out += suite.report_tables(evals, ["base", "sft"] + methods, LABELS, mean_ci) if e == "eval" else []
    evals = evals_all["eval"]
    if evals:
        out += ["## The paper's claims: paired differences", "",
                "A claim is *reproduced* when the 95% CI of a − b excludes 0 in the paper's direction, *not "
                "reproduced* when it excludes 0 the other way, *inconclusive* otherwise; decided from the CI "
                "alone. Precision differences bootstrap the precision of each resample; recall uses the right "
                "responses only.", "", claims_table(evals, n_boot, methods), ""]
        if evals_all["eval-gsm8k"]:  # the two headline claims again on the GSM8K evals
            out += ["On GSM8K dev:", "", claims_table(evals_all["eval-gsm8k"], n_boot, methods, CLAIMS[:2]), ""]
        gen_crit = [TABLE1_COLS[0], TABLE1_COLS[1], TABLE1_COLS[3], TABLE1_COLS[4], TABLE1_COLS[5]]
        sections = [
            ("Table 2: the data filter vs random sampling vs random sampling + reweight (Eq. 3)",
             ["gc", "gc-random", "gc-random-reweight"], gen_crit, None),
            ("Static vs dynamic critique data (§5.3): C-RL on its own fresh pairs is the reward-hacking setting; "
             "its training \"wrong\" rate (critic/wrong_rate) is the signal",
             ["gc", "gc-static", "c", "c-dynamic"],
             [TABLE1_COLS[0], TABLE1_COLS[3], TABLE1_COLS[5]],
             {f'train "wrong" rate, {w} step': (lambda m, w=w: train_cell(metrics, expected, m, "critic/wrong_rate", w))
              for w in ("first", "last")}),
            ("Reward steering (§5.4): Eq. 5 should raise precision, Eq. 6 recall (\"right\" is the positive class)",
             ["gc", "gc-precision", "gc-recall"],
             [("precision", "critique", "precision", True), ("recall", "critique", "recall", True),
              TABLE1_COLS[4], TABLE1_COLS[3]], None),
            ("Denoising (§5.2, Eq. 4, n = 1 refinement) and the denoised reward of Table 5 (evals with --k-ref 1)",
             ["c", "c-denoise", "gc", "gc-denoise"], [TABLE1_COLS[0], TABLE1_COLS[3], DENOISED_COL], None),
        ]
        for title, rows, cols, extra_cols in sections:
            if any(m in expected for m in rows if m not in ("c", "g", "gc")):  # shown once an ablation is in
                out += [f"## {title}", "", table(rows, cols, evals, expected, extra_cols), ""]
    plots = plot_curves(root, metrics, expected)
    if plots:
        out += ["## Training curves", "", f"{', '.join(CURVES)} per step from each run's metrics.jsonl; mean over "
                "seeds, band = min–max over seeds: " + ", ".join(f"[{p.name}](plots/{p.name})" for p in plots), ""]
    if runs:
        text, total, peak = runs_table(runs)
        out += ["## Cost", "", f"Grid total: {total / 60:.1f} min of runs (sum of wall times over all attempts), "
                f"largest peak RSS of one run {peak / 1024:.1f} GiB.", "", text, ""]
    md = "\n".join(out)
    (root / "results.md").write_text(md)
    for part in md.split("\n## ")[1:]:  # the headline tables on stdout too
        if part.startswith("Table 1"):
            print("## " + part.rstrip() + "\n", flush=True)
    print(f"[experiment] report: {root / 'results.md'}"
          + (f", {len(plots)} plots in {root / 'plots'}" if plots else ""), flush=True)
    return md


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
    a("--n-boot", type=int, default=2000, help="bootstrap replicates of the paired differences")
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
    g.add_argument("--grad-accum", type=int, default=4, help="micro-batches per update, at most (less memory, same update)")
    g.add_argument("--mixed-precision", choices=("no", "bf16"), default="bf16", help="train.py --mixed-precision")
    g.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="everything after this is appended to every train.py call (so it overrides), e.g. "
                        "--train-args --beta 1e-3 (see python train.py --help)")
    g = p.add_argument_group("evals (eval.py)")
    g.add_argument("--limit", type=int, default=256, help="held-out generation questions")
    g.add_argument("--critique-questions", type=int, default=64,
                   help="test questions of the critique test set (one right + one wrong response each: 2 pairs)")
    g.add_argument("--k", type=int, default=2, help="samples per question (pass@1, maj@k; the critique set's samples)")
    g.add_argument("--k-ref", type=int, default=1, help="refinements per critique for the denoised reward "
                                                        "(Table 5); 0 = skip")
    g.add_argument("--selection", action="store_true", help="also run critique-guided best-of-k (k critiques "
                                                            "per question more)")
    g.add_argument("--max-new-tokens", type=int, default=96, help="response budget (train and eval)")
    g.add_argument("--critique-max-new-tokens", type=int, default=128, help="critique budget (train and eval)")
    g.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16", help="eval.py --dtype")
    g.add_argument("--eval-batch", type=int, default=32, help="eval.py --batch (sampler rows per chunk)")
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
            update_grid(args, argv)
            try:
                run_grid(args)
            finally:
                if not args.dry_run:
                    try:
                        report(args.dir, args.n_boot)  # also after a failed run: what is there so far
                    except Exception as e:  # never hide the run's own error behind the report's
                        print(f"[experiment] report failed: {type(e).__name__}: {e}", file=sys.stderr)
        else:
            report(args.dir, args.n_boot)
    except ExperimentError as e:
        print(f"experiment.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
