"""Evaluation (arXiv 2602.22765 §4, Table 1): generation and critique metrics, critique-guided best-of-k.

    python eval.py --model M_OR_CHECKPOINT --data SPEC [--critique-data SPEC] --limit N --out FILE.json
    python eval.py --compare RUN_DIR_OR_JSON ...   # paper-style markdown table (rows: methods, columns: datasets)
    python eval.py --plot RUN_DIR                  # RUN_DIR/metrics.jsonl -> RUN_DIR/plots/*.png

- generation on `--data` (arith: its test split), answers boxed-only as in the paper (`--lenient`: also `#### x`,
  "the answer is x"): greedy accuracy, boxed rate, length, truncation; with `--k` samples pass@1, maj@k, pass@k.
- critique on a balanced set, one right and one wrong response per question (`--critique-data`, else the model's
  own samples through reward.balance): accuracy, precision / recall / F1 ("right" positive, §5.4), format and
  "wrong" rates, the reward (Eq. 2) and, with `--k-ref`, the denoised reward (Table 5: Eq. 2 + Eq. 4).
- selection (not in the paper): the sample whose c critiques say "right" most often, beside pass@1 and maj@k.
`items` holds the per-item outcomes, for experiment.py's paired statistics. Not done: unbiased pass@k from n > k
samples; per-dataset prompt templates; metrics needing a judge model. The tables and plots are report.py's.
"""
import argparse
import random
import sys
import time
from collections import Counter, defaultdict

from tqdm import tqdm

import critique
import data
import report
import reward


class EvalError(ValueError):
    """Bad eval input; the message names the path or spec."""


# ============================================================================ metrics (pure; the tests hand-check them)
def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def accuracy(correct):
    return mean(1.0 if c else 0.0 for c in correct)


def critique_guided_select(answers, right_votes):
    """Index of the response to submit: the most "right" votes; ties: the larger answer cluster (answers normalised
    as the verifier does, reward.normalize_answer; no answer = 0), then the earlier index. None for no responses."""
    if len(answers) != len(right_votes):
        raise ValueError(f"{len(answers)} answers but {len(right_votes)} vote counts")
    norm = [reward.normalize_answer(a) for a in answers]
    size = Counter(a for a in norm if a is not None)
    return max(range(len(answers)), key=lambda i: (right_votes[i], size.get(norm[i], 0), -i), default=None)


def majority_vote(answers):
    """(the most frequent normalised answer, its first index), first seen on ties; None answers cast no vote."""
    i = critique_guided_select(answers, [0] * len(answers))  # no votes: the first of the largest cluster
    a = None if i is None else reward.normalize_answer(answers[i])
    return (a, i) if a is not None else (None, None)


def majority_hits(groups):
    """maj@k per question: is the response carrying the majority answer correct (no answers = wrong)."""
    picks = [majority_vote([r["answer"] for r in g])[1] for g in groups]
    return [i is not None and bool(g[i]["correct"]) for g, i in zip(groups, picks)]


def generation_metrics(greedy, samples=None):
    """Generation block from scored responses: `greedy` one per question, `samples` k per question (or None)."""
    samples = samples or []
    flat = [r for g in samples for r in g]
    return dict(n_questions=len(greedy), accuracy=accuracy(r["correct"] for r in greedy),
                boxed_rate=accuracy(r["boxed"] for r in greedy),
                answer_rate=accuracy(r["answer"] is not None for r in greedy),
                mean_length=mean(r["length"] for r in greedy), truncation_rate=accuracy(r["truncated"] for r in greedy),
                k=max((len(g) for g in samples), default=0), mean_accuracy=accuracy(r["correct"] for r in flat),
                majority_accuracy=accuracy(majority_hits(samples)),
                pass_at_k=accuracy(any(r["correct"] for r in g) for g in samples),
                sample_boxed_rate=accuracy(r["boxed"] for r in flat),
                sample_mean_length=mean(r["length"] for r in flat),
                sample_truncation_rate=accuracy(r["truncated"] for r in flat), reason=None)


COLLAPSED = 0.95  # a critic that gives one verdict to this share of the critiques has collapsed to it


