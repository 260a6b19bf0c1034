"""Datasets: reading every source, one-line errors naming file/row/field, split and fingerprint."""

import json
import math
from pathlib import Path

import pytest

from align.data import as_messages, detect_format, fingerprint, load_rows, read_rows, split
from align.errors import AlignError


def msg(role: str, content) -> dict:
    return {"role": role, "content": content}


GOOD_MESSAGES = {"messages": [msg("user", "hi"), msg("assistant", "hello")]}
GOOD_PAIR = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def error_of(source, kind: str) -> str:
    """load_rows must raise an AlignError with a one-line message; return the message."""
    with pytest.raises(AlignError) as info:
        load_rows(str(source), kind)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def bad_jsonl(tmp_path, bad_row: dict, kind: str = "sft", good_row: dict = GOOD_MESSAGES) -> tuple[str, Path]:
    """A good row, a blank line, then the bad row: the bad row is on line 3."""
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(good_row), "", json.dumps(bad_row)])
    return error_of(path, kind), path


# --- unreadable sources ----------------------------------------------------------------------

def test_folder_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    m = error_of(tmp_path, "sft")
    assert str(tmp_path) in m and "save_to_disk" in m


def test_invalid_utf8(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'{"prompt": "\xff\xfe", "completion": "x"}\n')
    m = error_of(path, "sft")
    assert str(path) in m and "cannot read" in m and "UnicodeDecodeError" in m
    path = tmp_path / "bad.jsonl"  # JSONL: the line it is on
    path.write_bytes(b'{"prompt": "a", "completion": "x"}\n{"prompt": "\xff\xfe", "completion": "x"}\n')
    assert error_of(path, "sft") == f"{path}, line 2: not UTF-8 text (byte 0xff at column 13)"


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(json.dumps(GOOD_MESSAGES) + "\n")
    m = error_of(path, "sft")
    assert str(path) in m and "'.txt'" in m and ".jsonl" in m


@pytest.mark.parametrize("name", ["missing.jsonl", "sub/dir/missing", "missing.parquet"])
def test_nonexistent_path(tmp_path, name):
    path = tmp_path / name
    m = error_of(path, "sft")
    assert str(path) in m and "no such file or folder" in m


def test_relative_missing_file_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = error_of("nothing_here.jsonl", "sft")
    assert m == "nothing_here.jsonl: no such file or folder"


# --- JSONL: "line N", counting blank lines ---------------------------------------------------

def test_invalid_json_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD_MESSAGES), "", "", '{"messages": [}'])
    m = error_of(path, "sft")
    assert m.startswith(f"{path}, line 4:")
    assert "invalid JSON" in m


def test_line_that_is_a_list(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD_MESSAGES), json.dumps([1, 2])])
    m = error_of(path, "sft")
    assert m.startswith(f"{path}, line 2:")
    assert "expected a JSON object" in m and "a list" in m


def test_sft_row_missing_fields(tmp_path):
    m, path = bad_jsonl(tmp_path, {"text": "hello"})
    assert m.startswith(f"{path}, line 3:")
    assert "missing field 'messages'" in m and "'completion'" in m  # says what rows look like


def test_sft_row_with_prompt_but_no_completion(tmp_path):
    m, path = bad_jsonl(tmp_path, {"prompt": "hello"})
    assert m.startswith(f"{path}, line 3:")
    assert "missing field 'completion'" in m


def test_preference_row_without_rejected(tmp_path):
    m, path = bad_jsonl(tmp_path, {"prompt": "p", "chosen": "a"}, kind="preference", good_row=GOOD_PAIR)
    assert m.startswith(f"{path}, line 3:")
    assert "missing field 'rejected'" in m


def test_preference_null_field_is_missing(tmp_path):
    m, path = bad_jsonl(tmp_path, {"prompt": "p", "chosen": None, "rejected": "b"}, kind="preference",
                        good_row=GOOD_PAIR)
    assert m.startswith(f"{path}, line 3:")
    assert "missing field 'chosen'" in m


def test_preference_string_response_without_prompt(tmp_path):
    m, path = bad_jsonl(tmp_path, {"chosen": "a", "rejected": "b"}, kind="preference", good_row=GOOD_PAIR)
    assert m.startswith(f"{path}, line 3:")
    assert "missing field 'prompt'" in m


