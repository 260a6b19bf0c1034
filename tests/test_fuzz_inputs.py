"""Bad input, drawn rather than listed: every recipe key of every stage type, and every data kind.

Each draw goes through the real command (`align.cli.main`, in this process so hundreds of draws take
seconds) and must end in one of two ways: exit 0 with a plan or a report, or exit 2 with exactly one
`align: error:` line that names the key (recipes) or the file and row (data). Never a traceback, and
nothing written under the recipe's output_dir (a dry run writes nothing; a refused one, nothing either).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from align.cli import main
from align.config import LoraSettings, valid_range
from align.stages import STAGES
from conftest import REPO, TINY_PREFS, TINY_SFT, write_recipe

PROMPTS = REPO / "recipes" / "data" / "tiny_prompts.jsonl"
KTO = REPO / "recipes" / "data" / "concise_prefs.jsonl"  # preference rows; KTO reads them unpaired
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])
FUZZ_DATA = settings(FUZZ, max_examples=40)  # each draw reads its file twice (data check and a dry run)

# One stage of every type, each small enough to check in milliseconds; `model: tiny` needs no weights to plan.
STAGE_SETTINGS = {
    "sft": dict(model="tiny", data=str(TINY_SFT), lora={"r": 4, "alpha": 8}),
    "reward": dict(model="${sft}", data=str(TINY_PREFS)),
    "dpo": dict(model="${sft}", data=str(TINY_PREFS)),
    "kto": dict(model="${sft}", data=str(TINY_PREFS)),
    "ppo": dict(model="${sft}", data=str(PROMPTS), rollout_batch_size=4, batch_size=4),
    "grpo": dict(model="${sft}", data=str(PROMPTS), num_generations=2, batch_size=4),
    "rloo": dict(model="${sft}", data=str(PROMPTS), num_generations=2, batch_size=4),
}


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def assert_one_error_line(code: int, err: str, *names: str) -> None:
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("align: error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])


def recipe_keys() -> list[tuple[str, str, typing.Any, dataclasses.Field]]:
    """(stage name, dotted key, type hint, field) for every field of every stage type, LoRA's included."""
    keys = []
    for name in STAGE_SETTINGS:
        cls = STAGES[name].config
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "lora":
                lora_hints = typing.get_type_hints(LoraSettings)
                keys += [(name, f"stages.{name}.lora.{g.name}", lora_hints[g.name], g)
                         for g in dataclasses.fields(LoraSettings)]
            keys.append((name, f"stages.{name}.{f.name}", hints[f.name], f))
    return keys


KEYS = recipe_keys()


def test_every_numeric_field_declares_its_range():
    """Ranges live next to the fields: an int or float knob without one is a knob nobody checks."""
    numeric = [key for _, key, hint, f in KEYS if {int, float} & set(typing.get_args(hint) or (hint,))
               and valid_range(f) is None]
    assert len(KEYS) > 150 and numeric == []


def in_range(f: dataclasses.Field, hint) -> st.SearchStrategy:
    r = valid_range(f)
    if r is None:
        return st.nothing()
    lo = r.ge if r.ge is not None else r.gt
    hi = r.le if r.le is not None else r.lt
    if int in (typing.get_args(hint) or (hint,)):
        lo = -10 if lo is None else math.floor(lo) + (r.gt is not None)
        return st.integers(lo, lo + 1000 if hi is None else math.ceil(hi) - (r.lt is not None))
    return st.floats(-10.0 if lo is None else lo, 1e3 if hi is None else hi, exclude_min=r.gt is not None,
                     exclude_max=r.lt is not None)


VALUE_TEXT = st.one_of(
    st.integers(-10**30, 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda x: ".nan" if x != x else
                                                       (".inf" if x == math.inf else "-.inf" if x == -math.inf
                                                        else repr(x))),
    st.sampled_from(["", "nan", "NaN", "inf", "-inf", "1e999", "-0", "[]", "{}", "[1, 2]", "{a: 1}", "null", "true",
                     "false", "'5'", "abc", "[", "{a", "\x00", "0x10", "1_000", "~", "!!binary AAAA", "&a 1", "*b"]),
    st.text(max_size=12),
)


