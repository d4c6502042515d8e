"""The cold-start teachers (arXiv 2602.22765 §4): the paper distils GPT-5's critiques into the policy before RL.

- For `arith`, offline, a program plays the teacher: it writes right and wrong solutions (`synth_response`), a
  step-by-step critique of any response that ends in the verifier's verdict (`teacher_critique`), and the SFT file
  that teaches both formats (`cold_start_data`, read by `train.py --mode sft`), and tops up experiment.py's critique
  test set with program-written pairs (`critique_test_set`, this file's CLI).
- For any data, a model is the teacher (`distill`, `python teacher.py distill`): it critiques the policy's own
  sampled responses with the Figure 6 prompt (critique.critique_prompt); only critiques in the `Conclusion:
  right/wrong [END]` format whose verdict matches the verified label are kept, balanced 1:1 (`distill_rows`; the
  paper kept 1,339 of 1,885), plus verified right solutions as generation rows.

    python teacher.py distill --model POLICY --teacher TEACHER --data dapo-cold --k 2 --out cold_start.jsonl
"""
import random
import re
import sys
from fractions import Fraction
from pathlib import Path

import reward
from data import DataError, load_data, write_json, write_jsonl

_EQ = re.compile(r"(\d+(?:\.\d+)?)\s*([-+*/x×÷])\s*(\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")
_OPS = {"+": "+", "-": "-", "*": "*", "x": "*", "×": "*", "/": "/", "÷": "/"}


def _apply(a, op, b):
    return a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else (a / b if b else None)


def _num(x):
    return str(x.numerator) if x.denominator == 1 else str(float(x))


def _eq(a, op, b, c=None):
    return f"{_num(a)} {op} {_num(b)}" + ("" if c is None else f" = {_num(c)}")


def _equations(text):  # every `a op b = c` in the text, as (a, op, b, c) Fractions, op in + - * /
    return [(Fraction(a), _OPS[op], Fraction(b), Fraction(c)) for a, op, b, c in _EQ.findall(text)]


def _reference(record, where="record"):
    if not record.get("steps"):
        raise DataError(f"{where}: the program teacher needs an arith record with 'steps' (got keys "
                        f"{sorted(record)}); for other data write {{question, response, critique}} jsonl yourself")
    ref = [_equations(text) for text, _ in record["steps"]]
    if not all(len(e) == 1 for e in ref):
        raise DataError(f"{where}: cannot parse steps {record['steps']!r}")
    return [e[0] for e in ref]


def teacher_critique(record, response_text):
    """A program's step-by-step critique of `response_text` for an arith record: it redoes each reference step,
    compares it with the response's own `a op b = c` lines (an arithmetic slip, or right arithmetic on wrong
    numbers when the step counts agree), points out the first wrong step, compares final answers and ends with
    `Conclusion: right/wrong [END]`, the verdict of reward.is_correct(response, gold): it agrees with the label."""
    ref, gold, eqs = _reference(record), str(record["answer"]), _equations(response_text)
    ok, got = reward.is_correct(response_text, gold), reward.extract_answer(response_text)
    lines, flagged = ["Let me solve the problem myself and check the solution step by step."], False
    for i, (a, op, b, c) in enumerate(ref):
        line = f"Step {i + 1}: {_eq(a, op, b, c)}."
        if i < len(eqs) and not flagged:
            ea, eop, eb, ec = eqs[i]
            true = _apply(ea, eop, eb)
            if true != ec:  # an arithmetic slip in the response
                if not ok:
                    line += (f" The solution writes {_eq(ea, eop, eb, ec)}, but "
                             + (f"{_eq(ea, eop, eb)} = {_num(true)}" if true is not None else "that is undefined")
                             + ". This step is wrong"
                             + (", and the error carries into the later steps." if i + 1 < len(ref) else "."))
                    flagged = True
            elif ec == c:
                line += " The solution has the same result here."
            elif len(eqs) == len(ref) and not ok:  # right arithmetic on the wrong numbers
                line += (f" The solution computes {_eq(ea, eop, eb, ec)} instead, which does not follow from the "
                         f"question. This step is wrong.")
                flagged = True
        lines.append(line)
    lines.append(f"The correct answer is {gold}, but the solution gives no final answer." if got is None else
                 f"The correct answer is {gold}. The solution's final answer is {got}, which "
                 + ("matches." if ok else "does not match."))
    return "\n".join(lines + [f"Conclusion: {'right' if ok else 'wrong'} [END]"])


