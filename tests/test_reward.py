"""reward.py: answer checking, verdicts, every reward of the paper, the balance filter."""
import json
import random
import re
import threading
import time

import pytest

from conftest import SHARED
from reward import (
    CRITIQUE_REWARDS,
    balance,
    critique_reward,
    denoise_bonus,
    extract_answer,
    extract_verdict,
    is_correct,
    normalize_answer,
    response_reward,
)

GSM8K_SOLUTIONS = SHARED / "model_solutions_dev.jsonl"

# (response, gold, expected): right and wrong pairs side by side
ANSWER_CASES = [
    # GSM8K style: numbers, money, separators, units
    ("so she makes \\boxed{18} dollars", "18", True),
    ("so she makes \\boxed{17} dollars", "18", False),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{1,001}", "1000", False),
    ("\\boxed{1000}", "$1,000.00", True),
    ("\\boxed{1000.5}", "$1,000.00", False),
    ("\\boxed{\\$18}", "18", True),
    ("\\boxed{18.00}", "18", True),
    ("\\boxed{18 \\text{ dollars}}", "18", True),
    ("\\boxed{1 000}", "1000", True),         # whitespace means nothing in LaTeX math
    ("\\boxed{1{,}234}", "1234", True),
    ("\\boxed{32,\\! 349}", "32349", True),   # MATH style: thin space, then a space
    ("\\boxed{32,\\! 348}", "32349", False),
    ("\\boxed{32349}", "32,\\! 349", True),   # the same on the gold side
    ("\\boxed{32{,}\\, 349}", "32349", True),
    ("\\boxed{32\\,349}", "32349", True),
    ("\\boxed{1,\\! 2}", "12", False),        # not three digits after the comma: a list, not 12
    ("\\boxed{-5}", "-5", True),
    ("\\boxed{5}", "-5", False),
    ("\\boxed{\u22127}", "-7", True),        # unicode minus
    ("\\boxed{.5}", "0.5", True),
    ("\\boxed{25\\%}", "25", True),          # percent signs are dropped on both sides
    ("\\boxed{30^\\circ}", "30", True),
    ("\\boxed{\uff11\uff18}", "18", True),   # full-width digits
    ("Work...\n#### 1,234", "1234", True),
    ("The answer is 42.", "42", True),
    ("The answer is 41.", "42", False),
    ("#### 42\nso the answer is 7", "42", True),  # #### is tried before "the answer is"
    ("answer: 5", "5", False),               # no recognised marker
    # MATH style: fractions, symbolic equivalence
    ("\\boxed{\\frac12}", "0.5", True),
    ("\\boxed{\\dfrac{1}{2}}", "1/2", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{1/2}", "\\frac{1}{3}", False),
    ("\\boxed{\\frac{3}{4}}", "0.75", True),
    ("\\boxed{1/3}", "0.333", False),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{(x+1)^2}", "x^2+2x+2", False),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", True),
    ("\\boxed{2\\pi}", "\\pi", False),
    ("\\boxed{x=3}", "3", True),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", True),
    ("\\boxed{(1,2)}", "(2,1)", False),
    ("\\boxed{\\left(1,2\\right)}", "(1,2)", True),
    ("\\boxed{\\frac{1}{0}}", "5", False),
    # several / nested boxes: the last complete one counts
    ("\\boxed{3} no wait \\boxed{4}", "4", True),
    ("\\boxed{3} no wait \\boxed{4}", "3", False),
    ("\\boxed{\\boxed{4}}", "4", True),
    ("\\boxed{4} then \\boxed{5", "4", True),  # unclosed last box is ignored
    # text answers
    ("\\boxed{\\text{Monday}}", "Monday", True),
    ("\\boxed{Mnoday}", "Monday", False),    # math-verify alone accepts this anagram
    ("\\boxed{yes}", "Yes", True),
    ("\\boxed{caf\u00e9}", "Caf\u00e9", True),
    ("\\boxed{five}", "5", False),
    ("\\boxed{(C)}", "C", True),
    ("\\boxed{D}", "C", False),
    # malformed / empty
    ("\\boxed{\\frac{1}{2}", "0.5", False),   # box never closes, no marker
    ("\\boxed{\\frac{1}{}}", "0.5", False),
    ("", "5", False),
    ("\\boxed{}", "5", False),
    ("\\boxed{5}", "", False),
    ("\\boxed{5}", "\\boxed{5}", True),      # a gold given as a solution is extracted too
]


