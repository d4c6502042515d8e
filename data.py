"""Task sources -> records {id, question, answer}, and the generation prompt. A data SPEC names a source:
    arith            built-in arithmetic word problems, levels 1-3 mixed
    arith:LEVEL      one level (1 = one step, 2 = two steps, 3 = three steps with * and /)
    gsm8k            GSM8K from the Hugging Face hub (needs network or a warm HF cache)
    gsm8k:PATH       a local GSM8K jsonl (`answer` ends with a `#### x` line)
    jsonl:PATH       any jsonl with `question` / `answer` fields (see `fields=` to rename)
    hf:NAME[:SPLIT]  any HF dataset with `question` / `answer` columns
The paper's sets (arXiv 2602.22765 §4.1), each from the hub or, with `:PATH`, a local copy in the hub's schema
(a .jsonl / .json / .parquet file or a dataset dir):
    dapo[:PATH]           DAPO-Math-17k, deduplicated on the problem, the "Answer: $Answer" wrapper stripped
    dapo-cold[:PATH]      its 1k cold-start questions; dapo-rl[:PATH] the other ~16.4k (seeded, disjoint)
    math500, minerva, amc23, olympiadbench [:PATH]   the generation benchmarks; gsm8k (above) is the fifth

Records have string `id`, `question`, `answer` (the gold final answer, e.g. "72"); `arith` records also carry
`level`, `steps` [(text, value)] and a program `solution` ending in \\boxed{answer}, for teacher.py's cold-start
teacher. The arith train/test split hashes the question text (not the seed): no test question is ever trained on.
The lowest module (no gcrl imports), so the home of the shared helpers: `read_jsonl`, the atomic writers
`write_json` / `write_jsonl` and `require_field` (the one check of a row's question / answer / response).
"""
import hashlib
import json
import os
import random
import re
from pathlib import Path


class DataError(ValueError):
    """Bad data input; the message names the spec, file and row."""


# ----------------------------------------------------------------------------- arith

NAMES = ["Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Sara", "Tom", "Iris", "Kai"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "stamps", "cookies"]
LEVELS = {1: dict(ops=1, lo=2, hi=20), 2: dict(ops=2, lo=2, hi=50), 3: dict(ops=3, lo=2, hi=100)}
TEST_FRACTION = 5  # one question text in 5 (by hash) belongs to the test split
_SENTENCES = dict(add="{name} gets {x} more {item}.", sub="{name} gives away {x} {item}.",
                  mul="{name} ends up with {x} times as many {item} as before.",
                  div="{name} splits the {item} into {x} equal piles and keeps one pile.")


def _split_of(question):
    h = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16)
    return "test" if h % TEST_FRACTION == 0 else "train"


