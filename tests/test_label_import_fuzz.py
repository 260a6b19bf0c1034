"""`align label import` on malformed files, drawn by hypothesis: each ends in exit 2 with one `align: error:` line
naming the file (and the row, where one row is at fault), or in a clean import; never a traceback, and nothing
written to the database on exit 2. Each finding is also a named test below."""

import contextlib
import io
import json
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labeling_app.__main__ import main
from labeling_app.store import LabelStore, NewPair

FIELDS = {"pairs": ("prompt", "response_a", "response_b"), "preference": ("prompt", "chosen", "rejected"),
          "rollouts": ("prompt", "completions")}
NOT_TEXT = (st.integers() | st.floats() | st.booleans() | st.none()
            | st.lists(st.integers() | st.text(max_size=3), max_size=3)
            | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
BLANK = st.sampled_from(["", " ", "\n\t ", "\u3000"])
MESSAGES = st.lists(st.dictionaries(st.sampled_from(["role", "content", "name"]),
                                    NOT_TEXT | st.sampled_from(["user", "assistant", "system", "", "robot"])),
                    max_size=3)


def good_row(fmt: str, i: int) -> dict:
    if fmt == "pairs":
        return {"prompt": f"question {i}", "response_a": f"answer a {i}", "response_b": f"answer b {i}",
                "metadata": {"model_a": "m1"}}
    if fmt == "preference":
        return {"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": f"yes {i}", "rejected": f"no {i}"}
    return {"prompt": f"question {i}", "completions": [f"one {i}", f"two {i}", f"three {i}"], "rewards": [1, 2, 3]}


@st.composite
def bad_files(draw):
    """(file name, its bytes, the 1-based row at fault (None: the file's), whether the fault is found while reading
    the file rather than checking its rows, whether a clean import is also a right answer)."""
    fmt = draw(st.sampled_from(sorted(FIELDS)))
    rows = [good_row(fmt, i) for i in range(draw(st.integers(1, 4)))]
    k = draw(st.integers(0, len(rows) - 1))
    row, field = rows[k], draw(st.sampled_from(FIELDS[fmt]))
    defect = draw(st.sampled_from(["broken json", "wrong type", "empty", "equal", "not utf-8", "lone surrogate",
                                   "deep nesting", "any text", "big row", "not an object", "metadata", "messages"]))
    text_field = "completions" if field == "completions" else draw(st.sampled_from(FIELDS[fmt]))

    def set_text(value: str) -> None:
        if text_field == "completions":
            row["completions"][0] = value
        else:
            row[text_field] = value

    raw: dict[str, str | bytes] = {}  # placeholder in the JSON text -> what it stands for
    may_pass, parsing, whole_file = False, False, False
    if defect == "wrong type":
        row[field] = draw(NOT_TEXT)
        may_pass = (field == "completions" and isinstance(row[field], list) and len(set(row[field])) >= 2
                    and all(isinstance(c, str) for c in row[field]) and len(row[field]) == 3)
    elif defect == "empty":
        blank = draw(BLANK)
        row[field] = [blank, blank, blank] if field == "completions" else blank
        # A rollout's blank answers are left out (`align rollouts` writes "" for one that stopped at once), and a
        # rollout left with one answer gives no pair: only a file with no pair at all is refused.
        may_pass = whole_file = field == "completions"
    elif defect == "equal":
        if fmt == "rollouts":
            row["completions"], row["rewards"] = ["same", " same ", "same"], [1, 2, 3]
            may_pass = whole_file = True
        else:
            a, b = FIELDS[fmt][1:]
            row[b] = row[a] + draw(st.sampled_from(["", " ", "\n"]))
    elif defect == "messages":
        row["prompt"] = draw(MESSAGES)
        may_pass = True  # a drawn list may be a valid conversation
    elif defect == "any text":
        set_text(draw(st.text(max_size=20)))
        may_pass = True
    elif defect == "big row":
        set_text("x" * (10 * 1024 * 1024))
        may_pass = True
    elif defect == "metadata":
        row["metadata"] = draw(NOT_TEXT | st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
        may_pass = fmt != "pairs" or row["metadata"] is None or isinstance(row["metadata"], dict)
    elif defect == "lone surrogate":  # JSON's escape for half of a UTF-16 pair
        set_text("a @@SURROGATE@@ b")
        raw['@@SURROGATE@@'] = draw(st.sampled_from(["\\ud800", "\\udfff", "\\ud83d"]))
    elif defect == "not utf-8":
        set_text("a @@BYTES@@ b")
        raw['@@BYTES@@'] = draw(st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\x80abc"]))
        parsing = True
    elif defect == "deep nesting":
        depth = draw(st.sampled_from([20, 300, 100_000]))  # fine; read but refused; too deep for Python's reader
        row["extra"] = "@@DEEP@@"
        raw['"@@DEEP@@"'] = "[" * depth + "]" * depth
        may_pass, parsing = depth == 20, depth == 100_000
    lines = [json.dumps(r) for r in rows]
    if defect == "broken json":
        lines[k] = lines[k][:draw(st.integers(1, len(lines[k]) - 1))] + draw(st.sampled_from(["", ",", "}}", "\x00"]))
        parsing = True
    elif defect == "not an object":
        lines[k] = json.dumps(draw(NOT_TEXT.filter(lambda v: not isinstance(v, dict)) | st.text(max_size=5)))
        parsing = True
    as_json = draw(st.booleans()) and defect not in ("broken json", "not utf-8", "deep nesting")
    data = (("[" + ",\n".join(lines) + "]") if as_json else "\n".join(lines) + "\n").encode()
    for placeholder, value in raw.items():
        data = data.replace(placeholder.encode(), value if isinstance(value, bytes) else value.encode())
    return (f"bad-{fmt}.{'json' if as_json else 'jsonl'}", data, None if whole_file else k + 1, parsing, may_pass,
            fmt)


def run_import(*args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["import", *map(str, args)])
    return code, err.getvalue()


def pair_count(db: Path) -> int:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT count(*) FROM pairs").fetchone()[0]


def assert_refused_cleanly(code: int, err: str, path: Path, row: int | None, where: str) -> None:
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("align: error: ") and "Traceback" not in err, err
    assert str(path) in err, err
    if row is not None:
        assert f"{where} {row}" in err, err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(bad_files(), st.booleans(), st.sampled_from(["auto", "named", "another"]))
def test_a_malformed_file_ends_in_one_line_and_exit_2_or_a_clean_import(case, db_exists, format_flag):
    name, data, row, parsing, may_pass, fmt = case
    flag = {"auto": "auto", "named": fmt, "another": next(f for f in sorted(FIELDS) if f != fmt)}[format_flag]
    if format_flag == "another" and not parsing:  # every row is in the wrong format: the first one is named
        row, may_pass = 1, False
    with tempfile.TemporaryDirectory() as folder:
        path, db = Path(folder) / name, Path(folder) / "labels.sqlite"
        path.write_bytes(data)
        if db_exists:
            with LabelStore(db, create=True) as store:
                store.add_pairs([NewPair("already there", "a", "b")])
        code, err = run_import(path, "--db", db, "--format", flag)
        if code == 0 and may_pass:
            assert pair_count(db) > int(db_exists)
            return
        # a JSONL file's fault is on a line; a JSON file's on a row, once it has been read as a whole
        by_line = name.endswith(".jsonl")
        assert_refused_cleanly(code, err, path, row if by_line or not parsing else None, "line" if by_line else "row")
        assert pair_count(db) == 1 if db_exists else not db.exists()  # nothing half-written


@pytest.mark.parametrize("what", ["empty folder", "folder with a bad dataset_info.json", "the database a folder",
                                  "the database not SQLite"])
def test_a_folder_where_a_file_is_expected(tmp_path, what):
    source, db = tmp_path / "rows.jsonl", tmp_path / "labels.sqlite"
    source.write_text(json.dumps(good_row("pairs", 0)) + "\n")
    if what == "empty folder":
        source = tmp_path / "empty"
        source.mkdir()
    elif what == "folder with a bad dataset_info.json":
        source = tmp_path / "saved"
        source.mkdir()
        (source / "dataset_info.json").write_text("{}")
    elif what == "the database a folder":
        db.mkdir()
    else:
        db.write_bytes(b"not a database at all" * 100)
    code, err = run_import(source, "--db", db)
    assert_refused_cleanly(code, err, db if "database" in what else source, None, "")


def test_a_lone_surrogate_is_refused_naming_line_and_field(tmp_path):
    """Finding: JSON may escape half of a UTF-16 pair ("\\ud800"); Python reads it into a string SQLite cannot store
    (UnicodeEncodeError, a traceback, from inside the import's transaction)."""
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps(good_row("preference", 0)) + "\n"
                      + '{"prompt": "p", "chosen": "a \\ud800 b", "rejected": "c"}\n')
    code, err = run_import(source, "--db", tmp_path / "labels.sqlite")
    assert_refused_cleanly(code, err, source, 2, "line")
    assert "field 'chosen'" in err and "surrogate" in err and not (tmp_path / "labels.sqlite").exists()


def test_json_nested_too_deeply_is_refused_naming_the_line(tmp_path):
    """Finding: a line nested 100,000 deep stopped Python's JSON reader with a RecursionError (a traceback); one
    nested a few hundred deep read, and could then fail writing (json.dumps) or later."""
    for depth, line in ((100_000, 2), (500, 1)):
        source = tmp_path / f"deep{depth}.jsonl"
        deep = json.dumps(good_row("pairs", 0))[:-1] + f', "extra": {"[" * depth + "]" * depth}}}'
        rows = [json.dumps(good_row("pairs", 1)), deep] if line == 2 else [deep]
        source.write_text("\n".join(rows) + "\n")
        code, err = run_import(source, "--db", tmp_path / "labels.sqlite")
        assert_refused_cleanly(code, err, source, line, "line")
        assert "nested" in err


def test_a_ten_megabyte_row_imports(tmp_path):
    source = tmp_path / "big.jsonl"
    source.write_text(json.dumps({**good_row("pairs", 0), "response_a": "x" * (10 * 1024 * 1024)}) + "\n")
    code, err = run_import(source, "--db", tmp_path / "labels.sqlite")
    assert code == 0, err
    with LabelStore(tmp_path / "labels.sqlite") as store:
        assert len(store.pairs()[0].response_a) == 10 * 1024 * 1024