@pytest.mark.parametrize("text,gold,expected", ANSWER_CASES)
def test_is_correct_table(text, gold, expected):
    assert is_correct(text, gold) is expected


def test_table_is_big_and_balanced():
    assert len(ANSWER_CASES) >= 40
    assert sum(e for _, _, e in ANSWER_CASES) >= 15 and sum(not e for _, _, e in ANSWER_CASES) >= 15


def test_extract_answer():
    assert extract_answer("a \\boxed{x^{2}+\\frac{1}{2}} b") == "x^{2}+\\frac{1}{2}"
    assert extract_answer("\\boxed{\\{1\\}}") == "\\{1\\}"             # escaped braces are literal
    assert extract_answer("\\fbox{7}") == "7"
    assert extract_answer("#### 12\n") == "12"
    assert extract_answer("So the answer is $3.5$. Done.") == "$3.5$"
    assert extract_answer("A: 26", markers=("A:",)) == "26"
    assert extract_answer("Area: 26", markers=("A:",)) is None            # marker must start a word
    assert extract_answer("#### 12", markers=()) is None                  # boxed only
    assert extract_answer(None) is None and extract_answer("") is None


def test_normalize_answer():
    assert normalize_answer("$1,000") == normalize_answer("1000.0") == normalize_answer("1{,}000") == "1000"
    assert normalize_answer("0.5") == normalize_answer("1/2") == normalize_answer("\\frac{1}{2}") == "1/2"
    assert normalize_answer("-\\dfrac{2}{4}") == normalize_answer("-0.5") == "-1/2"
    assert normalize_answer("18 dollars") == normalize_answer("\\$18.00") == normalize_answer("18") == "18"
    assert normalize_answer("32,\\! 349") == "32349"
    assert normalize_answer("\\text{Even} ") == normalize_answer("even") == "even"  # text: case-folded
    assert normalize_answer("(C)") == "C" and normalize_answer("x + 1") == "x+1"    # math: case kept
    assert normalize_answer(None) is None and normalize_answer("  ") is None and normalize_answer("$") is None


def test_normalize_answer_agrees_with_is_correct():
    # wherever both sides normalise to a number, equal strings <=> is_correct
    number = re.compile(r"-?\d+(?:/\d+)?")
    n = 0
    for text, gold, expected in ANSWER_CASES:
        a, g = normalize_answer(extract_answer(text)), normalize_answer(extract_answer(gold, ("####",)) or gold)
        if a and g and number.fullmatch(a) and number.fullmatch(g):
            n += 1
            assert (a == g) is expected, (text, gold)
    assert n >= 20


def test_strict_is_boxed_only():
    assert is_correct("The answer is 5", "5") and not is_correct("The answer is 5", "5", strict=True)
    assert is_correct("\\boxed{5}", "5", strict=True)
    assert not is_correct("\\boxed{4}. The answer is 5", "5")  # a boxed answer wins over the markers


def test_custom_markers():
    assert is_correct("blah\nA: 1,000", "A: 1000", markers=("A:",))
    assert is_correct("A: -5.5 billion", "-5.5", markers=("A:",))
    assert not is_correct("A: 26", "18", markers=("A:",))


PATHOLOGICAL = {
    "100k chars": "x" * 100_000 + "\\boxed{5}",
    "100k chars, no answer": "1+" * 50_000,
    "long marker line": "the answer is " + "1+" * 50_000 + "1",
    "10k nested braces in a box": "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "10k nested boxes": "\\boxed{" * 10_000 + "1" + "}" * 10_000,
    "10k unclosed": "{" * 10_000 + "\\boxed{" * 10_000,
    "deep but short": "\\boxed{" + "{" * 30 + "1" + "}" * 30 + "}",
    "power tower": "\\boxed{10^{10^{10}}}",
    "huge factorial": "\\boxed{(10^{100})!}",
    "escaped braces": "\\boxed{" + "\\{" * 50_000 + "}",
}


