"""Tests of abtest.py on data whose answers are known (python3 -m unittest, run by ci/unit)."""

import math
import unittest

from abtest import permutation_pvalue, verdict


class PermutationTest(unittest.TestCase):
    def test_exact_p_values_by_counting_splits(self):
        # {1,2}|{3,4}: of the 6 splits, only it and its mirror are as far apart.
        self.assertAlmostEqual(permutation_pvalue([1, 2], [3, 4]), 2 / 6)
        # Five rounds a side, fully separated: the smallest p-value, 2 / C(10, 5).
        self.assertAlmostEqual(
            permutation_pvalue([10, 11, 12, 13, 14], [20, 21, 22, 23, 24]), 2 / math.comb(10, 5))
        # Identical samples: every split is at least as far apart.
        self.assertEqual(permutation_pvalue([5, 5, 5], [5, 5, 5]), 1.0)
        # Symmetric in its arguments.
        self.assertAlmostEqual(permutation_pvalue([1, 4, 2], [3, 8, 6]),
                               permutation_pvalue([3, 8, 6], [1, 4, 2]))

    def test_random_splits_when_there_are_too_many(self):
        a, b = list(range(100, 112)), list(range(106, 118))
        # C(24, 12) splits is too many to count: estimated, with a fixed seed, near the truth.
        p = permutation_pvalue(a, b)
        self.assertTrue(0.0 < p < 0.05, p)
        self.assertEqual(p, permutation_pvalue(a, b))
        self.assertGreater(permutation_pvalue(a, a), 0.99)

    def test_verdicts_need_both_size_and_significance(self):
        fast = [110, 111, 112, 113, 114]
        base = [100, 100.5, 101, 101.5, 102]
        v = verdict(fast, base, higher_is_better=True)
        self.assertEqual(v["verdict"], "faster")
        self.assertAlmostEqual(v["change"], (112 - 101) / 101)
        self.assertLess(v["p"], 0.01)
        # The same for a latency, where lower is better.
        self.assertEqual(verdict(fast, base, higher_is_better=False)["verdict"], "slower")
        # Significant but below 5 %: no call.
        small = [102.6, 102.8, 103, 103.2, 103.4]
        v = verdict(small, base, higher_is_better=True)
        self.assertLess(v["p"], 0.01)
        self.assertEqual(v["verdict"], "no difference at this noise")
        # Large but with three rounds the p-value cannot go below 0.1.
        v = verdict([200, 201, 202], [100, 101, 102], higher_is_better=True)
        self.assertAlmostEqual(v["p"], 0.1)
        self.assertEqual(v["verdict"], "no difference at this noise")
        with self.assertRaises(ValueError):
            permutation_pvalue([], [1])


if __name__ == "__main__":
    unittest.main()
