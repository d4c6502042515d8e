"""Rewards for GC-RL (arXiv 2602.22765, section 3): pure functions, no model, no state.

    extract_answer / is_correct / response_reward   first-order reward, Eq. 1
    normalize_answer                                an answer as a canonical string, for voting (maj@k)
    extract_verdict / critique_reward               second-order reward, Eq. 2 (+ Eq. 3, 5, 6)
    denoise_bonus                                   self-correction bonus, Eq. 4
    balance                                         the label-balance filter (one right + one wrong per question)

Decisions (the paper is silent on these):
- No boxed answer. The paper's evaluation requires `\\boxed{}`. By default (`strict=False`) a response without
  any complete `\\boxed{...}` falls back to the markers `#### x` and then `the answer is x`, because small models
  (SmolLM2-135M) often skip the box and GSM8K's own convention is `####`; a response that *does* box is judged
  by its last box only. `strict=True` (what eval.py should use for paper-style numbers) is boxed-only.
  Data with another convention names its own markers, e.g. `markers=("A:",)` for GSM8K model solutions.
- Equality. Plain numbers (after removing `$`, `%`, thousands separators, trailing unit words) compare exactly
  as fractions, without sympy: `\\boxed{1,000}` = `$1,000.00` = `1{,}000` = `1,\\! 000` = `1000`, and
  `25\\%` = `25`. Words of two or more letters ("Monday", "\\text{even}") compare as case-insensitive strings
  (math-verify would read them as products of symbols and accept anagrams). Everything else goes to
  math-verify (gold first), so `\\frac{1}{2}` = `0.5` = `1/2` and `x^2+2x+1` = `(x+1)^2`.
- Time limit. A linear scan finds the braces, answers longer than 300 characters or nested deeper than 8
  braces are wrong, and math-verify runs under one deadline for the whole comparison (default 1 s).
  math-verify 0.9.0's own timeouts (`parse(parsing_timeout=)`, `verify(timeout_seconds=)`) use
  `signal.alarm`: whole seconds, one alarm per call and per comparison, and a ValueError outside the main
  thread. So we pass None to both and arm one `setitimer` deadline ourselves, in the main thread only.
  Elsewhere (worker threads, Windows, or when the caller already has a timer) there is no timer, and
  answers that could explode (factorials, power towers, huge exponents) are simply judged wrong.
"""
import logging
import re
import signal
import threading
from fractions import Fraction
from functools import lru_cache

from math_verify import parse, verify

DEFAULT_MARKERS = ("####", "the answer is")  # tried in this order when there is no \boxed{}
MAX_ANSWER_CHARS = 300  # longer "answers" are wrong without parsing (MATH answers are far shorter)
MAX_DEPTH = 8           # brace nesting depth; parsing time grows ~1.5x per level (depth 8: ~0.6 s)
TIME_LIMIT = 1.0        # seconds for one math-verify comparison (main thread only)

# We pass timeout=None to math-verify on purpose (our own deadline replaces it); silence its warning about it.
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(lambda rec: "Timeout is disabled" not in rec.getMessage())


# ---------------------------------------------------------------------------------------------------------
# Answer extraction

_BRACE_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}\\]|[{}]")


def _last_box(text):
    """Content of the last complete \\boxed{...} (the one that closes last), or None. One linear pass."""
    stack, last = [], None  # stack holds (is_box, content_start) per open brace
    for m in _BRACE_TOKENS.finditer(text):
        tok = m.group()
        if len(tok) == 2:  # escaped \{ \} \\ : literal characters, not grouping braces
            continue
        if tok[-1] == "{":
            stack.append((tok != "{", m.end()))
        elif stack:
            is_box, start = stack.pop()
            if is_box:
                last = (start, m.start())
    return None if last is None else text[last[0]:last[1]]


def _after_marker(text, marker):
    """The rest of the line after the last occurrence of `marker` (case-insensitive, at a word start)."""
    hits = list(re.finditer(r"(?<!\w)" + re.escape(marker), text, flags=re.IGNORECASE))
    for m in reversed(hits):
        rest = text[m.end():].split("\n", 1)[0]
        rest = re.split(r"\.(?:\s|$)", rest, maxsplit=1)[0]  # end of sentence (but keep the "." in 3.5)
        rest = rest.strip().lstrip(":").strip()
        if rest:
            return rest
    return None