def _render(steps, final, style, record):
    """A solution text for steps [(a, op, b, c)] ending in \\boxed{final}, in one of three styles."""
    eqs = [_eq(*s) for s in steps]
    if style == "program":  # the record's own format, final sentence with `final` put in
        last = record["solution"].strip().split("\n")[-1] if record.get("solution") else "The answer is \\boxed{}."
        last = re.sub(r"\\boxed\{[^{}]*\}", lambda _: f"\\boxed{{{final}}}", last)
        last = re.sub(rf"\bhas {re.escape(str(record['answer']))} ", f"has {final} ", last)
        return "\n".join([f"Step {i + 1}: {e}." for i, e in enumerate(eqs)] + [last])
    if style == "prose":
        body = ([f"We compute {eqs[0]}."] if len(eqs) == 1 else
                [f"{('First', 'Next', 'Then', 'After that')[min(i, 3)] if i < len(eqs) - 1 else 'Finally'}, {e}."
                 for i, e in enumerate(eqs)])
        return "\n".join(body + [f"So the answer is \\boxed{{{final}}}."])
    return "\n".join(eqs + [f"Answer: \\boxed{{{final}}}"])  # compact


STYLES = ("program", "prose", "compact")
WRONG_KINDS = ("arith", "operand", "final")  # slip in a result / wrong number used / wrong final number


def _corrupt(ref, rng, kind):
    """A wrong solution from the reference steps: (steps, final). `arith`: one result is off and later steps
    carry the error; `operand`: one step uses a wrong number, error carried; `final`: right steps, wrong final
    number. Falls back to `final` when no exact integer corruption is found."""
    gold = ref[-1][3]
    for _ in range(40 if kind != "final" else 0):
        j = rng.randrange(len(ref))
        steps = [list(s) for s in ref]
        a, op, b, c = steps[j]
        d = rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
        if kind != "arith" and b + d < 1:
            continue
        steps[j][2:] = [b, c + d] if kind == "arith" else [b + d, _apply(a, op, b + d)]  # else: operand
        for i in range(j + 1, len(steps)):
            steps[i][0] = steps[i - 1][3]
            steps[i][3] = _apply(*steps[i][:3])
        vals = [s[3] for s in steps]
        if all(v is not None and v >= 0 and v.denominator == 1 for v in vals) and vals[-1] != gold:
            return [tuple(s) for s in steps], _num(vals[-1])
    while True:
        d = rng.choice([-10, -2, -1, 1, 2, 10])
        if gold + d >= 0:
            return list(ref), _num(gold + d)


def synth_response(record, rng, right=True, kind=None, style=None):
    """A synthetic response to an arith record: right (program solution, one of STYLES) or wrong (WRONG_KINDS)."""
    ref = _reference(record)
    style = style or rng.choice(STYLES)
    steps, final = (ref, _num(ref[-1][3])) if right else _corrupt(ref, rng, kind or rng.choice(WRONG_KINDS))
    return _render(steps, final, style, record)


def cold_start_data(records, out_path, responses=None, seed=0, n_wrong=1, generation=True):
    """Write the SFT cold-start jsonl (`train.py --mode sft`), shuffled (seeded): critique rows {question, response,
    critique, label} (teacher_critique; label by reward.is_correct), as many right as wrong, and unless
    generation=False rows {question, response} with the program solution: one file teaches both formats. Responses:
    `responses[i]` (policy samples for records[i], a list or a text), the scarcer label topped up with synthetic
    ones; else `n_wrong` synthetic right and wrong ones per record. Returns {path, n_critique, n_right, n_wrong,
    n_generation, n_policy}."""
    rng = random.Random(seed)
    if responses is not None and len(responses) != len(records):
        raise ValueError(f"responses has {len(responses)} entries for {len(records)} records")
    for i, rec in enumerate(records):
        _reference(rec, f"cold_start_data record {i} ({rec.get('id')})")
    items = [(i, r) for i, rs in enumerate(responses or []) for r in ([rs] if isinstance(rs, str) else rs)]
    crit = [(i, r, reward.is_correct(r, records[i]["answer"])) for i, r in items]  # (record index, text, label)
    if responses is None:
        crit += [(i, synth_response(rec, rng, right=lab), lab)
                 for i, rec in enumerate(records) for _ in range(n_wrong) for lab in (True, False)]
    n_right = sum(lab for _, _, lab in crit)
    short, need = 2 * n_right < len(crit), abs(len(crit) - 2 * n_right)  # the scarcer label, how many more of it
    order = list(range(len(records)))
    rng.shuffle(order)
    for i in (order[j % len(order)] for j in range(need)):  # top up the scarcer label
        crit.append((i, synth_response(records[i], rng, right=short), short))
    rows = []
    for i, resp, label in crit:
        text = teacher_critique(records[i], resp)  # its verdict is reward.is_correct's: it must match the label
        if reward.extract_verdict(text) != ("right" if label else "wrong"):
            raise RuntimeError(f"response labelled {label}, but the reward says otherwise: {resp!r}")
        rows.append(dict(question=records[i]["question"], response=resp, critique=text, label=label))
    if generation:
        rows += [dict(question=r["question"], response=r["solution"]) for r in records]
    rng.shuffle(rows)
    write_jsonl(out_path, rows)
    return dict(path=str(out_path), n_critique=len(crit), n_right=len(crit) // 2, n_wrong=len(crit) // 2,
                n_generation=len(records) if generation else 0, n_policy=len(items))