def _arith_problem(rng, level):
    """One word problem (a record without id): a start value, then `ops` operations; all values are ints >= 0."""
    cfg = LEVELS[level]
    name, item, v = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(cfg["lo"], cfg["hi"])
    sentences, steps = [f"{name} has {v} {item}."], []
    for _ in range(cfg["ops"]):
        kind = rng.choice(["add", "sub", "mul", "div"][:level + 1])
        divisors = [d for d in (2, 3, 4, 5) if v % d == 0]
        kind = "add" if kind == "sub" and v < 2 else "mul" if kind == "div" and not divisors else kind
        x = (rng.randint(cfg["lo"], cfg["hi"]) if kind == "add" else
             rng.randint(1, v - 1) if kind == "sub" else
             rng.randint(2, 5) if kind == "mul" else rng.choice(divisors))
        op, new = {"add": ("+", v + x), "sub": ("-", v - x), "mul": ("*", v * x), "div": ("/", v // x)}[kind]
        sentences.append(_SENTENCES[kind].format(name=name, item=item, x=x))
        steps.append((f"{v} {op} {x} = {new}", new))
        v = new
    sentences.append(f"How many {item} does {name} have now?")
    lines = [f"Step {i + 1}: {t}." for i, (t, _) in enumerate(steps)]
    solution = "\n".join(lines + [f"So {name} has {v} {item}. The answer is \\boxed{{{v}}}."])
    return dict(question=" ".join(sentences), answer=str(v), level=level, steps=steps, solution=solution)


def arith(level=None, split="train", n=1000, seed=0):
    """`n` arith records of `split` ('train' or 'test'); level None mixes levels 1-3 in turn."""
    if split not in ("train", "test"):
        raise DataError(f"arith: split must be 'train' or 'test', got {split!r}")
    if level is not None and level not in LEVELS:
        raise DataError(f"arith: unknown level {level!r}; levels are {sorted(LEVELS)}")
    rng = random.Random(f"arith-{level}-{seed}")  # same seed -> same questions, on any machine
    out, seen = [], set()
    while len(out) < n:
        lvl = level or (len(out) % len(LEVELS)) + 1
        rec = _arith_problem(rng, lvl)
        if rec["question"] not in seen and _split_of(rec["question"]) == split:
            seen.add(rec["question"])
            out.append(dict(id=f"arith{lvl}-{split}-{len(out)}", **rec))
    return out


# ----------------------------------------------------------------------------- files and hub

def _gsm8k_gold(answer, where):
    if "####" not in answer:
        raise DataError(f"{where}: GSM8K answer has no '#### x' line: {answer[-80:]!r}")
    return answer.split("####")[-1].strip().replace(",", "")


def require_field(row, key, where, text=True):
    """row[key] if present and not blank, else DataError "{where}: missing or empty {key!r}". With `text`
    (questions, responses) it must be a string; without (gold answers) any JSON value, e.g. 72."""
    v = row.get(key) if isinstance(row, dict) else None
    if v is None or (isinstance(v, str) and not v.strip()) or (text and not isinstance(v, str)):
        raise DataError(f"{where}: missing or empty {key!r}")
    return v


def _write_atomic(path, chunks):
    """Write strings to `path` via a tmp file and a rename: no reader (nor a resumed run) sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # pid: two processes never share a tmp file
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(chunks)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a row that is not JSON-serialisable: leave no stray tmp file
        raise


def write_json(path, obj):  # one indented JSON document, atomically
    _write_atomic(path, [json.dumps(obj, indent=2, ensure_ascii=False), "\n"])


def write_jsonl(path, rows):  # one JSON object per line, atomically; read_jsonl reads it back
    _write_atomic(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path, what="jsonl"):
    """Rows of a jsonl file; the error names the file and line of any bad row."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what}: file not found: {path}")
    rows = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


def _records(rows, where, q_field="question", a_field="answer", gsm8k=False, skip_bad=False):
    """Rows -> records; a row without a question or answer is a DataError naming it (skip_bad: skipped, counted)."""
    out, dropped = [], 0
    for i, row in enumerate(rows, 1):
        at = f"{where} row {i}"
        try:
            q, a = require_field(row, q_field, at), require_field(row, a_field, at, text=False)
            a = _gsm8k_gold(a, at) if gsm8k else str(a).strip()
        except DataError:
            if not skip_bad:
                raise
            dropped += 1
            continue
        out.append(dict(id=str(row.get("id", f"{Path(str(where)).stem}-{i - 1}")), question=q.strip(), answer=a))
    if dropped:
        print(f"[data] {where}: skipped {dropped} bad row(s) of {len(rows)}")
    return out


def _dataset(path, split, config=None, **kw):
    """A `datasets.Dataset`: a hub id (offline: from the HF cache) or a builder ("parquet", "json") with data_files."""
    try:
        import datasets
        return datasets.load_dataset(path, config, split=split, **kw)
    except Exception as e:  # offline, unknown name, ...: one clear line
        where = kw.get("data_files") or "from the Hugging Face hub"
        raise DataError(f"could not load {path!r} split {split!r} {where} ({type(e).__name__}: {str(e)[:200]}). "
                        "Offline? Use a local file: gsm8k:PATH.jsonl, jsonl:PATH or NAME:PATH for the paper's sets"
                        ) from None


def _rows_of(ds):
    """The rows of a Dataset as dicts, converted a batch at a time (DAPO's 1.79M rows: one row at a time is slow)."""
    for batch in ds.iter(batch_size=8192):
        yield from (dict(zip(batch, vals)) for vals in zip(*batch.values()))


def _hub(name, split, config=None):
    return list(_rows_of(_dataset(name, split, config)))


# ----------------------------------------------------------------------------- the paper's sets (arXiv 2602.22765 §4.1)

# name: (hub id, config, split, question field, gold answer field(s), first found)
PAPER_SETS = {
    "dapo": ("BytedTsinghua-SIA/DAPO-Math-17k", None, "train", "prompt", ("reward_model.ground_truth", "solution")),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "problem", ("answer",)),
    "minerva": ("math-ai/minervamath", None, "test", "question", ("answer",)),
    "amc23": ("math-ai/amc23", None, "test", "question", ("answer",)),
    "olympiadbench": ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train", "question", ("final_answer",)),
}
DAPO_COLD = 1000  # the paper's cold-start questions; the rest is the RL set (§4.1: "1k for cold start, 16k for RL")
DAPO_HEAD = ("Solve the following math problem step by step. The last line of your response should be of the form "
             "Answer: $Answer (without quotes) where $Answer is the answer to the problem.")
