"""Login throttling (labeling_app/throttle.py): the rules by hand, then the real server under guessing."""

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from labeling_app.loadtest import PASSWORD, ServerProcess, seed_database
from labeling_app.store import LabelStore
from labeling_app.throttle import LOCK_AFTER, WINDOW, Verdict, backoff, decide


def test_backoff_and_lockout_by_hand():
    assert [backoff(n) for n in range(0, 8)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    now = 1000.0
    assert decide([], [], now) == Verdict(True)
    assert decide([now - 0.2], [], now) == Verdict(False, pytest.approx(0.3))  # one failure: wait 0.5 s
    assert decide([now - 0.6], [], now) == Verdict(True)
    # the address's count rules when it is the larger: 3 failures from there -> 2 s after its last one
    assert decide([], [now - 5, now - 4, now - 1.5], now) == Verdict(False, pytest.approx(0.5))
    ten = [now - 300 + i for i in range(LOCK_AFTER)]
    locked = decide(ten, [], now)
    assert locked.locked and not locked.allowed and locked.wait == pytest.approx(ten[0] + WINDOW - now)
    # failures older than the window count for nothing
    assert decide([now - WINDOW - 1] * LOCK_AFTER, [], now) == Verdict(True)


@pytest.fixture
def server(tmp_path):
    db = tmp_path / "labels.sqlite"
    seed_database(db, ["ann", "bob"], pairs=4)
    with ServerProcess(db) as running:
        yield running


def login(url: str, user: str, password: str) -> int:
    return httpx.post(url + "/login", data={"username": user, "password": password}, timeout=60).status_code


def test_parallel_guesses_get_one_check_per_step_and_the_right_password_waits(server):
    """Ten wrong passwords at once: only the first few are checked (the rest refused at once, uncounted), and the
    right password sent right after is refused too, until the backoff has passed."""
    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(lambda i: login(server.url, "ann", f"guess {i}"), range(10)))
    assert codes == [400] * 10
    with LabelStore(server.db) as store:
        checked = store.login_failures(0, name="ann")
    assert 1 <= len(checked) < 10
    assert login(server.url, "ann", PASSWORD) == 400  # within the backoff: not even checked
    time.sleep(backoff(len(checked)) + 0.2)
    assert login(server.url, "ann", PASSWORD) == 200
    with LabelStore(server.db) as store:
        assert store.login_failures(0, name="ann") == []  # a good login clears the account's failures


def test_ten_failures_lock_the_account_across_a_restart_until_unlocked(server):
    now = time.time()
    with LabelStore(server.db) as store:
        for i in range(LOCK_AFTER):  # ten failures in the last minutes, from elsewhere
            store.record_login_failure("ann", "203.0.113.7", now - 120 + i)
    assert login(server.url, "ann", PASSWORD) == 400
    server.stop()
    server.start()
    assert login(server.url, "ann", PASSWORD) == 400  # the lock is in the database
    assert login(server.url, "bob", PASSWORD) == 200  # another account is not locked
    done = subprocess.run([sys.executable, "-m", "labeling_app", "users", "unlock", "ann", "--db", str(server.db)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "unlocked 'ann': 10 failed logins forgotten" in done.stdout
    assert login(server.url, "ann", PASSWORD) == 200
    missing = subprocess.run([sys.executable, "-m", "labeling_app", "users", "unlock", "zoe", "--db",
                              str(server.db)], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip().endswith(f"no user 'zoe' in {server.db}")
