"""The admin view's numbers on votes whose agreement and position bias are worked out by hand."""

import pytest

from labeling_app.admin import build_report, report_markdown
from labeling_app.store import LabelStore, NewPair

LEASE = 600.0


@pytest.fixture
def store(tmp_path):
    s = LabelStore(tmp_path / "labels.sqlite", create=True)
    s.add_pairs(NewPair(f"p{i}", f"a{i}", f"b{i}") for i in range(1, 4))
    for name in ("x", "y", "z"):
        s.add_user(name, "scrypt$unused")
    s.add_user("boss", "scrypt$unused", is_admin=True)
    yield s
    s.close()


def vote(store, name, verdicts):
    """Cast verdicts about the stored responses ('a', 'b', 'tie', 'skip'), in the order pairs come."""
    shown = store.present(name, overlap=3, lease_seconds=LEASE)
    for verdict in verdicts:
        picked = {"a": "left" if shown.left_side == "a" else "right",
                  "b": "right" if shown.left_side == "a" else "left"}.get(verdict, verdict)
        shown = store.record_vote(name, shown.presentation_id, picked, "", 3, LEASE).next


def test_agreement_counts_and_speed(store):
    """Verdicts per pair: p1 x=a y=a z=b; p2 x=b y=b; p3 x=tie z=tie (y skips p3, z skips p2).

    κ(x, y) on p1, p2: agree on both; p_e = (1·1 + 1·1)/4 = 0.5, κ = 1.
    κ(x, z) on p1, p3: p_o = 1/2; p_e = (tie 1·1)/4 = 1/4, κ = (1/2 - 1/4)/(3/4) = 1/3.
    κ(y, z) on p1: p_o = 0, p_e = 0, κ = 0.
    α: p1 adds 1/2 to o[a][a] twice, to o[a][b] and o[b][a] twice: o_aa = o_ab = o_ba = 1;
    p2 gives o_bb = 2, p3 o_tt = 2. n_a = 2, n_b = 3, n_t = 2, n = 7;
    α = 1 - (n-1)·Σ_{c≠k} o / Σ_{c≠k} n_c·n_k = 1 - 6·2 / (2·(6 + 4 + 6)) = 0.625."""
    vote(store, "x", ["a", "b", "tie"])
    vote(store, "y", ["a", "b", "skip"])
    vote(store, "z", ["b", "skip", "tie"])
    report = build_report(store, overlap=3)
    kappas = {(a, b): (n, k) for a, b, n, k in report.kappas}
    assert kappas[("x", "y")] == (2, pytest.approx(1.0))
    assert kappas[("x", "z")] == (2, pytest.approx(1 / 3))
    assert kappas[("y", "z")] == (1, pytest.approx(0.0))
    assert report.alpha == pytest.approx(0.625) and report.alpha_pairs == 3
    assert (report.pairs, report.complete, report.started, report.verdicts, report.skips) == (3, 1, 2, 7, 2)
    rows = {r.name: r for r in report.annotators}
    assert (rows["x"].votes, rows["x"].skips, rows["y"].votes, rows["y"].skips) == (3, 0, 2, 1)
    assert rows["boss"].admin and rows["boss"].votes == 0 and rows["boss"].median_seconds is None
    assert all(rows[n].median_seconds >= 0 for n in "xyz")
    text = report_markdown(report)
    assert "**0.625**" in text and "| x · z | 2 | 0.333 |" in text and "| boss (admin) | 0 | 0 |" in text


def test_position_bias_is_the_share_of_decisive_votes_for_the_left_side(store):
    for name, sides in (("x", ["left", "left", "tie"]), ("y", ["left", "right", "both_bad"])):
        shown = store.present(name, overlap=3, lease_seconds=LEASE)
        for side in sides:
            shown = store.record_vote(name, shown.presentation_id, side, "", 3, LEASE).next
    report = build_report(store, overlap=3)
    assert (report.left_votes, report.side_votes) == (3, 4) and report.left_share == pytest.approx(0.75)
    rows = {r.name: r for r in report.annotators}
    assert rows["x"].left_share == pytest.approx(1.0) and rows["y"].left_share == pytest.approx(0.5)
    assert "**0.750** (3 of 4; 95% interval" in report_markdown(report)
