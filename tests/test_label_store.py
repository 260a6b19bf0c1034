"""The label store's promises: one vote per id, K slots never overfilled, leases, undo, schema."""

import sqlite3
import threading
import time

import pytest

from align.errors import AlignError
from labeling_app.store import SCHEMA_VERSION, LabelStore, NewPair

LEASE = 600.0


@pytest.fixture
def store(tmp_path):
    s = LabelStore(tmp_path / "labels.sqlite", create=True)
    s.add_pairs(NewPair(f"prompt {i}", f"answer a{i}", f"answer b{i}", {"model_a": "m1"}) for i in range(6))
    for name in ("ann", "bob", "cat", "dan"):
        s.add_user(name, "scrypt$unused")
    yield s
    s.close()


def test_duplicates_are_skipped_in_either_order(store):
    added, duplicates = store.add_pairs([NewPair("prompt 0", "answer b0", "answer a0"),  # same pair, swapped
                                         NewPair("prompt 0", "answer a0", "answer c0"),
                                         NewPair("prompt 0", "answer a0", "answer c0")])
    assert (added, duplicates) == (1, 2)
    assert store.counts()["pairs"] == 7


def test_a_retried_vote_counts_once(store):
    shown = store.present("ann", overlap=2, lease_seconds=LEASE)
    first = store.record_vote("ann", shown.presentation_id, "left", "clearer", overlap=2, lease_seconds=LEASE)
    again = store.record_vote("ann", shown.presentation_id, "right", "retry", overlap=2, lease_seconds=LEASE)
    assert (first.status, again.status) == ("recorded", "already_recorded")
    (vote,) = store.votes()
    assert vote.vote_id == shown.presentation_id and vote.reason == "clearer"
    assert vote.choice == shown.left_side and vote.picked_side == "left"  # left/right mapped to the stored response
    assert next(p for p in store.pairs() if p.id == shown.pair_id).filled == 1
    # The retry also hands back the annotator's current pair, never the one just judged.
    assert again.next.pair_id == first.next.pair_id != shown.pair_id


def test_an_annotator_never_gets_a_pair_twice_and_cannot_use_anothers_presentation(store):
    seen = []
    shown = store.present("ann", overlap=3, lease_seconds=LEASE)
    while shown:
        seen.append(shown.pair_id)
        shown = store.record_vote("ann", shown.presentation_id, "tie", "", overlap=3, lease_seconds=LEASE).next
    assert sorted(seen) == sorted(p.id for p in store.pairs())  # every pair once, then nothing left
    assert store.progress("ann", 3) == (6, 0)

    theirs = store.present("bob", overlap=3, lease_seconds=LEASE)
    stolen = store.record_vote("cat", theirs.presentation_id, "left", "", overlap=3, lease_seconds=LEASE)
    assert stolen.status == "not_assigned" and store.votes("cat") == []
    mine = store.votes("ann")[-1].vote_id
    assert store.record_vote("bob", mine, "left", "", 3, LEASE).status == "not_assigned"  # not "already recorded"


def test_the_last_slot_goes_to_one_annotator_only(store):
    """K=2: two leases fill pair 1, so a third annotator is sent elsewhere."""
    first, second = (store.present(n, overlap=2, lease_seconds=LEASE) for n in ("ann", "bob"))
    third = store.present("cat", overlap=2, lease_seconds=LEASE)
    assert first.pair_id == second.pair_id != third.pair_id


def test_a_walked_away_lease_frees_its_slot_and_a_late_vote_cannot_overfill(store):
    ann = store.present("ann", overlap=2, lease_seconds=0.05)
    bob = store.present("bob", overlap=2, lease_seconds=LEASE)
    assert ann.pair_id == bob.pair_id
    time.sleep(0.1)  # ann walks away: her lease expires
    dan = store.present("dan", overlap=2, lease_seconds=LEASE)
    assert dan.pair_id == ann.pair_id  # the slot she held is handed on
    late = store.record_vote("ann", ann.presentation_id, "left", "", overlap=2, lease_seconds=LEASE)
    assert late.status == "pair_full" and late.next.pair_id != ann.pair_id
    for name, shown in (("bob", bob), ("dan", dan)):
        assert store.record_vote(name, shown.presentation_id, "right", "", 2, LEASE).status == "recorded"
    assert next(p for p in store.pairs() if p.id == ann.pair_id).filled == 2


