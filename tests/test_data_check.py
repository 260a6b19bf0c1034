"""`align data check`: the real command on small files with planted problems; counts, exit codes, --out, --json."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from align.cli import main
from align.data_check import jaccard, lsh_params, near_duplicates, shingles

REPO = Path(__file__).resolve().parents[1]
TINY_PREFS = REPO / "recipes" / "data" / "tiny_prefs.jsonl"
KEYS = {"rows", "exact_duplicates", "near_duplicates", "contaminated", "chosen_equals_rejected", "empty",
        "length_bias", "lengths", "examples"}
LONG = "the quick brown fox jumps over the lazy dog while the farmer watches from the old red barn"
OTHER = "seven small boats sailed past the harbour wall at dawn carrying salt fish and letters for the town"


def pair(prompt: str, chosen: str, rejected: str, **extra) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["data", "check", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys, *argv) -> tuple[int, dict]:
    code, out, _ = cli(capsys, *argv, "--json")
    return code, json.loads(out)


def subprocess_check(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align", "data", "check", *map(str, argv)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


PLANTED = [
    pair("What is the capital of France?", "Paris.", "London."),  # 0
    pair("Name a prime number between ten and twenty please", "Eleven is one.", "Twelve is one."),  # 1
    pair("What is the capital of France?", "Paris.", "London."),  # 2: exact duplicate of 0
    pair("Tell me a story about a fox", LONG, LONG + " and nothing else happens at all"),  # 3
    pair("Tell me a story about a fox", LONG, LONG + " and nothing else happens at all today"),  # 4: near dup of 3
    pair("Say hello", "hello", "hello"),  # 5: chosen == rejected
    pair("Say goodbye", "   ", "goodbye"),  # 6: empty chosen
    pair("What is the capital of France?", "Paris.", "London.", margin=1.0),  # 7: near (same text), not exact
    {"chosen": "Paris.", "rejected": "London.", "prompt": "What is the capital of France?"},  # 8: exact (key order)
]


def test_planted_problems_are_counted_exactly(tmp_path, capsys):
    code, r = cli_json(capsys, write_jsonl(tmp_path / "p.jsonl", PLANTED))
    assert code == 1
    assert KEYS <= set(r)
    assert (r["rows"], r["kind"]) == (9, "preference")
    assert (r["exact_duplicates"], r["near_duplicates"]) == (2, 2)
    assert r["examples"]["exact_duplicates"] == [2, 8] and r["duplicate_of"]["exact_duplicates"] == {"2": 0, "8": 0}
    assert r["examples"]["near_duplicates"] == [4, 7] and r["duplicate_of"]["near_duplicates"] == {"4": 3, "7": 0}
    assert (r["chosen_equals_rejected"], r["examples"]["chosen_equals_rejected"]) == (1, [5])
    assert (r["empty"], r["examples"]["empty"]) == (1, [6])
    assert r["contaminated"] == {} and r["clean"] is False


def test_the_text_report_and_a_clean_file_exits_0(tmp_path, capsys):
    code, out, _ = cli(capsys, write_jsonl(tmp_path / "p.jsonl", PLANTED))
    assert code == 1
    assert "exact duplicates" in out and "2 (= 0), 8 (= 0)" in out and "4 (~ 3), 7 (~ 0)" in out
    assert "found: exact_duplicates, near_duplicates, chosen_equals_rejected, empty" in out
    clean = write_jsonl(tmp_path / "clean.jsonl", [PLANTED[0], PLANTED[1], PLANTED[3]])
    code, out, _ = cli(capsys, clean)
    assert code == 0 and out.strip().endswith("clean")


def test_the_shipped_tiny_prefs_are_clean_and_repeats_are_counted(tmp_path):
    """The shipped file (regenerated with no prompt twice) checks clean; the same file with three of its rows
    repeated at the end is counted by plain Python (a duplicate: an earlier line holds the same JSON object)."""
    done = subprocess_check(TINY_PREFS, "--json")
    assert done.returncode == 0, done.stdout
    assert json.loads(done.stdout)["exact_duplicates"] == 0
    lines = [ln for ln in TINY_PREFS.read_text().splitlines() if ln.strip()]
    lines = lines + [lines[7], lines[3], lines[7]]
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text("\n".join(lines) + "\n")
    seen, duplicates = set(), []
    for i, line in enumerate(lines):
        key = json.dumps(json.loads(line), sort_keys=True)
        if key in seen:
            duplicates.append(i)
        seen.add(key)
    done = subprocess_check(repeated, "--json")
    assert done.returncode == 1, done.stderr
    r = json.loads(done.stdout)
    assert r["rows"] == len(lines)
    assert r["exact_duplicates"] == len(duplicates) == 3
    assert r["examples"]["exact_duplicates"] == duplicates[:5]


def test_a_malformed_row_is_one_line_naming_file_and_row(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [PLANTED[0], PLANTED[1],
                                                pair([{"role": "assistant", "content": "hi"}], "a", "b")])
    done = subprocess_check(bad)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"{bad}, line 3: field 'prompt[0].role' is 'assistant' where 'user' was expected" in done.stderr
    # a problem this command counts (chosen == rejected) does not hide one it refuses (the role) on the same row
    both = write_jsonl(tmp_path / "both.jsonl", [pair("q", [{"role": "user", "content": "x"}],
                                                      [{"role": "user", "content": "x"}])])
    done = subprocess_check(both)
    assert done.returncode == 2 and f"{both}, line 1: field 'chosen[0].role' is 'user'" in done.stderr


@pytest.mark.parametrize("argv, message", [
    (["missing.jsonl"], "missing.jsonl: no such file or folder"),
    (["{ok}", "--against", "nope.jsonl"], "nope.jsonl: no such file or folder"),
    (["{ok}", "--near", "1.5"], "--near must be in (0, 1]; got 1.5"),
    (["{empty}"], "dataset is empty"),
    (["{unknown}"], "line 1: cannot tell the format from the fields ['text']"),
    (["{ok}", "--tokenizer", "/nope"], "/nope: no such model folder"),
    (["{ok}", "--out", "."], ".: --out is a folder; expected a file path"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, message):
    ok = write_jsonl(tmp_path / "ok.jsonl", [PLANTED[0]])
    (tmp_path / "empty.jsonl").write_text("\n")
    write_jsonl(tmp_path / "unknown.jsonl", [{"text": "hi"}])
    paths = {"{ok}": str(ok), "{empty}": str(tmp_path / "empty.jsonl"), "{unknown}": str(tmp_path / "unknown.jsonl")}
    code, out, err = cli(capsys, *[paths.get(a, a) for a in argv])
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1


def test_a_bad_flag_exits_2(tmp_path):
    done = subprocess_check(write_jsonl(tmp_path / "ok.jsonl", [PLANTED[0]]), "--bogus")
    assert done.returncode == 2 and "unrecognized arguments: --bogus" in done.stderr


def test_out_drops_duplicates_near_duplicates_and_contaminated_rows(tmp_path, capsys):
    src = write_jsonl(tmp_path / "p.jsonl", PLANTED)
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "Say goodbye"}])  # row 6, by exact prompt
    out = tmp_path / "clean" / "p.jsonl"
    code, stdout, _ = cli(capsys, src, "--against", ev, "--out", out)
    assert code == 1
    assert "dropped 5" in stdout and "kept" in stdout  # rows 2, 8 exact; 4, 7 near; 6 contaminated
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert kept == [PLANTED[i] for i in (0, 1, 3, 5)]
    assert not list(out.parent.glob(".*"))  # written to a temporary name, then renamed
    code, r = cli_json(capsys, src, "--against", ev, "--out", out)
    assert r["out"] == {"path": str(out), "rows": 4, "dropped": 5}


def test_against_counts_per_file_with_long_and_short_texts(tmp_path, capsys):
    ten = "which river flows through the middle of old vienna town"  # 10 words: matched whole (n = 10)
    rows = [
        pair(f"Question: {LONG.split(' ', 2)[2]} today", "a", "b"),  # 0: holds 13 words of eval prompt 0
        pair(f"Please tell me {ten} now", "a", "b"),  # 1: holds all 10 words of eval prompt 1
        pair("WHAT is two plus two!", "4", "5"),  # 2: the 5-word eval prompt, case and punctuation aside
        pair("So, what is two plus two exactly", "4", "5"),  # 3: holds it but is not it: under 8 words, clean
        pair("Unrelated", f"Sure. {OTHER}", "no"),  # 4: an eval answer's 13-gram in the chosen answer
        pair("Another unrelated prompt", "fine", "good"),  # 5
        pair("which river flows through the middle of old vienna", "a", "b"),  # 6: 9 of the 10 words: clean
    ]
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    ev1 = write_jsonl(tmp_path / "eval1.jsonl", [pair(LONG, "x", "y"), pair(ten, "x", "y"),
                                                  pair("What is two plus two?", "4", "3")])
    ev2 = write_jsonl(tmp_path / "eval2.jsonl", [{"messages": [{"role": "user", "content": "hm"},
                                                               {"role": "assistant", "content": OTHER}]}])
    code, r = cli_json(capsys, src, "--against", ev1, "--against", ev2)
    assert code == 1
    assert r["contaminated"] == {str(ev1): 3, str(ev2): 1}
    assert r["examples"]["contaminated"] == {str(ev1): [0, 1, 2], str(ev2): [4]}
    assert r["contamination_n"] == {str(ev1): [10, 13], str(ev2): [13]}


def test_length_bias_and_lengths_by_hand(tmp_path, capsys):
    rows = [pair("p one", "a b c", "a"),  # chosen longer (3 > 1)
            pair("p two two", "a", "a b"),  # chosen shorter (1 < 2)
            pair("p", "a b", "c d"),  # tie: left out
            pair("p four four four", "a b c d", "a b")]  # chosen longer (4 > 2)
    code, r = cli_json(capsys, write_jsonl(tmp_path / "four.jsonl", rows))
    assert code == 0
    assert r["length_bias"] == round(2 / 3, 4) and r["length_bias_pairs"] == 3 and r["length_ties"] == 1
    assert r["length_unit"] == "words"
    assert r["lengths"]["chosen"] == {"rows": 4, "mean": 2.5, "median": 2.5, "p95": 4, "max": 4}
    assert r["lengths"]["rejected"] == {"rows": 4, "mean": 1.75, "median": 2.0, "p95": 2, "max": 2}
    assert r["lengths"]["prompt"] == {"rows": 4, "mean": 2.5, "median": 2.5, "p95": 4, "max": 4}


def test_sft_messages_empty_assistant_turn_and_tokens(tmp_path, capsys, tiny_model):
    def chat(q, a):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    src = write_jsonl(tmp_path / "sft.jsonl", [chat("hi there", "hello you"), chat("bye", " "),
                                               {"prompt": "hi there", "completion": "hello you"}])
    code, r = cli_json(capsys, src, "--tokenizer", tiny_model)
    assert code == 1 and r["kind"] == "sft"
    assert (r["empty"], r["examples"]["empty"]) == (1, [1])
    assert r["near_duplicates"] == 1 and r["duplicate_of"]["near_duplicates"] == {"2": 0}  # same text, other form
    assert r["length_unit"] == "tokens" and set(r["lengths"]) == {"prompt", "completion"}
    assert r["length_bias"] is None and "chosen_equals_rejected" in r


def test_near_duplicates_are_verified_exactly():
    base = " ".join(f"w{i}" for i in range(30))
    texts = [base, base.replace("w29", "x"), base.replace("w15", "x"), "something else entirely here"]
    found = near_duplicates(texts, 0.8)
    # one changed word at the end changes 1 of 28 shingles, in the middle 3: both stay above 0.8
    assert found == {1: 0, 2: 0}
    assert jaccard(shingles(texts[0]), shingles(texts[2])) == 25 / 31
    assert near_duplicates(texts, 0.85) == {1: 0}
    b, r = lsh_params(0.8)
    assert b * r <= 128 and 1 - (1 - 0.8 ** r) ** b >= 0.99


def test_near_duplicates_in_a_crowd_of_similar_rows_match_brute_force():
    """Rows sharing a long system prompt fill whole LSH buckets (capped); near duplicates are still all found."""
    rng = random.Random(0)
    system = "you are a helpful assistant that answers briefly and politely and never makes anything up about " \
             "the facts that it is given in the question below"
    texts = [f"{system} " + " ".join(f"v{rng.randrange(10**6)}" for _ in range(6)) for _ in range(300)]
    for pos in range(150, 300, 10):  # 15 planted: a copy of an earlier row with one word changed
        w = texts[pos - 150].split()
        w[-3] = "planted"
        texts[pos] = " ".join(w)
    sets = [shingles(t) for t in texts]
    truth = {i for i in range(len(texts)) if any(jaccard(sets[i], sets[j]) >= 0.8 for j in range(i))}
    assert len(truth) >= 15
    assert set(near_duplicates(texts, 0.8)) == truth


def test_help_names_the_flags():
    done = subprocess.run([sys.executable, "-m", "align", "data", "check", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0
    for flag in ("--against", "--json", "--out", "--near", "--tokenizer", "exit status"):
        assert flag in done.stdout