def critique_test_set(argv=None):
    """experiment.py's one critique test set: --model's own >= 2 samples per question (eval.py's sampling and
    balance), topped up with program-written right and wrong responses where they were all right or all wrong.

        python teacher.py --model sft/final --data arith:1 --limit 64 --k 2 --out critique_test.jsonl

    Takes eval.py's flags (--out: the jsonl, read back by critique.load_pairs). Returns the number of pairs."""
    import eval as ev
    import rollout
    args = ev.build_parser().parse_args(argv)
    if not args.out:
        raise DataError("teacher.py: --out OUT.jsonl is required (where the critique test set goes)")
    _, records = ev.eval_records(args)  # the questions eval.py evaluates
    model, tok, _ = ev.load_model(args)
    sampler = rollout.Sampler(model, max_batch=args.batch, max_len=args.max_len)
    groups = ev.sample_responses(sampler, tok, args, records, max(args.k, 2), "critique-set samples",
                                 args.temperature, args.seed + 7)
    pairs = [{k: v for k, v in p.items() if k != "index"}
             for p in ev.balanced_pairs(ev.sample_pairs(records, groups), args.seed)]
    n_policy, have, rng = len(pairs), {p["question"] for p in pairs}, random.Random(args.seed)
    for rec in records:
        if rec["question"] not in have and rec.get("steps"):
            pairs += [dict(question=rec["question"], response=synth_response(rec, rng, right=lab),
                           label=lab, answer=rec["answer"]) for lab in (True, False)]
    if not pairs:
        raise DataError(f"no critique pairs from {args.data}: the model's samples were all right or all wrong and "
                        "the data has no program solutions to top up from (use arith data)")
    write_jsonl(args.out, pairs)
    print(f"[teacher] critique test set: {len(pairs)} pairs ({n_policy} from {args.model}'s samples, "
          f"{len(pairs) - n_policy} program-written) -> {args.out}")
    return len(pairs)


# ----------------------------------------------------------------------------- a model as the teacher, any data

_FORMAT = re.compile(r"^Conclusion:\s*(right|wrong)\s*\[END\]$")


def _tidy(text):
    """A teacher critique, stripped and cut after its last `[END]` (anything after it is not the critique)."""
    text = (text or "").strip()
    return text[:text.rfind("[END]") + 5] if "[END]" in text else text


def critique_format(text):
    """"right" / "wrong" if the critique's last line is `Conclusion: right [END]` / `Conclusion: wrong [END]` (the
    format the cold start teaches, stricter than reward.extract_verdict), else None."""
    lines = [ln.strip() for ln in _tidy(text).splitlines() if ln.strip()]
    m = _FORMAT.match(lines[-1]) if lines else None
    return m.group(1) if m else None


def distill_rows(records, samples, critiques, solutions=None, seed=0, generation=True):
    """The paper's cold-start filter (§4.1: 1,885 critiques distilled, 1,339 kept) on any data. `samples`: (record
    index, policy response) pairs, `critiques`: the teacher's critique of each, in the same order. Keeps a critique
    when its format is right (`critique_format`) and its verdict is the response's verified label (reward.is_correct
    against the record's answer, boxed only), then as many right as wrong: all of the scarcer label, a seeded draw of
    the other. Generation rows (unless generation=False): per record, the first verified right of `solutions[i]`
    (e.g. the teacher's) and the policy's responses. Rows shuffled (seeded). Returns (rows, counts)."""
    if len(samples) != len(critiques):
        raise ValueError(f"{len(samples)} responses but {len(critiques)} critiques")
    rng, kept = random.Random(seed), {True: [], False: []}
    n_format = 0
    for (i, resp), crit in zip(samples, critiques):
        verdict, label = critique_format(crit), reward.is_correct(resp, records[i]["answer"], strict=True)
        n_format += verdict is not None
        if verdict == ("right" if label else "wrong"):
            kept[label].append(dict(question=records[i]["question"], response=resp, critique=_tidy(crit), label=label))
    n = min(len(kept[True]), len(kept[False]))
    rows = [r for lab in (True, False) for r in rng.sample(kept[lab], n)]
    gen = []
    for i, rec in enumerate(records if generation else []):
        cands = list((solutions or {}).get(i, [])) + [r for j, r in samples if j == i]
        right = next((c for c in cands if reward.is_correct(c, rec["answer"], strict=True)), None)
        gen += [dict(question=rec["question"], response=right.strip())] if right else []
    rows += gen
    rng.shuffle(rows)
    counts = dict(critiques=len(critiques), format_ok=n_format, verdict_ok=len(kept[True]) + len(kept[False]),
                  right=n, wrong=n, kept=2 * n, generation=len(gen))
    return rows, counts


