"""Recipes: YAML into typed dataclasses, dotted overrides, one-line errors that name the key."""

from pathlib import Path

import pytest

from align.config import LoraSettings, Recipe, SFTStage, apply_override
from align.stages import load_recipe, recipe_from_dict
from align.errors import AlignError

BASIC = """\
seed: 7
stages:
  sft:
    model: tiny
    data: d.jsonl
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    return write(tmp_path / "basic.yaml", BASIC)


def error_of(fn, *args, **kwargs) -> str:
    """Call fn, expect an AlignError, check its message is one line, and return it."""
    with pytest.raises(AlignError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.strip(), "empty error message"
    return message


# --- loading ---------------------------------------------------------------------------------

def test_valid_recipe_loads_into_typed_dataclasses(tmp_path):
    path = write(tmp_path / "my-recipe.yaml", """\
seed: 5
description: a test
stages:
  sft:
    model: tiny
    data: d.jsonl
    lr: 1e-4
    epochs: 2
    max_length: 128
    batch_size: 4
    packing: true
    gradient_checkpointing: true
    too_long: drop
    lora:
      r: 4
      alpha: 8
      dropout: 0.1
      target_modules: [q_proj, v_proj]
""")
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.seed == 5
    assert recipe.description == "a test"
    assert recipe.name == "my-recipe"
    assert recipe.output_dir == str(Path("runs") / "my-recipe")
    assert list(recipe.stages) == ["sft"]
    stage = recipe.stages["sft"]
    assert isinstance(stage, SFTStage)
    assert stage.type == "sft"
    # YAML 1.1 reads `1e-4` as a string; it must come back a float.
    assert isinstance(stage.lr, float) and stage.lr == pytest.approx(0.0001)
    assert isinstance(stage.epochs, float) and stage.epochs == 2.0
    assert isinstance(stage.max_length, int) and stage.max_length == 128
    assert stage.batch_size == 4
    assert stage.packing is True
    assert stage.gradient_checkpointing is True
    assert stage.too_long == "drop"
    assert stage.seed == 5  # inherits the recipe seed
    assert isinstance(stage.lora, LoraSettings)
    assert stage.lora == LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])
    # untouched fields keep their defaults
    assert stage.eval_fraction == 0.1
    assert stage.assistant_only_loss is True
    assert stage.merge_lora is False
    assert recipe.stage_dir("sft") == Path(recipe.output_dir) / "sft"


def test_defaults_and_lora_true(tmp_path):
    path = write(tmp_path / "r.yaml", """\
stages:
  sft:
    model: tiny
    data: d.jsonl
    lora: true
""")
    recipe = load_recipe(path)
    stage = recipe.stages["sft"]
    assert recipe.seed == 42
    assert stage.seed == 42
    assert stage.lora == LoraSettings()
    assert stage.lora.r == 16 and stage.lora.target_modules == "all-linear"
    assert stage.lr == 2e-5
    assert recipe.output_dir == str(Path("runs") / "r")


def test_no_lora_by_default_and_explicit_stage_seed_wins(tmp_path):
    path = write(tmp_path / "r.yaml", """\
seed: 1
output_dir: out/here
name: named
stages:
  sft:
    model: tiny
    data: d.jsonl
    seed: 99
""")
    recipe = load_recipe(path)
    assert recipe.stages["sft"].lora is None
    assert recipe.stages["sft"].seed == 99
    assert recipe.output_dir == "out/here"
    assert recipe.name == "named"


def test_output_dir_defaults_to_recipe_name(tmp_path):
    path = write(tmp_path / "r.yaml", "name: custom\n" + BASIC)
    assert load_recipe(path).output_dir == str(Path("runs") / "custom")


def test_stage_type_defaults_to_name_and_can_be_set(tmp_path):
    path = write(tmp_path / "two.yaml", """\
stages:
  sft:
    model: tiny
    data: d.jsonl
  sft2:
    type: sft
    model: ${sft}
    data: d.jsonl
    lr: 3e-5
