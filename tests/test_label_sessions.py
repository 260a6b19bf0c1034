"""Sessions owned by the app (labeling_app/sessions.py): in the label database, hashed, expiring, ended by logout,
password change and removal, alive across a restart; driven against the real server."""

import hashlib
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from labeling_app.loadtest import PASSWORD, ServerProcess, seed_database
from labeling_app.store import LabelStore


def test_session_rules_by_hand(tmp_path):
    db = tmp_path / "labels.sqlite"
    seed_database(db, ["ann"], pairs=1)
    with LabelStore(db) as store:
        token = store.create_session("ann", now=1000.0)
        assert store.session_user(token, idle=60, lifetime=600, now=1059.0) == "ann"
        # last use is written at most once a minute (SEEN_EVERY), so 1059 was not: 100 s idle since 1000
        assert store.session_user(token, idle=60, lifetime=600, now=1100.0) is None
    with LabelStore(db) as store:
        token = store.create_session("ann", now=1000.0)
        assert store.session_user(token, idle=100, lifetime=150, now=1090.0) == "ann"  # seen at 1090 (> 60 s old)
        assert store.session_user(token, idle=100, lifetime=150, now=1140.0) == "ann"  # idle 50 s: alive
        assert store.session_user(token, idle=100, lifetime=150, now=1151.0) is None  # 151 s after login: over
        assert store.sessions("ann") == 0  # an expired session is deleted
        assert store.session_user("not a token", idle=100, lifetime=150) is None
    stored = sqlite3.connect(db).execute("SELECT token_hash FROM sessions").fetchall()
    assert stored == []


@pytest.fixture
def server(tmp_path):
    # The default idle limit (12 h). A short one (this fixture once had 3.6 s) races the restart below: a restart
    # takes 3-8 s on 2 busy cores (Gradio's import alone), so the session sometimes went idle while the server was
    # down and the first request after it got 401. Idleness is tested by ageing a session in the database instead.
    db = tmp_path / "labels.sqlite"
    seed_database(db, ["ann", "bob"], pairs=4)
    with ServerProcess(db) as running:
        yield running


def age_session(db, client: httpx.Client, seconds: float) -> None:
    """Move a session's last use `seconds` into the past, as if it had gone unused that long."""
    token_hash = hashlib.sha256(client.cookies["align-session"].encode()).hexdigest()
    connection = sqlite3.connect(db)
    with connection:
        connection.execute("UPDATE sessions SET last_seen = last_seen - ? WHERE token_hash = ?", (seconds, token_hash))
    connection.close()


def logged_in(url: str, user: str = "ann") -> tuple[httpx.Client, httpx.Response]:
    client = httpx.Client(base_url=url)
    response = client.post("/login", data={"username": user, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return client, response


def test_the_cookie_is_httponly_lax_and_the_token_is_stored_hashed(server):
    client, response = logged_in(server.url)
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("align-session=") and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "Secure" not in cookie  # plain http here; --https or an https request adds it
    token = client.cookies["align-session"]
    [(stored,)] = sqlite3.connect(server.db).execute("SELECT token_hash FROM sessions WHERE user = 'ann'")
    assert stored == hashlib.sha256(token.encode()).hexdigest() and token not in stored
    assert client.get("/config").status_code == 200
    https = client.post("/login", data={"username": "bob", "password": PASSWORD},
                        headers={"X-Forwarded-Proto": "https"})  # a proxy on 127.0.0.1 says the client used https
    assert "Secure" in https.headers["set-cookie"]


def test_a_session_survives_a_restart_and_ends_on_logout_idle_password_change_and_removal(server):
    ann, _ = logged_in(server.url)
    server.stop()
    server.start()
    assert ann.get("/config").status_code == 200  # the session is in the database, not in the server's memory

    assert ann.get("/logout").status_code == 200 and ann.get("/config").status_code == 200  # GET shows a button
    out = ann.post("/logout")
    assert out.status_code == 200 and ann.get("/config").status_code == 401
    page = httpx.get(server.url + "/", cookies={"align-session": "gone"})
    assert page.status_code == 303 and page.headers["location"] == "login"

    idle, _ = logged_in(server.url)
    age_session(server.db, idle, 11.9 * 3600)
    assert idle.get("/config").status_code == 200  # used 11.9 h ago: alive (and now used again)
    age_session(server.db, idle, 12.1 * 3600)
    assert idle.get("/config").status_code == 401  # unused for over 12 h (--session-idle-hours): ended

    def users(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "labeling_app", "users", *args, "--db", str(server.db)],
                              input=stdin, capture_output=True, text=True)

    ann, _ = logged_in(server.url)
    assert users("passwd", "ann", "--password-stdin", stdin="a-new-password-9\n").returncode == 0
    assert ann.get("/config").status_code == 401  # a new password logs every session out
    bob, _ = logged_in(server.url, "bob")
    assert users("remove", "bob").returncode == 0
    assert bob.get("/config").status_code == 401
    assert bob.post("/label/api/vote", json={"presentation_id": "x", "choice": "left"}).status_code == 401


def test_a_browser_login_form_posts_and_lands_on_the_page(server):
    form = httpx.get(server.url + "/login")
    assert form.status_code == 200 and 'name="username"' in form.text and 'type="password"' in form.text
    html = {"Accept": "text/html"}
    wrong = httpx.post(server.url + "/login", data={"username": "ann", "password": "nope"}, headers=html)
    assert wrong.status_code == 400 and "Wrong name or password, or too many tries" in wrong.text
    time.sleep(0.6)  # the failure's backoff (throttle.py)
    right = httpx.post(server.url + "/login", data={"username": "ann", "password": PASSWORD}, headers=html)
    assert right.status_code == 303 and right.headers["location"] == "./"