def test_messages_is_a_string(tmp_path):
    m, path = bad_jsonl(tmp_path, {"messages": "hi there"})
    assert m.startswith(f"{path}, line 3:")
    assert "field 'messages'" in m and "expected a list of messages" in m and "a string" in m


def test_message_is_not_an_object(tmp_path):
    m, path = bad_jsonl(tmp_path, {"messages": ["hi", "there"]})
    assert m.startswith(f"{path}, line 3:")
    assert "field 'messages[0]'" in m and "expected a message object" in m


def test_message_without_content(tmp_path):
    m, path = bad_jsonl(tmp_path, {"messages": [{"role": "user"}]})
    assert m.startswith(f"{path}, line 3:")
    assert "field 'messages[0]'" in m and "'content'" in m


def test_content_is_a_number(tmp_path):
    m, path = bad_jsonl(tmp_path, {"messages": [msg("user", "q"), msg("assistant", 42)]})
    assert m.startswith(f"{path}, line 3:")
    assert "field 'messages[1].content'" in m and "expected a string" in m and "a number" in m


def test_content_is_whitespace(tmp_path):
    m, path = bad_jsonl(tmp_path, {"messages": [msg("user", "q"), msg("assistant", " \t\n ")]})
    assert m.startswith(f"{path}, line 3:")
    assert "field 'messages[1].content' is empty" in m and "non-empty text" in m


def test_empty_prompt_string(tmp_path):
    m, path = bad_jsonl(tmp_path, {"prompt": "   ", "completion": "x"})
    assert m.startswith(f"{path}, line 3:")
    assert "field 'prompt' is empty" in m


def test_empty_messages_list(tmp_path):
    m, path = bad_jsonl(tmp_path, {"messages": []})
    assert m.startswith(f"{path}, line 3:")
    assert "field 'messages' is an empty list" in m


def test_assistant_first(tmp_path):
    m, path = bad_jsonl(tmp_path, {"messages": [msg("assistant", "a"), msg("user", "b"), msg("assistant", "c")]})
    assert m.startswith(f"{path}, line 3:")
    assert "field 'messages[0].role' is 'assistant' where 'user' was expected" in m


def test_two_user_turns_in_a_row(tmp_path):
    m, path = bad_jsonl(tmp_path, {"messages": [msg("user", "a"), msg("user", "b"), msg("assistant", "c")]})
    assert m.startswith(f"{path}, line 3:")
    assert "field 'messages[1].role' is 'user' where 'assistant' was expected" in m


def test_system_turn_only_first(tmp_path):
    m, path = bad_jsonl(tmp_path, {"messages": [msg("user", "a"), msg("system", "s"), msg("assistant", "c")]})
    assert m.startswith(f"{path}, line 3:")
    assert "field 'messages[1].role' is 'system'" in m


def test_sft_messages_ending_with_user(tmp_path):
    m, path = bad_jsonl(tmp_path, {"messages": [msg("user", "a"), msg("assistant", "b"), msg("user", "c")]})
    assert m.startswith(f"{path}, line 3:")
    assert "field 'messages' ends with a 'user' turn" in m and "'assistant'" in m


def test_unknown_role(tmp_path):
    m, path = bad_jsonl(tmp_path, {"messages": [msg("human", "a"), msg("assistant", "b")]})
    assert m.startswith(f"{path}, line 3:")
    assert "field 'messages[0].role' is 'human'" in m and "system, user, assistant" in m


def test_completion_list_with_user_turn(tmp_path):
    m, path = bad_jsonl(tmp_path, {"prompt": "q", "completion": [msg("user", "not an answer")]})
    assert m.startswith(f"{path}, line 3:")
    assert "field 'completion[0].role' is 'user'" in m and "assistant messages only" in m


def test_prompt_list_ending_with_assistant(tmp_path):
    m, path = bad_jsonl(tmp_path, {"prompt": [msg("user", "q"), msg("assistant", "a")], "completion": "c"})
    assert m.startswith(f"{path}, line 3:")
    assert "field 'prompt' ends with a 'assistant' turn" in m


def test_preference_chosen_equals_rejected(tmp_path):
    m, path = bad_jsonl(tmp_path, {"prompt": "p", "chosen": "same", "rejected": "same"}, kind="preference",
                        good_row=GOOD_PAIR)
    assert m.startswith(f"{path}, line 3:")
    assert "'chosen' and 'rejected' are identical" in m


