"""`align data check FILE`: what is wrong with a dataset before a stage trains on it.

One pass over the rows reports

- the format check the stages run (`align.data`), as one line naming the file and row, exit 2;
- exact duplicates: rows whose canonical JSON (keys sorted) repeats an earlier row's;
- near duplicates: rows whose text is at least `--near` (Jaccard) like an earlier row's, exact
  duplicates aside. MinHash LSH (datasketch) over 3-word shingles finds the candidates; the exact
  Jaccard of the two shingle sets decides, so a reported pair really is that close. LSH can miss a pair:
  at most 1% of pairs at exactly the threshold, fewer above it (`lsh_params`), and, rarely, a pair inside
  a crowd of similar rows (`near_duplicates`);
- contamination against each `--against` file (see `AgainstIndex` for the n-gram rule);
- empty answers (an empty or whitespace completion, chosen, rejected or assistant turn) and preference
  pairs whose chosen equals their rejected: the stages refuse both, here they are counted instead;
- length statistics per field and, for preference pairs, `length_bias`.

Rows are numbered from 0 in file order (blank JSONL lines are not rows). The text of a row is its
prompt (every turn before the answer, system turn included) and its answers (chosen and rejected, or
the completion, or the final assistant turns of `messages`); other fields (`margin`, `label`) are
not text. Words, for shingles and n-grams, are lower-cased `\\w+` runs: case and punctuation do not
count, as in GPT-3's decontamination.

Exit codes: 0 clean, 1 something found (duplicates, near duplicates, contamination, chosen == rejected,
empty answers), 2 bad input. `--out` writes a copy without the exact duplicates, near duplicates and
contaminated rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import zlib
from dataclasses import dataclass, field

from align.errors import AlignError

SHINGLE = 3  # words per shingle for near duplicates
NUM_PERM = 128  # MinHash permutations
MAX_CANDIDATES = 100  # likely LSH candidates given the exact check, per row
BUCKET_CAP = 32  # rows kept per LSH bucket (see near_duplicates)
ESTIMATE_SLACK = 0.15  # MinHash agreement this far under the threshold still gets the exact check (~4 sigma)
MAX_N, MIN_N = 13, 8  # contamination n-grams, see AgainstIndex
EXAMPLES = 5  # example rows per finding
FILLER = "x"  # stands in for an empty answer while the rest of the row is format-checked
FINDINGS = ("exact_duplicates", "near_duplicates", "contaminated", "chosen_equals_rejected", "empty")
WORD = re.compile(r"\w+")

EPILOG = """examples:
  align data check recipes/data/tiny_prefs.jsonl
  align data check train.jsonl --against eval.jsonl --against test.jsonl --out train.clean.jsonl
  align data check train.jsonl --json --tokenizer tiny     lengths in the tiny model's tokens, as JSON

exit status: 0 clean, 1 something found, 2 bad input (missing file, malformed row, bad flag)
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    data = subparsers.add_parser("data", help="check a dataset: format, duplicates, contamination, lengths",
                                 description="Tools for datasets.")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p = sub.add_parser(
        "check", help="format, duplicates, near duplicates, contamination, empty answers, length bias",
        description="Check FILE as the stages would (a malformed row: one line naming the file and row, exit 2),\n"
                    "then count exact duplicates, near duplicates (MinHash LSH over word shingles), rows that\n"
                    "overlap each --against file (8- to 13-word n-grams, or the same prompt), preference pairs\n"
                    "with chosen == rejected and empty answers, and report lengths per field and length bias.\n"
                    "Rows are numbered from 0 in file order.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="dataset: JSONL, JSON, Parquet, CSV or a save_to_disk folder")
    p.add_argument("--against", action="append", default=[], metavar="EVAL",
                   help="an evaluation file to check for contamination (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.add_argument("--out", metavar="CLEAN",
                   help="write a JSONL copy without exact duplicates, near duplicates and contaminated rows")
    p.add_argument("--near", type=float, default=0.8, metavar="J",
                   help="Jaccard similarity of word shingles from which two rows are near duplicates (default 0.8)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="count lengths in this tokenizer's tokens (a model or tokenizer folder, 'tiny', 'smollm2'); "
                        "default: whitespace-separated words")
    return data


def run(args) -> int:
    if getattr(args, "data_command", None) != "check":
        raise AlignError("expected a subcommand: align data check FILE (see align data check --help)")
    if not 0 < args.near <= 1:
        raise AlignError(f"--near must be in (0, 1]; got {args.near}")
    if args.out and os.path.isdir(args.out):
        raise AlignError(f"{args.out}: --out is a folder; expected a file path")
    report, keep = check_file(args.file, args.against, near=args.near, tokenizer=args.tokenizer,
                              progress=not args.quiet)
    if args.out:
        from align.artifacts import write_text

        write_text(args.out, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in keep))
        report["out"] = {"path": args.out, "rows": len(keep), "dropped": report["rows"] - len(keep)}
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(format_report(report))
    return 0 if report["clean"] else 1


