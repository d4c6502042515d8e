"""Rewards for GC-RL (arXiv 2602.22765 §3): pure functions, no model, no state.

    extract_answer / is_correct / response_reward   first-order reward, Eq. 1
    normalize_answer                                an answer's canonical string, for voting (maj@k)
    extract_verdict / critique_reward               second-order reward, Eq. 2 (+ Eq. 3, 5, 6)
    denoise_bonus                                   self-correction bonus, Eq. 4
    critique_rewards                                a step's critique rewards: Eq. 2 / 3 / 5 / 6 (+ Eq. 4)
    balance                                         the label-balance filter (one right + one wrong per question)

Decisions (the paper is silent on these):
- No box. The paper requires `\\boxed{}`; by default (`strict=False`) a response without a complete box falls
  back to `#### x`, then `the answer is x` (small models skip the box; `####` is GSM8K's); one that boxes is
  judged by its last box only. `strict=True` (paper-style eval) is boxed-only. Data with another convention
  names its own markers, e.g. `markers=("A:",)` for GSM8K model solutions.
- Equality. Plain numbers (no `$`, `%`, thousands separators, unit words) compare as exact fractions, no sympy
  (`\\boxed{1,000}` = `$1,000.00` = `1{,}000` = `1,\\! 000` = `1000`); words of 2+ letters as case-insensitive
  strings (math-verify accepts anagrams); the rest by math-verify: `\\frac{1}{2}` = `0.5`, `(x+1)^2` = `x^2+2x+1`.
- Time. Answers over 300 characters or 8 braces deep are wrong; math-verify runs under one `setitimer` deadline
  per comparison (1 s), main thread only: its own timeouts (0.9.0) use `signal.alarm` per call, whole seconds,
  ValueError off the main thread, so we pass None. Without a timer (threads, Windows, a caller's timer), answers
  that could explode (factorials, power towers, huge exponents) are judged wrong.
"""
import logging
import re
import signal
import threading
from collections import Counter
from fractions import Fraction
from functools import lru_cache
from itertools import accumulate

from math_verify import parse, verify

DEFAULT_MARKERS = ("####", "the answer is")  # tried in this order when there is no \boxed{}
MAX_ANSWER_CHARS = 300  # longer "answers" are wrong without parsing (MATH answers are far shorter)
MAX_DEPTH = 8           # brace nesting depth; parsing time grows ~1.5x per level (depth 8: ~0.6 s)
TIME_LIMIT = 1.0        # seconds for one math-verify comparison (main thread only)

# our own deadline replaces math-verify's timeouts: silence its warning that they are off
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(lambda rec: "Timeout is disabled" not in rec.getMessage())


# ----------------------------------------------------------------------------- answer extraction

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
    for m in reversed(list(re.finditer(r"(?<!\w)" + re.escape(marker), text, flags=re.IGNORECASE))):
        rest = text[m.end():].split("\n", 1)[0]
        rest = re.split(r"\.(?:\s|$)", rest, maxsplit=1)[0]  # end of sentence (but keep the "." in 3.5)
        rest = rest.strip().lstrip(":").strip()
        if rest:
            return rest
    return None


def extract_answer(text, markers=DEFAULT_MARKERS):
    """A response's final answer (Eq. 1): the last complete `\\boxed{...}` (None if empty), else the rest of the
    line after the last occurrence of the first of `markers` found, else None. `markers=()`: boxed only."""
    if not text:
        return None
    box = _last_box(text)
    if box is not None:
        return box.strip() or None
    return next((a for a in (_after_marker(text, mk) for mk in markers) if a is not None), None)


# ----------------------------------------------------------------------------- answer comparison

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
    s = m.group(1).strip() if (m := _WRAP.match(s)) else s
    return m.group(1).strip() if (m := _PARENS.fullmatch(s)) else s  # "(C)" -> "C", not "(1,2)" or "(2)(3)"


def _number(s):
    m = _NUMBER.fullmatch(s)
    return Fraction(m.group(1).replace(",", "")) if m else None


def normalize_answer(ans):
    """An extracted answer -> its canonical string for voting (maj@k), or None: is_correct's normalisation.
    Numbers and simple fractions become exact (`$1,000` -> "1000", `0.5` = `\\frac{1}{2}` -> "1/2", `18 dollars`
    -> "18"), text is case-folded, the rest loses its whitespace; only math-verify equates `(x+1)^2`, `x^2+2x+1`."""
    s = None if ans is None else _norm(str(ans))
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
            signal.setitimer(signal.ITIMER_REAL, seconds, 0.1)  # re-fires every 0.1 s, should one be swallowed
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
def _warm_up():  # math-verify's first call builds its parser (~0.5 s): pay it outside the deadline, once
    verify(parse("$x^2+2x+1$", parsing_timeout=None), parse("$(x+1)^2$", parsing_timeout=None), timeout_seconds=None)