def test_prompts_row_without_prompt(tmp_path):
    m, path = bad_jsonl(tmp_path, {"question": "q"}, kind="prompts", good_row={"prompt": "ok"})
    assert m.startswith(f"{path}, line 3:")
    assert "missing field 'prompt'" in m


@pytest.mark.parametrize("text", ["", "\n\n  \n\t\n"])
def test_empty_dataset(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    m = error_of(path, "sft")
    assert m.startswith(f"{path}:") and "dataset is empty" in m and "messages" in m


def test_line_numbers_with_crlf(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes((json.dumps(GOOD_MESSAGES) + "\r\n\r\n" + json.dumps({"messages": "x"}) + "\r\n").encode())
    assert error_of(path, "sft").startswith(f"{path}, line 3:")


def test_unicode_line_separator_inside_a_string(tmp_path):
    # JSON allows U+2028, U+2029 and U+0085 unescaped inside strings; JSONL rows end only at '\n'.
    rows = [{"messages": [msg("user", "one\u2028two"), msg("assistant", "three\u2029four\x85five")]},
            {"messages": [msg("user", "bad"), msg("user", "row")]}]
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    m = error_of(path, "sft")
    assert m.startswith(f"{path}, line 2:")
    assert "messages[1].role" in m
    path.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n", encoding="utf-8")
    data = load_rows(str(path), "sft")
    assert data.rows == rows[:1] and data.numbers == [1]


# --- other formats: "row N" ------------------------------------------------------------------

def test_json_list_error_says_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD_MESSAGES, GOOD_MESSAGES, {"messages": [msg("assistant", "x")]}]))
    m = error_of(path, "sft")
    assert m.startswith(f"{path}, row 3:")
    assert "messages[0].role" in m


def test_json_item_not_an_object(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD_MESSAGES, "oops"]))
    m = error_of(path, "sft")
    assert m.startswith(f"{path}, row 2:") and "expected a JSON object" in m and "a string" in m


def test_json_invalid(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a",\n  }\n]')
    m = error_of(path, "sft")
    assert m.startswith(f"{path}, line 3:") and "invalid JSON" in m


def test_json_top_is_not_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": [GOOD_MESSAGES]}))
    m = error_of(path, "sft")
    assert m.startswith(f"{path}:") and "expected a JSON list" in m


def test_csv_error_says_row(tmp_path):
    import datasets

    rows = [{"messages": json.dumps(GOOD_MESSAGES["messages"])},
            {"messages": json.dumps(GOOD_MESSAGES["messages"])},
            {"messages": json.dumps([msg("user", "a"), msg("assistant", "b"), msg("user", "c")])}]
    path = tmp_path / "d.csv"
    datasets.Dataset.from_list(rows).to_csv(str(path))
    m = error_of(path, "sft")
    assert m.startswith(f"{path}, row 3:")
    assert "field 'messages' ends with a 'user' turn" in m


def test_parquet_error_says_row(tmp_path):
    import datasets

    rows = [GOOD_PAIR, {"prompt": "p", "chosen": "same", "rejected": "same"}]
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    m = error_of(path, "preference")
    assert m.startswith(f"{path}, row 2:")
    assert "identical" in m


def test_parquet_nested_messages_error_says_row(tmp_path):
    import datasets

    rows = [GOOD_MESSAGES, {"messages": [msg("user", "q"), msg("assistant", "  ")]}]
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    m = error_of(path, "sft")
    assert m.startswith(f"{path}, row 2:")
    assert "field 'messages[1].content' is empty" in m


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not a parquet file at all")
    m = error_of(path, "sft")
    assert str(path) in m and "cannot read as parquet" in m


# --- good inputs -----------------------------------------------------------------------------

def test_messages_rows(tmp_path):
    rows = [GOOD_MESSAGES,
            {"messages": [msg("system", "be brief"), msg("user", "a"), msg("assistant", "b"),
                          msg("user", "c"), msg("assistant", "d")]}]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(rows[0]), "", json.dumps(rows[1])])
    data = load_rows(str(path), "sft")
    assert data.rows == rows
    assert data.numbers == [1, 3]
    assert data.by_line is True
    assert len(data) == 2
    assert data.source == str(path)
    assert data.at(1) == f"{path}, line 3"


