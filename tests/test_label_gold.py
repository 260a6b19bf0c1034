"""Gold pairs (a known answer, mixed into every annotator's queue): accuracy per annotator, and exports that leave
out the votes of annotators who get them wrong."""

import json
import subprocess
import sys

import pytest

from labeling_app.export import export_preferences, export_raw
from labeling_app.quality import annotator_stats
from labeling_app.store import LabelStore, NewPair

LEASE = 600.0


def judge(store, name, verdict_of, overlap=2):
    """`name` judges every pair shown to them; `verdict_of(pair)` gives 'a', 'b' or 'tie' about stored sides."""
    pairs = {p.id: p for p in store.pairs()}
    shown, seen = store.present(name, overlap=overlap, lease_seconds=LEASE), []
    while shown is not None:
        seen.append(shown.pair_id)
        verdict = verdict_of(pairs[shown.pair_id])
        picked = {"a": "left" if shown.left_side == "a" else "right",
                  "b": "right" if shown.left_side == "a" else "left"}.get(verdict, verdict)
        shown = store.record_vote(name, shown.presentation_id, picked, "", overlap, LEASE).next
    return seen


@pytest.fixture
def store(tmp_path):
    s = LabelStore(tmp_path / "labels.sqlite", create=True, gold_rate=1.0)
    s.add_pairs([NewPair(f"q{i}", f"first {i}", f"second {i}") for i in range(3)])
    s.add_pairs([NewPair("g1", "right answer", "wrong answer", {"gold": "a"}),
                 NewPair("g2", "wrong one", "right one", {"gold": "b"})])
    for name in ("good", "bad"):
        s.add_user(name, "scrypt$unused")
    yield s
    s.close()


def test_gold_pairs_reach_everyone_and_only_gold_checks_annotators(store, tmp_path):
    """gold_rate 1: each annotator meets both gold pairs first (K = 2 does not apply to them), then the regular
    ones; 'good' answers gold right and prefers A; 'bad' answers gold wrong and prefers B."""
    assert store.progress("good", 2) == (0, 3)  # gold pairs are not in the count of pairs to do
    seen_good = judge(store, "good", lambda p: p.metadata.get("gold", "a"))
    seen_bad = judge(store, "bad", lambda p: {"a": "b", "b": "a"}.get(p.metadata.get("gold"), "b"))
    assert sorted(seen_good) == sorted(seen_bad) == [1, 2, 3, 4, 5]
    assert set(seen_good[:2]) == set(seen_bad[:2]) == {4, 5}
    stats = {r["annotator"]: r for r in annotator_stats(store)["annotators"]}
    assert (stats["good"]["gold_accuracy"], stats["good"]["gold_votes"]) == (1.0, 2)
    assert (stats["bad"]["gold_accuracy"], stats["bad"]["gold_votes"]) == (0.0, 2)

    with pytest.raises(Exception, match="no pair qualifies"):  # A vs B on every regular pair: no majority
        export_preferences(store, tmp_path / "split.jsonl", min_votes=1)
    summary = export_preferences(store, tmp_path / "trusted.jsonl", min_gold_accuracy=0.5)
    rows = [json.loads(line) for line in (tmp_path / "trusted.jsonl").read_text().splitlines()]
    assert [r["chosen"] for r in rows] == ["first 0", "first 1", "first 2"]  # gold pairs are never exported
    assert summary.dropped["votes from 1 annotators under 0.5 gold accuracy"] == 5
    export_raw(store, tmp_path / "raw.jsonl")
    raw = [json.loads(line) for line in (tmp_path / "raw.jsonl").read_text().splitlines()]
    assert {r["annotator"]: r["gold_accuracy"] for r in raw} == {"good": 1.0, "bad": 0.0}


def test_import_gold_from_preference_rows(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
    data = tmp_path / "gold.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = tmp_path / "labels.sqlite"
    done = subprocess.run([sys.executable, "-m", "labeling_app", "import", "--gold", str(data), "--db", str(db)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with LabelStore(db) as store:
        pairs = store.pairs()
    for p in pairs:  # the known answer names the side the chosen response was stored on
        assert p.metadata["source"] == "gold" and "prior_choice" not in p.metadata
        assert (p.response_a if p.metadata["gold"] == "a" else p.response_b).startswith("good")
    assert {p.metadata["gold"] for p in pairs} == {"a", "b"}  # sides mixed, so position tells nothing
    bad = subprocess.run([sys.executable, "-m", "labeling_app", "export", "--db", str(db), "--out",
                          str(tmp_path / "x.jsonl"), "--min-gold-accuracy", "1.5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--min-gold-accuracy must be between 0 and 1, got 1.5" in bad.stderr
