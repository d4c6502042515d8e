"""Task sources -> records {id, question, answer}, and the generation prompt.

A data SPEC names a source:
    arith            built-in arithmetic word problems, levels 1-3 mixed
    arith:LEVEL      one level (1 = one step, 2 = two steps, 3 = three steps with * and /)
    gsm8k            GSM8K from the Hugging Face hub (needs network or a warm HF cache)
    gsm8k:PATH       a local GSM8K jsonl (`answer` ends with a `#### x` line)
    jsonl:PATH       any jsonl with `question` / `answer` fields (see `fields=` to rename)
    hf:NAME[:SPLIT]  any HF dataset with `question` / `answer` columns

Every record is a dict with string `id`, `question`, `answer` (the gold final answer, e.g. "72").
`arith` records also carry `level`, `steps` [(text, value)] and a program-written `solution`
that ends in \\boxed{answer}: the teacher for the cold start (critique.py) reads them.

The arith train/test split is decided by a hash of the question text, not by the seed, so a
question that lands in the test split can never be generated for training.

This is the lowest module (it imports no other gcrl file), so the helpers every module shares live here:
`read_jsonl`, the atomic writers `write_json` / `write_jsonl`, and `require_field`, the one check of a
row's question / answer / response fields.
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


def _split_of(question):
    h = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16)
    return "test" if h % TEST_FRACTION == 0 else "train"


def _arith_problem(rng, level):
    """One word problem: a start value and `ops` operations applied in order. Returns a record
    without id. Every intermediate value is a non-negative integer."""
    cfg = LEVELS[level]
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    v = rng.randint(cfg["lo"], cfg["hi"])
    sentences = [f"{name} has {v} {item}."]
    steps = []
    kinds = ["add", "sub"] if level == 1 else ["add", "sub", "mul"] if level == 2 else ["add", "sub", "mul", "div"]
    for _ in range(cfg["ops"]):
        kind = rng.choice(kinds)
        if kind == "sub" and v < 2:
            kind = "add"
        if kind == "div":
            divisors = [d for d in (2, 3, 4, 5) if v % d == 0]
            if not divisors:
                kind = "mul"
        if kind == "add":
            x = rng.randint(cfg["lo"], cfg["hi"])
            sentences.append(f"{name} gets {x} more {item}.")
            text, new = f"{v} + {x} = {v + x}", v + x
        elif kind == "sub":
            x = rng.randint(1, v - 1)
            sentences.append(f"{name} gives away {x} {item}.")
            text, new = f"{v} - {x} = {v - x}", v - x
        elif kind == "mul":
            x = rng.randint(2, 5)
            sentences.append(f"{name} ends up with {x} times as many {item} as before.")
            text, new = f"{v} * {x} = {v * x}", v * x
        else:
            x = rng.choice(divisors)
            sentences.append(f"{name} splits the {item} into {x} equal piles and keeps one pile.")
            text, new = f"{v} / {x} = {v // x}", v // x
        steps.append((text, new))
        v = new
    sentences.append(f"How many {item} does {name} have now?")
    question = " ".join(sentences)
    lines = [f"Step {i + 1}: {t}." for i, (t, _) in enumerate(steps)]
    solution = "\n".join(lines + [f"So {name} has {v} {item}. The answer is \\boxed{{{v}}}."])
    return dict(question=question, answer=str(v), level=level, steps=steps, solution=solution)


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
        q = rec["question"]
        if q in seen or _split_of(q) != split:
            continue
        seen.add(q)
        out.append(dict(id=f"arith{lvl}-{split}-{len(out)}", **rec))
    return out


# ----------------------------------------------------------------------------- files and hub

def _gsm8k_gold(answer, where):
    if "####" not in answer:
        raise DataError(f"{where}: GSM8K answer has no '#### x' line: {answer[-80:]!r}")
    return answer.split("####")[-1].strip().replace(",", "")


def require_field(row, key, where, text=True):
    """row[key] if it is present and not blank, else DataError "{where}: missing or empty {key!r}". With `text`
    (questions, responses) it must be a string; without (gold answers) any JSON value, e.g. the number 72."""
    v = row.get(key) if isinstance(row, dict) else None
    if v is None or (isinstance(v, str) and not v.strip()) or (text and not isinstance(v, str)):
        raise DataError(f"{where}: missing or empty {key!r}")
    return v


def _write_atomic(path, chunks):
    """Write the strings `chunks` to `path` via a temporary file and a rename, so that no reader (and no
    resumed run after a kill) ever sees half a file. Creates the parent directory."""
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


def write_json(path, obj):
    """One JSON document (indented), written atomically."""
    _write_atomic(path, [json.dumps(obj, indent=2, ensure_ascii=False), "\n"])


def write_jsonl(path, rows):
    """One JSON object per line, written atomically; read it back with read_jsonl."""
    _write_atomic(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path, what="jsonl"):
    """Rows of a jsonl file; the error names the file and line of any bad row."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what}: file not found: {path}")
    rows = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


