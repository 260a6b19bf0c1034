"""Bad preference and unpaired rows: one clear line each, never a traceback or a silent bad model."""

import json

import pytest

from align.data import as_preference, as_unpaired, load_rows
from align.errors import AlignError


def write(tmp_path, rows, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
USER = {"role": "user", "content": "Hi?"}


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "Hi?", "chosen": "Hello."}, "missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "Hi?", "chosen": "  ", "rejected": "b"}, "field 'chosen' is empty"),
    ({"prompt": "Hi?", "chosen": "a", "rejected": []}, "field 'rejected' is an empty list"),
    ({"chosen": [USER, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "b"}]},
     "different prompt turns"),
    ({"prompt": "Hi?", "chosen": "a", "rejected": "b", "margin": "big"}, "field 'margin': expected a number"),
    ({"prompt": "Hi?", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "field 'chosen[0].role' is 'user'"),
])
def test_bad_preference_rows(tmp_path, row, expected):
    path = write(tmp_path, [GOOD, row])
    with pytest.raises(AlignError) as e:
        load_rows(str(path), "preference")
    message = str(e.value)
    assert message.startswith(f"{path}, line 2: ") and expected in message and "\n" not in message


def test_implicit_prompt_pairs_are_split_at_the_last_assistant_turn():
    row = {"chosen": [USER, {"role": "assistant", "content": "Hello."}],
           "rejected": [USER, {"role": "assistant", "content": "Go away."}], "margin": 2}
    pair = as_preference(row)
    assert pair == {"prompt": [USER], "chosen": [{"role": "assistant", "content": "Hello."}],
                    "rejected": [{"role": "assistant", "content": "Go away."}], "margin": 2.0}


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "Hi?", "completion": "Hello."}, "missing field 'label'"),
    ({"prompt": "Hi?", "completion": "Hello.", "label": "yes"}, "field 'label': expected true"),
    ({"prompt": "Hi?", "completion": "", "label": True}, "field 'completion' is empty"),
])
def test_bad_unpaired_rows(tmp_path, row, expected):
    path = write(tmp_path, [{"prompt": "Hi?", "completion": "Hello.", "label": True}, row])
    with pytest.raises(AlignError, match="line 2: .*" + expected.split("'")[0]):
        load_rows(str(path), "kto")


def test_kto_reads_pairs_as_two_unpaired_rows(tmp_path):
    rows = load_rows(str(write(tmp_path, [GOOD])), "kto").rows
    unpaired = as_unpaired(rows[0])
    assert [u["label"] for u in unpaired] == [True, False]
    assert unpaired[1]["completion"] == [{"role": "assistant", "content": "Go away."}]


def test_reward_model_from_a_tokenizer_without_pad_token_still_learns(tiny_model, tmp_path):
    """An unset pad token makes the classifier read the wrong position (near-chance accuracy); align
    supplies one and mirrors it onto the model config."""
    import shutil

    from align.stages import load_recipe
    from align.runner import run_recipe
    from conftest import SEED, record_learning, tiny_pref_stage, write_recipe

    model = tmp_path / "nopad"
    shutil.copytree(tiny_model, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    mcfg = json.loads((model / "config.json").read_text())
    mcfg["pad_token_id"] = None
    (model / "config.json").write_text(json.dumps(mcfg))

    stage = tiny_pref_stage(model, epochs=2)
    metrics = run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "o", {"reward": stage},
                                                  seed=SEED)))["reward"]
    record_learning("test_reward_model_from_a_tokenizer_without_pad_token_still_learns",
                    accuracy=metrics["eval_accuracy"])
    assert metrics["eval_accuracy"] >= 0.9  # 1.00 in all 10 runs over seeds 0-4 x 1 and 2 threads
    saved = json.loads((tmp_path / "o" / "reward" / "model" / "config.json").read_text())
    assert saved["pad_token_id"] is not None