def _math_equal(gold, pred):
    return verify(_parse_gold(gold), parse(f"${pred}$", parsing_timeout=None), timeout_seconds=None)


def _too_deep(s):
    return max(accumulate(((ch == "{") - (ch == "}") for ch in s), initial=0)) > MAX_DEPTH


def is_correct(text, gold, markers=DEFAULT_MARKERS, strict=False, time_limit=TIME_LIMIT):
    """Eq. 1's verifier: does the response's final answer equal `gold`, a bare answer ("18", "\\frac{1}{2}") or a
    solution ending in `\\boxed{}`, `#### x` or one of `markers`? `strict`: the response must box its answer.
    Never raises; what cannot be compared in time is wrong."""
    pred = extract_answer(text, () if strict else markers)
    if pred is None or gold is None:
        return False
    gold = str(gold)
    g, p = _norm(extract_answer(gold, ("####",) + tuple(markers)) or gold), _norm(pred)  # a bare gold as it is
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


def response_reward(text, gold, strict=False, markers=DEFAULT_MARKERS):
    """Eq. 1: R(r) = 1 if the final answer is correct, else 0 (no format bonus: the paper gives none)."""
    return 1.0 if is_correct(text, gold, markers=markers, strict=strict) else 0.0


# ----------------------------------------------------------------------------- critique rewards

_CONCLUSION = re.compile(r"conclusion\s*[*_]*\s*:", re.IGNORECASE)
_VERDICTS = {"right": "right", "correct": "right", "wrong": "wrong", "incorrect": "wrong"}


def extract_verdict(text):
    """Ext(c) of Eq. 2: the verdict of the last `Conclusion:` -> "right" | "wrong" | None. The one word after it
    (or on the next non-empty line) must be right/correct or wrong/incorrect, ignoring case, markdown, punctuation
    (`Conclusion: right?`) and `[END]`: "incorrect" is never "correct", and "not correct" is no verdict."""
    hits = list(_CONCLUSION.finditer(text or ""))
    if not hits:
        return None
    lines = text[hits[-1].end():].split("\n")
    rest = next((ln for ln in lines[1:] if ln.strip()), "") if not lines[0].strip() else lines[0]
    rest = re.split(r"\[\s*END\s*\]", rest, flags=re.IGNORECASE)[0]
    word = re.sub(r"[\s*_`#'\".!?,;:]+", "", rest).casefold()
    word = re.sub(r"^\\(?:text|textbf|boxed)\{(.*)\}$", r"\1", word)
    return _VERDICTS.get(word)


def classification_metrics(verdicts, labels):
    """Critic metrics of verdicts ("right" | "wrong" | None) against labels (True: the response is right), "right"
    the positive class (§5.4), for training's per-step metrics and eval alike. No verdict is a wrong call: it
    lowers accuracy and recall but is no false positive. Counts (tp, fp, tn, fn, wrong, formatted) and rates; a
    0/0 rate is None (null in JSON; sklearn would say 0), and a 0/0 precision / recall / F1 is named in `undefined`."""
    if len(verdicts) != len(labels):
        raise ValueError(f"{len(verdicts)} verdicts but {len(labels)} labels")
    if any(v not in ("right", "wrong", None) for v in verdicts):
        raise ValueError(f"verdicts must be 'right', 'wrong' or None, got {set(verdicts) - {'right', 'wrong', None}}")
    n, said = len(labels), Counter((v, bool(y)) for v, y in zip(verdicts, labels))
    tp, fp, tn, pos = said["right", True], said["right", False], said["wrong", False], sum(map(bool, labels))
    wrong, formatted = said["wrong", True] + tn, n - said[None, True] - said[None, False]
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / pos if pos else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else None  # tp = 0 zeroes both
    undefined = {k: why for k, v, why in (("precision", precision, "no 'right' verdicts (0/0)"),
                                          ("recall", recall, "no right responses in the set (0/0)"),
                                          ("f1", f1, "precision or recall undefined" if None in (precision, recall)
                                           else "precision + recall = 0 (0/0)")) if v is None}
    rate = (lambda k: k / n) if n else (lambda k: None)
    return dict(n=n, tp=tp, fp=fp, tn=tn, fn=pos - tp, wrong=wrong, formatted=formatted, accuracy=rate(tp + tn),
                precision=precision, recall=recall, f1=f1, format_rate=rate(formatted), wrong_rate=rate(wrong),
                undefined=undefined)