def test_an_expired_lease_still_takes_a_vote_while_the_slot_is_free(store):
    ann = store.present("ann", overlap=2, lease_seconds=0.05)
    time.sleep(0.1)
    assert store.record_vote("ann", ann.presentation_id, "left", "", 2, LEASE).status == "recorded"


def test_concurrent_annotators_race_for_one_last_slot(tmp_path):
    store = LabelStore(tmp_path / "race.sqlite", create=True)
    store.add_pairs([NewPair("only prompt", "x", "y")])
    names = [f"a{i}" for i in range(16)]
    for name in names:
        store.add_user(name, "scrypt$unused")
    got, start = {}, threading.Barrier(len(names))

    def grab(name):
        start.wait()
        got[name] = store.present(name, overlap=1, lease_seconds=LEASE)

    threads = [threading.Thread(target=grab, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(shown is not None for shown in got.values()) == 1
    store.close()


def test_skip_is_remembered_but_fills_no_slot(store):
    shown = store.present("ann", overlap=1, lease_seconds=LEASE)
    store.record_vote("ann", shown.presentation_id, "skip", "", overlap=1, lease_seconds=LEASE)
    assert next(p for p in store.pairs() if p.id == shown.pair_id).filled == 0
    assert store.present("bob", overlap=1, lease_seconds=LEASE).pair_id == shown.pair_id  # still open to others
    assert all(v.pair_id != shown.pair_id for v in store.votes("bob"))
    assert store.present("ann", overlap=1, lease_seconds=LEASE).pair_id != shown.pair_id


def test_undo_takes_back_only_the_named_latest_vote_and_shows_its_pair_again(store):
    shown = store.present("ann", overlap=2, lease_seconds=LEASE)
    outcome = store.record_vote("ann", shown.presentation_id, "left", "", 2, LEASE)
    undone = store.undo("ann", shown.presentation_id, overlap=2, lease_seconds=LEASE)
    assert undone.undone.vote_id == shown.presentation_id
    assert undone.next.pair_id == shown.pair_id and undone.next.left_side == shown.left_side
    assert store.votes("ann") == [] and all(p.filled == 0 for p in store.pairs())
    assert store.undo("ann", shown.presentation_id, 2, LEASE).undone is None  # a retried undo does nothing more
    # The pair she was looking at went back to the pool; voting again on the undone pair works.
    assert outcome.next.pair_id != shown.pair_id
    again = store.record_vote("ann", undone.next.presentation_id, "right", "", 2, LEASE)
    assert again.status == "recorded" and store.votes("ann")[0].choice != shown.left_side
    assert store.undo("bob", undone.next.presentation_id, 2, LEASE).undone is None  # not bob's to undo


def test_a_removed_user_is_locked_out_at_once(store):
    shown = store.present("ann", overlap=2, lease_seconds=LEASE)
    store.remove_user("ann")
    assert store.record_vote("ann", shown.presentation_id, "left", "", 2, LEASE).status == "not_assigned"
    assert store.present("ann", 2, LEASE) is None
    with pytest.raises(AlignError, match="no user 'ann'"):
        store.remove_user("ann")


def test_schema_is_versioned_and_newer_databases_are_refused(tmp_path):
    path = tmp_path / "labels.sqlite"
    LabelStore(path, create=True).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(AlignError, match="newer than this align understands"):
        LabelStore(path)


def test_not_a_database_and_missing_database(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_text("this is not sqlite" * 100)
    with pytest.raises(AlignError, match="not a label database"):
        LabelStore(junk)
    with pytest.raises(AlignError, match="no such label database"):
        LabelStore(tmp_path / "missing.sqlite")
