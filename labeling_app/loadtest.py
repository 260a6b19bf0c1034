"""Many annotators voting at once against a real server: the load test, crash test and benchmark.

`ServerProcess` runs `python -m labeling_app serve` as a child process (so it can be
SIGKILLed like a real crash), and `run_annotators` drives one thread per annotator, each
a `LabelingClient` calling the page's own endpoints. Every vote whose request came back
with "saved" is recorded as acknowledged, so a test can check the database against
exactly what the server promised. When the server goes away mid-request, an annotator
keeps retrying the same vote (same presentation id) until the server is back, as a
browser retry would; the store's idempotent vote ids make that safe.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx

from labeling_app.client import Disconnected, LabelingClient, RequestFailed

ACKNOWLEDGED = ("Saved.", "That vote was already saved; it counts once.")
PASSWORD = "load-test-password"
VERDICTS = ("left", "right", "tie", "both_bad")


def seed_database(path: str | Path, annotators: list[str], pairs: int, password: str = PASSWORD) -> None:
    """A database with `pairs` pairs of multi-paragraph markdown answers and these annotators."""
    from labeling_app.passwords import hash_password
    from labeling_app.store import LabelStore, NewPair

    body = ("Here is a careful answer with **bold**, `code` and a list:\n\n- first point\n- second point\n\n"
            "```python\nfor i in range(3):\n    print(i)\n```\n\n") * 2
    with LabelStore(path, create=True) as store:
        store.add_pairs(NewPair(f"Question {i}: explain topic {i} briefly.", f"Answer A{i}. " + body,
                                f"Answer B{i}. " + body, {"model_a": "m1", "model_b": "m2"}) for i in range(pairs))
        digest = hash_password(password)  # one real hash shared: 32 scrypt runs would only slow the set-up
        for name in annotators:
            store.add_user(name, digest)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`labeling_app serve` in a child process, started and stopped (or killed) on demand."""

    def __init__(self, db: str | Path, port: int | None = None, overlap: int = 3, extra: list[str] = (),
                 log: str | Path | None = None):
        self.db, self.overlap, self.extra = str(db), overlap, list(extra)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log) if log else Path(self.db).with_suffix(".server.log")
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> ServerProcess:
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "labeling_app", "serve", "--db", self.db, "--port", str(self.port),
                 "--overlap", str(self.overlap), *self.extra],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[1])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log}:\n"
                                   + self.log.read_text()[-2000:])
            try:
                if httpx.get(self.url + "/login", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not answer on {self.url} within {timeout:.0f} s; see {self.log}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or an OOM kill."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class LoadResult:
    acked: dict[str, str] = field(default_factory=dict)  # vote id -> annotator
    latencies: list[float] = field(default_factory=list)  # seconds per vote request that succeeded
    retries: int = 0  # requests sent again after a connection error or a 5xx
    resent: int = 0  # acknowledged votes deliberately sent a second time
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def votes_per_second(self) -> float:
        return len(self.acked) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_annotators(url: str, accounts: list[tuple[str, str]], votes_each: int, resend_every: int = 0,
                   retry_for: float = 0.0, seed: int = 0, result: LoadResult | None = None) -> LoadResult:
    """Every account logs in and loads its page, then all vote `votes_each` times at once.

    `resend_every=n` sends every n-th vote a second time after its acknowledgement (a
    client retry); `retry_for` is how long an annotator keeps retrying through a dead
    server before giving up. Pass `result` to watch `result.acked` grow from another thread."""
    result = result if result is not None else LoadResult()
    lock = threading.Lock()
    ready = threading.Barrier(len(accounts) + 1)

    def annotator(index: int, name: str, password: str) -> None:
        rng = random.Random(seed * 1000 + index)
        client = LabelingClient(url, name, password)
        try:
            _retrying(lambda: (client.login(), client.load()), client, retry_for, result, lock)
        except Exception as e:  # noqa: BLE001 -- reported, and the barrier must still be met
            with lock:
                result.errors.append(f"{name}: {e}")
            ready.wait()
            return
        ready.wait()
        try:
            for n in range(1, votes_each + 1):
                if not client.page.presentation_id:
                    break
                pid, picked = client.page.presentation_id, rng.choice(VERDICTS)
                start = time.perf_counter()
                page = _retrying(partial(client.vote, picked, f"reason {n}", presentation_id=pid), client,
                                 retry_for, result, lock)
                elapsed = time.perf_counter() - start
                if page.status not in ACKNOWLEDGED:
                    with lock:
                        result.errors.append(f"{name}: vote {pid} answered {page.status!r}")
                    continue
                resend = resend_every and n % resend_every == 0
                if resend:
                    again = _retrying(partial(client.vote, picked, "retry", presentation_id=pid), client,
                                      retry_for, result, lock)
                    if again.status != ACKNOWLEDGED[1]:
                        with lock:
                            result.errors.append(f"{name}: resent vote {pid} answered {again.status!r}")
                with lock:
                    result.acked[pid] = name
                    result.latencies.append(elapsed)
                    result.resent += bool(resend)
        except Exception as e:  # noqa: BLE001
            with lock:
                result.errors.append(f"{name}: {e}")
        finally:
            client.close()

    threads = [threading.Thread(target=annotator, args=(i, name, pw), daemon=True)
               for i, (name, pw) in enumerate(accounts)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - start
    return result


def _retrying(call, client: LabelingClient, retry_for: float, result: LoadResult, lock: threading.Lock):
    """Run `call`; while the server is unreachable (or restarting), log in again and repeat it."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            return call()
        except (Disconnected, RequestFailed) as e:
            refused = isinstance(e, RequestFailed) and "HTTP 4" in str(e) and "HTTP 401" not in str(e)
            if refused or time.monotonic() >= deadline:
                raise
            with lock:
                result.retries += 1
            time.sleep(0.2)
            # A restarted server has forgotten every session: log in again before the retry.
            try:
                client.login()
            except (Disconnected, RequestFailed):
                pass