@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_pathological_inputs_return_fast(name):
    # the one place a time bound is asserted: generous, the limit inside is ~1 s
    t0 = time.perf_counter()
    result = is_correct(PATHOLOGICAL[name], "5")
    assert time.perf_counter() - t0 < 3.0
    assert result is (name == "100k chars")


def test_works_in_worker_thread():
    # math-verify's signal-based timeout raises outside the main thread; ours must not
    out = {}

    def work():
        t0 = time.perf_counter()
        out["r"] = [is_correct("\\boxed{\\frac12}", "0.5"), is_correct("\\boxed{(x+1)^2}", "x^2+2x+1"),
                    is_correct("\\boxed{10^{10^{10}}}", "5"), is_correct("\\boxed{3}", "4")]
        out["t"] = time.perf_counter() - t0

    th = threading.Thread(target=work)
    th.start()
    th.join(timeout=30)
    assert out["r"] == [True, True, False, False] and out["t"] < 3.0


def test_deadline_leaves_signal_state_alone():
    import signal
    before = signal.getsignal(signal.SIGALRM)
    assert not is_correct("\\boxed{10^{10^{10}}}", "5")  # runs into the deadline
    assert is_correct("\\boxed{\\frac12}", "0.5")
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_response_reward():
    assert response_reward("\\boxed{5}", "5") == 1.0
    assert response_reward("\\boxed{4}", "5") == 0.0
    assert response_reward("The answer is 5", "5") == 1.0  # right, not boxed: the lenient fallback
    assert response_reward("The answer is 5", "5", strict=True) == 0.0


