"""Evaluation: generation and critique metrics, critique-guided best-of-k, paper-style tables, plots.

    python eval.py --model M_OR_CHECKPOINT --data SPEC [--critique-data SPEC] --limit N --out FILE.json
    python eval.py --compare RUN_DIR_OR_JSON ...   # paper-style markdown table (rows: methods, columns: datasets)
    python eval.py --plot RUN_DIR                  # RUN_DIR/metrics.jsonl -> RUN_DIR/plots/*.png
    python eval.py --make-critique-set OUT.jsonl --model M --data arith:1 --limit N   # experiment.py's fixed set

What one eval measures (the paper's evaluation, arXiv 2602.22765 §4 and Table 1):
- generation, on `--data` (arith: its test split): greedy accuracy (the paper's metric), boxed-format rate,
  mean length, truncation rate; with `--k` samples per question also mean accuracy over the samples (pass@1),
  majority-vote accuracy (maj@k, a vote over normalised extracted answers; no answer = no vote) and pass@k.
  Answers are judged boxed-only (`reward.is_correct(strict=True)`), as the paper's evaluation requires
  `\\boxed{}`; `--lenient` also accepts `#### x` / "the answer is x".
- critique, on a balanced set (one right and one wrong response per question, 1:1 as in the paper):
  `--critique-data gsm8k-solutions:PATH.jsonl` (or `jsonl:PATH`) through critique.load_critique_data, or by
  default the evaluated model's own `--k` samples on `--data` through the label-balance filter (reward.balance).
  Accuracy of the verdict, precision / recall / F1 with "right" as the positive class (as the paper's reward
  steering, §5.4, reads), verdict format rate, "wrong" rate, mean critique reward (Eq. 2) and, with
  `--k-ref R`, the denoised reward of Table 5 (mean of Eq. 2 + Eq. 4 with R refinements). A critique without
  a verdict counts as a wrong call. Greedy critiques unless `--critique-samples c` > 1.
- selection (not in the paper): each of the k samples is critiqued c times; the sample with the most "right"
  votes is the answer (ties: the larger answer cluster, then the earlier sample), reported beside pass@1 and
  maj@k.

The result JSON also carries `items`, the per-item outcomes behind the metrics (question ids; greedy, sampled
and majority-vote correctness per question; each critique's question, label, verdict, correctness and, with
`--k-ref`, denoised reward, in pair order) for experiment.py's paired statistics.

Layout: pure metric functions first (hand-checkable; the tests feed them constructed inputs), then the
sampling code that feeds them, then the CLI, the comparison table, plots and the critique test set of
experiment.py (`--make-critique-set`).
Deliberately not done: unbiased pass@k estimators from n > k samples; per-dataset prompt templates; any
metric needing a reference model (e.g. a judge LLM).
"""
import argparse
import json
import math
import random
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import critique
import data
import reward


class EvalError(ValueError):
    """Bad eval input; the message names the path or spec."""


# ============================================================================ pure metric functions

def mean(xs):
    """Mean of a list, None for an empty one."""
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def accuracy(correct):
    """Fraction of True in `correct` (None for an empty list)."""
    return mean(1.0 if c else 0.0 for c in correct)


def majority_vote(answers):
    """The most frequent answer after reward.normalize_answer (None answers cast no vote); ties go to the answer
    seen first. Returns (answer, index of the first response carrying it), or (None, None) when nobody answered."""
    from reward import normalize_answer  # the verifier's own normalisation: a vote never splits a right answer
    norm = [normalize_answer(a) for a in answers]
    counts = Counter(a for a in norm if a is not None)
    if not counts:
        return None, None
    best = max(counts.values())
    i = next(i for i, a in enumerate(norm) if a is not None and counts[a] == best)  # first seen wins ties
    return norm[i], i


def critique_guided_select(answers, right_votes):
    """Index of the response to submit: the most "right" votes from its critiques; ties broken by the size of
    the response's answer cluster (majority vote over all answers; no answer = cluster size 0), then by the
    earlier index. None for no responses."""
    if len(answers) != len(right_votes):
        raise ValueError(f"{len(answers)} answers but {len(right_votes)} vote counts")
    if not answers:
        return None
    from reward import normalize_answer
    norm = [normalize_answer(a) for a in answers]
    counts = Counter(a for a in norm if a is not None)
    return max(range(len(answers)), key=lambda i: (right_votes[i], counts.get(norm[i], 0), -i))