def check_file(source: str, against=(), near: float = 0.8, tokenizer: str | None = None,
               progress: bool = False) -> tuple[dict, list[dict]]:
    """The report (the `--json` object) and the rows `--out` keeps."""
    from align.data import read_rows

    data = read_rows(source)
    if not data.rows:
        raise AlignError(f"{source}: dataset is empty")
    kind = row_kind(data.rows[0], data.at(0))
    indexes = [AgainstIndex.build(path) for path in against]  # bad --against input fails before the long part
    count, unit = (_token_counter(tokenizer), "tokens") if tokenizer else (_word_counts, "words")
    empty, same = validate(data, kind)
    texts = [row_fields(row) for row in data.rows]
    exact = exact_duplicates(data.rows)
    near_dups = near_duplicates(["\n".join(t.values()) for t in texts], near, skip=exact, progress=progress)
    dirty = {ix.path: ix.contaminated(texts) for ix in indexes}
    lengths = field_lengths(texts, count)
    bias = length_bias(lengths.get("chosen", []), lengths.get("rejected", []))
    report = {
        "file": source, "kind": kind, "rows": len(data.rows),
        "exact_duplicates": len(exact), "near_duplicates": len(near_dups), "near_threshold": near,
        "contaminated": {path: len(rows) for path, rows in dirty.items()},
        "contamination_n": {ix.path: ix.sizes() for ix in indexes},
        "chosen_equals_rejected": len(same), "empty": len(empty),
        "length_unit": unit, "lengths": {name: describe(values) for name, values in lengths.items()},
        **bias,
        "examples": {"exact_duplicates": sorted(exact)[:EXAMPLES], "near_duplicates": sorted(near_dups)[:EXAMPLES],
                     "contaminated": {path: rows[:EXAMPLES] for path, rows in dirty.items()},
                     "chosen_equals_rejected": same[:EXAMPLES], "empty": empty[:EXAMPLES]},
        "duplicate_of": {"exact_duplicates": {str(i): exact[i] for i in sorted(exact)[:EXAMPLES]},
                         "near_duplicates": {str(i): near_dups[i] for i in sorted(near_dups)[:EXAMPLES]}},
    }
    report["clean"] = not (exact or near_dups or same or empty or any(dirty.values()))
    drop = set(exact) | set(near_dups) | {i for rows in dirty.values() for i in rows}
    return report, [row for i, row in enumerate(data.rows) if i not in drop]


# ---- the format check ------------------------------------------------------------------------------------


def row_kind(row: dict, at: str) -> str:
    """The `align.data` kind the first row says the file holds."""
    from align.data import KINDS, detect_format

    fmt = detect_format(row)
    if fmt == "preference":
        return "preference"
    if fmt in ("messages", "prompt_completion"):
        return "kto" if "label" in row else "sft"
    if fmt == "prompts":
        return "prompts"
    expected = "; ".join(f"{k}: {KINDS[k]}" for k in ("sft", "preference", "prompts", "unpaired"))
    raise AlignError(f"{at}: cannot tell the format from the fields {sorted(row)}; expected rows like {expected}")


def validate(data, kind: str) -> tuple[list[int], list[int]]:
    """Run the stages' row check on every row; return (rows with an empty answer, rows with chosen == rejected).

    The stages refuse those two problems; here they are findings, so the check sees a copy with the empty
    answers filled and the rejected answer told apart, and still fails on everything else."""
    from align.data import _check_row  # the per-row check of `load_rows`, the one the stages run

    empty, same = [], []
    for i, row in enumerate(data.rows):
        fixed = _filled(row)
        if fixed is not row:
            empty.append(i)
        if "chosen" in row and row.get("chosen") == row.get("rejected"):
            same.append(i)
            if fixed is row:
                fixed = dict(row)
            fixed["rejected"] = _told_apart(fixed["rejected"])
        _check_row(fixed, kind, data.at(i))
    return empty, same


