"""A/B verdicts for ci/bench-latency: whether vmm and QEMU differ on a figure, from the figure of
each round (the rounds run interleaved: every round boots both VMMs), by a two-sided permutation
test on the difference of the means, as Firecracker's tools/ab_test.py does. A difference is
called only when it is at least MIN_CHANGE of B's mean and its p-value below ALPHA; otherwise it
is "no difference at this noise". Standard library only, so ci/unit can test it without the
benchmark's venv.

With n rounds a side, the smallest two-sided p-value a permutation test can give is
2 / C(2n, n): 0.1 with 3 rounds, 0.029 with 4, 0.0079 with 5. So a verdict needs 5 rounds or more.
"""

import itertools
import math
import random
import statistics

ALPHA = 0.01
MIN_CHANGE = 0.05
# Above this many ways to split the rounds, the p-value is estimated from random splits.
EXACT_LIMIT = 20_000
RESAMPLES = 20_000


def permutation_pvalue(a, b, resamples=RESAMPLES, seed=0):
    """Two-sided p-value of the difference of the means of samples a and b: the share of the
    ways to relabel the pooled values (every one when there are at most EXACT_LIMIT, else
    `resamples` random ones, counting the observed labelling) whose difference is at least as
    far from 0 as the observed one."""
    a, b = list(a), list(b)
    if not a or not b:
        raise ValueError("both samples need at least one value")
    pooled = a + b
    n, total = len(a), sum(pooled)
    observed = abs(statistics.fmean(a) - statistics.fmean(b))
    # A tolerance for float sums that equal the observed one in exact arithmetic.
    tol = 1e-9 * max(1.0, observed)

    def diff(sum_a):
        return abs(sum_a / n - (total - sum_a) / (len(pooled) - n))

    if math.comb(len(pooled), n) <= EXACT_LIMIT:
        hits = count = 0
        for chosen in itertools.combinations(range(len(pooled)), n):
            count += 1
            hits += diff(sum(pooled[i] for i in chosen)) >= observed - tol
        return hits / count
    rng = random.Random(seed)
    hits = 1  # the observed labelling
    for _ in range(resamples):
        hits += diff(sum(rng.sample(pooled, n))) >= observed - tol
    return hits / (resamples + 1)


def verdict(a, b, higher_is_better, alpha=ALPHA, min_change=MIN_CHANGE):
    """A's figures over B's: {"verdict": "faster" | "slower" | "no difference at this noise",
    "p": p-value, "change": (mean A - mean B) / mean B, "rounds": (len a, len b)}."""
    mean_b = statistics.fmean(b)
    change = (statistics.fmean(a) - mean_b) / mean_b if mean_b else math.inf
    p = permutation_pvalue(a, b)
    called = "no difference at this noise"
    if p < alpha and abs(change) >= min_change:
        better = change > 0 if higher_is_better else change < 0
        called = "faster" if better else "slower"
    return {"verdict": called, "p": p, "change": change, "rounds": (len(a), len(b))}
