"""Agreement and bias statistics over votes: pure functions over plain labels, no store, no Gradio.

Labels are the stored verdicts about the pair itself ('a', 'b', 'tie', 'both_bad'), not
screen positions, so two annotators who saw the responses in opposite order and picked
the same one agree. `skip` is not a verdict and never reaches these functions.
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import permutations


def cohen_kappa(pairs: list[tuple[str, str]]) -> float | None:
    """Cohen's κ for two raters: (p_o - p_e) / (1 - p_e).

    `pairs` holds (rater 1's label, rater 2's label) per item both rated. p_o is the share
    of items they agree on; p_e the agreement expected by chance from each rater's own
    label frequencies, Σ_c p1(c)·p2(c). None when p_e = 1 (both always gave one and the
    same label), where κ is 0/0."""
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(x == y for x, y in pairs) / n
    first, second = Counter(x for x, _ in pairs), Counter(y for _, y in pairs)
    expected = sum(first[c] * second[c] for c in first) / (n * n)
    if expected == 1:
        return None
    return (observed - expected) / (1 - expected)


def krippendorff_alpha(units: list[list[str]]) -> float | None:
    """Krippendorff's α for nominal labels, any number of raters per item, missing votes allowed.

    α = 1 - D_o / D_e over the coincidence matrix o: each item with m ≥ 2 labels adds
    1/(m-1) to o[c][k] for every ordered pair of its labels (c, k) taken from two
    different raters. With n_c = Σ_k o[c][k] and n = Σ_c n_c,
    D_o = Σ_{c≠k} o[c][k] / n and D_e = Σ_{c≠k} n_c·n_k / (n(n-1)).
    Items with one label carry no information about agreement and are left out.
    None when fewer than two labels are pairable or only one label value occurs."""
    coincidences: Counter = Counter()
    for labels in units:
        m = len(labels)
        if m < 2:
            continue
        for c, k in permutations(labels, 2):
            coincidences[(c, k)] += 1 / (m - 1)
    totals: Counter = Counter()
    for (c, _), weight in coincidences.items():
        totals[c] += weight
    n = sum(totals.values())
    if n < 2:
        return None
    disagree_observed = sum(w for (c, k), w in coincidences.items() if c != k)
    disagree_expected = sum(totals[c] * totals[k] for c in totals for k in totals if c != k)
    if disagree_expected == 0:
        return None
    return 1 - (n - 1) * disagree_observed / disagree_expected


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson score interval for a proportion: honest near 0 and 1 and for small n."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