@st.composite
def override(draw):
    name, key, hint, f = draw(st.sampled_from(KEYS))
    value = draw(st.one_of(in_range(f, hint).map(repr), VALUE_TEXT))
    return name, key, value


@FUZZ
@given(override())
def test_a_drawn_recipe_override_is_a_plan_or_one_error_line(tmp_path_factory, drawn):
    name, key, value = drawn
    tmp = tmp_path_factory.mktemp("fuzz")
    out = tmp / "run"
    recipe = write_recipe(tmp / "r.yaml", out, STAGE_SETTINGS)
    code, stdout, err = run_cli(["run", str(recipe), f"{key}={value}", "--dry-run"])
    assert not out.exists(), f"{key}={value!r} wrote {sorted(p.name for p in out.iterdir())}"
    if code == 0:
        assert stdout.startswith("recipe r: output_dir") and f"  {name} ({name}):" in stdout, stdout
    else:
        assert_one_error_line(code, err, f"stages.{name}")


@pytest.mark.parametrize("value, expected", [
    ("stages.dpo.beta=-1", "'stages.dpo.beta' must be > 0; got -1"),
    ("stages.dpo.beta=nan", "'stages.dpo.beta' must be a finite number; got 'nan'"),
    ("stages.dpo.beta=.inf", "'stages.dpo.beta' must be a finite number; got inf"),
    ("stages.dpo.lr=0", "'stages.dpo.lr' must be > 0; got 0"),
    ("stages.sft.max_length=-5", "'stages.sft.max_length' must be >= 1; got -5"),
    ("stages.sft.lora.r=0", "'stages.sft.lora.r' must be >= 1; got 0"),
    ("stages.sft.lora.dropout=1", "'stages.sft.lora.dropout' must be in [0, 1); got 1"),
    ("stages.ppo.gamma=1.5", "'stages.ppo.gamma' must be in [0, 1]; got 1.5"),
    ("stages.ppo.temperature=-0.1", "'stages.ppo.temperature' must be >= 0; got -0.1"),
    ("stages.grpo.num_generations=1", "'stages.grpo.num_generations' must be >= 2; got 1"),
    ("seed=-1", "'seed' must be in [0, 4294967295]; got -1"),
    ("stages.sft.seed=4294967296", "'stages.sft.seed' must be in [0, 4294967295]; got 4294967296"),
])
def test_each_value_the_issue_found_is_refused_before_anything_loads(tmp_path, value, expected):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", out, STAGE_SETTINGS)
    for argv in (["run", str(recipe), value, "--dry-run"], ["run", str(recipe), value]):
        code, _, err = run_cli(argv)
        assert_one_error_line(code, err, f"override '{value.partition('=')[0]}'", expected)
        assert not out.exists()


def test_a_nan_in_the_recipe_file_names_the_file_and_key(tmp_path):
    stages = {"sft": dict(STAGE_SETTINGS["sft"], lr=float("nan"))}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", stages)
    code, _, err = run_cli(["run", str(recipe), "--dry-run"])
    assert_one_error_line(code, err, str(recipe), "'stages.sft.lr' must be a finite number")


