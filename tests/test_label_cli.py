"""`align label import / users / export` as a user runs them: real files, real database, exit codes."""

import json
import sqlite3
import subprocess
import sys

import pytest

from align.data import load_rows
from labeling_app.store import LabelStore

ROLLOUTS = [
    {"prompt": "What is 2+2?", "completions": ["4", "Four.", "4", "2+2 is 4."], "rewards": [1.0, 0.5, 1.0, 0.7],
     "model": "tiny"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}],
     "completions": ["hi", "Hello there!"], "model": ["m1", "m2"]},
]


def label(*args, stdin=None):
    """The CLI as a user runs it (`python -m labeling_app` is `align label`)."""
    return subprocess.run([sys.executable, "-m", "labeling_app", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_command_has_help():
    for command in ([], ["import"], ["users"], ["users", "add"], ["users", "list"], ["users", "remove"],
                    ["users", "passwd"], ["serve"], ["export"]):
        result = label(*command, "--help")
        assert result.returncode == 0 and "usage: align label" in result.stdout, command


def test_import_rollouts_forms_pairs_and_skips_duplicates(tmp_path):
    db = tmp_path / "labels.sqlite"
    source = write_jsonl(tmp_path / "rollouts.jsonl", ROLLOUTS)
    first = label("import", source, "--db", db)
    assert first.returncode == 0, first.stderr
    # Row 1: 3 distinct completions ("4" twice) -> 3 pairs; row 2: 1 pair.
    assert "imported 4 pairs" in first.stdout and "skipped 0 duplicates" in first.stdout
    again = label("import", source, "--db", db)
    assert "imported 0 pairs" in again.stdout and "skipped 4 duplicates" in again.stdout
    with LabelStore(db) as store:
        pairs = store.pairs()
    assert {(p.response_a, p.response_b) for p in pairs[:3]} == {("4", "Four."), ("4", "2+2 is 4."),
                                                                   ("Four.", "2+2 is 4.")}
    four_vs_words = next(p for p in pairs if p.response_b == "Four.")
    assert four_vs_words.metadata["reward_a"] == 1.0 and four_vs_words.metadata["reward_b"] == 0.5
    assert pairs[3].prompt == ROLLOUTS[1]["prompt"] and pairs[3].metadata["model_b"] == "m2"


def test_import_leaves_out_empty_completions(tmp_path):
    """`align rollouts` writes "" for a completion that stopped at once; it is not a pair to judge."""
    db = tmp_path / "labels.sqlite"
    rows = [{"prompt": "2+2?", "completions": ["4", "", "Four.", "  "]}, {"prompt": "hi", "completions": ["", "yo"]}]
    result = label("import", write_jsonl(tmp_path / "rollouts.jsonl", rows), "--db", db)
    assert result.returncode == 0, result.stderr
    with LabelStore(db) as store:
        assert [(p.response_a, p.response_b) for p in store.pairs()] == [("4", "Four.")]


def test_import_pairs_and_a_cap_per_prompt(tmp_path):
    db = tmp_path / "labels.sqlite"
    rows = [{"prompt": "p", "response_a": "x", "response_b": "y", "metadata": {"model_a": "m1"}, "reward_a": 0.3}]
    assert label("import", write_jsonl(tmp_path / "pairs.jsonl", rows), "--db", db).returncode == 0
    many = [{"prompt": "q", "completions": [f"answer {i}" for i in range(6)]}]  # 15 possible pairs
    result = label("import", write_jsonl(tmp_path / "many.jsonl", many), "--db", db, "--max-pairs-per-prompt", 4)
    assert "imported 4 pairs" in result.stdout
    with LabelStore(db) as store:
        assert store.pairs()[0].metadata == {"model_a": "m1", "reward_a": 0.3}


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "p", "completions": ["only one"]}, "line 2: field 'completions': expected a list of at least 2"),
    ({"prompt": "p", "completions": ["a", 3]}, "line 2: field 'completions[1]': expected a string, got a number"),
    ({"prompt": "p", "completions": ["a", "b"], "rewards": [1]}, "line 2: field 'rewards': expected a list of 2"),
    ({"completions": ["a", "b"]}, "line 2: missing field 'prompt'"),
    ({"prompt": "", "completions": ["a", "b"]}, "line 2: field 'prompt' is empty"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "completions": ["a", "b"]}, "line 2: field 'prompt[0].role'"),
])
def test_bad_rollout_rows_stop_the_import_with_one_line(tmp_path, row, expected):
    db = tmp_path / "labels.sqlite"
    source = write_jsonl(tmp_path / "bad.jsonl", [ROLLOUTS[0], row])
    result = label("import", source, "--db", db)
    assert result.returncode == 2
    assert result.stderr.startswith(f"align: error: {source}, ") and expected in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not db.exists()  # nothing half-imported


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "p", "response_a": "same", "response_b": "same"}, "'response_a' and 'response_b' are identical"),
    ({"prompt": "p", "response_a": "x"}, "missing field 'response_b'"),
    ({"prompt": "p", "response_a": "x", "response_b": "y", "metadata": [1]}, "field 'metadata': expected an object"),
    ({"text": "hello"}, "cannot tell the format"),
])
def test_bad_pair_rows(tmp_path, row, expected):
    result = label("import", write_jsonl(tmp_path / "bad.jsonl", [row]), "--db", tmp_path / "l.sqlite")
    assert result.returncode == 2 and "line 1" in result.stderr and expected in result.stderr