""")
    recipe = load_recipe(path)
    assert list(recipe.stages) == ["sft", "sft2"]
    assert recipe.stages["sft"].type == "sft"
    assert recipe.stages["sft2"].type == "sft"
    assert isinstance(recipe.stages["sft2"], SFTStage)
    assert recipe.stages["sft2"].model == "${sft}"  # a stage reference is kept as is
    assert recipe.stages["sft2"].lr == pytest.approx(3e-5)


def test_recipe_from_dict_directly():
    recipe = recipe_from_dict({"stages": {"sft": {"model": "m", "data": "d", "lr": "1e-3"}}}, default_name="x")
    assert recipe.name == "x"
    assert recipe.output_dir == str(Path("runs") / "x")
    assert recipe.stages["sft"].lr == pytest.approx(1e-3)
    msg = error_of(recipe_from_dict, {"stages": {"sft": {"model": "m", "data": "d", "lrr": 1}}}, source="src.yaml")
    assert msg.startswith("src.yaml:")
    assert "lrr" in msg and "did you mean 'lr'" in msg


def test_named_choices_or_a_bool_take_each_and_list_them_all_when_wrong():
    def dpo(value):
        return {"stages": {"dpo": {"model": "m", "data": "d", "prefix_sharing": value}}}

    assert [recipe_from_dict(dpo(v)).stages["dpo"].prefix_sharing for v in ("auto", True, False)] == ["auto", True,
                                                                                                     False]
    msg = error_of(recipe_from_dict, dpo("maybe"), source="r.yaml")
    assert msg == "r.yaml: 'stages.dpo.prefix_sharing' must be one of auto, true, false; got 'maybe'"


def test_shipped_recipe_loads():
    repo = Path(__file__).resolve().parents[1]
    recipe = load_recipe(repo / "recipes" / "tiny-sft.yaml")
    stage = recipe.stages["sft"]
    assert stage.lr == pytest.approx(3e-3)
    assert Path(stage.data).is_file()


# --- overrides -------------------------------------------------------------------------------

def test_override_float_from_exponent(recipe_file):
    recipe = load_recipe(recipe_file, ["stages.sft.lr=1e-4"])
    assert isinstance(recipe.stages["sft"].lr, float)
    assert recipe.stages["sft"].lr == pytest.approx(1e-4)


def test_override_output_dir(recipe_file):
    assert load_recipe(recipe_file, ["output_dir=/tmp/x"]).output_dir == "/tmp/x"


def test_override_creates_lora_section(recipe_file):
    stage = load_recipe(recipe_file, ["stages.sft.lora.r=8"]).stages["sft"]
    assert isinstance(stage.lora, LoraSettings)
    assert stage.lora.r == 8
    assert stage.lora.alpha == 32  # other lora fields default


def test_override_seed_propagates_to_stages(recipe_file):
    recipe = load_recipe(recipe_file, ["seed=3"])
    assert recipe.seed == 3
    assert recipe.stages["sft"].seed == 3


def test_override_several_and_types(recipe_file):
    stage = load_recipe(recipe_file, ["stages.sft.epochs=3", "stages.sft.packing=true",
                                      "stages.sft.too_long=drop", "stages.sft.max_steps=10"]).stages["sft"]
    assert stage.epochs == 3.0 and isinstance(stage.epochs, float)
    assert stage.packing is True
    assert stage.too_long == "drop"
    assert stage.max_steps == 10


def test_apply_override_sets_nested_value_and_returns_key():
    raw = {"stages": {"sft": {"model": "m"}}}
    assert apply_override(raw, "stages.sft.lr=1e-4") == "stages.sft.lr"
    assert apply_override(raw, " seed = 3") == "seed"
    assert apply_override(raw, "stages.sft.lora.r=8") == "stages.sft.lora.r"
    assert raw["stages"]["sft"]["lora"] == {"r": 8}
    assert raw["seed"] == 3
    assert raw["stages"]["sft"]["model"] == "m"


# --- override errors: one line, names the key, says "override '<key>'" ------------------------

def test_override_unknown_key_suggests(recipe_file):
    msg = error_of(load_recipe, recipe_file, ["stages.sft.lrr=1"])
    assert "override 'stages.sft.lrr'" in msg
    assert "lrr" in msg and "did you mean 'lr'" in msg


def test_override_unknown_top_level_key_suggests(recipe_file):
    msg = error_of(load_recipe, recipe_file, ["ouput_dir=x"])
    assert "override 'ouput_dir'" in msg
    assert "did you mean 'output_dir'" in msg


def test_override_unknown_lora_key(recipe_file):
    msg = error_of(load_recipe, recipe_file, ["stages.sft.lora.rank=8"])
    assert "override 'stages.sft.lora.rank'" in msg
    assert "stages.sft.lora.rank" in msg


def test_override_wrong_type_number(recipe_file):
    msg = error_of(load_recipe, recipe_file, ["stages.sft.epochs=abc"])
    assert "override 'stages.sft.epochs'" in msg
    assert "must be a finite number" in msg and "abc" in msg


def test_override_wrong_type_whole_number(recipe_file):
    msg = error_of(load_recipe, recipe_file, ["stages.sft.batch_size=2.5"])
    assert "override 'stages.sft.batch_size'" in msg
    assert "whole number" in msg


def test_override_bad_literal_lists_choices(recipe_file):
    msg = error_of(load_recipe, recipe_file, ["stages.sft.too_long=cut"])
    assert "override 'stages.sft.too_long'" in msg
    assert "truncate" in msg and "drop" in msg and "cut" in msg


def test_override_without_equals(recipe_file):
    msg = error_of(load_recipe, recipe_file, ["stages.sft.lr"])
    assert "override 'stages.sft.lr'" in msg
    assert "key=value" in msg


def test_override_empty_key_part(recipe_file):
    msg = error_of(load_recipe, recipe_file, ["stages..lr=1"])
    assert "stages..lr" in msg


def test_override_through_a_value(tmp_path):
    path = write(tmp_path / "r.yaml", BASIC)  # sets seed: 7
    msg = error_of(load_recipe, path, ["seed.x=1"])
    assert "override 'seed.x=1'" in msg
    assert "'seed' is a value, not a section" in msg


def test_override_bool_given_string(recipe_file):
    msg = error_of(load_recipe, recipe_file, ["stages.sft.packing=maybe"])
    assert "override 'stages.sft.packing'" in msg
    assert "true or false" in msg and "maybe" in msg


def test_override_unknown_stage_type(recipe_file):
    msg = error_of(load_recipe, recipe_file, ["stages.foo.model=x", "stages.foo.data=y"])
    assert msg.startswith("override 'stages.foo.")
    assert "'foo'" in msg and "unknown type" in msg
    assert "sft" in msg  # lists the valid types


def test_override_eval_fraction_out_of_range(recipe_file):
    msg = error_of(load_recipe, recipe_file, ["stages.sft.eval_fraction=1.5"])
    assert "override 'stages.sft.eval_fraction'" in msg
    assert "[0, 1)" in msg and "1.5" in msg


def test_override_empty_model_is_missing(recipe_file):
    msg = error_of(load_recipe, recipe_file, ["stages.sft.model="])
    assert "override 'stages.sft.model'" in msg
    assert "'stages.sft.model' is missing" in msg


# --- file errors: one line, names the file and the key ---------------------------------------

def file_error(tmp_path, text: str, overrides=()) -> tuple[str, Path]:
    path = write(tmp_path / "bad.yaml", text)
    return error_of(load_recipe, path, list(overrides)), path


def test_file_unknown_key_names_file(tmp_path):
    msg, path = file_error(tmp_path, BASIC + "    lrr: 1\n")
    assert msg.startswith(f"{path}:")
    assert "override" not in msg
    assert "stages.sft.lrr" in msg and "did you mean 'lr'" in msg


def test_file_unknown_top_level_key(tmp_path):
    msg, path = file_error(tmp_path, "ouput_dir: x\n" + BASIC)
    assert msg.startswith(f"{path}:")
    assert "'ouput_dir'" in msg and "did you mean 'output_dir'" in msg


def test_file_wrong_type(tmp_path):
    msg, path = file_error(tmp_path, BASIC + "    epochs: abc\n")
    assert msg.startswith(f"{path}:")
    assert "stages.sft.epochs" in msg and "must be a finite number" in msg


def test_file_bad_literal(tmp_path):
    msg, path = file_error(tmp_path, BASIC + "    too_long: cut\n")
    assert msg.startswith(f"{path}:")
    assert "stages.sft.too_long" in msg and "truncate" in msg and "drop" in msg


def test_file_bool_given_string(tmp_path):
    msg, path = file_error(tmp_path, BASIC + "    merge_lora: \"yes\"\n")
    assert msg.startswith(f"{path}:")
    assert "stages.sft.merge_lora" in msg and "true or false" in msg


def test_file_lora_wrong_type(tmp_path):
    msg, path = file_error(tmp_path, BASIC + "    lora: 8\n")
    assert msg.startswith(f"{path}:")
    assert "stages.sft.lora" in msg and "LoraSettings" in msg


def test_file_error_not_blamed_on_unrelated_override(tmp_path):
    # The problem is in the file; an override elsewhere must not take the blame.
    msg, path = file_error(tmp_path, BASIC + "    epochs: abc\n", ["stages.sft.lr=1e-4"])
    assert msg.startswith(f"{path}:")
    assert "stages.sft.epochs" in msg


def test_unknown_stage_type_in_file(tmp_path):
    msg, path = file_error(tmp_path, "stages:\n  dpo_x:\n    model: m\n    data: d\n")
    assert msg.startswith(f"{path}:")
    assert "stage 'dpo_x' has unknown type 'dpo_x'" in msg
    assert "sft" in msg


def test_unknown_explicit_stage_type_suggests(tmp_path):
    msg, path = file_error(tmp_path, "stages:\n  first:\n    type: sfft\n    model: m\n    data: d\n")
    assert "'sfft'" in msg and "did you mean 'sft'" in msg


def test_reference_to_missing_stage(tmp_path):
    msg, path = file_error(tmp_path, "stages:\n  sft:\n    model: ${nope}\n    data: d\n")
    assert msg.startswith(f"{path}:")
    assert "stages.sft.model" in msg and "'nope'" in msg and "does not exist" in msg


def test_reference_to_later_stage(tmp_path):
    msg, path = file_error(tmp_path, """\