def critique_metrics(crits, pairs, source, c, k_ref=0):
    """Critique block from second-order rollout outputs (each with `verdict`, `label`, `bonus`, `length`, ...).
    `collapsed`: one verdict ("right" or "wrong") on >= COLLAPSED of the critiques: on a 1:1 set such a critic
    sits at ~50% accuracy whatever it reads, and its precision / recall say little."""
    m = reward.classification_metrics([x["verdict"] for x in crits], [bool(x["label"]) for x in crits])
    one_verdict = max(m["wrong"], m["tp"] + m["fp"]) / m["n"] if m["n"] else None
    plain = [reward.critique_reward(x["verdict"], bool(x["label"])) for x in crits]
    return dict(source=source, n_pairs=len(pairs), n_right=sum(1 for p in pairs if p["label"]),
                n_wrong=sum(1 for p in pairs if not p["label"]), samples_per_pair=c, n_critiques=len(crits),
                **{k: m[k] for k in ("accuracy", "precision", "recall", "f1", "format_rate", "wrong_rate")},
                collapsed=None if one_verdict is None else one_verdict >= COLLAPSED,
                reward=mean(plain), k_ref=k_ref,
                denoised_reward=mean(r + float(x.get("bonus") or 0.0) for r, x in zip(plain, crits)) if k_ref else None,
                mean_length=mean(x["length"] for x in crits), truncation_rate=accuracy(x["truncated"] for x in crits),
                undefined=m["undefined"], reason=None)


def selection_metrics(groups, critique_samples=None, greedy=None):
    """Selection block from per-question lists of scored responses carrying `right_votes` (the other two: shown)."""
    picks = [critique_guided_select([r["answer"] for r in g], [r["right_votes"] for r in g]) for g in groups]
    return dict(n_questions=len(groups), k=max((len(g) for g in groups), default=0), critique_samples=critique_samples,
                greedy=greedy, pass_at_1=accuracy(r["correct"] for g in groups for r in g),
                majority_at_k=accuracy(majority_hits(groups)),
                critique_selected=accuracy(g[i]["correct"] for g, i in zip(groups, picks) if i is not None),
                pass_at_k=accuracy(any(r["correct"] for r in g) for g in groups), reason=None)


def balanced_pairs(rows, seed=0):
    """A 1:1 critique set: reward.balance keeps one random right and one random wrong row per question with both."""
    groups = defaultdict(list)  # questions in first-seen order
    for r in rows:
        groups[r["question"]].append(r)
    groups = list(groups.values())
    keep = reward.balance([[1.0 if r["label"] else 0.0 for r in g] for g in groups], random.Random(seed))
    return [dict(groups[qi][ri], label=bool(label)) for qi, ri, label in keep]


def item_outcomes(records, greedy, samples, pairs, crits, k_ref=0):
    """Per-item outcomes for paired statistics: question ids; greedy / each sample / the majority response correct
    (0/1); per critique, pair-major, its pair, question, label, verdict, correctness and (k_ref) denoised reward."""
    per = len(crits) // len(pairs) if pairs else 0  # critiques of each pair
    crit = [dict(pair=j // per, question=pairs[j // per]["question"], label=bool(x["label"]), verdict=x["verdict"],
                 correct=int(x["verdict"] == ("right" if x["label"] else "wrong"))) for j, x in enumerate(crits)]
    for e, x in zip(crit, crits if k_ref else []):
        e["denoised"] = reward.critique_reward(x["verdict"], e["label"]) + float(x.get("bonus") or 0.0)
    return dict(question_ids=[r["id"] for r in records], greedy=[int(bool(r["correct"])) for r in greedy],
                samples=[[int(bool(r["correct"])) for r in g] for g in samples] if samples else None,
                majority=[int(h) for h in majority_hits(samples)] if samples else None, critique=crit)


GEN_KEYS, CRIT_KEYS, SEL_KEYS = (tuple(generation_metrics([])), tuple(critique_metrics([], [], None, 0)),  # schema
                                 tuple(selection_metrics([])))


def null_block(keys, reason, **known):
    """A metrics block whose values are all null, with the reason; the schema stays the same."""
    return dict({k: None for k in keys}, **known, reason=reason)