def test_users_passwords_are_hashed_and_never_shown(tmp_path):
    db = tmp_path / "labels.sqlite"
    secret = "correct horse battery"
    added = label("users", "add", "alice", "--admin", "--password-stdin", "--db", db, stdin=secret + "\n")
    assert added.returncode == 0, added.stderr
    assert label("users", "add", "bob", "--password-stdin", "--db", db, stdin="another password\n").returncode == 0
    listing = label("users", "list", "--db", db)
    assert "alice" in listing.stdout and "admin" in listing.stdout and "annotator" in listing.stdout
    for output in (added.stdout + added.stderr, listing.stdout):
        assert secret not in output
    raw = db.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("labels.sqlite-*"))
    assert secret.encode() not in raw
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT password_hash FROM users WHERE name = 'alice'").fetchone()[0]
        other = conn.execute("SELECT password_hash FROM users WHERE name = 'bob'").fetchone()[0]
    assert stored.startswith("scrypt$16384$8$1$") and stored.split("$")[4] != other.split("$")[4]  # own salt

    assert label("users", "add", "alice", "--password-stdin", "--db", db, stdin="whatever1\n").returncode == 2
    short = label("users", "add", "carl", "--password-stdin", "--db", db, stdin="short\n")
    assert short.returncode == 2 and "at least 8 characters" in short.stderr
    bad_name = label("users", "add", "no spaces", "--password-stdin", "--db", db, stdin="long enough\n")
    assert bad_name.returncode == 2 and "user name" in bad_name.stderr
    removed = label("users", "remove", "bob", "--db", db)
    assert removed.returncode == 0 and "bob" not in label("users", "list", "--db", db).stdout
    assert label("users", "remove", "bob", "--db", db).returncode == 2


def vote_all(db, votes):
    """Cast `votes[name] = [choice per pair, in the order pairs are handed out]` through the store."""
    with LabelStore(db) as store:
        for name, choices in votes.items():
            shown = store.present(name, overlap=3, lease_seconds=600)
            for choice in choices:
                stored = {"a": "left" if shown.left_side == "a" else "right",
                          "b": "right" if shown.left_side == "a" else "left"}.get(choice, choice)
                shown = store.record_vote(name, shown.presentation_id, stored, f"{name} says {choice}", 3, 600).next