def _records(rows, where, q_field="question", a_field="answer", gsm8k=False, skip_bad=False):
    """Rows -> records; a row without a question or answer is an error naming it (or skipped
    and counted when skip_bad)."""
    out, dropped = [], 0
    for i, row in enumerate(rows, 1):
        try:
            q = require_field(row, q_field, f"{where} row {i}")
            a = require_field(row, a_field, f"{where} row {i}", text=False)
            a = _gsm8k_gold(a, f"{where} row {i}") if gsm8k else str(a).strip()
        except DataError:
            if not skip_bad:
                raise
            dropped += 1
            continue
        out.append(dict(id=str(row.get("id", f"{Path(str(where)).stem}-{i - 1}")), question=q.strip(), answer=a))
    if dropped:
        print(f"[data] {where}: skipped {dropped} bad row(s) of {len(rows)}")
    return out


def _hub(name, split, config=None):
    try:
        import datasets
        return list(datasets.load_dataset(name, config, split=split))
    except Exception as e:  # offline, unknown name, ...: one clear line
        raise DataError(f"could not load {name!r} split {split!r} from the Hugging Face hub ({type(e).__name__}: "
                        f"{str(e)[:200]}). Offline? Use a local file: gsm8k:PATH.jsonl or jsonl:PATH") from None


SPECS = "arith, arith:LEVEL, gsm8k, gsm8k:PATH.jsonl, jsonl:PATH, hf:NAME[:SPLIT]"


def load_data(spec, split="train", limit=None, seed=0, skip_bad=False, fields=("question", "answer")):
    """Records for a data SPEC (see module docstring). `split` applies to arith and hub sources;
    `limit` keeps the first N records (arith: generates N, default 1000 train / 200 test)."""
    kind, _, arg = str(spec).partition(":")
    if kind == "arith":
        try:
            level = int(arg) if arg else None
        except ValueError:
            raise DataError(f"data spec {spec!r}: LEVEL must be one of {sorted(LEVELS)}") from None
        recs = arith(level, split, limit or (1000 if split == "train" else 200), seed)
    elif kind == "gsm8k" and arg:
        recs = _records(read_jsonl(arg, spec), arg, gsm8k=True, skip_bad=skip_bad)
    elif kind == "gsm8k":
        recs = _records(_hub("openai/gsm8k", split, "main"), f"gsm8k[{split}]", gsm8k=True, skip_bad=skip_bad)
    elif kind == "jsonl" and arg:
        recs = _records(read_jsonl(arg, spec), arg, *fields, skip_bad=skip_bad)
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

PROMPT_STYLES = {
    # zero-shot: the task and the answer format, nothing else
    "plain": "{question}\nSolve it step by step, then give the final answer as \\boxed{{number}}.",
    # one-shot: one worked example in the program-written solution format, to show the format
    "oneshot": ("Example question: Ava has 12 shells. Ava gets 7 more shells. How many shells does Ava have now?\n"
                "Example solution:\nStep 1: 12 + 7 = 19.\nSo Ava has 19 shells. The answer is \\boxed{{19}}.\n\n"
                "Question: {question}\nSolve it step by step, then give the final answer as \\boxed{{number}}."),
}


def chat_ids(tokenizer, user_text):
    """Token ids of one user turn plus the assistant header (the tokenizer's chat template), or a
    plain 'Question/Answer' frame for tokenizers without a template (base models, test tokenizers)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = f"{user_text}\nAnswer:"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def gen_prompt(tokenizer, question, style="plain"):
    """The generation prompt for one question: token ids, asking for the answer in \\boxed{}."""
    if style not in PROMPT_STYLES:
        raise DataError(f"unknown prompt style {style!r}; styles: {sorted(PROMPT_STYLES)}")
    return chat_ids(tokenizer, PROMPT_STYLES[style].format(question=question))