# (reward for a right response judged "right", reward for a wrong response judged "wrong"); any other
# verdict scores 0. For "reweight" the two entries are divided by p and (1 - p), p = running accuracy.
CRITIQUE_REWARDS = {
    "plain":     (0.7, 0.7),    # Eq. 2
    "reweight":  (0.35, 0.35),  # Eq. 3: 0.35 / E[R(r)]  and  0.35 / (1 - E[R(r)])
    "precision": (0.6, 0.8),    # Eq. 5: favour "wrong" -> higher precision of "right"
    "recall":    (0.8, 0.6)}    # Eq. 6: favour "right" -> higher recall of "right"


def critique_reward(verdict, label, scheme="plain", p_correct=None):
    """R(c) for one critique: Eq. 2 (`plain`), Eq. 3 (`reweight`, needs `p_correct` = E[R(r)], clipped to
    [0.05, 0.95]), Eq. 5 (`precision`) or Eq. 6 (`recall`). `label` True means the response is right.
    No verdict scores 0, as a wrong one does."""
    if scheme not in CRITIQUE_REWARDS:
        raise ValueError(f"unknown critique reward scheme {scheme!r}; valid: {', '.join(CRITIQUE_REWARDS)}")
    if verdict not in ("right", "wrong", None):
        raise ValueError(f"verdict must be 'right', 'wrong' or None, got {verdict!r}")
    if scheme == "reweight" and p_correct is None:
        raise ValueError("scheme 'reweight' (Eq. 3) needs p_correct, the running first-order accuracy E[R(r)]")
    if verdict is None or (verdict == "right") != bool(label):
        return 0.0
    r = CRITIQUE_REWARDS[scheme][0 if label else 1]
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


def critique_rewards(verdicts, labels, scheme="plain", p_correct=None, k_ref=0, refinements=None, golds=None):
    """Step 5 for a step's critiques: R(c) = critique_reward(verdict, label, scheme, p_correct) (Eq. 2, 3, 5, 6),
    and with `refinements` (Eq. 4: per critique the texts of its k_ref self-corrections, [] without a verdict;
    `golds`: each judged question's answer) plus denoise_bonus(verdict, k, k_ref) for k of them correct.
    Returns (rewards, bonuses, ks): ks[i] is k, or None where nothing was refined."""
    rewards, bonuses, ks = [], [], []
    for i, (verdict, label) in enumerate(zip(verdicts, labels)):
        k = None
        if refinements is not None and verdict is not None:
            k = sum(is_correct(text, golds[i]) for text in refinements[i])
        bonus = denoise_bonus(verdict, k or 0, k_ref) if refinements is not None else 0.0
        rewards.append(critique_reward(verdict, label, scheme, p_correct) + bonus)
        bonuses.append(bonus)
        ks.append(k)
    return rewards, bonuses, ks


# ----------------------------------------------------------------------------- the data filter

def balance(groups, rng):
    """The label-balance filter (§3, §5.1): per question's reward list, none if all right or all wrong, else one
    random right (reward > 0.5), then one random wrong. Returns [(question_index, response_index, label)]."""
    out = []
    for qi, rewards in enumerate(groups):
        right = [i for i, r in enumerate(rewards) if r > 0.5]
        wrong = [i for i, r in enumerate(rewards) if r <= 0.5]
        if right and wrong:
            out += [(qi, rng.choice(right), True), (qi, rng.choice(wrong), False)]
    return out


# ----------------------------------------------------------------------------- a step's metrics

def completion_metrics(metrics, kind, completions):
    """A phase's per-step metrics: reward, length, truncation; responses: accuracy; critiques: the critic's
    accuracy, precision / recall ("right" positive, §5.4), "wrong" rate, format rate (as eval.py's)."""
    metrics.mean_of(f"reward/{kind}", [c.reward for c in completions])
    if kind == "response":
        metrics.mean_of("acc/response", [c.reward > 0.5 for c in completions])
    else:
        k = classification_metrics([c.verdict for c in completions], [c.label for c in completions])  # counts
        metrics.add("acc/critique", k["tp"] + k["tn"], k["n"])
        metrics.add("critic/precision", k["tp"], k["tp"] + k["fp"])
        metrics.add("critic/recall", k["tp"], k["tp"] + k["fn"])
        metrics.add("critic/wrong_rate", k["wrong"], k["n"])
        metrics.add("critic/format_rate", k["formatted"], k["n"])
    metrics.mean_of(f"len/{kind}", [c.length for c in completions])
    metrics.mean_of(f"trunc/{kind}", [c.truncated for c in completions])
