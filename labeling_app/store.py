"""The labeling database. Every read and write of it goes through `LabelStore`.

Keeping SQL in this one module is what lets a server database (Postgres) be added later
as a second class with the same methods; nothing else in the app knows about SQLite.

What the store guarantees, and how:

- **A vote is stored once.** Its id is the id of the presentation it answers, issued by
  the server when it handed the pair out, so a retried request finds its own vote and
  reports `already_recorded`. A partial unique index also forbids two live votes by one
  annotator on one pair.
- **Acknowledged means on disk.** One transaction per vote, WAL journal with
  `synchronous=FULL`: the commit fsyncs the log before the call returns, so a SIGKILL (or
  a power cut) after the acknowledgement loses nothing.
- **K votes per pair, never K+1.** A pair is handed out (leased) only while its counted
  votes plus other annotators' live leases leave a slot, and a vote that arrives after
  its lease expired is accepted only if a slot is still free. Each annotator holds at
  most one lease; a lease left alone for `lease_seconds` frees its slot.
- **Writers queue, readers don't.** Threads of one server take a process lock before
  `BEGIN IMMEDIATE`, so they wait in line instead of in SQLite's sleep-and-retry busy
  handler; other processes (the CLI importing while the app serves) wait on
  `busy_timeout`. WAL lets reads run beside the writer.
- **One name, one account.** A login name is stored and compared in its canonical form
  (`canonical_name`: Unicode NFKC, case-folded), so `Alice` and `alice` are one account.
- **The schema is versioned.** `PRAGMA user_version` holds it; `MIGRATIONS[i]` takes a
  database from version i to i+1 inside one transaction, and a database from a newer
  release is refused rather than misread.

`skip` is recorded like a vote (so the pair is not shown to that annotator again) but
fills no slot and counts in no majority.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import secrets
import sqlite3
import threading
import time
import unicodedata
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from align.errors import AlignError

log = logging.getLogger("align")

# What the annotator clicks. The store turns left/right into the stored response ('a' or 'b')
# using the side each response was shown on, inside the vote's transaction.
CHOICES = ("left", "right", "tie", "both_bad", "skip")
# Among the fullest pairs, which comes next: `fifo` the oldest; `random` a fixed shuffle (a multiplicative hash
# of the id, so every annotator and every restart sees the same order); `uncertainty` the pair whose stored
# reward gap (`align label import --reward-model`: metadata reward_gap) is smallest in size, pairs without one
# last.
ORDERS = {
    "fifo": "p.id",
    "random": "(p.id * 2654435761) % 4294967296, p.id",
    "uncertainty": "json_extract(p.metadata, '$.reward_gap') IS NULL, "
                   "abs(json_extract(p.metadata, '$.reward_gap')), p.id",
}

# A gold pair's known answer ('a' or 'b'), in its metadata: `align label import --gold`.
GOLD = "json_extract(p.metadata, '$.gold')"

# Stored choices; all but skip fill one of a pair's K slots.
STORED_CHOICES = ("a", "b", "tie", "both_bad", "skip")

_V1 = """
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    is_admin INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE pairs (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,                 -- JSON: a string or a message list
    response_a TEXT NOT NULL,
    response_b TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',  -- JSON object: model names, reward scores, source
    content_key TEXT NOT NULL UNIQUE,     -- the same prompt and two responses, in either order
    filled INTEGER NOT NULL DEFAULT 0,    -- live votes other than skip
    imported_at REAL NOT NULL
);
CREATE INDEX pairs_to_fill ON pairs (filled DESC, id);
CREATE TABLE leases (
    annotator TEXT PRIMARY KEY,
    presentation_id TEXT NOT NULL UNIQUE,
    pair_id INTEGER NOT NULL REFERENCES pairs (id),
    left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')),
    shown_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX leases_by_pair ON leases (pair_id, expires_at);
CREATE TABLE votes (
    vote_id TEXT PRIMARY KEY,             -- the presentation id: a retried request finds it
    pair_id INTEGER NOT NULL REFERENCES pairs (id),
    annotator TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad', 'skip')),
    left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')),
    reason TEXT NOT NULL DEFAULT '',
    shown_at REAL NOT NULL,
    voted_at REAL NOT NULL,
    undone_at REAL
);
CREATE UNIQUE INDEX one_live_vote ON votes (annotator, pair_id) WHERE undone_at IS NULL;
CREATE INDEX votes_by_pair ON votes (pair_id);
CREATE INDEX votes_by_time ON votes (annotator, voted_at);
"""

# Failed logins, by account name (whether or not it exists) and client address: the backoff and the lockout
# read them, so a restart forgets neither and `align label users unlock NAME` clears an account's.
_V2 = """
CREATE TABLE login_failures (
    name TEXT NOT NULL,
    address TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX login_failures_by_name ON login_failures (name, at);
CREATE INDEX login_failures_by_address ON login_failures (address, at)
"""

# MIGRATIONS[i] takes a database from version i to i+1: SQL statements split on ';' (so none
# inside a string or comment), or a function of the connection, run in one transaction with the version bump.
# Sessions: the app's own (not Gradio's in-memory tokens), so they survive a restart and end on logout,
# password change and account removal. Only a SHA-256 of the token is stored.
_V3 = """
CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE INDEX sessions_by_user ON sessions (user)
"""

def _canonical_names(db: sqlite3.Connection) -> None:
    """Version 4: login names in their canonical form (`canonical_name`), in users, sessions, leases, votes and
    failed logins. Names that fold to one (`Alice` beside `alice`: the old check was case-sensitive) stay apart: an
    account already named in the canonical form keeps its name; the others take their folded name in the order
    they were created, each one that finds it taken the first free `<name>.2`, `<name>.3` ..., its votes going
    with it and its sessions ended (its login name changed). Each such rename is logged. Votes of removed accounts
    keep the name they were cast under: there is no account to merge them into."""
    names = [r[0] for r in db.execute("SELECT name FROM users ORDER BY created_at, rowid")]
    taken = {name for name in names if _folded(name) == name}
    for old in (name for name in names if name not in taken):
        new, n = _folded(old), 2
        while new in taken:
            new, n = f"{_folded(old)}.{n}", n + 1
        taken.add(new)
        db.execute("UPDATE users SET name = ? WHERE name = ?", (new, old))
        if new != _folded(old):
            db.execute("DELETE FROM sessions WHERE user = ?", (old,))
            log.warning("label database: account %r is now %r (%r, the same name once case and Unicode forms are "
                        "folded, is taken); its votes go with it", old, new, _folded(old))
        for table, column in (("sessions", "user"), ("leases", "annotator"), ("votes", "annotator")):
            db.execute(f"UPDATE {table} SET {column} = ? WHERE {column} = ?", (new, old))
    for (name,) in db.execute("SELECT DISTINCT name FROM login_failures").fetchall():
        if _folded(name) != name:
            db.execute("UPDATE login_failures SET name = ? WHERE name = ?", (_folded(name), name))


MIGRATIONS = [_V1, _V2, _V3, _canonical_names]
SEEN_EVERY = 60.0  # seconds: how stale a session's last_seen may get before a request writes it
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class NewPair:
    prompt: str | list
    response_a: str
    response_b: str
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Pair:
    id: int
    prompt: str | list
    response_a: str
    response_b: str
    metadata: dict
    filled: int


@dataclass(frozen=True)
class Presentation:
    """A pair as one annotator sees it now: its id is the id their vote will carry."""

    presentation_id: str
    pair_id: int
    prompt: str | list
    left: str
    right: str
    left_side: str  # which stored response ('a' or 'b') is on the left


@dataclass(frozen=True)
class Vote:
    vote_id: str
    pair_id: int
    annotator: str
    choice: str  # one of STORED_CHOICES
    left_side: str
    reason: str
    shown_at: float
    voted_at: float

    @property
    def picked_side(self) -> str | None:
        """'left' or 'right' for a decisive vote, else None: what position bias is measured on."""
        if self.choice not in ("a", "b"):
            return None
        return "left" if self.choice == self.left_side else "right"

    @property
    def seconds(self) -> float:
        return self.voted_at - self.shown_at


@dataclass(frozen=True)
class VoteOutcome:
    status: str  # recorded | already_recorded | pair_full | not_assigned
    vote_id: str
    next: Presentation | None  # what the annotator sees now; None when nothing is left for them

    @property
    def stored(self) -> bool:
        return self.status in ("recorded", "already_recorded")


@dataclass(frozen=True)
class UndoOutcome:
    undone: Vote | None  # None when there was nothing (or no longer anything) to undo
    next: Presentation | None


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class User:
    name: str
    is_admin: bool
    created_at: float
    password_hash: str = field(repr=False)


class LabelStore:
    def __init__(self, path: str | Path, *, create: bool = False, order: str = "fifo", gold_rate: float = 0.0):
        if order not in ORDERS:
            raise AlignError(f"order {order!r}: expected one of {', '.join(ORDERS)}")
        if not 0.0 <= gold_rate <= 1.0:
            raise AlignError(f"gold rate {gold_rate}: expected a share between 0 and 1")
        self.order = order  # which pair a new presentation picks among the fullest (`ORDERS`)
        self.gold_rate = gold_rate  # the chance that a new presentation is a gold pair the annotator has not seen
        self.path = Path(path)
        if not create and not self.path.exists():
            raise AlignError(f"{self.path}: no such label database; create it with `align label import` "
                             "or `align label users add`")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._migrate()

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- connections and transactions

    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
            except sqlite3.DatabaseError as e:
                raise AlignError(f"{self.path}: not a label database ({e})") from None
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        with self._write_lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _migrate(self) -> None:
        if self.schema_version() == SCHEMA_VERSION:  # the usual case; no need to queue for the write lock
            return
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise AlignError(f"{self.path}: label database has schema version {version}, newer than this "
                                 f"align understands ({SCHEMA_VERSION}); upgrade align to open it")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                step = MIGRATIONS[target - 1]
                if callable(step):
                    step(db)
                    db.execute(f"PRAGMA user_version = {target}")
                    continue
                for statement in step.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")

    def schema_version(self) -> int:
        try:
            return self._db().execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise AlignError(f"{self.path}: not a label database ({e})") from None

    # -- users

    def add_user(self, name: str, password_hash: str, is_admin: bool = False) -> None:
        name = canonical_name(name)
        with self._write() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise AlignError(f"user '{name}' already exists in {self.path}")
            db.execute("INSERT INTO users (name, password_hash, is_admin, created_at) VALUES (?, ?, ?, ?)",
                       (name, password_hash, int(is_admin), time.time()))

    def set_password(self, name: str, password_hash: str) -> None:
        name = canonical_name(name)
        with self._write() as db:
            if not db.execute("UPDATE users SET password_hash = ? WHERE name = ?", (password_hash, name)).rowcount:
                raise AlignError(f"no user '{name}' in {self.path}")
            db.execute("DELETE FROM sessions WHERE user = ?", (name,))  # a new password logs every session out

    def remove_user(self, name: str) -> None:
        """The account goes at once, even on a running server; the votes stay (they are the data)."""
        name = canonical_name(name)
        with self._write() as db:
            if not db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount:
                raise AlignError(f"no user '{name}' in {self.path}")
            db.execute("DELETE FROM leases WHERE annotator = ?", (name,))
            db.execute("DELETE FROM sessions WHERE user = ?", (name,))

    # -- sessions

    def create_session(self, user: str, now: float | None = None) -> str:
        """A new session for `user`: returns its token (random, 256 bits), of which only a hash is kept."""
        token = secrets.token_urlsafe(32)
        user = canonical_name(user)
        now = time.time() if now is None else now
        with self._write() as db:
            db.execute("INSERT INTO sessions (token_hash, user, created_at, last_seen) VALUES (?, ?, ?, ?)",
                       (_token_hash(token), user, now, now))
        return token

    def session_user(self, token: str, idle: float, lifetime: float, now: float | None = None) -> str | None:
        """The account a session token belongs to, if the session is alive: at most `idle` seconds since it was
        last used, `lifetime` since it began, and the account still there. An expired session is deleted."""
        now = time.time() if now is None else now
        user, write = self.session_check(token, idle, lifetime, now)
        if write:
            self.session_write(token, write, now)
        return user

    def session_check(self, token: str, idle: float, lifetime: float, now: float | None = None) -> tuple[
            str | None, str | None]:
        """`session_user` without its write, so it can run where waiting for the writer must not happen (the
        server's event loop; a WAL read never waits for it): (the account or None, the write the session needs:
        "end" once expired, "seen" when its last use is more than SEEN_EVERY seconds old, else None)."""
        now = time.time() if now is None else now
        row = self._db().execute("SELECT s.user, s.created_at, s.last_seen FROM sessions s JOIN users u "
                                 "ON u.name = s.user WHERE s.token_hash = ?", (_token_hash(token),)).fetchone()
        if row is None:
            return None, None
        user, created, seen = row
        if now - seen > idle or now - created > lifetime:
            return None, "end"
        return user, ("seen" if now - seen > SEEN_EVERY else None)

    def session_write(self, token: str, write: str, now: float | None = None) -> None:
        """Carry out what `session_check` said: end the session, or note its use now."""
        if write == "end":
            self.end_session(token)
        elif write == "seen":
            with self._write() as db:
                db.execute("UPDATE sessions SET last_seen = ? WHERE token_hash = ?",
                           (time.time() if now is None else now, _token_hash(token)))

    def end_session(self, token: str) -> bool:
        with self._write() as db:
            return bool(db.execute("DELETE FROM sessions WHERE token_hash = ?", (_token_hash(token),)).rowcount)

    def sessions(self, user: str) -> int:
        return self._db().execute("SELECT COUNT(*) FROM sessions WHERE user = ?",
                                  (canonical_name(user),)).fetchone()[0]

    # -- failed logins

    def record_login_failure(self, name: str, address: str, at: float | None = None) -> None:
        with self._write() as db:
            db.execute("INSERT INTO login_failures (name, address, at) VALUES (?, ?, ?)",
                       (canonical_name(name), address, time.time() if at is None else at))

    def login_failures(self, since: float, name: str | None = None, address: str | None = None) -> list[float]:
        """Times (ascending) of the failed logins since `since` for an account name or a client address."""
        column, value = ("name", canonical_name(name)) if name is not None else ("address", address)
        rows = self._db().execute(f"SELECT at FROM login_failures WHERE {column} = ? AND at >= ? ORDER BY at",
                                  (value, since))
        return [r[0] for r in rows]

    def clear_login_failures(self, name: str) -> int:
        """Forget an account's failed logins (after a good one, or `users unlock`); how many there were."""
        with self._write() as db:
            return db.execute("DELETE FROM login_failures WHERE name = ?", (canonical_name(name),)).rowcount

    def user(self, name: str) -> User | None:
        row = self._db().execute("SELECT * FROM users WHERE name = ?", (canonical_name(name),)).fetchone()
        return _user(row) if row else None

    def users(self) -> list[User]:
        return [_user(r) for r in self._db().execute("SELECT * FROM users ORDER BY name")]

    # -- pairs

    def add_pairs(self, pairs: Iterable[NewPair]) -> tuple[int, int]:
        """Insert all pairs in one transaction; returns (added, duplicates skipped)."""
        added = duplicates = 0
        now = time.time()
        with self._write() as db:
            for pair in pairs:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO pairs (prompt, response_a, response_b, metadata, content_key, imported_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (json.dumps(pair.prompt), pair.response_a, pair.response_b, json.dumps(pair.metadata),
                     content_key(pair.prompt, pair.response_a, pair.response_b), now))
                if cursor.rowcount:
                    added += 1
                else:
                    duplicates += 1
        return added, duplicates

    def pairs(self) -> list[Pair]:
        return [Pair(r["id"], json.loads(r["prompt"]), r["response_a"], r["response_b"], json.loads(r["metadata"]),
                     r["filled"]) for r in self._db().execute("SELECT * FROM pairs ORDER BY id")]

    # -- labeling

    def present(self, annotator: str, overlap: int, lease_seconds: float) -> Presentation | None:
        """The pair this annotator should judge now: their current lease, or a new one; None when done."""
        with self._write() as db:
            return self._show(db, annotator, overlap, lease_seconds, time.time())

    def _show(self, db: sqlite3.Connection, annotator: str, overlap: int, lease_seconds: float,
              now: float) -> Presentation | None:
        return _present(db, annotator, overlap, lease_seconds, now, self.order, self.gold_rate)

    def record_vote(self, annotator: str, presentation_id: str, picked: str, reason: str, overlap: int,
                    lease_seconds: float) -> VoteOutcome:
        """Store one vote, and lease the annotator's next pair, in one transaction (one fsync).

        Safe to call again with the same presentation id: the vote is found, not added."""
        if picked not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {picked!r}")
        now = time.time()
        with self._write() as db:
            done = db.execute("SELECT annotator FROM votes WHERE vote_id = ?", (presentation_id,)).fetchone()
            lease = db.execute("SELECT * FROM leases WHERE presentation_id = ? AND annotator = ?",
                               (presentation_id, annotator)).fetchone()
            if done:
                # Someone else's vote id tells the caller nothing: same answer as an unknown id.
                status = "already_recorded" if done["annotator"] == annotator else "not_assigned"
            elif not lease or not _exists(db, annotator):
                status = "not_assigned"
            elif (_stored_choice(picked, lease["left_side"]) != "skip"
                  and not _has_slot(db, lease["pair_id"], annotator, overlap, now)):
                db.execute("DELETE FROM leases WHERE annotator = ?", (annotator,))
                status = "pair_full"
            else:
                _insert_vote(db, lease, _stored_choice(picked, lease["left_side"]), reason, now)
                status = "recorded"
            shown = self._show(db, annotator, overlap, lease_seconds, now)
            return VoteOutcome(status, presentation_id, shown)

    def undo(self, annotator: str, vote_id: str, overlap: int, lease_seconds: float) -> UndoOutcome:
        """Take back `vote_id` if it is this annotator's latest live vote, and show its pair again.

        Naming the vote (rather than "the last one") makes a retried undo harmless."""
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT * FROM votes WHERE annotator = ? AND undone_at IS NULL "
                             "ORDER BY voted_at DESC, rowid DESC LIMIT 1", (annotator,)).fetchone()
            if not row or row["vote_id"] != vote_id or not _exists(db, annotator):
                return UndoOutcome(None, self._show(db, annotator, overlap, lease_seconds, now))
            vote = _vote(row)
            db.execute("UPDATE votes SET undone_at = ? WHERE vote_id = ?", (now, vote_id))
            if vote.choice != "skip":
                db.execute("UPDATE pairs SET filled = filled - 1 WHERE id = ?", (vote.pair_id,))
            # The pair they were looking at goes back to the pool; the undone one comes back to them,
            # on the same sides as before, unless others filled it meanwhile (only possible after a skip).
            db.execute("DELETE FROM leases WHERE annotator = ?", (annotator,))
            if _has_slot(db, vote.pair_id, annotator, overlap, now):
                _lease(db, annotator, vote.pair_id, vote.left_side, now, lease_seconds)
            return UndoOutcome(vote, self._show(db, annotator, overlap, lease_seconds, now))

    def last_vote_id(self, annotator: str) -> str | None:
        row = self._db().execute("SELECT vote_id FROM votes WHERE annotator = ? AND undone_at IS NULL "
                                 "ORDER BY voted_at DESC, rowid DESC LIMIT 1", (annotator,)).fetchone()
        return row["vote_id"] if row else None

    def progress(self, annotator: str, overlap: int) -> tuple[int, int]:
        """(votes this annotator has cast, pairs still open to them)."""
        db = self._db()
        done = db.execute("SELECT count(*) FROM votes WHERE annotator = ? AND undone_at IS NULL",
                          (annotator,)).fetchone()[0]
        # Open pairs minus the open ones they already judged: two index counts, not a probe per pair.
        open_pairs = db.execute(f"SELECT count(*) FROM pairs p WHERE filled < ? AND {GOLD} IS NULL",
                                (overlap,)).fetchone()[0]
        judged_open = db.execute(
            "SELECT count(*) FROM votes v JOIN pairs p ON p.id = v.pair_id "
            f"WHERE v.annotator = ? AND v.undone_at IS NULL AND p.filled < ? AND {GOLD} IS NULL",
            (annotator, overlap)).fetchone()[0]
        return done, open_pairs - judged_open

    # -- reading it all out (admin view, export)

    def votes(self, annotator: str | None = None) -> list[Vote]:
        """Live votes (undone ones are gone from every count), oldest first."""
        sql = "SELECT * FROM votes WHERE undone_at IS NULL"
        args: tuple = ()
        if annotator is not None:
            sql, args = sql + " AND annotator = ?", (annotator,)
        return [_vote(r) for r in self._db().execute(sql + " ORDER BY voted_at, rowid", args)]

    def counts(self) -> dict[str, int]:
        db = self._db()
        return {
            "pairs": db.execute("SELECT count(*) FROM pairs").fetchone()[0],
            "votes": db.execute("SELECT count(*) FROM votes WHERE undone_at IS NULL").fetchone()[0],
            "undone": db.execute("SELECT count(*) FROM votes WHERE undone_at IS NOT NULL").fetchone()[0],
            "users": db.execute("SELECT count(*) FROM users").fetchone()[0],
        }


NAME = re.compile(r"[a-z0-9][a-z0-9_.@-]{0,63}")  # a canonical login name, matched whole


def canonical_name(name: str) -> str:
    """The form a login name is stored and compared in: Unicode NFKC, case-folded (`ALICE`, `Alice` and the
    full-width `ａｌｉｃｅ` are `alice`). Nothing is stripped: a name with a control character or a trailing newline
    stays unlike every valid name (`name_problem` refuses it)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a new login name, or None. Checked on its canonical form."""
    folded = canonical_name(name)
    if any(unicodedata.category(c)[0] == "C" for c in folded):
        return "has a control or invisible character (a newline, a tab ...)"
    if not NAME.fullmatch(folded):
        return "expected 1-64 letters, digits or _.@- starting with a letter or digit"
    return None


def _folded(name: str) -> str:
    """A stored name's canonical form, control characters and surrounding spaces dropped (for the migration)."""
    return "".join(c for c in canonical_name(name) if unicodedata.category(c)[0] != "C").strip() or name


def content_key(prompt: str | list, response_a: str, response_b: str) -> str:
    """The same prompt with the same two responses, in either order, is one pair."""
    return hashlib.sha256(json.dumps([prompt, sorted([response_a, response_b])]).encode()).hexdigest()


def _exists(db: sqlite3.Connection, annotator: str) -> bool:
    # Checked on every write so that `users remove` locks a user out of a running server at once.
    return db.execute("SELECT 1 FROM users WHERE name = ?", (annotator,)).fetchone() is not None


def _has_slot(db: sqlite3.Connection, pair_id: int, annotator: str, overlap: int, now: float) -> bool:
    filled, gold = db.execute(f"SELECT filled, {GOLD} FROM pairs p WHERE id = ?", (pair_id,)).fetchone()
    if gold is not None:
        return True  # gold pairs are for everyone
    held = db.execute("SELECT count(*) FROM leases WHERE pair_id = ? AND expires_at > ? AND annotator != ?",
                      (pair_id, now, annotator)).fetchone()[0]
    return filled + held < overlap


def _present(db: sqlite3.Connection, annotator: str, overlap: int, lease_seconds: float,
             now: float, order: str = "fifo", gold_rate: float = 0.0) -> Presentation | None:
    if not _exists(db, annotator):
        return None
    lease = db.execute("SELECT * FROM leases WHERE annotator = ?", (annotator,)).fetchone()
    if lease and (lease["expires_at"] > now or _has_slot(db, lease["pair_id"], annotator, overlap, now)):
        db.execute("UPDATE leases SET expires_at = ? WHERE annotator = ?", (now + lease_seconds, annotator))
        return _presentation(db, lease)
    db.execute("DELETE FROM leases WHERE annotator = ?", (annotator,))
    pair_id = _next_pair(db, annotator, overlap, now, order)
    if pair_id is None:
        return None
    if gold_rate and random.random() < gold_rate:  # a gold pair, mixed in where a regular one would come
        pair_id = _next_gold(db, annotator) or pair_id
    return _lease(db, annotator, pair_id, random.choice("ab"), now, lease_seconds)


def _insert_vote(db: sqlite3.Connection, lease: sqlite3.Row, choice: str, reason: str, now: float) -> None:
    db.execute("INSERT INTO votes (vote_id, pair_id, annotator, choice, left_side, reason, shown_at, voted_at) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               (lease["presentation_id"], lease["pair_id"], lease["annotator"], choice, lease["left_side"],
                reason.strip(), lease["shown_at"], now))
    if choice != "skip":
        db.execute("UPDATE pairs SET filled = filled + 1 WHERE id = ?", (lease["pair_id"],))
    db.execute("DELETE FROM leases WHERE annotator = ?", (lease["annotator"],))


