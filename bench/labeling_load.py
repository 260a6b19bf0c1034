"""Labeling app under load: N annotators voting at once; prints votes/s and p50/p95 latency.

    python bench/labeling_load.py                       # starts its own server, 32 clients x 25 votes
    python bench/labeling_load.py --clients 8 --votes 50
    python bench/labeling_load.py --guessers 16           # and 16 clients sending wrong passwords meanwhile
    python bench/labeling_load.py --url http://127.0.0.1:7860 --password PW   # a running app whose
                                                        # users bench01..benchNN exist with password PW

Each client is a separate annotator account that logs in through Gradio's /login, opens
the page through its `load` event, and votes through `POST /label/api/vote`, the route
the page's buttons call, so a vote here is a vote there: one store transaction (fsynced)
that records it and leases the next pair, which is then rendered. Latency is per vote
request, measured at the client; votes/s counts acknowledged votes over the wall time
from the first to the last. The clients are threads of this process on the same machine
as the server, so on a small machine they take CPU from it (the numbers are a floor).
Target on 2 cores: >= 100 votes/s with 32 clients and p95 < 250 ms, also with 16 password guessers
(`--guessers`: each posts wrong passwords for an account `victim` to /login in a loop, from the first
acknowledged vote to the last; the server's throttle answers most of them unchecked, see
labeling_app/throttle.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labeling_app.loadtest import PASSWORD, LoadResult, ServerProcess, run_annotators, seed_database  # noqa: E402


def load(url: str, accounts: list, votes: int, guessers: int) -> tuple[LoadResult, int]:
    """The annotators' run, with `guessers` threads posting wrong passwords while votes are acknowledged;
    returns the result and how many guesses were answered."""
    import httpx

    result, stop, answered, lock = LoadResult(), threading.Event(), [0], threading.Lock()

    def guesser(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not result.acked and not stop.is_set():
                stop.wait(0.01)
            while not stop.is_set():
                client.post("/login", data={"username": "victim", "password": f"guess {i}"})
                with lock:
                    answered[0] += 1

    threads = [threading.Thread(target=guesser, args=(i,), daemon=True) for i in range(guessers)]
    for t in threads:
        t.start()
    try:
        run_annotators(url, accounts, votes, result=result)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return result, answered[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32, help="concurrent annotators (default 32)")
    p.add_argument("--votes", type=int, default=25, help="votes per annotator (default 25)")
    p.add_argument("--overlap", type=int, default=3, help="votes per pair, K (default 3)")
    p.add_argument("--url", help="a running app to load instead of starting one")
    p.add_argument("--password", default=PASSWORD, help="password of the bench users (with --url)")
    p.add_argument("--guessers", type=int, default=0,
                   help="clients posting wrong passwords to /login while the annotators vote (default 0)")
    args = p.parse_args()

    names = [f"bench{i:02d}" for i in range(1, args.clients + 1)]
    accounts = [(name, args.password) for name in names]
    if args.url:
        result, guesses = load(args.url, accounts, args.votes, args.guessers)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "bench.sqlite"
            seed_database(db, names + ["victim"], pairs=args.clients * args.votes)
            with ServerProcess(db, overlap=args.overlap) as server:
                result, guesses = load(server.url, accounts, args.votes, args.guessers)
    print(f"clients {args.clients}, votes per client {args.votes}, guessers {args.guessers}, cpus {os.cpu_count()}")
    if args.guessers:
        print(f"wrong-password logins answered meanwhile: {guesses} ({guesses / max(result.seconds, 1e-9):.0f}/s)")
    print(f"acknowledged votes {len(result.acked)} in {result.seconds:.2f} s: {result.votes_per_second:.0f} votes/s")
    print(f"latency p50 {result.percentile(50) * 1000:.0f} ms, p95 {result.percentile(95) * 1000:.0f} ms, "
          f"max {max(result.latencies, default=0) * 1000:.0f} ms")
    if result.errors:
        print(f"{len(result.errors)} errors, first: {result.errors[0]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