def extract_answer(text, markers=DEFAULT_MARKERS):
    """The final answer of a response (input to Eq. 1): the last complete `\\boxed{...}` (nested braces fine),
    else the text after the first of `markers` found (its last occurrence, rest of that line), else None.
    `markers=()` is boxed-only. An empty box gives None."""
    if not text:
        return None
    box = _last_box(text)
    if box is not None:
        return box.strip() or None
    for marker in markers:
        ans = _after_marker(text, marker)
        if ans is not None:
            return ans
    return None


# ---------------------------------------------------------------------------------------------------------
# Answer comparison

_NUMBER = re.compile(r"([+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+)"  # 1,000.50  12  -.5
                     r"(?:\s*\\(?:text|mbox|mathrm)\{[^{}]*\}|\s+[^\W\d_][^\W\d_.\-]*\.?)*")  # units: 18 dollars
_TEXT = re.compile(r"[^\W\d_]{2,}(?:[\s'\-]+[^\W\d_]+)*")  # words of letters, first one 2+ letters
_PARENS = re.compile(r"\(([^()\[\],]*)\)")
_WRAP = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}$")
_SEPARATOR = re.compile(r"(?<=\d)(?:,|\{,\})(?:\s*\\[!,;: ])+\s*(?=\d{3}(?!\d))")  # 32,\! 349  32{,}\, 349
_FRACTION = re.compile(r"([+-]?)(?:(\d+)\s*/\s*(\d+)|\\[dt]?frac\{(\d+)\}\{(\d+)\})")  # 1/2  -\frac{1}{2}
_EXPLOSIVE = re.compile(r"(?<!\\)!(?!=)|\^\s*\{[^}]*\^|\^\s*\w+\s*\^|\^\s*\{?\s*\d{5,}")  # n!, towers, 2^{99999}


def _norm(s):
    """Light normalisation shared by both sides: money, percent, degrees, LaTeX spacing, wrappers."""
    s = s.strip().replace("\u2212", "-").replace("\u00a0", " ")
    s = _SEPARATOR.sub(",", s)  # 32,\! 349 (MATH style) is one number, not a list
    s = re.sub(r"\\[$%]|[$%]|\\[!,;: ]|\\(?:left|right)(?![a-zA-Z])|\^\s*\{?\\circ\}?", "", s)
    s = s.replace("{,}", ",").strip().rstrip(".").strip()
    s = re.sub(r"^([+-])\s+", r"\1", s)
    m = _WRAP.match(s)
    if m:
        s = m.group(1).strip()
    m = _PARENS.fullmatch(s)  # "(C)" -> "C", but not "(1,2)" or "(2)(3)"
    if m:
        s = m.group(1).strip()
    return s


def _number(s):
    m = _NUMBER.fullmatch(s)
    return Fraction(m.group(1).replace(",", "")) if m else None


def normalize_answer(ans):
    """An extracted answer -> its canonical string for majority voting (maj@k), or None for no answer.

    The normalisation `is_correct` uses: plain numbers (units, `$`, `%`, thousands separators dropped) and
    simple fractions become exact fractions, so `$1,000` = `1000.0` -> "1000", `0.5` = `1/2` = `\\frac{1}{2}`
    -> "1/2" and `18 dollars` -> "18"; text answers are case-folded (`\\text{Even}` -> "even"); anything else
    is compared without whitespace. Answers that only math-verify equates (`(x+1)^2`, `x^2+2x+1`) stay apart."""
    if ans is None:
        return None
    s = _norm(str(ans))
    if not s:
        return None
    f = _number(s)
    m = None if f is not None else _FRACTION.fullmatch(s)
    if m:
        num, den = (int(x) for x in (m.group(2, 3) if m.group(2) else m.group(4, 5)))
        f = Fraction(-num if m.group(1) == "-" else num, den) if den else None
    if f is not None:
        return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"
    s = re.sub(r"\s+", "", s)
    return s.casefold() if _TEXT.fullmatch(s) else s