def classification_metrics(verdicts, labels, zero_division=None):
    """Critic metrics on verdicts ("right" | "wrong" | None) against labels (True = the response is right).
    "right" is the positive class (as the paper's reward steering, §5.4, reads). No verdict counts as a wrong
    call: it lowers accuracy and recall (a right response not called right) but is no false positive.

    Precision (no "right" verdicts), recall (no right responses) and F1 (precision + recall = 0, or one of them
    undefined) can be 0/0: they are then `zero_division` (None -> null in JSON; sklearn uses 0) and named in
    `undefined` with the reason."""
    if len(verdicts) != len(labels):
        raise ValueError(f"{len(verdicts)} verdicts but {len(labels)} labels")
    for v in verdicts:
        if v not in ("right", "wrong", None):
            raise ValueError(f"verdict must be 'right', 'wrong' or None, got {v!r}")
    n = len(labels)
    tp = sum(1 for v, y in zip(verdicts, labels) if v == "right" and y)
    fp = sum(1 for v, y in zip(verdicts, labels) if v == "right" and not y)
    tn = sum(1 for v, y in zip(verdicts, labels) if v == "wrong" and not y)
    pos = sum(1 for y in labels if y)
    undefined = {}
    precision = tp / (tp + fp) if tp + fp else None
    if precision is None:
        undefined["precision"] = "no 'right' verdicts (0/0)"
    recall = tp / pos if pos else None
    if recall is None:
        undefined["recall"] = "no right responses in the set (0/0)"
    if precision is None or recall is None:
        f1 = None
        undefined["f1"] = "precision or recall undefined"
    elif precision + recall == 0:
        f1 = None
        undefined["f1"] = "precision + recall = 0 (0/0)"
    else:
        f1 = 2 * precision * recall / (precision + recall)
    if zero_division is not None:
        precision, recall, f1 = (zero_division if x is None else x for x in (precision, recall, f1))
    return dict(n=n, tp=tp, fp=fp, tn=tn, fn=pos - tp,
                accuracy=(tp + tn) / n if n else None, precision=precision, recall=recall, f1=f1,
                format_rate=mean(1.0 if v is not None else 0.0 for v in verdicts),
                wrong_rate=mean(1.0 if v == "wrong" else 0.0 for v in verdicts),
                undefined=undefined)


def generation_metrics(greedy, samples=None):
    """Generation block from scored responses (dicts with `correct`, `answer`, `boxed`, `length`, `truncated`):
    `greedy` one per question; `samples` one list of k per question (or None)."""
    out = dict(n_questions=len(greedy), accuracy=accuracy(r["correct"] for r in greedy),
               boxed_rate=accuracy(r["boxed"] for r in greedy),
               answer_rate=accuracy(r["answer"] is not None for r in greedy),
               mean_length=mean(r["length"] for r in greedy),
               truncation_rate=accuracy(r["truncated"] for r in greedy),
               k=0, mean_accuracy=None, majority_accuracy=None, pass_at_k=None, sample_boxed_rate=None,
               sample_mean_length=None, sample_truncation_rate=None)
    if samples:
        flat = [r for g in samples for r in g]
        out.update(k=max(len(g) for g in samples), mean_accuracy=accuracy(r["correct"] for r in flat),
                   majority_accuracy=majority_accuracy(samples),
                   pass_at_k=accuracy(any(r["correct"] for r in g) for g in samples),
                   sample_boxed_rate=accuracy(r["boxed"] for r in flat),
                   sample_mean_length=mean(r["length"] for r in flat),
                   sample_truncation_rate=accuracy(r["truncated"] for r in flat))
    return out


def majority_accuracy(groups):
    """maj@k: per question, is the response carrying the majority answer correct (no answers = wrong)."""
    hits = []
    for g in groups:
        _, i = majority_vote([r["answer"] for r in g])
        hits.append(i is not None and g[i]["correct"])
    return accuracy(hits)


def selection_metrics(groups):
    """Selection block from per-question lists of scored responses that carry `right_votes`."""
    picks = [critique_guided_select([r["answer"] for r in g], [r["right_votes"] for r in g]) for g in groups]
    return dict(n_questions=len(groups), k=max((len(g) for g in groups), default=0),
                pass_at_1=accuracy(r["correct"] for g in groups for r in g),
                majority_at_k=majority_accuracy(groups),
                critique_selected=accuracy(g[i]["correct"] for g, i in zip(groups, picks) if i is not None),
                pass_at_k=accuracy(any(r["correct"] for r in g) for g in groups))