@pytest.mark.parametrize("order", [
    ["{recipe}", "--dry-run", "stages.dpo.beta=0.2"],
    ["--dry-run", "{recipe}", "stages.dpo.beta=0.2"],
    ["{recipe}", "stages.dpo.beta=0.2", "--dry-run"],
    ["{recipe}", "stages.dpo.beta=0.5", "--dry-run", "stages.dpo.beta=0.2"],  # the last one wins, as written
])
def test_flags_and_overrides_in_any_order(tmp_path, order):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"sft": STAGE_SETTINGS["sft"],
                                                                  "dpo": STAGE_SETTINGS["dpo"]})
    code, stdout, err = run_cli(["run", *(a.format(recipe=recipe) for a in order)])
    assert code == 0 and stdout.startswith("recipe r:"), err
    from align.stages import load_recipe

    assert load_recipe(recipe, [a for a in order if "=" in a]).stages["dpo"].beta == 0.2
    bad = [a.replace("0.2", "-0.2") for a in order]
    code, _, err = run_cli(["run", *(a.format(recipe=recipe) for a in bad)])
    assert_one_error_line(code, err, "'stages.dpo.beta' must be > 0")


def test_demo_takes_its_overrides_around_its_flags_too():
    from align.cli import build_parser, parse

    args = parse(build_parser(), ["demo", "seed=1", "--output-dir", "/tmp/d", "stages.dpo.beta=0.2"])
    assert args.output_dir == "/tmp/d" and args.overrides == ["seed=1", "stages.dpo.beta=0.2"]


def test_an_unknown_flag_is_still_refused_wherever_it_stands(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"sft": STAGE_SETTINGS["sft"]})
    code, _, err = run_cli(["run", str(recipe), "--dry-run", "--bogus", "seed=1"])
    assert code == 2 and "unrecognized arguments: --bogus" in err
    code, _, err = run_cli(["tiny-model", str(tmp_path / "t"), "seed=1"])
    assert code == 2 and "unrecognized arguments: seed=1" in err and not (tmp_path / "t").exists()


# ---- data files -------------------------------------------------------------------------------------------

GOOD_ROW = {
    "sft": {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
    "preference": {"prompt": "Say hi.", "chosen": "hi", "rejected": "hello there, friend"},
    "kto": {"prompt": "Say hi.", "completion": "hi", "label": True},
    "prompts": {"prompt": "Say hi."},
}
# The stage that reads each kind, and the other stages it needs to plan.
KIND_STAGE = {"sft": "sft", "preference": "dpo", "kto": "kto", "prompts": "ppo"}
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                 st.just(""), st.just("   "), st.text(max_size=8), st.lists(st.text(max_size=3), max_size=2),
                 st.dictionaries(st.sampled_from(["role", "content", "x"]), st.text(max_size=3), max_size=2),
                 st.just([{"role": "user"}]), st.just([{"role": "system", "content": "x"}]))


@st.composite
def broken_file(draw, kind: str):
    """Rows of `kind`, one of them (its 1-based line `bad`) broken in one drawn way; bytes to write."""
    n = draw(st.integers(3, 6))
    rows = [json.dumps(dict(GOOD_ROW[kind], prompt=f"Say hi {i}.") if "prompt" in GOOD_ROW[kind] else
                       GOOD_ROW[kind]).encode() for i in range(n)]
    bad = draw(st.integers(0, n - 1))
    how = draw(st.sampled_from(["json", "column", "missing", "extra", "same", "utf8", "huge", "empty_line",
                                "not_object"]))
    row = dict(json.loads(rows[bad]))
    if how == "json":
        rows[bad] = rows[bad][: draw(st.integers(1, len(rows[bad]) - 1))]
    elif how == "column":
        row[draw(st.sampled_from(sorted(row)))] = draw(JUNK)
        rows[bad] = json.dumps(row).encode()
    elif how == "missing":
        del row[draw(st.sampled_from(sorted(row)))]
        rows[bad] = json.dumps(row).encode()
    elif how == "extra":
        row[draw(st.sampled_from(["margin", "weight", "id"]))] = draw(JUNK)
        rows[bad] = json.dumps(row).encode()
    elif how == "same" and kind == "preference":
        row["rejected"] = row["chosen"]
        rows[bad] = json.dumps(row).encode()
    elif how == "utf8":
        rows[bad] = rows[bad].replace(b"hi", b"h\xff\xfei", 1)
    elif how == "huge":
        key = "prompt" if "prompt" in row else "messages"
        row[key] = "x " * 5_000_000 if key == "prompt" else [{"role": "user", "content": "x " * 5_000_000},
                                                              {"role": "assistant", "content": "hi"}]
        rows[bad] = json.dumps(row).encode()
    elif how == "empty_line":
        rows[bad] = b""
    elif how == "not_object":
        rows[bad] = json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=2), st.text(max_size=3),
                                              st.integers()))).encode()
    return b"\n".join(rows) + b"\n", bad + 1, how