def test_export_majorities_raw_and_kto(tmp_path):
    db = tmp_path / "labels.sqlite"
    pairs = [{"prompt": f"p{i}", "response_a": f"a{i}", "response_b": f"b{i}"} for i in range(4)]
    label("import", write_jsonl(tmp_path / "pairs.jsonl", pairs), "--db", db)
    for name in ("u1", "u2", "u3"):
        label("users", "add", name, "--password-stdin", "--db", db, stdin="password123\n")
    # Pairs are handed out fullest first, so all three judge p0..p3 in order.
    vote_all(db, {"u1": ["a", "b", "tie", "both_bad"], "u2": ["a", "b", "a", "both_bad"],
                  "u3": ["b", "b", "tie", "a"]})
    out = tmp_path / "prefs.jsonl"
    result = label("export", "--db", db, "--out", out)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": "p0", "chosen": "a0", "rejected": "b0"},
                    {"prompt": "p1", "chosen": "b1", "rejected": "a1"}]
    assert "1 judged a tie" in result.stdout and "1 judged both bad" in result.stdout
    assert len(load_rows(str(out), "preference")) == 2

    strict = label("export", "--db", db, "--out", out, "--min-agreement", "0.9")
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["p1"]  # p0 was 2 of 3
    assert "1 under 0.9 agreement" in strict.stdout

    kto = tmp_path / "kto.jsonl"
    assert label("export", "--db", db, "--out", kto, "--kto").returncode == 0
    kto_rows = [json.loads(line) for line in kto.read_text().splitlines()]
    assert {(r["completion"], r["label"]) for r in kto_rows} == {("a0", True), ("b0", False), ("b1", True),
                                                                  ("a1", False), ("a3", False), ("b3", False)}
    assert len(load_rows(str(kto), "kto")) == 6

    raw = tmp_path / "raw.jsonl"
    assert label("export", "--db", db, "--out", raw, "--raw").returncode == 0
    votes = [json.loads(line) for line in raw.read_text().splitlines()]
    assert len(votes) == 12 and {v["annotator"] for v in votes} == {"u1", "u2", "u3"}
    first = next(v for v in votes if v["annotator"] == "u3" and v["prompt"] == "p0")
    assert first["choice"] == "b" and first["reason"] == "u3 says b" and first["shown_left"] in ("a", "b")
    assert first["picked_side"] == ("left" if first["shown_left"] == "b" else "right")
    assert first["seconds"] >= 0 and first["voted_at"] >= first["shown_at"]


def test_export_errors_write_nothing(tmp_path):
    db = tmp_path / "labels.sqlite"
    label("import", write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "response_a": "x", "response_b": "y"}]),
          "--db", db)
    out = tmp_path / "prefs.jsonl"
    empty = label("export", "--db", db, "--out", out)
    assert empty.returncode == 2 and "nothing to export" in empty.stderr and not out.exists()
    assert "--min-votes must be at least 1" in label("export", "--db", db, "--out", out, "--min-votes", 0).stderr
    assert label("export", "--db", db, "--out", out, "--min-agreement", 2).returncode == 2
    missing = label("export", "--db", tmp_path / "nope.sqlite", "--out", out)
    assert missing.returncode == 2 and "no such label database" in missing.stderr
    assert not (tmp_path / "nope.sqlite").exists()


def test_serve_refuses_bad_settings_before_starting(tmp_path):
    db = tmp_path / "labels.sqlite"
    label("import", write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "response_a": "x", "response_b": "y"}]),
          "--db", db)
    no_users = label("serve", "--db", db, "--port", 1)
    assert no_users.returncode == 2 and "no users" in no_users.stderr
    label("users", "add", "alice", "--admin", "--password-stdin", "--db", db, stdin="password123\n")
    for args, expected in ((["--overlap", 0], "--overlap must be at least 1"),
                           (["--port", 70000], "--port must be between"),
                           (["--lease-minutes", 0], "--lease-minutes must be more than 0"),
                           (["--guidelines", tmp_path / "missing.md"], "cannot read guidelines")):
        result = label("serve", "--db", db, *args)
        assert result.returncode == 2 and expected in result.stderr, args
    assert "no such label database" in label("serve", "--db", tmp_path / "other.sqlite").stderr
