"""Annotator quality and the model leaderboard (labeling_app/quality.py) on votes worked out by hand."""

import json
import math
import subprocess
import sys

import pytest

from labeling_app.quality import TOO_FAST, annotator_stats, bradley_terry
from labeling_app.store import LabelStore, NewPair

LEASE = 600.0


def vote(store, name, verdicts, overlap=4):
    """Cast verdicts about the stored responses ('a', 'b', 'tie'), in the order pairs come."""
    shown = store.present(name, overlap=overlap, lease_seconds=LEASE)
    for verdict in verdicts:
        picked = {"a": "left" if shown.left_side == "a" else "right",
                  "b": "right" if shown.left_side == "a" else "left"}.get(verdict, verdict)
        shown = store.record_vote(name, shown.presentation_id, picked, "", overlap, LEASE).next


@pytest.fixture
def store(tmp_path):
    s = LabelStore(tmp_path / "labels.sqlite", create=True)
    # p1 and p2: B is the longer answer; p3: the same length
    s.add_pairs([NewPair("p1", "short", "a much longer answer"), NewPair("p2", "brief", "a much longer one"),
                 NewPair("p3", "one two", "three four")])
    for name in "wxyz":
        s.add_user(name, "scrypt$unused")
    yield s
    s.close()


def test_majority_agreement_speed_and_length_bias_by_hand(store):
    """p1: w=a x=a y=a z=b; p2: w=b x=b y=a z=b; p3: w=tie x=a y=tie z=tie.
    Leave-one-out majority: w agrees on all 3; x misses p3 (others all tie); y misses p2 (others all b); z misses
    p1 (others all a): 3/3, 2/3, 2/3, 2/3. Longer answer (B on p1, p2; p3 has none): w 1 of 2, x 1 of 2, y 0 of 2,
    z 2 of 2; the team 4 of 8."""
    vote(store, "w", ["a", "b", "tie"])
    vote(store, "x", ["a", "b", "a"])
    vote(store, "y", ["a", "a", "tie"])
    vote(store, "z", ["b", "b", "tie"])
    store._db().execute("UPDATE votes SET shown_at = voted_at - 5 WHERE annotator = 'w'")  # w reads for 5 s
    stats = annotator_stats(store)
    rows = {r["annotator"]: r for r in stats["annotators"]}
    assert {n: (r["majority_agreement"], r["majority_pairs"]) for n, r in rows.items()} == {
        "w": (1.0, 3), "x": (pytest.approx(2 / 3), 3), "y": (pytest.approx(2 / 3), 3), "z": (pytest.approx(2 / 3), 3)}
    assert {n: r["longer_wins"] for n, r in rows.items()} == {"w": 0.5, "x": 0.5, "y": 0.0, "z": 1.0}
    assert (stats["longer_wins"], stats["length_votes"]) == (0.5, 8)
    assert rows["w"]["median_seconds"] == pytest.approx(5.0) and not rows["w"]["too_fast"]
    assert rows["x"]["median_seconds"] < TOO_FAST and rows["x"]["too_fast"]


def test_bradley_terry_reads_the_win_share_and_counts_ties_half():
    games = [("A", "B", 1.0)] * 30 + [("A", "B", 0.0)] * 10
    theta = bradley_terry(games)
    assert 1 / (1 + math.exp(-(theta["A"] - theta["B"]))) == pytest.approx(0.75, abs=0.02)  # the prior: tiny
    assert theta["A"] + theta["B"] == pytest.approx(0.0, abs=1e-9)
    even = bradley_terry([("A", "B", 0.5)] * 20 + [("A", "B", 1.0)] * 5 + [("B", "A", 1.0)] * 5)
    assert even["A"] == pytest.approx(even["B"], abs=1e-9)
    chain = bradley_terry([("A", "B", 1.0)] * 8 + [("B", "A", 1.0)] * 2 + [("B", "C", 1.0)] * 8
                          + [("C", "B", 1.0)] * 2)
    assert chain["A"] > chain["B"] > chain["C"]  # A never met C, and still ranks above it


def test_leaderboard_and_stats_from_the_cli(tmp_path):
    db = tmp_path / "labels.sqlite"
    with LabelStore(db, create=True) as store:
        store.add_pairs([NewPair(f"q{i}", f"answer a {i}", f"answer b {i}", {"model_a": "new", "model_b": "old"})
                         for i in range(12)])
        store.add_user("u", "scrypt$unused")
        vote(store, "u", ["a"] * 9 + ["b"] * 2 + ["tie"], overlap=1)  # new wins 9.5 of 12
    board = subprocess.run([sys.executable, "-m", "labeling_app", "leaderboard", "--db", str(db), "--json",
                            "--rounds", "300"], capture_output=True, text=True)
    assert board.returncode == 0, board.stderr
    rows = json.loads(board.stdout)
    assert [r["model"] for r in rows] == ["new", "old"] and [r["votes"] for r in rows] == [12, 12]
    new, old = rows
    assert new["score"] + old["score"] == pytest.approx(2000, abs=0.2)
    assert new["ci"][0] <= new["score"] <= new["ci"][1] and new["ci"][0] > 1000 - 1  # ahead, with its interval
    stats = subprocess.run([sys.executable, "-m", "labeling_app", "stats", "--db", str(db)], capture_output=True,
                           text=True)
    assert stats.returncode == 0 and "| u | 12 |" in stats.stdout and "too fast" in stats.stdout
    empty = subprocess.run([sys.executable, "-m", "labeling_app", "leaderboard", "--db", str(tmp_path / "none.sqlite")],
                           capture_output=True, text=True)
    assert empty.returncode == 2 and empty.stderr.count("\n") == 1