def distill(records, policy_fn, teacher_fn, k=2, seed=0, generation=True):
    """The distilled cold start: policy_fn(records, k) -> k responses per record; those without \\boxed{} are dropped;
    teacher_fn([(question, response)], records) -> (a critique of each response, a solution per record or None);
    then distill_rows. Returns (rows, counts with questions, responses and unboxed added)."""
    responses = policy_fn(records, k)
    samples = [(i, t) for i, ts in enumerate(responses) for t in ts if reward.extract_answer(t, ()) is not None]
    critiques, sols = teacher_fn([(records[i]["question"], t) for i, t in samples], records)
    solutions = {i: [t] for i, t in enumerate(sols) if t} if sols and generation else None
    rows, counts = distill_rows(records, samples, critiques, solutions, seed, generation)
    n_resp = sum(len(ts) for ts in responses)
    return rows, dict(questions=len(records), responses=n_resp, unboxed=n_resp - len(samples), **counts)


def _with_model(args, name, fn):
    """fn(sampler, tokenizer) with model `name` loaded (eval.py's loading flags), freed afterwards."""
    import copy
    import gc

    import torch

    import eval as ev
    import rollout
    a = copy.copy(args)
    a.model = name
    model, tok, _ = ev.load_model(a)
    try:
        return fn(rollout.Sampler(model, max_batch=args.batch, max_len=args.max_len), tok)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def distill_main(argv=None):
    """CLI: `python teacher.py distill --model POLICY --teacher T --data SPEC --k K --out OUT.jsonl` (eval.py's
    sampling flags). Writes the SFT rows to OUT.jsonl and the counts to OUT.counts.json; returns the counts."""
    import critique
    import eval as ev
    p = ev.build_parser()
    p.prog, p.description = "teacher.py distill", distill_main.__doc__.split("\n")[0]
    p.add_argument("--teacher", required=True, help="the model that writes the critiques (and solutions)")
    p.add_argument("--no-generation", action="store_true", help="critique rows only (the paper's cold start)")
    p.set_defaults(k=2)
    args = p.parse_args(argv)
    if not args.out:
        raise DataError("teacher.py distill: --out OUT.jsonl is required")
    args.max_len = max(args.max_len, 2 * args.max_new_tokens + args.critique_max_new_tokens + 1024)
    records = load_data(args.data, split="train", limit=args.limit or None, seed=args.seed)

    def policy(recs, k):
        return _with_model(args, args.model, lambda s, tok: [[o["text"] for o in g] for g in ev.sample_responses(
            s, tok, args, recs, k, "policy responses", args.temperature, args.seed)])

    def teacher(pairs, recs):
        def run(s, tok):
            crit = ev.with_progress("teacher critiques", critique.second_order_rollout, s, tok,
                                    [dict(question=q, response=r, label=False) for q, r in pairs], 1,
                                    temperature=0.0, max_new_tokens=args.critique_max_new_tokens, seed=args.seed)
            sols = None if args.no_generation else [g[0]["text"] for g in ev.sample_responses(
                s, tok, args, recs, 1, "teacher solutions", 0.0, args.seed)]
            return [c["text"] for c in crit], sols
        return _with_model(args, args.teacher, run)

    rows, counts = distill(records, policy, teacher, args.k, args.seed, not args.no_generation)
    if not counts["kept"]:
        raise DataError(f"teacher.py distill: no critique passed the filter ({counts}): a stronger --teacher, more "
                        "--k or --critique-max-new-tokens")
    write_jsonl(args.out, rows)
    write_json(Path(args.out).with_suffix(".counts.json"), counts)
    print(f"[teacher] distilled cold start: kept {counts['verdict_ok']} / {counts['critiques']} teacher critiques "
          f"(right format and verdict; the paper: 1,339 / 1,885), balanced to {counts['right']} right + "
          f"{counts['wrong']} wrong, plus {counts['generation']} generation rows -> {args.out}")
    return counts


if __name__ == "__main__":
    import eval as ev
    try:
        distill_main(sys.argv[2:]) if sys.argv[1:2] == ["distill"] else critique_test_set()
    except (DataError, ev.EvalError) as e:
        print(f"teacher.py: error: {e}", file=sys.stderr)
        sys.exit(2)