VERDICTS = [
    ("... so the solution holds.\nConclusion: right [END]", "right"),
    ("Conclusion: wrong [END]", "wrong"),
    ("**Conclusion:** **Right**", "right"),
    ("**Conclusion**: Wrong [END]", "wrong"),
    ("Conclusion: Correct.", "right"),
    ("Conclusion: incorrect", "wrong"),            # contains "correct"
    ("CONCLUSION: INCORRECT [END] trailing", "wrong"),
    ("Conclusion:\n\n**wrong**", "wrong"),          # verdict on the next line
    ("Conclusion: wrong\nlater...\nConclusion: right", "right"),  # the last one counts
    ("Conclusion: right?", "right"),
    ("Conclusion: wrong.", "wrong"),
    ("**Conclusion:** Right [END]", "right"),
    ("Conclusion: right\nConclusion: maybe", None),
    ("Conclusion: right or wrong", None),
    ("Conclusion: right? wrong?", None),
    ("Conclusion: right/wrong", None),
    ("Conclusion: ?", None),
    ("Conclusion: not correct", None),
    ("Conclusion: the solution is right", None),
    ("The answer is right.", None),
    ("Conclusion:", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text,expected", VERDICTS)
def test_extract_verdict(text, expected):
    assert extract_verdict(text) == expected


def test_critique_reward_schemes():
    table = {  # scheme: (right->"right", right->"wrong", wrong->"wrong", wrong->"right")
        "plain": (0.7, 0.0, 0.7, 0.0),          # Eq. 2
        "precision": (0.6, 0.0, 0.8, 0.0),      # Eq. 5
        "recall": (0.8, 0.0, 0.6, 0.0),         # Eq. 6
    }
    for scheme, (rr, rw, ww, wr) in table.items():
        assert critique_reward("right", True, scheme) == pytest.approx(rr)
        assert critique_reward("wrong", True, scheme) == pytest.approx(rw)
        assert critique_reward("wrong", False, scheme) == pytest.approx(ww)
        assert critique_reward("right", False, scheme) == pytest.approx(wr)
        assert critique_reward(None, True, scheme) == 0.0
        assert critique_reward(None, False, scheme) == 0.0
    assert set(CRITIQUE_REWARDS) == {"plain", "reweight", "precision", "recall"}


def test_critique_reward_reweight():
    # Eq. 3 with p = 0.25: 0.35 / 0.25 = 1.4 and 0.35 / 0.75 = 0.4666...
    assert critique_reward("right", True, "reweight", p_correct=0.25) == pytest.approx(1.4)
    assert critique_reward("wrong", False, "reweight", p_correct=0.25) == pytest.approx(0.35 / 0.75)
    assert critique_reward("wrong", True, "reweight", p_correct=0.25) == 0.0
    # p is clipped to [0.05, 0.95]
    assert critique_reward("right", True, "reweight", p_correct=0.0) == pytest.approx(7.0)
    assert critique_reward("wrong", False, "reweight", p_correct=1.0) == pytest.approx(7.0)
    # balanced accuracy: the expected reward equals 0.7 * (P1 + P2) / 2 (Appendix C)
    p, p1, p2 = 0.2, 0.9, 0.6
    expected = (p * p1 * critique_reward("right", True, "reweight", p_correct=p)
                + (1 - p) * p2 * critique_reward("wrong", False, "reweight", p_correct=p))
    assert expected == pytest.approx(0.7 * (p1 + p2) / 2)


def test_critique_reward_errors():
    with pytest.raises(ValueError, match="p_correct"):
        critique_reward("right", True, "reweight")
    with pytest.raises(ValueError, match="p_correct"):
        critique_reward(None, True, "reweight")  # checked up front, not only when a reward is paid
    with pytest.raises(ValueError, match="plain, reweight, precision, recall"):
        critique_reward("right", True, "bogus")
    with pytest.raises(ValueError):
        critique_reward("correct", True)


def test_denoise_bonus():
    assert denoise_bonus("right", 1, 1) == pytest.approx(0.1)
    assert denoise_bonus("wrong", 1, 1) == pytest.approx(0.7)
    assert denoise_bonus("wrong", 1, 4) == pytest.approx(0.175)
    assert denoise_bonus("right", 3, 4) == pytest.approx(0.075)
    assert denoise_bonus("wrong", 0, 4) == 0.0
    assert denoise_bonus(None, 4, 4) == 0.0
    assert denoise_bonus("right", 0, 0) == 0.0
    with pytest.raises(ValueError):
        denoise_bonus("right", 5, 4)


def test_balance_fixed():
    groups = [[1, 1, 1], [0, 0], [1, 0, 0, 1, 0], [], [0.0, 1.0]]
    out = balance(groups, random.Random(0))
    assert [(q, lab) for q, _, lab in out] == [(2, True), (2, False), (4, True), (4, False)]
    assert out[2:] == [(4, 1, True), (4, 0, False)]
    assert out[0][1] in (0, 3) and out[1][1] in (1, 2, 4)


def test_balance_random_groups():
    rng = random.Random(123)
    groups = [[float(rng.random() < p) for _ in range(rng.randint(1, 8))]
              for p in (rng.choice([0.0, 0.1, 0.5, 0.9, 1.0]) for _ in range(2000))]
    out = balance(groups, random.Random(7))
    assert out == balance(groups, random.Random(7))                        # seeded: reproducible
    assert sum(lab for *_, lab in out) * 2 == len(out)                      # always 1:1
    mixed = [q for q, g in enumerate(groups) if len(set(g)) > 1]
    assert sorted({q for q, *_ in out}) == mixed                            # never from a uniform group
    for q, i, lab in out:
        assert (groups[q][i] > 0.5) is lab
    per_q = {}
    for q, _, lab in out:
        per_q.setdefault(q, []).append(lab)
    assert all(sorted(v) == [False, True] for v in per_q.values())
    # the pick is random: over many draws every right response of a group gets chosen
    picks = {balance([[1, 0, 1, 1]], random.Random(s))[0][1] for s in range(50)}
    assert picks == {0, 2, 3}


def test_gsm8k_model_solutions_agree():
    n, misses = 0, []
    for line in GSM8K_SOLUTIONS.read_text().splitlines():
        row = json.loads(line)
        for name, sol in row.items():
            if isinstance(sol, dict):  # four model solutions per question, each {"solution", "is_correct"}
                n += 1
                if is_correct(sol["solution"], row["ground_truth"], markers=("A:",)) != sol["is_correct"]:
                    misses.append((name, sol["is_correct"], sol["solution"][-80:]))
    assert n == 3200
    assert len(misses) <= 0.005 * n, misses[:10]