def _filled(row: dict) -> dict:
    """`row` itself when no answer is empty, else a copy with each empty answer (or assistant turn) filled."""
    implicit = "prompt" not in row  # preference pairs without a prompt hold the whole chat in chosen/rejected
    out = row
    for key in ("chosen", "rejected", "completion", "messages"):
        if key not in row:
            continue
        value = _fill(row[key], response=key != "messages" and not (implicit and key != "completion"))
        if value is not row[key]:
            out = dict(row) if out is row else out
            out[key] = value
    return out


def _fill(value, response: bool):
    if isinstance(value, str):
        return value if value.strip() else FILLER
    if not isinstance(value, list):
        return value
    if not value and response:
        return [{"role": "assistant", "content": FILLER}]
    blank = [isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str)
             and not m["content"].strip() for m in value]
    if not any(blank):
        return value
    return [{**m, "content": FILLER} if b else m for m, b in zip(value, blank)]


def _told_apart(value):
    if isinstance(value, str):
        return value + " #"
    if isinstance(value, list) and value and isinstance(value[-1], dict) and isinstance(value[-1].get("content"), str):
        return value[:-1] + [{**value[-1], "content": value[-1]["content"] + " #"}]
    return value


# ---- the text of a row -----------------------------------------------------------------------------------


def row_fields(row: dict) -> dict[str, str]:
    """The text of a row by field: `prompt`, then `chosen`/`rejected` or `completion` (see the module doc).

    Lenient, so it serves `--against` files of any of the formats (and, failing those, every string value)."""
    if isinstance(row.get("messages"), list):
        turns = [m for m in row["messages"] if isinstance(m, dict)]
        k = len(turns)
        while k and turns[k - 1].get("role") == "assistant":
            k -= 1
        return {"prompt": _text(turns[:k]), "completion": _text(turns[k:])}
    out = {}
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if "prompt" in row:
        out["prompt"] = _text(row["prompt"])
    elif isinstance(chosen, list) and chosen:
        out["prompt"] = _text(chosen[:-1])
        chosen, rejected = chosen[-1:], rejected[-1:] if isinstance(rejected, list) else rejected
    for name, value in (("chosen", chosen), ("rejected", rejected), ("completion", row.get("completion"))):
        if value is not None:
            out[name] = _text(value)
    if not out:
        out["prompt"] = "\n".join(v for v in row.values() if isinstance(v, str))
    return out


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str))
    return ""


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


# ---- duplicates ------------------------------------------------------------------------------------------


def canonical(row: dict) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def exact_duplicates(rows: list[dict]) -> dict[int, int]:
    """{row: the earlier row it repeats} for every row whose canonical JSON an earlier row has."""
    first, out = {}, {}
    for i, row in enumerate(rows):
        key = canonical(row)
        if key in first:
            out[i] = first[key]
        else:
            first[key] = i
    return out