def _next_gold(db: sqlite3.Connection, annotator: str) -> int | None:
    """A gold pair (metadata `gold`: the known answer) this annotator has not judged, at random; every annotator
    may judge every gold pair (no K)."""
    row = db.execute(
        f"SELECT p.id FROM pairs p WHERE {GOLD} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM votes v WHERE "
        "v.annotator = ? AND v.pair_id = p.id AND v.undone_at IS NULL) ORDER BY random() LIMIT 1",
        (annotator,)).fetchone()
    return row[0] if row else None


def _next_pair(db: sqlite3.Connection, annotator: str, overlap: int, now: float, order: str = "fifo") -> int | None:
    # Fullest pairs first, so pairs reach K votes and can be exported while the labeling goes on,
    # and overlapping votes for agreement accumulate from the start; then `ORDERS[order]`.
    row = db.execute(
        "SELECT p.id FROM pairs p "
        f"WHERE p.filled < :k AND {GOLD} IS NULL "
        "AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.annotator = :u AND v.pair_id = p.id AND v.undone_at IS NULL) "
        "AND p.filled + (SELECT count(*) FROM leases l WHERE l.pair_id = p.id AND l.expires_at > :now "
        "                AND l.annotator != :u) < :k "
        f"ORDER BY p.filled DESC, {ORDERS[order]} LIMIT 1",
        {"k": overlap, "u": annotator, "now": now}).fetchone()
    return row[0] if row else None