DAPO_TAIL = 'Remember to put your answer on its own line after "Answer:".'


def _dapo_question(prompt):
    """The problem inside DAPO's prompt (a one-turn chat list, or its content as a string in processed copies),
    without the "Answer: $Answer" instruction around it: our generation prompt asks for \\boxed{} instead."""
    if isinstance(prompt, list):
        prompt = next((m.get("content") for m in reversed(prompt) if isinstance(m, dict) and m.get("role") == "user"),
                      None)
    if not isinstance(prompt, str):
        raise DataError("no user turn with text content in 'prompt'")
    text = prompt.strip()
    text = text[len(DAPO_HEAD):].strip() if text.startswith(DAPO_HEAD) else text
    return text[:-len(DAPO_TAIL)].strip() if text.endswith(DAPO_TAIL) else text


def _number_gold(v):
    """A gold answer as a string; a float that is an integer (AMC23 copies store 27.0) as the integer."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    s = str(v).strip()
    return s[:-2] if re.fullmatch(r"-?\d+\.0", s) else s


def _olympiad_gold(v):
    """OlympiadBench's `final_answer`: a list of (usually one) strings, each often `$...$`, sometimes several
    answers in one string ("$3$, $5$"): one string, the answers joined by ", ", without the `$` delimiters."""
    parts = [str(x).strip() for x in (v if isinstance(v, list) else [v]) if str(x).strip()]
    return re.sub(r"\$+([^$]*)\$+", r"\1", ", ".join(parts)).strip()


GOLD = {"amc23": _number_gold, "olympiadbench": _olympiad_gold}


def _get(row, key):  # row["a"]["b"] for "a.b"; None if absent or blank
    for part in key.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return None if row is None or row == [] or (isinstance(row, str) and not row.strip()) else row


def _field(row, keys, where):
    """The first of `keys` present and not blank in the row, else DataError naming them."""
    v = next((v for v in map(lambda k: _get(row, k), keys) if v is not None), None)
    if v is None:
        raise DataError(f"{where}: missing or empty {' / '.join(map(repr, keys))}")
    return v


def _local_rows(path, what):
    """Rows of a local copy: jsonl read as is (no type coercion, bad lines named); parquet, json or a dataset dir
    through `datasets`."""
    p = Path(path)
    if p.suffix == ".jsonl" or not p.exists():
        return read_jsonl(p, what)
    builder = {".parquet": "parquet", ".json": "json"}.get(p.suffix)
    return list(_rows_of(_dataset(builder, "train", data_files=str(p)) if builder else _dataset(str(p), "train")))


def _paper_records(kind, arg, skip_bad=False):
    """Records of a paper set (`kind` in PAPER_SETS, or dapo-cold / dapo-rl). DAPO: one record per distinct problem
    (the first row's), a problem whose copies disagree on the gold answer is dropped (counted)."""
    name = kind.split("-")[0]
    hub, config, split, q_key, a_keys = PAPER_SETS[name]
    rows, where = ((_local_rows(arg, kind), arg) if arg else
                   (_rows_of(_dataset(hub, split, config)), f"{hub}[{split}]"))
    recs, gold_of, bad, conflicts = [], {}, 0, set()
    for i, row in enumerate(rows, 1):
        at = f"{kind}: {where} row {i}"
        try:
            if not isinstance(row, dict):
                raise DataError(f"{at}: expected a JSON object")
            q = _dapo_question(row.get(q_key)) if name == "dapo" else require_field(row, q_key, at).strip()
            a = GOLD.get(name, _number_gold)(_field(row, a_keys, at))
            if not q or not a:
                raise DataError(f"{at}: empty {'question' if not q else 'gold answer'} after normalisation")
        except DataError as e:
            if not skip_bad:
                raise DataError(str(e) if str(e).startswith(at) else f"{at}: {e}") from None
            bad += 1
            continue
        if name == "dapo" and q in gold_of:
            conflicts |= {q} if gold_of[q] != a else set()
            continue
        gold_of[q] = a
        rid = next((v for v in map(lambda k: _get(row, k), ("extra_info.index", "unique_id", "id")) if v is not None),
                   f"{name}-{len(recs)}")
        recs.append(dict(id=str(rid), question=q, answer=a))
    if bad or conflicts:
        print(f"[data] {kind}: skipped {bad} bad row(s); dropped {len(conflicts)} problem(s) whose copies disagree on "
              "the gold answer")
    recs = [r for r in recs if r["question"] not in conflicts]
    if kind in ("dapo-cold", "dapo-rl"):
        cold, rl = dapo_split(recs)
        recs = cold if kind == "dapo-cold" else rl
    return recs


def dapo_split(records, n_cold=None):
    """(cold start, RL): the `n_cold` (default DAPO_COLD) problems first in the order of a hash of their text, and
    the rest in that order. The same whatever the copy's row order or the seed of a run: disjoint by construction."""
    n_cold = DAPO_COLD if n_cold is None else n_cold
    order = sorted(records, key=lambda r: hashlib.sha256(f"dapo-split:{r['question']}".encode()).hexdigest())
    return order[:n_cold], order[n_cold:]


SPECS = ("arith, arith:LEVEL, gsm8k, gsm8k:PATH.jsonl, jsonl:PATH, hf:NAME[:SPLIT], dapo, dapo-cold, dapo-rl, "
         "math500, minerva, amc23, olympiadbench (each also NAME:PATH)")


def load_data(spec, split="train", limit=None, seed=0, skip_bad=False, fields=("question", "answer")):
    """Records for a data SPEC (module docstring). `split` applies to arith, gsm8k and hf: sources (each paper set
    has its one split); `limit` keeps the first N records (arith generates N, default 1000 train / 200 test)."""
    kind, _, arg = str(spec).partition(":")
    if kind == "arith":
        try:
            level = int(arg) if arg else None
        except ValueError:
            raise DataError(f"data spec {spec!r}: LEVEL must be one of {sorted(LEVELS)}") from None
        recs = arith(level, split, limit or (1000 if split == "train" else 200), seed)
    elif kind == "gsm8k":
        rows, where = (read_jsonl(arg, spec), arg) if arg else (_hub("openai/gsm8k", split, "main"), f"gsm8k[{split}]")
        recs = _records(rows, where, gsm8k=True, skip_bad=skip_bad)
    elif kind == "jsonl" and arg:
        recs = _records(read_jsonl(arg, spec), arg, *fields, skip_bad=skip_bad)
    elif kind in PAPER_SETS or kind in ("dapo-cold", "dapo-rl"):
        recs = _paper_records(kind, arg, skip_bad)
    elif kind == "hf" and arg:
        name, _, sp = arg.partition(":")
        recs = _records(_hub(name, sp or split), f"hf:{name}[{sp or split}]", *fields, skip_bad=skip_bad)
    else:
        raise DataError(f"unknown data spec {spec!r}; expected one of: {SPECS}")
    recs = recs[:limit] if limit else recs
    if not recs:
        raise DataError(f"data spec {spec!r} gave no records")
    return recs


# ----------------------------------------------------------------------------- prompts

PROMPT_STYLES = {  # zero-shot; one-shot: one worked example in the program-solution format
    "plain": "{question}\nSolve it step by step, then give the final answer as \\boxed{{number}}.",
    "oneshot": ("Example question: Ava has 12 shells. Ava gets 7 more shells. How many shells does Ava have now?\n"
                "Example solution:\nStep 1: 12 + 7 = 19.\nSo Ava has 19 shells. The answer is \\boxed{{19}}.\n\n"
                "Question: {question}\nSolve it step by step, then give the final answer as \\boxed{{number}}."),
    # the Qwen2.5-Math evaluation harness's boxed prompts (its "qwen-boxed" and "qwen25-math-cot"), for base models
    "qwen-boxed": "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "qwen25-math-cot": "{question}",
}
SYSTEM_PROMPTS = {"qwen-boxed": "You are a helpful assistant.",  # a style's system turn (default: the template's)
                  "qwen25-math-cot": "Please reason step by step, and put your final answer within \\boxed{}."}


def chat_ids(tokenizer, user_text, system=None):
    """Token ids of one user turn (after a `system` turn if given) plus the assistant header (chat template), or
    `{text}\\nAnswer:` for tokenizers without a template (base models, test tokenizers)."""
    turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    text = (tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            if getattr(tokenizer, "chat_template", None) else
            (f"{system}\n\n" if system else "") + f"{user_text}\nAnswer:")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def gen_prompt(tokenizer, question, style="plain"):
    """The generation prompt for one question: token ids, asking for the answer in \\boxed{}."""
    if style not in PROMPT_STYLES:
        raise DataError(f"unknown prompt style {style!r}; styles: {sorted(PROMPT_STYLES)}")
    return chat_ids(tokenizer, PROMPT_STYLES[style].format(question=question), SYSTEM_PROMPTS.get(style))