# ============================================================================ one eval: generate, critique, select
def evaluate(model, tok, args, log=print):
    """The three blocks for one model; `args` is the parsed CLI namespace (see build_parser)."""
    import rollout
    t0, sampler = time.time(), rollout.Sampler(model, max_batch=args.batch, max_len=args.max_len)
    # plain decode attention: with 1-3 rows per prompt the shared-prompt path (for RL's n >= 4) costs more than
    # it saves on CPU (decode 16.0 -> 14.4 s for 85 questions' greedy + 2 samples, BENCHMARKS.md "Evals")
    sampler.share_prompts = False
    split, records = eval_records(args)
    file_pairs = (load_critique_set(args.critique_data, args.seed, args.critique_limit)  # before sampling: their
                  if args.critique_data and not args.no_critique else None)  # critiques join the first call
    greedy, samples, file_crits = first_call(sampler, tok, args, split, records, file_pairs, log)
    generation = generation_metrics(greedy, samples)
    no_votes, pairs, crits, k_ref, crit = critique_block(sampler, tok, args, records, samples, file_pairs,
                                                         file_crits, log)
    selection = (null_block(SEL_KEYS, no_votes) if no_votes else  # else every sample carries its "right" votes
                 selection_metrics(samples, args.critique_samples, generation["accuracy"]))
    if args.save_samples:
        data.write_jsonl(args.save_samples,
                         [dict(kind="greedy", id=r["id"], text=r["text"], correct=r["correct"]) for r in greedy]
                         + [dict(kind="sample", id=r["id"], text=r["text"], correct=r["correct"],
                                 right_votes=r.get("right_votes")) for g in (samples or []) for r in g])
    return dict(generation=generation, critique=crit, selection=selection,
                items=item_outcomes(records, greedy, samples, pairs, crits, k_ref), time_s=round(time.time() - t0, 1))


def eval_records(args):
    """(split, records): the --data questions to evaluate, at most --limit (default 100); arith: its test split."""
    split = "test" if str(args.data).split(":")[0] == "arith" else args.split  # arith: its held-out questions
    return split, data.load_data(args.data, split=split, limit=args.limit or 100, seed=args.seed)


def first_call(sampler, tok, args, split, records, file_pairs, log):
    """What needs no earlier output, in one Sampler.generate_many call (a prompt prefilled once for its greedy answer
    and its samples; bigger decode batches): the greedy answers, --k samples per question and the critiques of a
    --critique-data set. -> (greedy responses, samples per record or None, those critiques or None)."""
    import rollout
    prompts = rollout.generation_prompts(tok, records, args.prompt_style)
    reqs = [dict(prompts=prompts, n=1, temperature=0.0, seed=args.seed, max_new_tokens=args.max_new_tokens)]
    what = [f"{len(records)} questions from {args.data} ({split}): greedy"]
    if args.k > 0:
        reqs.append(dict(prompts=prompts, n=args.k, temperature=args.temperature, seed=args.seed + 1,
                         max_new_tokens=args.max_new_tokens))
        what.append(f"{args.k} samples per question at temperature {args.temperature}")
    if file_pairs:
        reqs.append(dict(prompts=critique.critique_prompts(tok, file_pairs), n=args.critique_samples,
                         **critique_sampling(args)))
        what.append(f"{args.critique_samples} critique(s) of each of {len(file_pairs)} pairs")
    log("[eval] " + "; ".join(what))
    outs = with_progress("generate", sampler.generate_many, reqs, top_p=args.top_p,
                         stop_ids=rollout.default_stop_ids(tok))
    greedy = [g[0] for g in score_responses(args, records, rollout.rollout_outputs(tok, records, prompts, outs[0]))]
    samples = (score_responses(args, records, rollout.rollout_outputs(tok, records, prompts, outs[1]))
               if args.k > 0 else None)
    crits = (critique.critique_outputs(tok, file_pairs, reqs[-1]["prompts"], outs[-1], args.critique_samples)
             if file_pairs else None)
    return greedy, samples, crits


