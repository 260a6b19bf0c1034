"""Agreement statistics against values worked out by hand or published with the method."""

import math

import pytest

from labeling_app.agreement import cohen_kappa, krippendorff_alpha, median, wilson_interval


def test_cohen_kappa_textbook_example():
    """50 items, two raters: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no.
    p_o = 35/50 = 0.7; rater 1 says yes 25/50, rater 2 says yes 30/50, so
    p_e = 0.5·0.6 + 0.5·0.4 = 0.5 and κ = (0.7 - 0.5) / (1 - 0.5) = 0.4."""
    pairs = [("y", "y")] * 20 + [("y", "n")] * 5 + [("n", "y")] * 10 + [("n", "n")] * 15
    assert cohen_kappa(pairs) == pytest.approx(0.4)


def test_cohen_kappa_edges():
    assert cohen_kappa([("a", "a"), ("b", "b"), ("tie", "tie")]) == pytest.approx(1.0)
    # Always opposite on a 50/50 split: p_o = 0, p_e = 0.5, κ = -1.
    assert cohen_kappa([("a", "b"), ("b", "a")]) == pytest.approx(-1.0)
    assert cohen_kappa([("a", "a"), ("a", "a")]) is None  # p_e = 1: 0/0
    assert cohen_kappa([]) is None


def test_krippendorff_alpha_published_example():
    """Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the 4 observers x
    12 units nominal example with missing values: α = 0.743."""
    rows = ["1 2 3 3 2 1 4 1 2 . . .",
            "1 2 3 3 2 2 4 1 2 5 . 3",
            ". 3 3 3 2 3 4 2 2 5 1 .",
            "1 2 3 3 2 4 4 1 2 5 1 ."]
    units = [[v for v in column if v != "."] for column in zip(*(r.split() for r in rows))]
    assert krippendorff_alpha(units) == pytest.approx(0.743, abs=5e-4)


def test_krippendorff_alpha_by_hand():
    """Two items, two raters: (a, a) and (a, b). Coincidences: o[a][a] = 2, o[a][b] = o[b][a] = 1;
    n_a = 3, n_b = 1, n = 4. α = 1 - (n-1)·Σ_{c≠k} o / Σ_{c≠k} n_c·n_k = 1 - 3·2 / (2·3·1) = 0."""
    assert krippendorff_alpha([["a", "a"], ["a", "b"]]) == pytest.approx(0.0)
    assert krippendorff_alpha([["a", "a"], ["b", "b"], ["a"]]) == pytest.approx(1.0)  # lone votes left out
    assert krippendorff_alpha([["a"], ["b"]]) is None
    assert krippendorff_alpha([["a", "a"], ["a", "a"]]) is None  # one value only: no expected disagreement


def test_wilson_interval_and_median():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and 0 < high < 0.35
    assert wilson_interval(0, 0) is None
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0, 2.0, 3.0]) == 2.5 and median([]) is None
    assert not math.isnan(wilson_interval(7, 7)[0])