def balanced_pairs(rows, seed=0):
    """A 1:1 critique set from rows {question, response, label, answer?}: rows are grouped by question and
    reward.balance keeps one random right and one random wrong response of each question that has both
    (questions with one label only are dropped). Already balanced input comes back unchanged."""
    groups, order = defaultdict(list), []
    for r in rows:
        if r["question"] not in groups:
            order.append(r["question"])
        groups[r["question"]].append(r)
    keep = reward.balance([[1.0 if r["label"] else 0.0 for r in groups[q]] for q in order], random.Random(seed))
    return [dict(groups[order[qi]][ri], label=bool(label)) for qi, ri, label in keep]


# ============================================================================ sampling and scoring

CRIT_KEYS = ("source", "n_pairs", "n_right", "n_wrong", "samples_per_pair", "n_critiques", "accuracy", "precision",
             "recall", "f1", "format_rate", "wrong_rate", "reward", "k_ref", "denoised_reward", "mean_length",
             "truncation_rate", "undefined", "reason")
SEL_KEYS = ("n_questions", "k", "critique_samples", "greedy", "pass_at_1", "majority_at_k", "critique_selected",
            "pass_at_k", "reason")
GEN_KEYS = tuple(generation_metrics([]).keys()) + ("reason",)


def null_block(keys, reason, **known):
    """A metrics block whose values are all null, with the reason; the schema stays the same."""
    out = {k: None for k in keys}
    out.update(known, reason=reason)
    return out


def score(text, gold, strict=True):
    """Answer, correctness and format of one response."""
    markers = () if strict else reward.DEFAULT_MARKERS
    return dict(answer=reward.extract_answer(text, markers), correct=reward.is_correct(text, gold, strict=strict),
                boxed=reward.extract_answer(text, ()) is not None)


def progress_bar(desc):
    """(callback for rollout.Sampler.generate's `progress`, tqdm bar) counting sampled rows. The bar lives
    outside the sampling, so the samples are the same with or without it. A second generate call in the same
    phase (the refinements after the critiques) extends the bar."""
    from tqdm import tqdm
    bar = tqdm(desc=desc, total=0, unit="row", dynamic_ncols=True, mininterval=1.0)
    base = [0]

    def progress(done, total):
        if done == 0:
            base[0] = bar.n
            bar.total = bar.n + total
            bar.refresh()
        else:
            bar.update(base[0] + done - bar.n)
    return progress, bar


def sample_responses(sampler, tok, records, n, strict=True, desc=None, **gen):
    """n responses per record through rollout.first_order_rollout (gen: its sampling kwargs and prompt `style`),
    scored: a list (per record) of lists. `desc`: show a progress bar with this title."""
    import rollout
    progress, bar = progress_bar(desc) if desc else (None, None)
    if progress:
        gen["progress"] = progress
    groups = [[] for _ in records]
    try:
        for o in rollout.first_order_rollout(sampler, tok, records, n, **gen):
            o.update(score(o["text"], records[o["q_index"]]["answer"], strict))
            groups[o["q_index"]].append(o)
    finally:
        if bar:
            bar.close()
    return groups


def run_critiques(sampler, tok, pairs, c, k_ref=0, desc=None, **gen):
    """c critiques of each pair (critique.second_order_rollout, plain Eq. 2 reward), in pair order."""
    progress, bar = progress_bar(desc) if desc else (None, None)
    if progress:
        gen["progress"] = progress
    try:
        return critique.second_order_rollout(sampler, tok, pairs, c, scheme="plain", k_ref=k_ref, **gen)
    finally:
        if bar:
            bar.close()


def item_outcomes(records, greedy, samples, pairs, crits, k_ref=0):
    """Per-item outcomes behind the metrics, for paired statistics across models evaluated on the same items:
    question ids; greedy / each sample / the majority-vote response correct (0/1) per question; one entry per
    critique in pair order: its pair's question and label, the verdict, whether it was right and (k_ref > 0)
    its denoised reward (Eq. 2 + Eq. 4)."""
    maj = []
    for g in samples or []:
        _, i = majority_vote([r["answer"] for r in g])
        maj.append(int(i is not None and bool(g[i]["correct"])))
    crit = []
    per = len(crits) // len(pairs) if pairs else 0  # critiques come pair-major, `per` of each pair
    for j, x in enumerate(crits or []):  # (x["pair_index"] indexes the selection's samples when reused from there)
        label = bool(x["label"])
        e = dict(pair=j // per, question=pairs[j // per]["question"], label=label,
                 verdict=x["verdict"], correct=int(x["verdict"] == ("right" if label else "wrong")))
        if k_ref:
            e["denoised"] = reward.critique_reward(x["verdict"], label) + float(x.get("bonus") or 0.0)
        crit.append(e)
    return dict(question_ids=[r["id"] for r in records], greedy=[int(bool(r["correct"])) for r in greedy],
                samples=[[int(bool(r["correct"])) for r in g] for g in samples] if samples else None,
                majority=maj if samples else None, critique=crit)


