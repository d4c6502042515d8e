"""Seed-level statistics for the experiment report (arXiv 2602.22765's claims, decided on training seeds).

The unit of replication is the training seed: one RL run gives one number per metric (its mean over the eval
items, or its precision / recall / denoised reward). Two methods trained with the same seed see the same questions
in the same order, so a comparison is the per-seed paired difference d_s = score_a(s) - score_b(s), and its 95% CI
is Student's t on those differences (scipy.stats.t). Why t and not a bootstrap: a grid has 3-10 seeds, and a
percentile bootstrap of 3 values has 10 distinct resample means and covers far less than 95%; the t interval is
exact for normal differences and, on the simulated grids of tests/test_stats.py (seed noise, item noise, a critic
that either learns or collapses), decides at most ~5% of identical-method comparisons.

Not done, deliberately: no correction for the many claims of one report (each row is its own question; the A/A
row shows what noise alone does); no pooling of eval items into the error (items are the same for every run, so
their noise is part of each run's score and already in the seed-to-seed spread).
"""
import math

from scipy import optimize
from scipy import stats as st

ALPHA, POWER = 0.05, 0.8  # two-sided 95% CIs; minimum detectable effects at 80% power
MIN_SEEDS = 3  # below this a claim is "too few seeds", never a verdict
MAX_SEEDS = 10_000  # seeds_needed gives up beyond this


def mean_ci(xs):
    """(mean, 95% CI half-width) of xs with Student t (n - 1 df); half-width None for n < 2, (None, None) for n = 0."""
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        return None, None
    m = sum(xs) / n
    if n == 1:
        return m, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, st.t.ppf(1 - ALPHA / 2, n - 1) * sd / math.sqrt(n)


def power(effect, sd, n):
    """Power of the two-sided paired t test (level ALPHA) on n seeds whose differences have SD `sd`, when the true
    mean difference is `effect` (noncentral t; exact for normal differences)."""
    if n < 2:
        return float("nan")
    if sd <= 0:
        return 1.0 if effect else ALPHA
    df, nc = n - 1, abs(effect) * math.sqrt(n) / sd
    tc = st.t.ppf(1 - ALPHA / 2, df)
    lower = st.nct.cdf(-tc, df, nc)  # the wrong-direction tail: tiny, and scipy gives nan far out in it
    return float(st.nct.sf(tc, df, nc) + (lower if math.isfinite(lower) else 0.0))


def mde(sd, n):
    """Minimum detectable effect: the smallest |mean difference| the paired t test finds with POWER on n seeds
    of difference-SD `sd`. None when n < 2 or sd is 0 (every seed gave the same difference: no spread to plan with)."""
    if n < 2 or sd is None or not math.isfinite(sd) or sd <= 0:
        return None
    hi = sd
    while power(hi, sd, n) < POWER:
        hi *= 2
    return float(optimize.brentq(lambda e: power(e, sd, n) - POWER, 0.0, hi, xtol=1e-9 * sd))


def seeds_needed(effect, sd):
    """The fewest seeds (>= MIN_SEEDS) at which the paired t test detects `effect` with POWER, given the measured
    difference SD; None beyond MAX_SEEDS or without an SD."""
    if sd is None or not math.isfinite(sd) or sd <= 0 or not effect:
        return None
    lo = MIN_SEEDS
    if power(effect, sd, lo) >= POWER:
        return lo
    hi = lo
    while power(effect, sd, hi) < POWER:
        if hi >= MAX_SEEDS:
            return None
        lo, hi = hi, min(2 * hi, MAX_SEEDS)
    while hi - lo > 1:  # power grows with n: bisect for the first n that reaches it
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if power(effect, sd, mid) < POWER else (lo, mid)
    return hi


def paired(a, b):
    """The seed-level comparison of two methods. a, b: {seed: score or None (undefined there)}; a method with one
    model and no seeds (the cold start) is given as {None: score} and pairs with every seed of the other.
    Returns {seeds (used), undefined (seeds where either score is undefined), missing (seeds run for one method
    only), n, diffs, diff (mean), sd, lo, hi (95% paired-t CI), mde}; lo / hi / sd / mde are None below 2 seeds."""
    if set(a) == {None}:
        a = {s: a[None] for s in b}
    if set(b) == {None}:
        b = {s: b[None] for s in a}
    common = sorted(set(a) & set(b), key=lambda s: (s is None, s))
    undefined = [s for s in common if a[s] is None or b[s] is None]
    seeds = [s for s in common if s not in undefined]
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    n = len(diffs)
    res = dict(seeds=seeds, undefined=undefined, missing=sorted(set(a) ^ set(b), key=str), n=n, diffs=diffs,
               diff=sum(diffs) / n if n else None, sd=None, lo=None, hi=None, mde=None)
    if n >= 2:
        m, hw = mean_ci(diffs)
        sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1))
        res.update(sd=sd, lo=m - hw, hi=m + hw, mde=mde(sd, n))
    return res


def verdict(res, sign):
    """The paper's claim "a - b has sign `sign`" (+1 / -1) against the paired-t CI; sign 0 is an A/A control, whose
    right answer is "inconclusive". Below MIN_SEEDS usable seeds: "too few seeds", never a verdict."""
    if res is None or res["n"] == 0:
        return "not run"
    if res["n"] < MIN_SEEDS:
        return f"too few seeds ({res['n']} usable, {MIN_SEEDS} needed)"
    lo, hi = res["lo"], res["hi"]
    if sign == 0:
        return "inconclusive (as an A/A control must be)" if lo <= 0 <= hi else "DECIDED: a false positive"
    lo, hi = sorted((sign * lo, sign * hi))
    if lo > 0:
        return "reproduced"
    if hi < 0:
        return "contradicted"
    return "inconclusive"
