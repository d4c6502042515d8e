"""Result files -> tables and figures: `eval.py --compare` (paper-style markdown tables of eval JSONs, rows =
methods, columns = datasets, as arXiv 2602.22765's Table 1) and `eval.py --plot` (a training run's curves). No
model, no torch: reads eval.py's JSON and train.py's metrics.jsonl. experiment.py writes its grid's own tables,
with confidence intervals over seeds.
"""
import contextlib
import json
import math
import sys
from pathlib import Path


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
        raise ReportError(f"{run_dir}/metrics.jsonl: none of the plotted metrics ({', '.join(sum(PLOTS.values(), []))}) "
                        "appear in it")
    return written