def critique_metrics(crits, pairs, source, c, k_ref=0):
    """Critique block from second-order rollout outputs (each with `verdict`, `label`, `reward`, `bonus`)."""
    m = classification_metrics([x["verdict"] for x in crits], [bool(x["label"]) for x in crits])
    plain = [reward.critique_reward(x["verdict"], bool(x["label"])) for x in crits]
    out = dict(source=source, n_pairs=len(pairs), n_right=sum(1 for p in pairs if p["label"]),
               n_wrong=sum(1 for p in pairs if not p["label"]), samples_per_pair=c, n_critiques=len(crits),
               reward=mean(plain), k_ref=k_ref,
               denoised_reward=mean(r + float(x.get("bonus") or 0.0) for r, x in zip(plain, crits)) if k_ref else None,
               mean_length=mean(x["length"] for x in crits), truncation_rate=accuracy(x["truncated"] for x in crits),
               reason=None)
    out.update({k: m[k] for k in ("accuracy", "precision", "recall", "f1", "format_rate", "wrong_rate", "undefined")})
    return {k: out[k] for k in CRIT_KEYS}


def load_critique_set(spec, seed=0, limit=None):
    """Balanced pairs from a critique SPEC (critique.load_critique_data: gsm8k-solutions:PATH, jsonl:PATH),
    at most `limit` questions (2 pairs each). A set where no question has both labels is empty, not an error."""
    try:
        rows = critique.load_critique_data(spec, seed=seed)
    except data.DataError as e:
        if "no question has both" not in str(e):
            raise
        return []
    pairs = balanced_pairs(rows, seed)  # a no-op on gsm8k-solutions (already 1:1); balances a jsonl set
    return pairs[:2 * limit] if limit else pairs  # whole questions: pairs come right, wrong per question


def self_critique_set(records, groups, seed=0):
    """Balanced pairs from the evaluated model's own samples (groups of k scored responses per record)."""
    rows = [dict(question=rec["question"], response=r["text"], label=r["correct"], answer=rec["answer"])
            for rec, g in zip(records, groups) for r in g]
    for i, row in enumerate(rows):
        row["index"] = i  # position among all samples (question-major), to find the row's critiques
    return balanced_pairs(rows, seed)