def critique_block(sampler, tok, args, records, samples, file_pairs, file_crits, log):
    """Critiques of every sample for selection (their "right" counts go to r["right_votes"]), then the balanced
    critique set (`file_pairs` with `file_crits` sampled already, else the own samples'), judged and, with --k-ref,
    refined: (why there are no votes or None, the set, its critiques, the k_ref used, the critique block)."""
    c = args.critique_samples
    no_votes = ("skipped (--no-selection / --no-critique)" if args.no_selection or args.no_critique else
                "needs --k >= 2 samples per question" if args.k < 2 else None)
    if not no_votes:
        log(f"[eval] selection: {c} critique(s) of each of {args.k} samples per question")
        sample_crits = run_critiques(sampler, tok, args, sample_pairs(records, samples), "selection critiques")
        votes = Counter(x["pair_index"] for x in sample_crits if x["verdict"] == "right")
        for i, r in enumerate(r for g in samples for r in g):
            r["right_votes"] = votes[i]
    if args.no_critique:
        return no_votes, [], [], 0, null_block(CRIT_KEYS, "skipped (--no-critique)")
    source = args.critique_data or f"self:{args.data}"
    pairs = (file_pairs if args.critique_data else
             balanced_pairs(sample_pairs(records, samples), args.seed) if args.k >= 2 else None)
    if not pairs:
        why = ("no critique set: give --critique-data or --k >= 2 to build one from the model's own samples"
               if pairs is None else f"empty balanced critique set from {source}: no question has both a right and "
               "a wrong response (e.g. all right or all wrong)")
        log(f"[eval] critique metrics are null: {why}")
        counts = {} if pairs is None else dict(n_pairs=0, n_right=0, n_wrong=0)
        return no_votes, [], [], 0, null_block(CRIT_KEYS, why, source=source, **counts)
    log(f"[eval] critique: {len(pairs)} pairs from {source}, {c} critique(s) each"
        + (f", {args.k_ref} refinement(s)" if args.k_ref else ""))
    k_ref = args.k_ref if all(p.get("answer") is not None for p in pairs) else 0
    if not (no_votes or args.critique_data or args.k_ref):  # the self set's samples are critiqued already
        crits = [x for p in pairs for x in sample_crits[p["index"] * c:(p["index"] + 1) * c]]
    else:
        crits = run_critiques(sampler, tok, args, pairs, "refinements" if file_crits else "critiques", k_ref,
                              file_crits)
    crit = dict(critique_metrics(crits, pairs, source, c, k_ref), k_ref=args.k_ref)  # the k_ref asked for
    if args.k_ref and not k_ref:
        crit["undefined"]["denoised_reward"] = why = f"pairs from {source} carry no gold 'answer' to verify refinements"
        log(f"[eval] no denoised reward: {why}")
    return no_votes, pairs, crits, k_ref, crit


def with_progress(desc, fn, *args, **kwargs):
    """fn(*args, **kwargs) with a tqdm bar of the rows it samples, fed by Sampler.generate's `progress` callback
    (which changes no sample); a second generate call in fn (the refinements) extends the bar."""
    start = [0]  # rows done before the current generate call
    with tqdm(desc=desc, total=0, unit="row", dynamic_ncols=True, mininterval=1.0) as bar:
        def progress(done, total):
            if done == 0:
                start[0], bar.total = bar.n, bar.n + total
            bar.update(start[0] + done - bar.n)
        return fn(*args, progress=progress, **kwargs)


def sample_responses(sampler, tok, args, records, n, desc, temperature, seed):
    """n scored responses per record (rollout.first_order_rollout; boxed-only unless --lenient), one list each."""
    import rollout
    outs = with_progress(desc, rollout.first_order_rollout, sampler, tok, records, n, temperature=temperature,
                         seed=seed, max_new_tokens=args.max_new_tokens, top_p=args.top_p, style=args.prompt_style)
    return score_responses(args, records, outs)


def score_responses(args, records, outs):
    """first-order rollout outputs, scored (boxed-only unless --lenient), grouped per record: one list each."""
    groups, markers = [[] for _ in records], reward.DEFAULT_MARKERS if args.lenient else ()
    for o in outs:
        text, gold = o["text"], records[o["q_index"]]["answer"]
        o.update(answer=reward.extract_answer(text, markers), boxed=reward.extract_answer(text, ()) is not None,
                 correct=reward.is_correct(text, gold, strict=not args.lenient))
        groups[o["q_index"]].append(o)
    return groups


def sample_pairs(records, groups):
    """Critique pairs of the scored samples, question-major; `index` is the sample's position."""
    return [dict(question=rec["question"], response=r["text"], label=r["correct"], answer=rec["answer"], index=i)
            for i, (rec, r) in enumerate((rec, r) for rec, g in zip(records, groups) for r in g)]


def load_critique_set(spec, seed=0, limit=None):
    """Balanced pairs of a critique SPEC (critique.load_critique_data), at most `limit` questions; maybe none."""
    try:
        rows = critique.load_critique_data(spec, seed=seed)
    except data.DataError as e:
        if "no question has both" not in str(e):
            raise
        return []
    pairs = balanced_pairs(rows, seed)  # a no-op on gsm8k-solutions (already 1:1); balances a jsonl set
    return pairs[:2 * limit] if limit else pairs  # whole questions: pairs come right, wrong per question