def test_prompt_completion_rows(tmp_path):
    rows = [{"prompt": "q", "completion": "a"},
            {"prompt": [msg("system", "s"), msg("user", "q")], "completion": [msg("assistant", "a")]},
            {"prompt": [msg("user", "q1"), msg("assistant", "a1"), msg("user", "q2")],
             "completion": [msg("assistant", "a2")]}]
    data = load_rows(str(write_jsonl(tmp_path / "d.jsonl", rows)), "sft")
    assert data.rows == rows
    assert [detect_format(r) for r in data.rows] == ["prompt_completion"] * 3


def test_preference_rows(tmp_path):
    rows = [GOOD_PAIR,
            {"prompt": [msg("user", "q")], "chosen": [msg("assistant", "good")],
             "rejected": [msg("assistant", "bad")]},
            {"chosen": [msg("user", "q"), msg("assistant", "good")],
             "rejected": [msg("user", "q"), msg("assistant", "bad")]}]
    data = load_rows(str(write_jsonl(tmp_path / "p.jsonl", rows)), "preference")
    assert data.rows == rows
    assert detect_format(rows[0]) == "preference"


def test_prompts_rows(tmp_path):
    rows = [{"prompt": "hello"}, {"prompt": [msg("system", "s"), msg("user", "q")]}]
    data = load_rows(str(write_jsonl(tmp_path / "q.jsonl", rows)), "prompts")
    assert data.rows == rows
    assert detect_format(rows[0]) == "prompts"


def test_prompts_row_ending_with_assistant_is_rejected(tmp_path):
    m, path = bad_jsonl(tmp_path, {"prompt": [msg("user", "q"), msg("assistant", "a")]}, kind="prompts",
                        good_row={"prompt": "ok"})
    assert m.startswith(f"{path}, line 3:") and "ends with a 'assistant' turn" in m


def test_save_to_disk_folder(tmp_path):
    import datasets

    rows = [GOOD_MESSAGES, {"messages": [msg("user", "x"), msg("assistant", "y")]}]
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    data = load_rows(str(folder), "sft")
    assert data.rows == rows
    assert data.numbers == [1, 2] and data.by_line is False


def test_save_to_disk_dataset_dict(tmp_path):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD_PAIR])}).save_to_disk(str(folder))
    assert load_rows(str(folder), "preference").rows == [GOOD_PAIR]
    other = tmp_path / "dd2"
    datasets.DatasetDict({"test": datasets.Dataset.from_list([GOOD_PAIR])}).save_to_disk(str(other))
    m = error_of(other, "preference")
    assert str(other) in m and "'train'" in m and "test" in m


def test_saved_dataset_error_says_row(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list([{"prompt": "ok"}, {"prompt": " "}]).save_to_disk(str(folder))
    m = error_of(folder, "prompts")
    assert m.startswith(f"{folder}, row 2:") and "field 'prompt' is empty" in m


def test_json_data_wrapper(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, GOOD_MESSAGES]
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": rows}))
    data = load_rows(str(path), "sft")
    assert data.rows == rows
    assert data.numbers == [1, 2] and data.by_line is False


def test_csv_message_list_decodes(tmp_path):
    import datasets

    messages = [msg("user", "hi"), msg("assistant", "hello")]
    path = tmp_path / "d.csv"
    datasets.Dataset.from_list([{"messages": json.dumps(messages)}]).to_csv(str(path))
    data = load_rows(str(path), "sft")
    assert data.rows == [{"messages": messages}]
    assert isinstance(data.rows[0]["messages"], list)


def test_csv_prompt_completion_strings(tmp_path):
    import datasets

    rows = [{"prompt": "what?", "completion": "that."}, {"prompt": "who?", "completion": "them."}]
    path = tmp_path / "d.csv"
    datasets.Dataset.from_list(rows).to_csv(str(path))
    assert load_rows(str(path), "sft").rows == rows


def test_parquet_good(tmp_path):
    import datasets

    rows = [GOOD_MESSAGES]
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    data = load_rows(str(path), "sft")
    assert data.rows == rows and data.by_line is False


def test_read_rows_does_not_validate(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"anything": 1}])
    assert read_rows(str(path)).rows == [{"anything": 1}]


# --- as_messages -----------------------------------------------------------------------------