def evaluate(model, tok, args, log=print):
    """All three blocks for one model; `args` is the parsed CLI namespace (see build_parser)."""
    import rollout
    t0 = time.time()
    strict = not args.lenient
    sampler = rollout.Sampler(model, max_batch=args.batch, max_len=args.max_len)
    split = "test" if str(args.data).split(":")[0] == "arith" else args.split
    records = data.load_data(args.data, split=split, limit=args.limit or 100, seed=args.seed)
    gen = dict(max_new_tokens=args.max_new_tokens, top_p=args.top_p, style=args.prompt_style)
    log(f"[eval] {len(records)} questions from {args.data} ({split}): greedy")
    greedy = [g[0] for g in sample_responses(sampler, tok, records, 1, strict, desc="greedy", temperature=0.0,
                                             seed=args.seed, **gen)]
    samples = None
    if args.k > 0:
        log(f"[eval] {args.k} samples per question at temperature {args.temperature}")
        samples = sample_responses(sampler, tok, records, args.k, strict, desc=f"{args.k} samples",
                                   temperature=args.temperature, seed=args.seed + 1, **gen)
    generation = dict(generation_metrics(greedy, samples), reason=None)

    c = args.critique_samples
    cgen = dict(max_new_tokens=args.critique_max_new_tokens, top_p=args.top_p,
                temperature=0.0 if c == 1 else args.critique_temperature, seed=args.seed + 2)
    # selection critiques every sample c times; the self critique set is a subset of those samples, so its
    # critiques are reused from there (same settings) unless refinements (--k-ref) are wanted
    all_crits = None
    pairs, crits, k_ref = [], [], 0  # the critique set and its critiques, for the per-item outcomes
    if args.no_selection or args.no_critique:
        sel = null_block(SEL_KEYS, "skipped (--no-selection / --no-critique)")
    elif samples is None or args.k < 2:
        sel = null_block(SEL_KEYS, "needs --k >= 2 samples per question")
    else:
        log(f"[eval] selection: {c} critique(s) of each of {args.k} samples per question")
        flat = [r for g in samples for r in g]
        all_crits = run_critiques(sampler, tok, [dict(question=records[r["q_index"]]["question"], response=r["text"],
                                                      label=r["correct"], answer=records[r["q_index"]]["answer"])
                                                 for r in flat], c, desc="selection critiques", **cgen)
        for r in flat:
            r["right_votes"] = 0
        for x in all_crits:
            flat[x["pair_index"]]["right_votes"] += x["verdict"] == "right"
        sel = dict(selection_metrics(samples), critique_samples=c, greedy=generation["accuracy"], reason=None)
        sel = {k: sel[k] for k in SEL_KEYS}

    if args.no_critique:
        crit = null_block(CRIT_KEYS, "skipped (--no-critique)")
    else:
        if args.critique_data:
            source, pairs = args.critique_data, load_critique_set(args.critique_data, args.seed, args.critique_limit)
        elif samples is not None and args.k >= 2:
            source, pairs = f"self:{args.data}", self_critique_set(records, samples, args.seed)
        else:
            source, pairs = f"self:{args.data}", None
        if pairs is None:
            crit = null_block(CRIT_KEYS, "no critique set: give --critique-data or --k >= 2 to build one from "
                                         "the model's own samples", source=source)
        elif not pairs:
            crit = null_block(CRIT_KEYS, f"empty balanced critique set from {source}: no question has both a right "
                                         "and a wrong response (e.g. all right or all wrong)",
                              source=source, n_pairs=0, n_right=0, n_wrong=0)
        else:
            log(f"[eval] critique: {len(pairs)} pairs from {source}, {c} critique(s) each"
                + (f", {args.k_ref} refinement(s)" if args.k_ref else ""))
            k_ref = args.k_ref if all(p.get("answer") is not None for p in pairs) else 0
            if all_crits is not None and not args.critique_data and not args.k_ref:
                by_pair = defaultdict(list)
                for x in all_crits:
                    by_pair[x["pair_index"]].append(x)
                crits = [x for p in pairs for x in by_pair[p["index"]]]
            else:
                crits = run_critiques(sampler, tok, pairs, c, k_ref=k_ref, desc="critiques", **cgen)
            crit = critique_metrics(crits, pairs, source, c, args.k_ref)
            if args.k_ref and not k_ref:
                crit["denoised_reward"] = None
                crit["undefined"]["denoised_reward"] = f"pairs from {source} carry no gold 'answer' to verify refinements"
                log(f"[eval] no denoised reward: {crit['undefined']['denoised_reward']}")
        if crit["reason"]:
            log(f"[eval] critique metrics are null: {crit['reason']}")

    if args.save_samples:
        dump = [dict(kind="greedy", id=r["id"], text=r["text"], correct=r["correct"]) for r in greedy]
        dump += [dict(kind="sample", id=r["id"], text=r["text"], correct=r["correct"], right_votes=r.get("right_votes"))
                 for g in (samples or []) for r in g]
        data.write_jsonl(args.save_samples, dump)
    items = item_outcomes(records, greedy, samples, pairs or [], crits, k_ref)
    return dict(generation={k: generation[k] for k in GEN_KEYS}, critique=crit, selection=sel, items=items,
                time_s=round(time.time() - t0, 1))


# ============================================================================ model loading

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_model_path(name):
    """An existing dir must hold a model: itself, or `model/` (a checkpoint-STEP dir), or `final/` (a train.py
    run dir). Anything that is not a local path (alias, HF id) is passed on unchanged."""
    p = Path(name)
    if p.is_file():
        raise EvalError(f"{name}: is a file, not a model directory (expected a dir with config.json)")
    if not p.is_dir():
        return str(name)
    for cand in (p, p / "model", p / "final"):
        if (cand / "config.json").is_file():
            return str(cand)
    ckpts = sorted(p.glob("checkpoint-*/model/config.json"), key=lambda c: _step_of(c.parent.parent))
    if ckpts:
        return str(ckpts[-1].parent)
    raise EvalError(f"{name}: not a model directory: no config.json in it, in {name}/model/, {name}/final/ "
                    f"or {name}/checkpoint-*/model/ (give a model dir, a checkpoint dir or a train.py run dir)")