def check_data_outcome(code: int, err: str, path, line: int, stdout: str = "") -> None:
    """0: a clean pass; 2: one line naming the file and the line; and for `align data check` 1: its report,
    which lists what it found (chosen equal to rejected, empty answers, duplicates) by row."""
    if code == 0 or (code == 1 and "Traceback" not in err and "rows" in stdout):
        return
    assert_one_error_line(code, err, str(path))
    assert f"row {line}" in err or f"line {line}" in err, (line, err)


@pytest.mark.parametrize("kind", sorted(GOOD_ROW))
def test_a_drawn_broken_data_file_is_refused_by_row_or_passes(tmp_path_factory, kind):
    @FUZZ_DATA
    @given(broken_file(kind))
    def draw(case):
        content, line, how = case
        tmp = tmp_path_factory.mktemp(f"data-{kind}")
        path = tmp / "data.jsonl"
        path.write_bytes(content)
        code, stdout, err = run_cli(["data", "check", str(path)])
        check_data_outcome(code, err, path, line, stdout)
        stage = KIND_STAGE[kind]
        stages = {"sft": STAGE_SETTINGS["sft"], "reward": STAGE_SETTINGS["reward"],
                  stage: dict(STAGE_SETTINGS[stage], data=str(path))}
        out = tmp / "run"
        recipe = write_recipe(tmp / "r.yaml", out, stages)
        code, _, err = run_cli(["run", str(recipe), "--dry-run"])
        check_data_outcome(code, err, path, line)
        assert not out.exists()

    draw()


@pytest.mark.parametrize("kind", sorted(GOOD_ROW))
def test_a_folder_or_a_missing_file_where_data_is_expected(tmp_path, kind):
    stage = KIND_STAGE[kind]
    for where in (tmp_path / "folder", tmp_path / "missing.jsonl"):
        if where.name == "folder":
            where.mkdir(exist_ok=True)
        stages = {"sft": STAGE_SETTINGS["sft"], "reward": STAGE_SETTINGS["reward"],
                  stage: dict(STAGE_SETTINGS[stage], data=str(where))}
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", stages)
        code, _, err = run_cli(["run", str(recipe), "--dry-run"])
        assert_one_error_line(code, err, str(where))
        code, _, err = run_cli(["data", "check", str(where)])
        assert_one_error_line(code, err, str(where))


@pytest.mark.parametrize("margin", ["NaN", "Infinity", "-Infinity"])
def test_a_margin_that_is_not_finite_is_refused_by_line(tmp_path, margin):
    """JSON parsers (Python's included) read NaN and Infinity; a Bradley-Terry margin of NaN trains NaN."""
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                    f'{{"prompt": "d", "chosen": "e", "rejected": "f", "margin": {margin}}}\n')
    stages = {"sft": STAGE_SETTINGS["sft"], "reward": dict(STAGE_SETTINGS["reward"], data=str(path))}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", stages)
    code, _, err = run_cli(["run", str(recipe), "--dry-run"])
    assert_one_error_line(code, err, f"{path}, line 2: field 'margin': expected a finite number")


def test_a_byte_that_is_not_utf8_is_refused_by_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b\xff"}\n')
    code, _, err = run_cli(["data", "check", str(path)])
    assert_one_error_line(code, err, f"{path}, line 2: not UTF-8 text (byte 0xff at column 14)")
