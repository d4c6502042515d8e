"""stats.py: the seed-level rule the experiment report decides the paper's claims with. Hand-computed values, then
a calibration on simulated grids shaped like real runs: identical methods are decided at most ~5% of the time,
a known shift is found about as often as stats.power says."""
import math

import numpy as np
import pytest

import stats


def test_mean_ci_hand_computed():
    m, hw = stats.mean_ci([1, 2, 3])  # sd 1, t_{0.975, 2} = 4.303
    assert m == 2 and hw == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert stats.mean_ci([0.5]) == (0.5, None) and stats.mean_ci([]) == (None, None)
    m, hw = stats.mean_ci([0.5, 0.7])  # sd = 0.1414, t_{0.975, 1} = 12.706
    assert m == pytest.approx(0.6) and hw == pytest.approx(12.7062 * 0.1, rel=1e-4)


def test_paired_differences_hand_computed():
    a, b = {0: 0.5, 1: 0.7, 2: 0.6, 3: 0.9}, {0: 0.4, 1: 0.5, 2: 0.65, 5: 0.1}
    r = stats.paired(a, b)  # seeds 0..2 in both: differences 0.1, 0.2, -0.05
    assert r["seeds"] == [0, 1, 2] and r["missing"] == [3, 5] and r["undefined"] == [] and r["n"] == 3
    assert r["diffs"] == pytest.approx([0.1, 0.2, -0.05])
    mean, sd = 0.25 / 3, math.sqrt(((0.1 - 0.25 / 3) ** 2 + (0.2 - 0.25 / 3) ** 2 + (-0.05 - 0.25 / 3) ** 2) / 2)
    hw = 4.302653 * sd / math.sqrt(3)
    assert (r["diff"], r["sd"], r["lo"], r["hi"]) == pytest.approx((mean, sd, mean - hw, mean + hw))
    # the MDE at 80% power: by definition stats.power there is 0.8; bigger than the CI half-width
    assert stats.power(r["mde"], sd, 3) == pytest.approx(0.8, abs=1e-6) and r["mde"] > hw
    # one model without seeds (the cold start) pairs with every seed of the other method
    r = stats.paired({0: 0.5, 1: 0.6, 2: 0.7}, {None: 0.4})
    assert r["diffs"] == pytest.approx([0.1, 0.2, 0.3]) and r["seeds"] == [0, 1, 2]


def test_undefined_seed_is_named_and_below_three_seeds_is_no_verdict():
    # seed 0's precision is undefined (a critic that never says "right"): named, not silently dropped
    r = stats.paired({0: None, 1: 0.6, 2: 0.7, 3: 0.8}, {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5})
    assert r["undefined"] == [0] and r["seeds"] == [1, 2, 3] and r["n"] == 3
    assert r["diffs"] == pytest.approx([0.1, 0.2, 0.3])  # CI 0.2 +- 4.303 * 0.1 / sqrt 3 = [-0.048, 0.448]
    assert r["lo"] == pytest.approx(-0.0484, abs=1e-4) and stats.verdict(r, +1) == "inconclusive"
    r2 = stats.paired({0: None, 1: 0.6, 2: 0.7}, {0: 0.5, 1: 0.5, 2: 0.5})  # two usable seeds: never a verdict
    assert r2["n"] == 2 and stats.verdict(r2, +1) == "too few seeds (2 usable, 3 needed)"
    assert stats.verdict(stats.paired({}, {0: 0.5}), +1) == "not run"


def test_verdicts_follow_the_ci():
    up = stats.paired({s: 0.5 + 0.1 + 0.01 * s for s in range(4)}, {s: 0.5 for s in range(4)})
    assert up["lo"] > 0 and stats.verdict(up, +1) == "reproduced" and stats.verdict(up, -1) == "contradicted"
    assert stats.verdict(up, 0) == "DECIDED: a false positive"  # an A/A control must never look like this
    flat = stats.paired({0: 0.6, 1: 0.4, 2: 0.55}, {0: 0.5, 1: 0.5, 2: 0.5})
    assert flat["lo"] < 0 < flat["hi"] and stats.verdict(flat, +1) == "inconclusive"
    assert stats.verdict(flat, 0) == "inconclusive (as an A/A control must be)"


def test_seeds_needed_and_mde_agree():
    sd = 0.05
    n = stats.seeds_needed(0.05, sd)  # effect = 1 SD: the textbook answer for a paired t test is ~10 seeds
    assert 9 <= n <= 11 and stats.power(0.05, sd, n) >= 0.8 > stats.power(0.05, sd, n - 1)
    assert stats.mde(sd, n) <= 0.05 < stats.mde(sd, n - 1)
    assert stats.seeds_needed(1.0, sd) == stats.MIN_SEEDS  # a huge effect still needs 3 seeds for a verdict
    assert stats.seeds_needed(1e-6, sd) is None  # more than MAX_SEEDS
    assert stats.mde(sd, 1) is None and stats.seeds_needed(0.02, None) is None


def _simulate(rng, n_seeds, shift=0.0, bimodal=False, items=256):
    """One simulated comparison of two methods on n_seeds training seeds, shaped like the committed grid: a run's
    true accuracy = base + the seed's shared part (same question order for both methods) + the run's own part;
    its score = Binomial(items, p) / items (the eval items). bimodal: a critic that learns (~0.82) with
    probability 2/3 or collapses to always "wrong" (exactly 0.5 on a balanced set)."""
    def runs(extra):
        if bimodal:
            learned = rng.random(n_seeds) < 2 / 3
            p = np.where(learned, 0.82 + rng.normal(0, 0.04, n_seeds), 0.5) + extra
        else:
            p = 0.70 + shared + rng.normal(0, 0.04, n_seeds) + extra
        return rng.binomial(items, np.clip(p, 0, 1)) / items
    shared = rng.normal(0, 0.03, n_seeds)
    a, b = runs(shift), runs(0.0)
    return stats.paired(dict(enumerate(a)), dict(enumerate(b)))


@pytest.mark.parametrize("bimodal", [False, True])
def test_identical_methods_are_rarely_decided(bimodal):
    rng = np.random.default_rng(0)
    decided = total = 0
    for n in (3, 5, 8):
        for _ in range(200):
            r = _simulate(rng, n, bimodal=bimodal)
            decided += stats.verdict(r, +1) != "inconclusive"
            total += 1
    assert total == 600 and decided / total <= 0.06, f"{decided} of {total} null comparisons decided"


def test_a_known_shift_is_found_at_the_stated_power():
    rng = np.random.default_rng(1)
    n, items = 5, 256
    # the SD of one seed's difference: two independent run parts and two item draws (the shared part cancels)
    sd = math.sqrt(2 * 0.04 ** 2 + 2 * 0.7 * 0.3 / items)
    shift = stats.mde(sd, n)  # the effect the rule should find 80% of the time
    hits = sum(stats.verdict(_simulate(rng, n, shift=shift, items=items), +1) == "reproduced" for _ in range(600))
    assert abs(hits / 600 - 0.8) < 0.06, f"found {hits} of 600 at the MDE (stated power 80%)"