def critique_sampling(args):
    """The critiques' budget, temperature (greedy for one per response) and seed."""
    c = args.critique_samples
    return dict(max_new_tokens=args.critique_max_new_tokens, temperature=0.0 if c == 1 else args.critique_temperature,
                seed=args.seed + 2)


def run_critiques(sampler, tok, args, pairs, desc, k_ref=0, critiques=None):
    """--critique-samples critiques of each pair (critique.second_order_rollout, plain Eq. 2 reward), pair-major;
    `critiques`: sampled already (first_call), only judged and refined here."""
    return with_progress(desc, critique.second_order_rollout, sampler, tok, pairs, args.critique_samples,
                         scheme="plain", k_ref=k_ref, critiques=critiques, top_p=args.top_p, **critique_sampling(args))


# ============================================================================ model loading, the CLI
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_model(args):
    """(model, tokenizer, device) for --model (rollout.resolve_model: also a checkpoint or train.py run dir), --dtype
    and --device (default: cuda when available)."""
    import torch

    import rollout
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return (*rollout.load_policy(args.model, dtype=getattr(torch, DTYPES[args.dtype]), device=device), device)
    except rollout.ModelError as e:
        raise EvalError(str(e)) from None


def run_eval(args):
    """Load the model, evaluate, print every metric, write --out. Returns the result dict."""
    import rollout
    import suite
    if suite.is_suite(args.data):  # the paper's five benchmarks, Table 1's layout
        return suite.run_eval(args)
    model, tok, device = load_model(args)
    res = evaluate(model, tok, args)
    config = {k: v for k, v in vars(args).items() if k not in ("compare", "plot")}
    config.update(device=device, model_path=rollout.resolve_model(args.model), time_s=res.pop("time_s"))
    result = dict(model=args.model, data=args.data, critique_data=args.critique_data, label=args.label, **res,
                  config=config)
    lines = [f"model {result['model']}   data {result['data']}"]  # every metric, one per line
    for block in ("generation", "critique", "selection"):
        b = result[block]
        lines.append(f"-- {block}" + (f"  (null: {b['reason']})" if b.get("reason") else ""))
        lines += [f"   {k:<24}{v:.4f}" if isinstance(v, float) else f"   {k:<24}{v}"
                  for k, v in b.items() if k not in ("reason", "undefined")]
        lines += [f"   ({k} undefined: {why})" for k, why in (b.get("undefined") or {}).items()]
    print("\n".join(lines))
    if args.out:
        data.write_json(args.out, result)
        print(f"[eval] wrote {args.out}")
    return result


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--model", default="smollm2-135m", help="alias, HF id, model dir, checkpoint-STEP dir or train.py run dir")
    a("--data", default="arith", help=f"data SPEC for generation (arith: its test split): {data.SPECS}; or "
                                      "suite[:DIR], the paper's five benchmarks (suite.py)")
    a("--split", default="test", help="split for hub specs (gsm8k, hf:NAME without :SPLIT)")
    a("--critique-data", help="critique SPEC: gsm8k-solutions:PATH.jsonl, jsonl:PATH (default: the own --k samples)")
    a("--limit", type=int, help="questions of --data to evaluate (default 100; suite: per benchmark, default all)")
    a("--critique-limit", type=int, help="questions of --critique-data (2 pairs each); default all")
    a("--out", help="write the result JSON here")
    a("--label", help="row name in --compare tables (default: the run dir or file name)")
    a("--k", type=int, default=4, help="samples per question (pass@1, maj@k, pass@k, self critique set, selection)")
    a("--prompt-style", choices=sorted(data.PROMPT_STYLES), default="plain", help="generation prompt (zero/one-shot)")
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
    a("--device", help="cpu / cuda (default: cuda when available)")
    a("--batch", type=int, default=32, help="sampler rows per chunk (KV cache: batch x longest prompt + budget)")
    a("--max-len", type=int, default=4096, help="sampler cap on prompt + new tokens (the KV cache is sized by need)")
    a("--save-samples", help="dump greedy and sampled responses to this jsonl")
    a("--compare", nargs="+", metavar="RUN_DIR_OR_JSON", help="paper-style markdown tables of eval JSONs and run dirs")
    a("--plot", metavar="RUN_DIR", help="plot RUN_DIR/metrics.jsonl into RUN_DIR/plots/")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.compare:
            print(report.compare_table(args.compare))
        elif args.plot:
            print("\n".join(f"[plot] wrote {path}" for path in report.plot_run(args.plot)))
        else:
            run_eval(args)
    except (EvalError, report.ReportError, data.DataError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
