"""Labeling app under load: N annotators voting at once; prints votes/s and p50/p95 latency.

    python bench/labeling_load.py                       # starts its own server, 32 clients x 25 votes
    python bench/labeling_load.py --clients 8 --votes 50
    python bench/labeling_load.py --url http://127.0.0.1:7860 --password PW   # a running app whose
                                                        # users bench01..benchNN exist with password PW

Each client is a separate annotator account that logs in through Gradio's /login, opens
the page through its `load` event, and votes through `POST /label/api/vote`, the route
the page's buttons call, so a vote here is a vote there: one store transaction (fsynced)
that records it and leases the next pair, which is then rendered. Latency is per vote
request, measured at the client; votes/s counts acknowledged votes over the wall time
from the first to the last. The clients are threads of this process on the same machine
as the server, so on a small machine they take CPU from it (the numbers are a floor).
Target on 2 cores: >= 100 votes/s with 32 clients and p95 < 250 ms.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labeling_app.loadtest import PASSWORD, ServerProcess, run_annotators, seed_database  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32, help="concurrent annotators (default 32)")
    p.add_argument("--votes", type=int, default=25, help="votes per annotator (default 25)")
    p.add_argument("--overlap", type=int, default=3, help="votes per pair, K (default 3)")
    p.add_argument("--url", help="a running app to load instead of starting one")
    p.add_argument("--password", default=PASSWORD, help="password of the bench users (with --url)")
    args = p.parse_args()

    names = [f"bench{i:02d}" for i in range(1, args.clients + 1)]
    accounts = [(name, args.password) for name in names]
    if args.url:
        result = run_annotators(args.url, accounts, args.votes)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "bench.sqlite"
            seed_database(db, names, pairs=args.clients * args.votes)
            with ServerProcess(db, overlap=args.overlap) as server:
                result = run_annotators(server.url, accounts, args.votes)
    print(f"clients {args.clients}, votes per client {args.votes}, cpus {os.cpu_count()}")
    print(f"acknowledged votes {len(result.acked)} in {result.seconds:.2f} s: {result.votes_per_second:.0f} votes/s")
    print(f"latency p50 {result.percentile(50) * 1000:.0f} ms, p95 {result.percentile(95) * 1000:.0f} ms, "
          f"max {max(result.latencies, default=0) * 1000:.0f} ms")
    if result.errors:
        print(f"{len(result.errors)} errors, first: {result.errors[0]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