def _has_timer():
    """A SIGALRM deadline is possible only in the main thread, on POSIX, when no other timer is running."""
    return (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
            and signal.getitimer(signal.ITIMER_REAL)[0] == 0)


class _Deadline(BaseException):  # BaseException: math-verify catches Exception and would swallow it
    pass


def _within(seconds, fn):
    """fn() under one wall-clock deadline; False when it runs out. Caller checked _has_timer()."""
    armed = [True]

    def handler(signum, frame):
        if armed[0]:
            raise _Deadline

    old = signal.signal(signal.SIGALRM, handler)
    try:
        try:
            # re-fires every 0.1 s in case something deep inside swallows the first one
            signal.setitimer(signal.ITIMER_REAL, seconds, 0.1)
            return fn()
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
        return False
    finally:
        signal.signal(signal.SIGALRM, old)


@lru_cache(maxsize=4096)
def _parse_gold(gold):  # the same gold is compared with n responses
    return parse(f"${gold}$", parsing_timeout=None)


@lru_cache(maxsize=1)
def _warm_up():
    """math-verify's first call builds its LaTeX parser and imports sympy parts (~0.5 s, more on a busy
    machine): pay that once, outside the per-comparison deadline, so it never turns a right answer wrong."""
    verify(parse("$x^2+2x+1$", parsing_timeout=None), parse("$(x+1)^2$", parsing_timeout=None), timeout_seconds=None)


def _math_equal(gold, pred):
    return verify(_parse_gold(gold), parse(f"${pred}$", parsing_timeout=None), timeout_seconds=None)


def _too_deep(s):
    depth = 0
    for ch in s:
        depth += (ch == "{") - (ch == "}")
        if depth > MAX_DEPTH:
            return True
    return False


def is_correct(text, gold, markers=DEFAULT_MARKERS, strict=False, time_limit=TIME_LIMIT):
    """Eq. 1's verifier: does the response's final answer equal `gold`?

    `gold` is a bare answer ("18", "\\frac{1}{2}") or a solution ending in `\\boxed{}`, `#### x` or one of
    `markers`. `strict=True` ignores the markers for the response (boxed only). Never raises; an input that
    cannot be compared in time is wrong."""
    pred = extract_answer(text, () if strict else markers)
    if pred is None or gold is None:
        return False
    gold = str(gold)
    g = extract_answer(gold, ("####",) + tuple(markers)) or gold  # a bare answer passes through unchanged
    g, p = _norm(g), _norm(pred)
    if not g or not p:
        return False
    if re.sub(r"\s+", "", g) == re.sub(r"\s+", "", p):
        return True
    gn, pn = _number(g), _number(p)
    if gn is not None and pn is not None:  # fast path: both plain numbers, no sympy
        return gn == pn
    if _TEXT.fullmatch(g) or _TEXT.fullmatch(p):  # text answers: math-verify would accept anagrams
        return g.casefold() == p.casefold()
    if len(p) > MAX_ANSWER_CHARS or _too_deep(p) or _too_deep(g):
        return False
    try:
        _warm_up()
        if _has_timer():
            return bool(_within(time_limit, lambda: _math_equal(g, p)))
        if _EXPLOSIVE.search(p):  # no way to interrupt sympy here: refuse what could run for hours
            return False
        return bool(_math_equal(g, p))
    except Exception:  # noqa: BLE001 - a reward must never crash training
        return False


def response_reward(text, gold, format_weight=0.0, strict=False, markers=DEFAULT_MARKERS):
    """Eq. 1: R(r) = 1 if the final answer is correct else 0, plus `format_weight` when the response has a
    complete `\\boxed{}` answer (off by default; with it on, a right answer scores 1 + format_weight)."""
    r = 1.0 if is_correct(text, gold, markers=markers, strict=strict) else 0.0
    if format_weight and extract_answer(text, ()) is not None:
        r += format_weight
    return r


# ---------------------------------------------------------------------------------------------------------
# Critique rewards

_CONCLUSION = re.compile(r"conclusion\s*[*_]*\s*:", re.IGNORECASE)
_VERDICTS = {"right": "right", "correct": "right", "wrong": "wrong", "incorrect": "wrong"}


