"""`align data check` on 100k synthetic preference rows: seconds, rows/s, and whether the planted problems are found.

There is no peer tool to compare with, so the time is printed against the target: 100k rows in under 60 s
on 2 cores. The rows are random words from a 5000-word vocabulary (prompt 8-20 words, answers 10-40), so no
two are alike by chance; then, at distinct positions, planted:

- exact duplicates: copies of an earlier row (each planted row from a different row of the first half);
- near duplicates: a copy of an earlier, unplanted row with the last word of its rejected answer replaced
  (one 3-word shingle of 26 or more changes: Jaccard >= 25/27 = 0.93);
- contamination: rows whose prompt holds a 13-word run of one of 50 evaluation prompts (20 words each).

    .venv/bin/python bench/data_check.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.data_check import check_file  # noqa: E402

TARGET_S = 60.0


def sentence(rng: random.Random, vocab: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))


def make_rows(n: int, seed: int = 0) -> tuple[list[dict], list[dict], dict]:
    """(training rows, evaluation rows, planted counts)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    rows = [{"prompt": sentence(rng, vocab, 8, 20), "chosen": sentence(rng, vocab, 10, 40),
             "rejected": sentence(rng, vocab, 10, 40)} for _ in range(n)]
    evals = [{"prompt": sentence(rng, vocab, 20, 20), "chosen": "yes", "rejected": "no"} for _ in range(50)]
    planted = {"exact_duplicates": n // 100, "near_duplicates": n // 200, "contaminated": n // 1000}
    positions = rng.sample(range(n // 2, n), sum(planted.values()))
    sources = iter(rng.sample(range(n // 2), len(positions)))  # one source each: no two planted rows alike
    at = 0
    for what, count in planted.items():
        for pos in positions[at:at + count]:
            src = dict(rows[next(sources)])
            if what == "near_duplicates":
                src["rejected"] = src["rejected"].rsplit(" ", 1)[0] + " planted"
            elif what == "contaminated":
                run = " ".join(rng.choice(evals)["prompt"].split()[3:16])
                src = {"prompt": f"{sentence(rng, vocab, 3, 6)} {run} {sentence(rng, vocab, 0, 4)}".strip(),
                       "chosen": sentence(rng, vocab, 10, 40), "rejected": sentence(rng, vocab, 10, 40)}
            rows[pos] = src
        at += count
    return rows, evals, planted


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    rows, evals, planted = make_rows(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        train, ev = Path(tmp, "train.jsonl"), Path(tmp, "eval.jsonl")
        train.write_text("".join(json.dumps(r) + "\n" for r in rows))
        ev.write_text("".join(json.dumps(r) + "\n" for r in evals))
        start = time.perf_counter()
        report, keep = check_file(str(train), [str(ev)], near=0.8)
        seconds = time.perf_counter() - start
    found = {"exact_duplicates": report["exact_duplicates"], "near_duplicates": report["near_duplicates"],
             "contaminated": report["contaminated"][str(ev)]}
    print(f"align data check: {args.rows} preference rows, 1 --against file of {len(evals)} rows")
    print(f"  {seconds:.1f} s, {args.rows / seconds:,.0f} rows/s "
          f"({'within' if seconds < TARGET_S else 'OVER'} the {TARGET_S:.0f} s target for 100k rows)")
    ok = True
    for what, want in planted.items():
        ok &= found[what] == want
        print(f"  {what:<17} planted {want:>5}  found {found[what]:>5}  {'ok' if found[what] == want else 'MISMATCH'}")
    print(f"  kept by --out: {len(keep)} rows (expected {args.rows - sum(planted.values())})")
    ok &= len(keep) == args.rows - sum(planted.values())
    return 0 if ok and seconds < TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