def test_as_messages_prompt_completion_strings():
    assert as_messages({"prompt": "q", "completion": "a"}) == [msg("user", "q"), msg("assistant", "a")]


def test_as_messages_prompt_completion_lists():
    row = {"prompt": [msg("system", "s"), msg("user", "q")], "completion": [msg("assistant", "a")]}
    assert as_messages(row) == [msg("system", "s"), msg("user", "q"), msg("assistant", "a")]


def test_as_messages_keeps_only_role_and_content():
    row = {"messages": [{"role": "user", "content": "q", "name": "x"}, msg("assistant", "a")]}
    out = as_messages(row)
    assert out == [msg("user", "q"), msg("assistant", "a")]
    assert out[0] is not row["messages"][0]


# --- split -----------------------------------------------------------------------------------

def test_split_deterministic_and_seeded():
    rows = list(range(100))
    a = split(rows, 0.2, seed=1)
    assert split(rows, 0.2, seed=1) == a
    b = split(rows, 0.2, seed=2)
    assert b[1] != a[1]


@pytest.mark.parametrize("n,frac,expected", [(100, 0.2, 20), (10, 0.25, 3), (10, 0.01, 1), (7, 0.5, 4),
                                             (10, 0.99, 9), (2, 0.5, 1), (30, 0.1, 3), (10, 0.3, 3),
                                             (100, 0.07, 7)])
def test_split_sizes(n, frac, expected):
    rows = [{"i": i} for i in range(n)]
    train, held = split(rows, frac, seed=0)
    assert len(held) == expected
    assert len(train) == n - expected


def test_split_sizes_follow_ceil():
    for n in range(2, 40):
        for frac in (0.0625, 0.125, 0.25, 0.5, 0.75):  # exact in binary, so n * frac has no rounding
            _, held = split(list(range(n)), frac, seed=n)
            assert len(held) == min(n - 1, max(1, math.ceil(n * frac))), (n, frac)


def test_split_zero_fraction_and_tiny_inputs():
    rows = list(range(5))
    assert split(rows, 0.0, seed=0) == (rows, [])
    assert split([1], 0.5, seed=0) == ([1], [])  # never all rows
    assert split([], 0.5, seed=0) == ([], [])


def test_split_disjoint_and_complete():
    rows = [{"i": i} for i in range(50)]
    train, held = split(rows, 0.3, seed=7)
    ids_train, ids_held = [r["i"] for r in train], [r["i"] for r in held]
    assert not set(ids_train) & set(ids_held)
    assert sorted(ids_train + ids_held) == list(range(50))
    # both keep the input order
    assert ids_train == sorted(ids_train) and ids_held == sorted(ids_held)


def test_split_does_not_modify_input():
    rows = list(range(20))
    split(rows, 0.5, seed=3)
    assert rows == list(range(20))


# --- fingerprint -----------------------------------------------------------------------------

def test_fingerprint_file(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b'{"prompt": "x"}\n')
    b.write_bytes(b'{"prompt": "x"}\n')
    h = fingerprint(str(a))
    assert len(h) == 64 and int(h, 16) >= 0
    assert fingerprint(str(a)) == h
    assert fingerprint(str(b)) == h  # same content, same hash
    b.write_bytes(b'{"prompt": "y"}\n')  # one byte changed
    assert fingerprint(str(b)) != h


def test_fingerprint_folder(tmp_path):
    folder = tmp_path / "ds"
    (folder / "sub").mkdir(parents=True)
    (folder / "x.arrow").write_bytes(b"abc")
    (folder / "sub" / "y.json").write_bytes(b"{}")
    h = fingerprint(str(folder))
    assert fingerprint(str(folder)) == h
    (folder / "sub" / "y.json").write_bytes(b"{ }")
    h2 = fingerprint(str(folder))
    assert h2 != h
    (folder / "z").write_bytes(b"")  # a new (empty) file changes it too
    assert fingerprint(str(folder)) != h2


def test_fingerprint_missing_path(tmp_path):
    path = tmp_path / "missing.jsonl"
    with pytest.raises(AlignError) as info:
        fingerprint(str(path))
    assert str(path) in str(info.value) and "no such file" in str(info.value)


def test_fingerprint_hub_name():
    assert fingerprint("org/name") == fingerprint("org/name")
    assert fingerprint("org/name") != fingerprint("org/other")