def _step_of(path):
    m = re.search(r"(\d+)$", Path(path).name)
    return int(m.group(1)) if m else -1


def load_model(name, dtype="fp32", device="cpu"):
    import torch
    import rollout
    path = resolve_model_path(name)
    try:
        return rollout.load_policy(path, dtype=getattr(torch, DTYPES[dtype]), device=device)
    except (OSError, ValueError) as e:
        if Path(path).is_dir():
            raise EvalError(f"{path}: could not load a model from it ({type(e).__name__}: {str(e)[:300]})") from None
        raise


# ============================================================================ tables

def fmt(v, pct=True):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{100 * v:.1f}" if pct else f"{v:.3f}"
    return str(v)


def format_result(res):
    """A plain two-column table of every metric of one eval result."""
    lines = [f"model {res['model']}   data {res['data']}"]
    for block in ("generation", "critique", "selection"):
        b = res[block]
        lines.append(f"-- {block}" + (f"  (null: {b['reason']})" if b.get("reason") else ""))
        for k, v in b.items():
            if k in ("reason", "undefined"):
                continue
            lines.append(f"   {k:<24}{v:.4f}" if isinstance(v, float) else f"   {k:<24}{v}")
        for k, why in (b.get("undefined") or {}).items():
            lines.append(f"   ({k} undefined: {why})")
    return "\n".join(lines)


def short_name(spec):
    """'gsm8k:/x/test_dev.jsonl' -> 'gsm8k:test_dev'; 'arith' stays."""
    if spec is None:
        return "?"
    kind, _, arg = str(spec).partition(":")
    if kind == "self":
        return short_name(arg)
    return f"{kind}:{Path(arg).stem}" if ("/" in arg or arg.endswith(".jsonl")) else str(spec)


# (title, block, key, column source, percent?)
TABLE_BLOCKS = [
    ("Generation accuracy (greedy, %)", "generation", "accuracy", "data", True),
    ("Generation pass@1 (mean of k samples, %)", "generation", "mean_accuracy", "data", True),
    ("Generation maj@k (%)", "generation", "majority_accuracy", "data", True),
    ("Critique-guided best-of-k (%)", "selection", "critique_selected", "data", True),
    ("Critique accuracy (balanced, %)", "critique", "accuracy", "critique", True),
    ("Critique F1, 'right' positive (%)", "critique", "f1", "critique", True),
    ("Critique 'wrong' rate (%)", "critique", "wrong_rate", "critique", True),
    ("Denoised critique reward (Table 5)", "critique", "denoised_reward", "critique", False),
]


