"""Result files -> tables and figures: `eval.py --compare` (paper-style markdown tables of eval JSONs, rows =
methods, columns = datasets, as arXiv 2602.22765's Table 1) and `eval.py --plot` (a training run's curves). No
model, no torch: reads eval.py's JSON and train.py's metrics.jsonl), and `experiment.py`'s report of a grid
(results.md: Table 1 over training seeds, the paper's claims decided on per-seed paired differences (stats.py),
the ablation tables, curves with a band over seeds, the run costs).
"""
import contextlib
import json
import math
import re
import sys
from pathlib import Path

import stats
import suite
from experiment import EVALS, LABELS, METHODS, _read_json, run_dir


class ReportError(ValueError):
    """A missing or unreadable result file; the message names it."""


def fmt(v, pct=True):
    if isinstance(v, float):
        return f"{100 * v:.1f}" if pct else f"{v:.3f}"
    return "–" if v is None else str(v)


def short_name(spec):
    """Column name of a data spec: 'gsm8k:/x/test_dev.jsonl' -> 'gsm8k:test_dev'; 'self:arith', 'arith' -> 'arith'."""
    kind, _, arg = str(spec).partition(":")
    if kind == "self":
        return short_name(arg)
    return "?" if spec is None else f"{kind}:{Path(arg).stem}" if "/" in arg or arg.endswith(".jsonl") else str(spec)


TABLE_BLOCKS = [  # (title, block, key, column source, percent?)
    ("Generation accuracy (greedy, %)", "generation", "accuracy", "data", True),
    ("Generation pass@1 (mean of k samples, %)", "generation", "mean_accuracy", "data", True),
    ("Generation maj@k (%)", "generation", "majority_accuracy", "data", True),
    ("Critique-guided best-of-k (%)", "selection", "critique_selected", "data", True),
    ("Critique accuracy (balanced, %)", "critique", "accuracy", "critique", True),
    ("Critique F1, 'right' positive (%)", "critique", "f1", "critique", True),
    ("Critique 'wrong' rate (%)", "critique", "wrong_rate", "critique", True),
    ("Denoised critique reward (Table 5)", "critique", "denoised_reward", "critique", False),
]


def compare_table(paths):
    """Paper-style markdown of eval JSON files and run dirs (a dir gives its eval*.json and eval/*.json): a table
    per TABLE_BLOCKS entry, rows = methods / checkpoints (--label), columns = datasets + Avg."""
    results = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p}: no such file or directory")
        files = sorted(p.glob("eval*.json")) + sorted(p.glob("eval/*.json")) if p.is_dir() else [p]
        if not files:
            raise ReportError(f"{p}: no eval*.json or eval/*.json in it (write one with eval.py --out)")
        for f in files:
            try:
                res = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ReportError(f"{f}: not valid JSON ({e.msg})") from None
            if not isinstance(res, dict) or "generation" not in res:
                raise ReportError(f"{f}: not an eval.py result (no 'generation' block)")
            results.append((res.get("label") or (p.name if p.is_dir() else f.stem), res))
    rows, parts = list(dict.fromkeys(label for label, _ in results)), []
    for title, block, key, col_src, pct in TABLE_BLOCKS:
        cells = {}
        for label, res in results:
            spec = res.get("data") if col_src == "data" else \
                (res.get("critique") or {}).get("source") or res.get("critique_data") or res.get("data")
            v, cell = (res.get(block) or {}).get(key), (label, short_name(spec))
            if v is not None:
                if cell in cells:
                    print(f"[compare] two results for row {label!r}, column {cell[1]!r}: keeping the later one "
                          "(give each eval a distinct --label)", file=sys.stderr)
                cells[cell] = v
        cols = list(dict.fromkeys(c for _, c in cells))
        avg = len(cols) > 1
        table = [["method"] + cols + (["Avg"] if avg else [])]
        for r in rows:
            vals = [cells.get((r, c)) for c in cols]
            if any(v is not None for v in vals):
                table.append([r] + [fmt(v, pct) for v in vals]
                             + ([fmt(sum(vals) / len(vals), pct) if None not in vals else "–"] if avg else []))
        md = ["| " + " | ".join(line) + " |" for line in table]
        if cells:
            parts.append("\n".join([f"**{title}**", "", md[0], "|" + "---|" * len(table[0])] + md[1:]))
    if not parts:
        raise ReportError("nothing to compare: every metric is null in " + ", ".join(map(str, paths)))
    return "\n\n".join(parts) + "\n"