def shingles(text: str) -> set[str]:
    """Word 3-grams; a text of fewer words is one shingle of all of them, a text of none has none."""
    w = words(text)
    if len(w) <= SHINGLE:
        return {" ".join(w)} if w else set()
    return {" ".join(w[i:i + SHINGLE]) for i in range(len(w) - SHINGLE + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def near_duplicates(texts: list[str], threshold: float, skip=(), progress: bool = False) -> dict[int, int]:
    """{row: the earliest candidate earlier row it is a near duplicate of} (Jaccard of shingles >= threshold).

    Rows in `skip` (the exact duplicates) are neither reported nor compared with. Each row's MinHash signature
    (datasketch) is cut into the bands of `lsh_params`; earlier rows with an equal band are candidates. A band's
    bucket keeps its first BUCKET_CAP rows only: rows that share a long system prompt share whole bands, and
    datasketch's MinHashLSH, whose query returns whole buckets, made those files quadratic (20k such rows took
    43 s). A near duplicate still meets its original in the bands its own words decide, where buckets stay
    small. Candidates whose signatures agree within ESTIMATE_SLACK of the threshold get the exact check."""
    import numpy as np
    from datasketch import MinHash

    bands, r = lsh_params(threshold)
    perms = MinHash(num_perm=NUM_PERM, hashfunc=zlib.crc32).permutations
    signatures = np.zeros((len(texts), NUM_PERM), dtype=np.uint32)
    tables: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    out = {}
    for i in _bar(range(len(texts)), progress, "near duplicates"):
        mine = shingles(texts[i]) if i not in skip else None
        if not mine:
            continue
        m = MinHash(num_perm=NUM_PERM, hashfunc=zlib.crc32, permutations=perms, scheme="affine32")
        m.update_batch([s.encode() for s in mine])
        signatures[i] = m.hashvalues
        keys = [signatures[i, k * r:(k + 1) * r].tobytes() for k in range(bands)]
        candidates = sorted({j for table, key in zip(tables, keys) for j in table.get(key, ())})
        if candidates:
            agree = (signatures[candidates] == signatures[i]).mean(axis=1)
            likely = [j for j, a in zip(candidates, agree) if a >= threshold - ESTIMATE_SLACK][:MAX_CANDIDATES]
            close = next((j for j in likely if jaccard(mine, shingles(texts[j])) >= threshold), None)
            if close is not None:
                out[i] = close
        for table, key in zip(tables, keys):
            bucket = table.setdefault(key, [])
            if len(bucket) < BUCKET_CAP:
                bucket.append(i)
    return out


def lsh_params(threshold: float, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows per band) that make a pair at exactly `threshold` a candidate with probability >= `recall`.

    datasketch's own choice weighs missed pairs and false candidates alike, and finds a pair at the threshold
    only about 40% of the time (0.8, 128 permutations); false candidates cost only the exact check here."""
    for r in range(NUM_PERM, 0, -1):
        b = NUM_PERM // r
        if 1 - (1 - threshold ** r) ** b >= recall:
            return b, r
    return NUM_PERM, 1


def _bar(items, progress: bool, desc: str):
    """A bar on stderr for long files: on a terminal, or past some thousands of rows anywhere."""
    if not progress or not (sys.stderr.isatty() or len(items) > 5000):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="row", file=sys.stderr, mininterval=1.0, leave=False)


# ---- contamination ---------------------------------------------------------------------------------------


@dataclass
class AgainstIndex:
    """The n-grams of one `--against` file, and its prompts.

    A row is contaminated when one of its texts (prompt or an answer) holds one of these n-grams, or its
    prompt is word for word one of the file's prompts. Each text of the file (prompts and answers alike)
    gives n-grams of n = min(13, max(8, its length in words)) words: 13 as in GPT-3's decontamination
    (Brown et al. 2020, which also matched an example shorter than 13 words as a whole); a text of 8 to 12
    words is matched as a whole; a text under 8 words gives no n-gram, so common short phrases
    ("I hope this helps", "The answer is 4") do not flag a row. A short prompt is still caught when a
    row has that same prompt. Answers are compared too: an evaluation's reference answers in training
    answers are a leak as well."""

    path: str
    grams: dict[tuple, list[tuple]] = field(default_factory=dict)  # first MIN_N words -> n-grams starting so
    prompts: set[tuple] = field(default_factory=set)

    @classmethod
    def build(cls, path: str) -> AgainstIndex:
        from align.data import read_rows

        data = read_rows(path)
        if not data.rows:
            raise AlignError(f"{path}: --against file is empty")
        index = cls(path)
        for row in data.rows:
            texts = row_fields(row)
            if texts.get("prompt", "").strip():
                index.prompts.add(tuple(words(texts["prompt"])))
            for text in texts.values():
                index.add(words(text))
        return index

    def add(self, w: list[str]) -> None:
        n = min(MAX_N, len(w))
        if n < MIN_N:
            return
        for i in range(len(w) - n + 1):
            gram = tuple(w[i:i + n])
            bucket = self.grams.setdefault(gram[:MIN_N], [])
            if gram not in bucket:
                bucket.append(gram)

    def sizes(self) -> list[int]:
        """The n-gram sizes in use (13, and 8 to 12 for shorter texts)."""
        return sorted({len(g) for bucket in self.grams.values() for g in bucket})

    def hit(self, texts: dict[str, str]) -> bool:
        if "prompt" in texts and tuple(words(texts["prompt"])) in self.prompts:
            return True
        for text in texts.values():
            w = words(text)
            for i in range(len(w) - MIN_N + 1):
                bucket = self.grams.get(tuple(w[i:i + MIN_N]))
                if bucket and any(tuple(w[i:i + len(g)]) == g for g in bucket):
                    return True
        return False

    def contaminated(self, rows: list[dict[str, str]]) -> list[int]:
        return [i for i, texts in enumerate(rows) if self.hit(texts)]


# ---- lengths ---------------------------------------------------------------------------------------------


def field_lengths(texts: list[dict[str, str]], count) -> dict[str, list]:
    """{field: the length of each row's field, None where a row has no such field}, by `count` (words or tokens)."""
    names = list(dict.fromkeys(name for t in texts for name in t))
    return {name: count([t.get(name) for t in texts]) for name in names}


def _word_counts(values: list) -> list:
    return [None if v is None else len(v.split()) for v in values]


def _token_counter(spec: str):
    from align.models import load_tokenizer, resolve_model

    try:
        tok = load_tokenizer(resolve_model(spec))
    except OSError as e:
        raise AlignError(f"{spec}: cannot load a tokenizer ({str(e).splitlines()[0] if str(e) else e})") from None

    def count(values: list) -> list:
        present = [i for i, v in enumerate(values) if v is not None]
        out = [None] * len(values)
        for start in range(0, len(present), 2048):
            chunk = present[start:start + 2048]
            ids = tok([values[i] for i in chunk], add_special_tokens=False)["input_ids"]
            for i, seq in zip(chunk, ids):
                out[i] = len(seq)
        return out

    return count


def describe(values: list) -> dict:
    v = sorted(x for x in values if x is not None)
    if not v:
        return {"rows": 0}
    return {"rows": len(v), "mean": round(sum(v) / len(v), 2), "median": statistics.median(v),
            "p95": v[math.ceil(0.95 * len(v)) - 1], "max": v[-1]}


def length_bias(chosen: list, rejected: list) -> dict:
    """The share of pairs whose chosen answer is the longer one; pairs of equal length (ties) are left out."""
    pairs = [(c, r) for c, r in zip(chosen, rejected) if c is not None and r is not None]
    decided = [c > r for c, r in pairs if c != r]
    if not pairs:
        return {"length_bias": None}
    return {"length_bias": round(sum(decided) / len(decided), 4) if decided else None,
            "length_bias_pairs": len(decided), "length_ties": len(pairs) - len(decided)}


# ---- the report ------------------------------------------------------------------------------------------


def format_report(r: dict) -> str:
    lines = [f"{r['file']}: {r['rows']} {r['kind']} rows (rows numbered from 0)"]
    ex, of = r["examples"], r["duplicate_of"]
    rows = [("exact duplicates", r["exact_duplicates"], _rows(ex["exact_duplicates"], of["exact_duplicates"], "=")),
            (f"near duplicates (Jaccard >= {r['near_threshold']})", r["near_duplicates"],
             _rows(ex["near_duplicates"], of["near_duplicates"], "~")),
            *[(f"contaminated by {path} ({_sizes(r['contamination_n'][path])})", n,
               _rows(ex["contaminated"][path])) for path, n in r["contaminated"].items()],
            ("chosen == rejected", r["chosen_equals_rejected"], _rows(ex["chosen_equals_rejected"])),
            ("empty answers", r["empty"], _rows(ex["empty"]))]
    if r["kind"] not in ("preference", "kto"):
        rows = [x for x in rows if x[0] != "chosen == rejected"]
    width = max([len(x[0]) for x in rows] + [len("lengths in whitespace words")])
    lines += [f"  {name:<{width}}  {n:>6}{'   e.g. ' + eg if n else ''}" for name, n, eg in rows]
    unit = "whitespace words" if r["length_unit"] == "words" else "tokens"
    lines.append(f"  {'lengths in ' + unit:<{width}}  {'mean':>8}{'median':>8}{'p95':>8}{'max':>8}")
    for name, s in r["lengths"].items():
        if s["rows"]:
            lines.append(f"  {'  ' + name:<{width}}  {s['mean']:>8}{s['median']:>8}{s['p95']:>8}{s['max']:>8}")
    if r.get("length_bias") is not None:
        lines.append(f"length bias: the chosen answer is the longer in {r['length_bias']:.1%} of "
                     f"{r['length_bias_pairs']} pairs ({r['length_ties']} of equal length left out)")
    if "out" in r:
        o = r["out"]
        kept = " (rows with chosen == rejected or empty answers are kept)" if r["chosen_equals_rejected"] or \
            r["empty"] else ""
        lines.append(f"wrote {o['path']}: {o['rows']} rows; dropped {o['dropped']} (exact duplicates, near "
                     f"duplicates, contaminated){kept}")
    found = [name for name in FINDINGS if (sum(r[name].values()) if name == "contaminated" else r[name])]
    lines.append("clean" if not found else f"found: {', '.join(found)}")
    return "\n".join(lines)


def _sizes(sizes: list[int]) -> str:
    return f"n={','.join(map(str, sizes))} or same prompt" if sizes else "same prompt; no text of 8+ words"


def _rows(rows: list[int], of: dict | None = None, sign: str = "") -> str:
    """`4, 9` or, for duplicates, `4 (= 3), 9 (= 2)`: each row and the earlier row it repeats."""
    return ", ".join(f"{i} ({sign} {of[str(i)]})" if of else str(i) for i in rows)