def _lease(db: sqlite3.Connection, annotator: str, pair_id: int, left_side: str, now: float,
           lease_seconds: float) -> Presentation:
    db.execute("INSERT INTO leases (annotator, presentation_id, pair_id, left_side, shown_at, expires_at) "
               "VALUES (?, ?, ?, ?, ?, ?)", (annotator, uuid.uuid4().hex, pair_id, left_side, now, now + lease_seconds))
    return _presentation(db, db.execute("SELECT * FROM leases WHERE annotator = ?", (annotator,)).fetchone())


def _presentation(db: sqlite3.Connection, lease: sqlite3.Row) -> Presentation:
    pair = db.execute("SELECT prompt, response_a, response_b FROM pairs WHERE id = ?", (lease["pair_id"],)).fetchone()
    a, b = pair["response_a"], pair["response_b"]
    left, right = (a, b) if lease["left_side"] == "a" else (b, a)
    return Presentation(lease["presentation_id"], lease["pair_id"], json.loads(pair["prompt"]), left, right,
                        lease["left_side"])


def _stored_choice(picked: str, left_side: str) -> str:
    if picked == "left":
        return left_side
    if picked == "right":
        return "b" if left_side == "a" else "a"
    return picked


def _vote(row: sqlite3.Row) -> Vote:
    return Vote(row["vote_id"], row["pair_id"], row["annotator"], row["choice"], row["left_side"], row["reason"],
                row["shown_at"], row["voted_at"])


def _user(row: sqlite3.Row) -> User:
    return User(row["name"], bool(row["is_admin"]), row["created_at"], row["password_hash"])