stages:
  sft:
    model: ${sft2}
    data: d
  sft2:
    type: sft
    model: tiny
    data: d
""")
    assert msg.startswith(f"{path}:")
    assert "stages.sft.model" in msg and "'sft2'" in msg and "later" in msg


def test_reference_to_missing_stage_from_override(recipe_file):
    msg = error_of(load_recipe, recipe_file, ["stages.sft.model=${gone}"])
    assert "override 'stages.sft.model'" in msg
    assert "'gone'" in msg and "does not exist" in msg


@pytest.mark.parametrize("field", ["model", "data"])
def test_missing_model_or_data(tmp_path, field):
    body = {"model": "    model: tiny\n", "data": "    data: d.jsonl\n"}
    other = "data" if field == "model" else "model"
    msg, path = file_error(tmp_path, "stages:\n  sft:\n" + body[other])
    assert msg.startswith(f"{path}:")
    assert f"'stages.sft.{field}' is missing" in msg


def test_missing_data_names_file_despite_other_override(tmp_path):
    # `data` is missing from the file; the unrelated lr override is not where the problem is.
    msg, path = file_error(tmp_path, "stages:\n  sft:\n    model: tiny\n", ["stages.sft.lr=1e-4"])
    assert msg.startswith(f"{path}:")
    assert "'stages.sft.data' is missing" in msg


def test_empty_stage_body(tmp_path):
    msg, path = file_error(tmp_path, "stages:\n  sft:\n")
    assert msg.startswith(f"{path}:")
    assert "is missing" in msg


@pytest.mark.parametrize("text", ["seed: 1\n", "stages: {}\n", "stages:\n", ""])
def test_empty_or_missing_stages(tmp_path, text):
    msg, path = file_error(tmp_path, text)
    assert msg.startswith(f"{path}:")
    assert "'stages'" in msg and "missing or empty" in msg


def test_stages_not_a_mapping(tmp_path):
    msg, path = file_error(tmp_path, "stages: [sft]\n")
    assert msg.startswith(f"{path}:")
    assert "'stages'" in msg and "mapping" in msg


@pytest.mark.parametrize("value", ["1.0", "-0.1", "2"])
def test_eval_fraction_out_of_range(tmp_path, value):
    msg, path = file_error(tmp_path, BASIC + f"    eval_fraction: {value}\n")
    assert msg.startswith(f"{path}:")
    assert "stages.sft.eval_fraction" in msg and "[0, 1)" in msg


def test_eval_fraction_zero_is_allowed(tmp_path):
    path = write(tmp_path / "r.yaml", BASIC + "    eval_fraction: 0\n")
    assert load_recipe(path).stages["sft"].eval_fraction == 0.0


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "seed: 1\nstages:\n  sft:\n    model: a: b\n")
    msg = error_of(load_recipe, path)
    assert msg.startswith(f"{path}, line 4:")
    assert "invalid YAML" in msg


def test_missing_recipe_file(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = error_of(load_recipe, path)
    assert str(path) in msg and "not found" in msg


def test_recipe_is_a_folder(tmp_path):
    msg = error_of(load_recipe, tmp_path)
    assert str(tmp_path) in msg and "folder" in msg


def test_recipe_top_is_a_list(tmp_path):
    path = write(tmp_path / "list.yaml", "- a\n- b\n")
    msg = error_of(load_recipe, path)
    assert msg.startswith(f"{path}:")
    assert "mapping" in msg and "list" in msg


# --- paths -----------------------------------------------------------------------------------

def test_relative_data_path_resolves_next_to_recipe(tmp_path, monkeypatch):
    sub = tmp_path / "sub"
    path = write(sub / "r.yaml", "stages:\n  sft:\n    model: tiny\n    data: d.jsonl\n    eval_data: e.jsonl\n")
    write(sub / "d.jsonl", '{"prompt": "a", "completion": "b"}\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    stage = load_recipe(path).stages["sft"]
    assert Path(stage.data) == sub / "d.jsonl"
    assert Path(stage.data).is_file()
    assert stage.eval_data == "e.jsonl"  # exists nowhere: left as written
    assert stage.model == "tiny"  # not a path next to the recipe: left as written


def test_relative_path_in_cwd_wins(tmp_path, monkeypatch):
    sub = tmp_path / "sub"
    path = write(sub / "r.yaml", "stages:\n  sft:\n    model: tiny\n    data: d.jsonl\n")
    write(sub / "d.jsonl", "{}\n")
    write(tmp_path / "d.jsonl", "{}\n")
    monkeypatch.chdir(tmp_path)
    assert load_recipe(path).stages["sft"].data == "d.jsonl"


def test_stage_reference_is_not_treated_as_a_path(tmp_path, monkeypatch):
    path = write(tmp_path / "r.yaml", """\
stages:
  sft:
    model: tiny
    data: d
  sft2:
    type: sft
    model: ${sft}
    data: d
""")
    write(tmp_path / "${sft}", "")  # even a file of that name next to the recipe does not win
    monkeypatch.chdir(tmp_path.parent)
    assert load_recipe(path).stages["sft2"].model == "${sft}"
