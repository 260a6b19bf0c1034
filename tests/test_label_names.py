"""Login names are stored and compared in one form (store.canonical_name: NFKC, case-folded), and a database
from before that (schema 3) is brought to it without merging two people (store._canonical_names)."""

import sqlite3

import pytest

from align.errors import AlignError
from labeling_app.store import LabelStore, canonical_name, name_problem


def test_names_are_folded_when_stored_and_compared(tmp_path):
    with LabelStore(tmp_path / "labels.sqlite", create=True) as store:
        store.add_user("Alice", "hash")
        assert [u.name for u in store.users()] == ["alice"]
        assert store.user("ALICE").name == store.user("\uff41\uff4c\uff49\uff43\uff45").name == "alice"
        for same in ("alice", "ALICE", "Ａｌｉｃｅ"):
            with pytest.raises(AlignError, match="user 'alice' already exists"):
                store.add_user(same, "hash")
        store.record_login_failure("ALICE", "1.2.3.4", at=1.0)
        assert store.login_failures(0.0, name="alice") == [1.0] and store.clear_login_failures("Alice") == 1
        token = store.create_session("ALICE")
        assert store.session_user(token, idle=60, lifetime=60) == "alice"
    assert canonical_name("Straße") == "strasse" and canonical_name("ﬁ") == "fi"


@pytest.mark.parametrize("name, why", [
    ("alice\n", "control or invisible"), ("al\tice", "control or invisible"), ("a\u200bb", "control or invisible"),
    ("", "expected 1-64"), ("al ice", "expected 1-64"), (".alice", "expected 1-64"), ("a" * 65, "expected 1-64"),
    ("élise", "expected 1-64"),
])
def test_a_new_name_must_be_plain_once_folded(name, why):
    assert why in name_problem(name)


def test_good_names_pass():
    assert all(name_problem(n) is None for n in ("alice", "Bob", "ＢＯＢ", "ann.lee@example.com", "x_1-2"))


def test_an_old_database_gets_canonical_names_and_clashes_stay_apart(tmp_path):
    """Schema 3 compared names as stored: `Alice` could sit beside `alice`, and `carol\\n` be added. Version 4 folds
    them: an already canonical name stays; the older clashing account takes the folded name and a later one
    `<name>.2`, with its votes; votes of a removed account keep their name."""
    db = tmp_path / "labels.sqlite"
    with LabelStore(db, create=True) as store:
        store.add_pairs([])
    raw = sqlite3.connect(db)
    with raw:
        raw.execute("PRAGMA user_version = 3")
        raw.execute("INSERT INTO pairs (id, prompt, response_a, response_b, content_key, imported_at) "
                    "VALUES (1, '\"p\"', 'a', 'b', 'k', 0)")
        for name, created in (("BOB", 1), ("Bob", 2), ("alice", 3), ("Alice", 4), ("carol\n", 5)):
            raw.execute("INSERT INTO users (name, password_hash, created_at) VALUES (?, 'h', ?)", (name, created))
        for vote_id, annotator in (("v1", "BOB"), ("v2", "Bob"), ("v3", "Alice"), ("v4", "Zed"), ("v5", "carol\n")):
            raw.execute("INSERT INTO votes (vote_id, pair_id, annotator, choice, left_side, shown_at, voted_at) "
                        "VALUES (?, 1, ?, 'tie', 'a', 0, 1)", (vote_id, annotator))
        for token_hash, user in (("s1", "Bob"), ("s2", "BOB"), ("s3", "alice")):
            raw.execute("INSERT INTO sessions VALUES (?, ?, 0, 0)", (token_hash, user))
        raw.execute("INSERT INTO login_failures VALUES ('ALICE', '1.2.3.4', 0)")
    raw.close()

    with LabelStore(db) as store:
        assert store.schema_version() == 4
        assert sorted(u.name for u in store.users()) == ["alice", "alice.2", "bob", "bob.2", "carol"]
        assert {v.vote_id: v.annotator for v in store.votes()} == {"v1": "bob", "v2": "bob.2", "v3": "alice.2",
                                                                   "v4": "Zed", "v5": "carol"}
        assert store.sessions("bob") == 1 and store.sessions("bob.2") == 0 and store.sessions("alice") == 1
        assert store.login_failures(-1.0, name="alice") == [0.0]