PLOTS = {  # file name -> metric keys of metrics.jsonl (train.py; tests/test_train.py CONTRACT_KEYS); "prefix/*": all
    "reward": ["reward/response", "reward/critique", "acc/response", "acc/critique"],
    "critic": ["critic/precision", "critic/recall", "critic/wrong_rate", "critic/format_rate"],
    "length": ["len/response", "len/critique"], "truncation": ["trunc/response", "trunc/critique"], "kl": ["kl"],
    "frac_zero_std": ["frac_reward_zero_std"], "policy": ["entropy", "clip_ratio", "logprob_gap"],
    "optim": ["loss", "grad_norm"], "cache": ["cache/size"], "speed": ["tokens_per_s"], "time": ["time/*"],
    "memory": ["mem/*"], "eval": ["eval/*"]}


def plot_run(run_dir):
    """PNG curves of RUN_DIR/metrics.jsonl into RUN_DIR/plots/, one per PLOTS entry with data; returns the paths."""
    path, out_dir, written = Path(run_dir) / "metrics.jsonl", Path(run_dir) / "plots", []
    if not path.is_file():
        raise ReportError(f"{run_dir}: no metrics.jsonl in it (is it a train.py run dir?)" if Path(run_dir).is_dir()
                        else f"{run_dir}: no such directory")
    lines, rows = [line for line in path.read_text().splitlines() if line.strip()], []  # e.g. a kill cuts one short
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    rows = [r for r in rows if isinstance(r, dict)]
    if len(rows) < len(lines):
        print(f"[plot] {path}: skipped {len(lines) - len(rows)} unreadable line(s)")
    if not rows:
        raise ReportError(f"{path}: no metric rows in it")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir.mkdir(exist_ok=True)
    for name, pats in PLOTS.items():
        keys = [k for pat in pats for k in
                (sorted({key for r in rows for key in r if key.startswith(pat[:-1])}) if pat.endswith("/*") else [pat])]
        series = {k: [(r.get("step", i), r[k]) for i, r in enumerate(rows) if isinstance(r.get(k), (int, float))
                      and not isinstance(r[k], bool) and math.isfinite(r[k])] for k in keys}
        series = {k: pts for k, pts in series.items() if pts}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for k, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 30 else None)
        ax.set(xlabel="step", title=f"{Path(run_dir).name}: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / f"{name}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    if not written:
        names = ", ".join(k for keys in PLOTS.values() for k in keys)
        raise ReportError(f"{run_dir}/metrics.jsonl: none of the plotted metrics ({names}) "
                        "appear in it")
    return written


# ============================================================================ the experiment grid's report

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
    m, hw = stats.mean_ci(vals)
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


def collapsed_cell(evals, m):
    """How many of method m's seeds ended with a collapsed critic (eval.COLLAPSED: one verdict on >= 95% of the
    pairs), and which: "1/3 (seed 0)"; "yes" / "no" for the one cold start or base model."""
    def collapsed(res):  # eval.json's flag; evals written before it had one: from the per-item verdicts
        flag = (res.get("critique") or {}).get("collapsed")
        verdicts = [x["verdict"] for x in (res.get("items") or {}).get("critique") or []]
        if flag is None and verdicts:
            flag = max(verdicts.count("right"), verdicts.count("wrong")) / len(verdicts) >= 0.95
        return flag
    flags = {s: f for s, f in ((s, collapsed(r)) for s, r in evals.get(m, {}).items()) if f is not None}
    if not flags:
        return "–"
    if set(flags) == {None}:
        return "yes" if flags[None] else "no"
    bad = sorted(s for s, f in flags.items() if f)
    return f"{len(bad)}/{len(flags)}" + (f" (seed {', '.join(map(str, bad))})" if bad else "")


# a metric of the claims -> (eval.json block, key): one number per run, the seed-level score
SCORES = {"greedy": ("generation", "accuracy"), "critique": ("critique", "accuracy"),
          "wrong": ("critique", "wrong_rate"), "recall": ("critique", "recall"),
          "precision": ("critique", "precision"), "denoised": ("critique", "denoised_reward")}
METRIC_NAMES = {"greedy": "gen. greedy", "critique": "crit. accuracy", "wrong": 'says "wrong"',
                "recall": "recall", "precision": "precision", "denoised": "denoised reward"}
PCT = {m: m != "denoised" for m in SCORES}  # shown in points; the denoised reward raw

# the paper's claims: (claim, a, b, metric, expected sign of a - b (0: an A/A control, no effect), where in arXiv
# 2602.22765, the paper's own effect in the metric's units or None where it gives only a figure). Table 1 gives
# +2.2..+2.8 (generation) and +2.2..+4.8 (critique) over the three Qwen2.5 sizes: the smallest is used, the
# effect a replication must be able to see; Table 2 and Table 5 are Qwen2.5-7B's (Table 5: the 3B gap).
CLAIMS = [
    ("GC-RL generates better than G-RL", "gc", "g", "greedy", +1, "Table 1", 0.022),
    ("GC-RL critiques better than C-RL", "gc", "c", "critique", +1, "Table 1", 0.022),
    ("G-RL generates better than C-RL", "g", "c", "greedy", +1, "Table 1", 0.084),
    ("C-RL generates better than the cold start", "c", "sft", "greedy", +1, "Table 1", 0.062),
    ("GC-RL's denoised critique reward is above C-RL's", "gc", "c", "denoised", +1, "Table 5", 0.019),
    ("A/A control: GC-RL vs GC-RL with other sampling seeds (generation)", "gc-aa", "gc", "greedy", 0, "noise floor",
     None),
    ("A/A control: GC-RL vs GC-RL with other sampling seeds (critique)", "gc-aa", "gc", "critique", 0, "noise floor",
     None),
    ('A/A control: GC-RL vs GC-RL with other sampling seeds (says "wrong")', "gc-aa", "gc", "wrong", 0,
     "noise floor", None),
    ("the filter beats random sampling (generation)", "gc", "gc-random", "greedy", +1, "Table 2", 0.020),
    ("the filter beats random sampling (critique)", "gc", "gc-random", "critique", +1, "Table 2", 0.037),
    ("reweighting (Eq. 3) beats plain random sampling (generation)", "gc-random-reweight", "gc-random", "greedy", +1,
     "Table 2", 0.007),
    ("reweighting (Eq. 3) beats plain random sampling (critique)", "gc-random-reweight", "gc-random", "critique", +1,
     "Table 2", 0.025),
    ("the filter beats random sampling + reweight (generation)", "gc", "gc-random-reweight", "greedy", +1, "Table 2",
     0.013),
    ("the filter beats random sampling + reweight (critique)", "gc", "gc-random-reweight", "critique", +1, "Table 2",
     0.012),
    ("GC-RL: dynamic pairs beat static ones (generation)", "gc", "gc-static", "greedy", +1, "§5.3, Fig. 4", None),
    ("GC-RL: dynamic pairs beat static ones (critique)", "gc", "gc-static", "critique", +1, "§5.3, Fig. 4", None),
    ("C-RL: static pairs beat dynamic ones (critique)", "c", "c-dynamic", "critique", +1, "§5.3, Fig. 4", None),
    ('C-RL on dynamic pairs says "wrong" more (reward hacking)', "c-dynamic", "c", "wrong", +1, "§5.3", None),
    ("Eq. 5 raises precision", "gc-precision", "gc", "precision", +1, "§5.4, Fig. 5", None),
    ("Eq. 5 lowers recall", "gc-precision", "gc", "recall", -1, "§5.4, Fig. 5", None),
    ("Eq. 6 raises recall", "gc-recall", "gc", "recall", +1, "§5.4, Fig. 5", None),
    ("Eq. 6 lowers precision", "gc-recall", "gc", "precision", -1, "§5.4, Fig. 5", None),
    ("denoising (Eq. 4) improves GC-RL's generation", "gc-denoise", "gc", "greedy", +1, "§5.2, Fig. 3", None),
    ("denoising (Eq. 4) improves GC-RL's critique", "gc-denoise", "gc", "critique", +1, "§5.2, Fig. 3", None),
    ("denoising (Eq. 4) improves C-RL's generation", "c-denoise", "c", "greedy", +1, "§5.2, Fig. 3", None),
    ("denoising (Eq. 4) improves C-RL's critique", "c-denoise", "c", "critique", +1, "§5.2, Fig. 3", None),
    ("question groups (the paper's mixing) beat per-pair groups (generation)", "gc", "gc-per-prompt", "greedy", +1,
     "§3 grouping", None),
    ("question groups (the paper's mixing) beat per-pair groups (critique)", "gc", "gc-per-prompt", "critique", +1,
     "§3 grouping", None),
    ("question groups beat one group per step (critique)", "gc", "gc-shared", "critique", +1, "§3 grouping", None),
]


def seed_scores(evals, m, metric):
    """{seed: the run's score or None (undefined: e.g. no precision for a critic that never says "right")} of
    method m; {None: score} for the cold start / base model (one model, no seeds); {} when not run."""
    block, key = SCORES[metric]
    return {s: _metric(r, block, key) for s, r in evals.get(m, {}).items()}


def _sizes(res, metric):  # the eval's item counts: two evals are comparable only on the same items
    return (res.get("generation") or {}).get("n_questions") if metric == "greedy" else \
        (res.get("critique") or {}).get("n_pairs")


def compare(evals, a, b, metric):
    """stats.paired of method a vs b on `metric`, one score per run. Returns (result or None, why not)."""
    sa, sb = seed_scores(evals, a, metric), seed_scores(evals, b, metric)
    if not sa or not sb:
        return None, "not run: " + " and ".join(LABELS.get(m, m) for m, x in ((a, sa), (b, sb)) if not x)
    sizes = {_sizes(r, metric) for m in (a, b) for r in evals[m].values()}
    if len(sizes) > 1:
        return None, f"the evals have different items ({sorted(sizes, key=str)}): not comparable"
    res = stats.paired(sa, sb)
    return (res, None) if res["seeds"] or res["undefined"] else (None, "no seed in common")


def _fmt_diff(v, metric, signed=True):
    if v is None:
        return "–"
    return (f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}") if PCT[metric] else \
        (f"{v:+.3f}" if signed else f"{v:.3f}")


def claim_row(evals, claim):
    """The cells of one claim: per-seed differences, mean [95% CI], seeds, verdict, MDE, the paper's effect and
    the seeds this grid's spread would need to detect it."""
    text, a, b, metric, sign, where, effect = claim
    res, why = compare(evals, a, b, metric)
    head = [f"{text} ({where})", f"{LABELS.get(a, a)} − {LABELS.get(b, b)}", METRIC_NAMES[metric]]
    if res is None:
        return head + ["–", "–", "–", why, "–", "–", "–"]
    f = lambda v: _fmt_diff(v, metric)  # noqa: E731
    per_seed = ", ".join(f(d) for d in res["diffs"]) or "–"
    ci = f"{f(res['diff'])} [{f(res['lo'])}, {f(res['hi'])}]" if res["lo"] is not None else f(res["diff"])
    seeds = f"{res['n']}: " + ", ".join(map(str, res["seeds"])) if res["seeds"] else "0"
    notes = ([f"undefined in seed {', '.join(map(str, res['undefined']))}"] if res["undefined"] else []) + \
            ([f"one method only: {', '.join(map(str, res['missing']))}"] if res["missing"] else [])
    seeds += f" ({'; '.join(notes)})" if notes else ""
    v = stats.verdict(res, sign)
    mde = _fmt_diff(res["mde"], metric, signed=False) if res["mde"] is not None and v != "reproduced" else "–"
    need = stats.seeds_needed(effect, res["sd"]) if effect else None
    paper = _fmt_diff(sign * effect, metric) if effect else "–"
    needed = "–" if not effect or not res["sd"] else f"{need}" if need else f"> {stats.MAX_SEEDS}"
    return head + [per_seed, ci, seeds, v, mde, paper, needed]


def claims_table(evals, in_grid, claims=CLAIMS):
    """One line per claim whose two methods are in the grid (`in_grid`; the cold start always is), then one line
    naming the claims this grid does not test."""
    cols = ["claim (arXiv 2602.22765)", "a − b", "metric", "per seed", "mean [95% CI]", "seeds used", "verdict",
            "MDE (80%)", "paper's effect", "seeds for it"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    absent = [f"{c[0]} ({c[5]})" for c in claims if not {c[1], c[2]} <= set(in_grid) | {"sft"}]
    lines += ["| " + " | ".join(claim_row(evals, c)) + " |" for c in claims if {c[1], c[2]} <= set(in_grid) | {"sft"}]
    if absent:
        lines += ["", "Not tested by this grid (a method is not in it): " + "; ".join(absent) + "."]
    return "\n".join(lines)


STATS_NOTE = (
    "Each claim is decided on training seeds, the unit that varies: a run's score is its metric over the eval "
    "items; \"per seed\" is a − b for each seed that trained both methods (the same seed gives both the same "
    "question order); the CI is Student's t on those differences (a bootstrap of 3–10 values covers far less than "
    "95%). *reproduced* / *contradicted*: the CI excludes 0 in / against the paper's direction; *inconclusive*: "
    "it does not; below 3 usable seeds: *too few seeds*, never a verdict. A seed where a metric is undefined for "
    "either method (a critic that never says \"right\" has no precision) is named and left out. MDE: the "
    "smallest true difference this test would detect with 80% power at the measured between-seed SD of the "
    "differences and this seed count; \"seeds for it\": the seeds that SD needs to detect the paper's own "
    "effect (Table 1's smallest gain; Tables 2 and 5 of Qwen2.5). The A/A rows compare GC-RL with itself "
    "under other sampling seeds: the grid's noise floor, which must come out inconclusive.")


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


CURVES = ["reward/response", "acc/response", "reward/critique", "acc/critique", "critic/wrong_rate",
          "critic/unanimous_groups"]
# one figure per comparison, plots/<name>.png: the Table 1 methods, then each ablation beside its baseline(s)
PLOT_GROUPS = {"table1": ["g", "c", "gc", "gc-aa"], "filter": ["gc", "gc-random", "gc-random-reweight"],
               "static_vs_dynamic": ["gc", "gc-static", "c", "c-dynamic"],
               "reward_steering": ["gc", "gc-precision", "gc-recall"],
               "denoise": ["c", "c-denoise", "gc", "gc-denoise"], "grouping": ["gc", "gc-per-prompt", "gc-shared"]}


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


def ablation_tables(evals, metrics, expected):
    """The ablation sections of results.md (Table 2, §5.2-5.4, the grouping), each once one of its methods ran."""
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
        ("GRPO grouping (§3, \"mixed into the same group\"): a question's responses and its pairs' critiques in one "
         "group (GC-RL, the default) vs a group per pair vs one per step; a critic that gives one verdict to >= 95% "
         "of the pairs is collapsed; critic/unanimous_groups: the share of critique groups whose verdicts all agree",
         ["gc", "gc-per-prompt", "gc-shared"], [TABLE1_COLS[0], TABLE1_COLS[3], TABLE1_COLS[5]],
         {"collapsed critics": lambda m: collapsed_cell(evals, m),
          "unanimous critique groups, last step": lambda m: train_cell(metrics, expected, m,
                                                                        "critic/unanimous_groups", "last")}),
    ]
    out = []
    for title, rows, cols, extra_cols in sections:
        if any(m in expected for m in rows if m not in ("c", "g", "gc")):  # shown once an ablation is in
            out += [f"## {title}", "", table(rows, cols, evals, expected, extra_cols), ""]
    return out


def report(root):
    """DIR/results.md and DIR/plots/*.png from whatever the grid has finished. Returns the markdown."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root}: no such directory (run the grid first)")
    grid = _read_json(root / "grid.json", {}) or {}
    evals_all, metrics, runs, expected = collect(root, grid)
    methods = [m for m in METHODS if m in expected]
    out = [f"# Results: {root}", "", "Commands (every invocation of the runner on this directory, in order):", "",
           "```"] + (grid.get("commands") or ["(no grid.json: runs found on disk)"]) + ["```", ""]
    out += ["Cells: mean ± 95% CI half-width (Student t over training seeds), in % (rewards: raw), with the "
            "number of seeds; "
            "missing or undefined seeds are named and left out of the mean. The cold start and the base model are "
            "one model each (no seeds). Every eval uses the same questions, critique pairs and sampling seed, so "
            "the CIs measure training variability only. Each run's exact commands are in its run.json and log.",
            ""]
    for e, data in EVALS.items():
        evals = evals_all[e]
        if not evals:
            continue
        any_denoised = any(_metric(r, "critique", "denoised_reward") is not None for g in evals.values()
                           for r in g.values())
        cols = TABLE1_COLS + ([DENOISED_COL] if any_denoised else [])
        out += [f"## Table 1 ({data}): the cold start, C-RL, G-RL, GC-RL", "",
                table(["base", "sft", "c", "g", "gc", "gc-aa"], cols, evals, expected,
                      {"collapsed critics": lambda m, ev=evals: collapsed_cell(ev, m)}), ""]
        out += suite.report_tables(evals, ["base", "sft"] + methods, LABELS, stats.mean_ci) if e == "eval" else []
    evals = evals_all["eval"]
    if evals:
        out += ["## The paper's claims: per-seed paired differences", "", STATS_NOTE, "",
                claims_table(evals, methods), ""]
        if evals_all["eval-gsm8k"]:  # the two headline claims again on the GSM8K evals
            out += ["On GSM8K dev:", "", claims_table(evals_all["eval-gsm8k"], methods, CLAIMS[:2]), ""]
        out += ablation_tables(evals, metrics, expected)
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