def load_results(paths):
    """[(row label, result dict)] from eval JSON files and run dirs (a dir contributes eval*.json and eval/*.json)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(p.glob("eval*.json")) + sorted(p.glob("eval/*.json"))
            if not files:
                raise EvalError(f"{p}: no eval*.json or eval/*.json in it (write one with eval.py --out)")
        elif p.is_file():
            files = [p]
        else:
            raise EvalError(f"{p}: no such file or directory")
        for f in files:
            try:
                res = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise EvalError(f"{f}: not valid JSON ({e.msg})") from None
            if not isinstance(res, dict) or "generation" not in res:
                raise EvalError(f"{f}: not an eval.py result (no 'generation' block)")
            out.append((res.get("label") or (p.name if p.is_dir() else f.stem), res))
    return out


def compare_table(paths):
    """Paper-style markdown: one table per metric block, rows = methods / checkpoints, columns = datasets + Avg."""
    results = load_results(paths)
    rows = list(dict.fromkeys(label for label, _ in results))
    parts = []
    for title, block, key, col_src, pct in TABLE_BLOCKS:
        cells = {}
        for label, res in results:
            v = (res.get(block) or {}).get(key)
            col = short_name(res.get("data") if col_src == "data" else
                             (res.get("critique") or {}).get("source") or res.get("critique_data") or res.get("data"))
            if v is not None:
                if (label, col) in cells:
                    print(f"[compare] two results for row {label!r}, column {col!r}: keeping the later one "
                          "(give each eval a distinct --label)", file=sys.stderr)
                cells[(label, col)] = v
        if not cells:
            continue
        cols = list(dict.fromkeys(c for _, c in cells))
        avg = len(cols) > 1
        head = ["method"] + cols + (["Avg"] if avg else [])
        lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            vals = [cells.get((r, c)) for c in cols]
            if all(v is None for v in vals):
                continue
            line = [r] + [fmt(v, pct) for v in vals]
            if avg:
                line.append(fmt(mean(vals), pct) if all(v is not None for v in vals) else "–")
            lines.append("| " + " | ".join(line) + " |")
        parts.append("\n".join(lines))
    if not parts:
        raise EvalError("nothing to compare: every metric is null in " + ", ".join(map(str, paths)))
    return "\n\n".join(parts) + "\n"


# ============================================================================ plots

PLOTS = {  # file name -> metric keys of metrics.jsonl (train.py; tests/test_train.py CONTRACT_KEYS)
    "reward": ["reward/response", "reward/critique", "acc/response", "acc/critique"],
    "critic": ["critic/precision", "critic/recall", "critic/wrong_rate", "critic/format_rate"],
    "length": ["len/response", "len/critique"],
    "truncation": ["trunc/response", "trunc/critique"],
    "kl": ["kl"],
    "frac_zero_std": ["frac_reward_zero_std"],
    "policy": ["entropy", "clip_ratio", "logprob_gap"],
    "optim": ["loss", "grad_norm"],
    "cache": ["cache/size"],
    "speed": ["tokens_per_s"],
    "time": ["time/*"],  # "prefix/*": every key under the prefix
    "memory": ["mem/*"],
    "eval": ["eval/*"],
}


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise EvalError(f"{run_dir}: no such directory")
    if not path.is_file():
        raise EvalError(f"{run_dir}: no metrics.jsonl in it (is it a train.py run dir?)")
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None  # e.g. a line cut short by a killed run: skip it, say so
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    if bad:
        print(f"[plot] {path}: skipped {bad} unreadable line(s)")
    if not rows:
        raise EvalError(f"{path}: no metric rows in it")
    return rows


def plot_run(run_dir):
    """PNG curves of RUN_DIR/metrics.jsonl into RUN_DIR/plots/; returns the paths written. A plot whose
    metrics never appear (e.g. critique curves of a `--mode g` run) is not drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(run_dir)
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, keys in PLOTS.items():
        series = {}
        keys = [k for pat in keys for k in
                (sorted({key for r in rows for key in r if key.startswith(pat[:-1])}) if pat.endswith("/*") else [pat])]
        for k in keys:
            pts = [(r.get("step", i), r[k]) for i, r in enumerate(rows)
                   if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) and math.isfinite(r[k])]
            if pts:
                series[k] = pts
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for k, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(f"{Path(run_dir).name}: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if not written:
        raise EvalError(f"{run_dir}/metrics.jsonl: none of the plotted metrics ({', '.join(sum(PLOTS.values(), []))}) "
                        "appear in it")
    return written


# ============================================================================ experiment.py's critique test set

def build_critique_test_set(args):
    """experiment.py's fixed critique test set (--make-critique-set OUT), shared by every method: the --model's
    (the cold start's) own `--k` samples (at least 2) on the first --limit test questions of --data through the
    balance filter, topped up (arith only) with program-written right / wrong responses
    (critique.synth_response) for the questions whose samples were all right or all wrong, so every question
    gives one right and one wrong response. Returns the number of pairs written."""
    import rollout
    split = "test" if str(args.data).split(":")[0] == "arith" else args.split
    records = data.load_data(args.data, split=split, limit=args.limit or 100, seed=args.seed)
    model_obj, tok = load_model(args.model, args.dtype, _device(args))
    sampler = rollout.Sampler(model_obj, max_batch=args.batch, max_len=args.max_len)
    groups = sample_responses(sampler, tok, records, max(args.k, 2), not args.lenient, desc="critique-set samples",
                              temperature=args.temperature, max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                              seed=args.seed + 7, style=args.prompt_style)
    pairs = self_critique_set(records, groups, args.seed)
    n_policy = len(pairs)
    have, rng = {p["question"] for p in pairs}, random.Random(args.seed)
    for rec in records:
        if rec["question"] not in have and rec.get("steps"):
            pairs += [dict(question=rec["question"], response=critique.synth_response(rec, rng, right=lab),
                           label=lab, answer=rec["answer"]) for lab in (True, False)]
    pairs = [{k: v for k, v in p.items() if k != "index"} for p in pairs]
    if not pairs:
        raise EvalError(f"--make-critique-set: no pairs from {args.data}: the model's samples were all right or all "
                        "wrong and the data has no program solutions to top up from (use arith data)")
    critique.save_pairs(args.make_critique_set, pairs)
    print(f"[eval] critique test set: {len(pairs)} pairs ({n_policy} from {args.model}'s samples, "
          f"{len(pairs) - n_policy} program-written) -> {args.make_critique_set}")
    return len(pairs)


# ============================================================================ CLI

def _device(args):
    import torch
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def run_eval(args):
    """Load the model, evaluate, print the table, write --out. Returns the result dict."""
    device = _device(args)
    model, tok = load_model(args.model, args.dtype, device)
    res = evaluate(model, tok, args)
    config = {k: v for k, v in vars(args).items() if k not in ("compare", "plot", "make_critique_set")}
    config.update(device=device, model_path=resolve_model_path(args.model), time_s=res.pop("time_s"))
    result = dict(model=args.model, data=args.data, critique_data=args.critique_data, label=args.label, **res,
                  config=config)
    print(format_result(result))
    if args.out:
        data.write_json(args.out, result)
        print(f"[eval] wrote {args.out}")
    return result


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default="smollm2-135m", help="alias, HF id, model dir, checkpoint-STEP dir or train.py run dir")
    a("--data", default="arith", help="data SPEC for generation (arith uses its test split): arith, arith:LEVEL, "
                                      "gsm8k, gsm8k:PATH.jsonl, jsonl:PATH, hf:NAME[:SPLIT]")
    a("--split", default="test", help="split for hub specs (gsm8k, hf:NAME without :SPLIT)")
    a("--critique-data", default=None, help="critique SPEC (gsm8k-solutions:PATH.jsonl, jsonl:PATH); default: "
                                            "a balanced set from the model's own --k samples on --data")
    a("--limit", type=int, default=None, help="questions of --data to evaluate (default 100)")
    a("--critique-limit", type=int, default=None, help="questions of --critique-data (2 pairs each); default all")
    a("--out", default=None, help="write the result JSON here")
    a("--label", default=None, help="row name in --compare tables (default: the run dir or file name)")
    a("--k", type=int, default=4, help="samples per question for mean acc, maj@k, pass@k, the self critique set "
                                       "and selection (0: greedy only)")
    a("--prompt-style", choices=sorted(data.PROMPT_STYLES), default="plain",
      help="generation prompt (data.PROMPT_STYLES): plain (zero-shot) or oneshot (one worked example first)")
    a("--temperature", type=float, default=1.0, help="sampling temperature of the k samples")
    a("--top-p", type=float, default=1.0, help="nucleus sampling for all sampling")
    a("--max-new-tokens", type=int, default=256, help="generation budget per response")
    a("--critique-samples", type=int, default=1, help="critiques per response: 1 = greedy, c > 1 = sampled")
    a("--critique-temperature", type=float, default=1.0, help="temperature when --critique-samples > 1")
    a("--critique-max-new-tokens", type=int, default=256, help="budget per critique")
    a("--k-ref", type=int, default=0, help="refinements per critique for the denoised reward (Table 5); 0 = skip")
    a("--no-critique", action="store_true", help="skip the critique and selection blocks (null in the JSON)")
    a("--no-selection", action="store_true", help="skip critique-guided selection (k x c critiques per question)")
    a("--lenient", action="store_true", help="also accept '#### x' / 'the answer is x' (default: boxed only)")
    a("--seed", type=int, default=0, help="data, sampling and balance seed")
    a("--dtype", choices=sorted(DTYPES), default="fp32", help="model dtype")
    a("--device", default=None, help="cpu / cuda (default: cuda when available)")
    a("--batch", type=int, default=32, help="sampler rows per chunk (KV cache: batch x longest prompt + budget)")
    a("--max-len", type=int, default=4096, help="sampler cap on prompt + new tokens (the KV cache is sized by need)")
    a("--save-samples", default=None, help="dump greedy and sampled responses to this jsonl")
    a("--compare", nargs="+", default=None, metavar="RUN_DIR_OR_JSON",
      help="print a paper-style markdown table of eval JSONs (a dir contributes its eval*.json and eval/*.json)")
    a("--plot", default=None, metavar="RUN_DIR", help="plot RUN_DIR/metrics.jsonl into RUN_DIR/plots/")
    a("--make-critique-set", default=None, metavar="OUT.jsonl",
      help="write experiment.py's balanced critique test set from --model's --k samples on the first --limit "
           "test questions of --data (arith: program-written top-up), then exit")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    errors = (EvalError, data.DataError)
    try:
        if args.compare:
            print(compare_table(args.compare))
        elif args.plot:
            for path in plot_run(args.plot):
                print(f"[plot] wrote {path}")
        elif args.make_critique_set:
            build_critique_test_set(args)
        else:
            run_eval(args)
    except errors as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
