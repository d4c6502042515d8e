"""Task sources -> records {id, question, answer}, and the generation prompt. A data SPEC names a source:
    arith            built-in arithmetic word problems, levels 1-3 mixed
    arith:LEVEL      one level (1 = one step, 2 = two steps, 3 = three steps with * and /)
    gsm8k            GSM8K from the Hugging Face hub (needs network or a warm HF cache)
    gsm8k:PATH       a local GSM8K jsonl (`answer` ends with a `#### x` line)
    jsonl:PATH       any jsonl with `question` / `answer` fields (see `fields=` to rename)
    hf:NAME[:SPLIT]  any HF dataset with `question` / `answer` columns

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


def _hub(name, split, config=None):
    try:
        import datasets
        return list(datasets.load_dataset(name, config, split=split))
    except Exception as e:  # offline, unknown name, ...: one clear line
        raise DataError(f"could not load {name!r} split {split!r} from the Hugging Face hub ({type(e).__name__}: "
                        f"{str(e)[:200]}). Offline? Use a local file: gsm8k:PATH.jsonl or jsonl:PATH") from None


SPECS = "arith, arith:LEVEL, gsm8k, gsm8k:PATH.jsonl, jsonl:PATH, hf:NAME[:SPLIT]"


def load_data(spec, split="train", limit=None, seed=0, skip_bad=False, fields=("question", "answer")):
    """Records for a data SPEC (module docstring). `split` applies to arith and hub sources; `limit` keeps the
    first N records (arith generates N, default 1000 train / 200 test)."""
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
}


def chat_ids(tokenizer, user_text):
    """Token ids of one user turn plus the assistant header (chat template), or `{text}\\nAnswer:` for
    tokenizers without a template (base models, test tokenizers)."""
    text = (tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                          add_generation_prompt=True)
            if getattr(tokenizer, "chat_template", None) else f"{user_text}\nAnswer:")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def gen_prompt(tokenizer, question, style="plain"):
    """The generation prompt for one question: token ids, asking for the answer in \\boxed{}."""
    if style not in PROMPT_STYLES:
        raise DataError(f"unknown prompt style {style!r}; styles: {sorted(PROMPT_STYLES)}")
    return chat_ids(tokenizer, PROMPT_STYLES[style].format(question=question))