def extract_verdict(text):
    """Ext(c) of Eq. 2: the verdict on the last `Conclusion:` line -> "right" | "wrong" | None.

    The word after the colon must be exactly right/correct (-> "right") or wrong/incorrect (-> "wrong"),
    ignoring case, markdown (`**Conclusion:** **Right**`), punctuation and a trailing `[END]`; when the
    line is empty after the colon, the next non-empty line is read. Whole-word matching, so "incorrect"
    is never read as "correct", and "not correct" or a sentence is no verdict."""
    if not text:
        return None
    hits = list(_CONCLUSION.finditer(text))
    if not hits:
        return None
    lines = text[hits[-1].end():].split("\n")
    rest = next((ln for ln in lines[1:] if ln.strip()), "") if not lines[0].strip() else lines[0]
    rest = re.split(r"\[\s*END\s*\]", rest, flags=re.IGNORECASE)[0]
    word = re.sub(r"[\s*_`#'\".!?,;:]+", "", rest).casefold()
    word = re.sub(r"^\\(?:text|textbf|boxed)\{(.*)\}$", r"\1", word)
    return _VERDICTS.get(word)


# (reward for a right response judged "right", reward for a wrong response judged "wrong"); any other
# verdict scores 0. For "reweight" the two entries are divided by p and (1 - p), p = running accuracy.
CRITIQUE_REWARDS = {
    "plain":     (0.7, 0.7),    # Eq. 2
    "reweight":  (0.35, 0.35),  # Eq. 3: 0.35 / E[R(r)]  and  0.35 / (1 - E[R(r)])
    "precision": (0.6, 0.8),    # Eq. 5: favour "wrong" -> higher precision of "right"
    "recall":    (0.8, 0.6),    # Eq. 6: favour "right" -> higher recall of "right"
}


def critique_reward(verdict, label, scheme="plain", p_correct=None, format_penalty=0.0):
    """R(c) for one critique: Eq. 2 (`plain`), Eq. 3 (`reweight`, needs `p_correct` = E[R(r)], clipped to
    [0.05, 0.95]), Eq. 5 (`precision`) or Eq. 6 (`recall`). `label` True means the response is right.
    No verdict scores 0, or -format_penalty."""
    if scheme not in CRITIQUE_REWARDS:
        raise ValueError(f"unknown critique reward scheme {scheme!r}; valid: {', '.join(CRITIQUE_REWARDS)}")
    if verdict not in ("right", "wrong", None):
        raise ValueError(f"verdict must be 'right', 'wrong' or None, got {verdict!r}")
    if scheme == "reweight" and p_correct is None:
        raise ValueError("scheme 'reweight' (Eq. 3) needs p_correct, the running first-order accuracy E[R(r)]")
    if verdict is None:
        return -float(format_penalty)
    if (verdict == "right") != bool(label):
        return 0.0
    on_right, on_wrong = CRITIQUE_REWARDS[scheme]
    r = on_right if label else on_wrong
    if scheme == "reweight":
        p = min(max(float(p_correct), 0.05), 0.95)  # clip: an all-wrong batch must not give 0.35/0
        r /= p if label else 1.0 - p
    return r


def denoise_bonus(verdict, k, n):
    """Eq. 4: R_q(c) = 0.1·k/n for a "right" verdict, 0.7·k/n for "wrong" (k of n refinements correct),
    0 for no verdict or n = 0. Added to R(c) whether or not the verdict itself matched the label."""
    if not n or verdict is None:
        return 0.0
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    return {"right": 0.1, "wrong": 0.7}[verdict] * k / n


# ---------------------------------------------------------------------------------------------------------
# The data filter

def balance(groups, rng):
    """The paper's label-balance filter (section 3, section 5.1): for each question's reward list, skip it when
    all responses are right or all wrong; otherwise keep one random right (reward > 0.5) and one random
    wrong response. Returns [(question_index, response_index, label)], right then wrong per question."""
    out = []
    for qi, rewards in enumerate(groups):
        right = [i for i, r in enumerate(rewards) if r > 0.5]
        wrong = [i for i, r in enumerate(rewards) if r <= 0.5]
        if right and wrong:
            out += [(qi, rng.choice(right), True), (qi, rng.choice(wrong), False)]
    return out
