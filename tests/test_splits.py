"""Held-out sets are held out: rows are grouped by prompt before the split, each stage writes split.json, and
`strict_eval` refuses an `eval_data` that overlaps the training data."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from align.data import held_out, load_rows, load_split, prompt_key
from align.errors import AlignError
from conftest import REPO, tiny_sft_stage, write_recipe


def sft(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def planted_sft(path):
    """74 rows: 20 distinct prompts, 15 prompts repeated 2-4 times with different answers, 8 verbatim duplicates,
    and a prompt/completion row whose prompt is a messages row's prompt."""
    rows = [sft(f"unique {i}", f"a{i}") for i in range(20)]
    for i in range(15):
        rows += [sft(f"repeated {i}", f"answer {j}") for j in range(2 + i % 3)]
    rows += [sft(f"repeated {i}", "answer 0") for i in range(8)]  # verbatim copies of earlier rows
    rows.append({"prompt": "unique 3", "completion": "same prompt, other form"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def stage(data, **kw):
    return SimpleNamespace(**{"data": str(data), "eval_data": None, "eval_fraction": 0.25, "seed": 0,
                              "strict_eval": False, **kw})


@pytest.mark.parametrize("seed", range(8))
def test_no_held_out_prompt_is_trained_on(tmp_path, seed):
    rows = planted_sft(tmp_path / "d.jsonl")
    train, held = load_split(stage(tmp_path / "d.jsonl", seed=seed), "sft", out_dir=tmp_path)
    key = lambda r: prompt_key(r, "sft")  # noqa: E731
    assert held and train
    assert not {key(r) for r in held} & {key(r) for r in train}
    assert not {json.dumps(r) for r in held} & {json.dumps(r) for r in train}  # verbatim copies on one side
    assert len(train) + len(held) == len(rows)
    report = json.loads((tmp_path / "split.json").read_text())
    assert report["eval_rows"] == sorted(report["eval_rows"])
    assert [rows[i] for i in report["eval_rows"]] == held
    assert report["shared_prompts"] == 0


def test_split_json_contents(tmp_path):
    rows = planted_sft(tmp_path / "d.jsonl")
    load_split(stage(tmp_path / "d.jsonl"), "sft", out_dir=tmp_path)
    report = json.loads((tmp_path / "split.json").read_text())
    assert set(report) == {"data", "eval_rows", "duplicate_rows", "shared_prompts"}
    assert report["data"] == str(tmp_path / "d.jsonl")
    assert report["duplicate_rows"] == 8
    assert report["shared_prompts"] == 0
    assert 19 <= len(report["eval_rows"]) < 19 + 4  # ceil(74 * 0.25), overshooting by less than one group
    assert all(0 <= i < len(rows) for i in report["eval_rows"])


def test_grouping_follows_the_rendered_prompt():
    assert prompt_key(sft("q", "a"), "sft") == prompt_key({"prompt": "q", "completion": "b"}, "sft")
    assert prompt_key({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference") == prompt_key({"prompt": "q"},
                                                                                                  "prompts")
    implicit = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    assert prompt_key(implicit, "preference") == prompt_key({"prompt": "q"}, "prompts")
    kto_row = {"prompt": "q", "completion": "a", "label": True}
    assert prompt_key(kto_row, "kto") == prompt_key({"prompt": "q"}, "prompts")
    assert prompt_key(sft("q", "a"), "sft") != prompt_key(sft("r", "a"), "sft")


def test_same_prompts_same_side_across_files():
    """The order of prompts is a seeded hash of each prompt, not its place in the file: two files holding the same
    prompts (in another order, repeated or not) split with one seed hold out the same prompts, and a smaller share
    holds out a subset (the reward -> PPO recipes rely on it)."""
    keys = [f"p{i}" for i in range(400)]
    held = {keys[i] for i in held_out(keys, 0.1, 0)}
    shuffled = keys[::-1]
    assert {shuffled[i] for i in held_out(shuffled, 0.1, 0)} == held
    assert {keys[i] for i in held_out(keys, 0.05, 0)} < held
    other_seed = {keys[i] for i in held_out(keys, 0.1, 1)}
    assert len(other_seed) == 40 and other_seed != held


def test_shipped_tiny_data_has_no_repeated_prompt():
    for name, kind in [("tiny_sft", "sft"), ("tiny_chatty_sft", "sft"), ("tiny_prefs", "preference"),
                       ("tiny_prompts", "prompts"), ("concise_sft", "sft"), ("chatty_sft", "sft"),
                       ("concise_prefs", "preference")]:
        rows = load_rows(str(REPO / "recipes" / "data" / f"{name}.jsonl"), kind).rows
        assert len({prompt_key(r, kind) for r in rows}) == len(rows), name


def test_ppo_held_out_prompts_are_not_reward_training_prompts():
    """The tiny recipes' reward stage (tiny_prefs, 0.1) and PPO/GRPO stages (tiny_prompts, 0.1), seed 0."""
    prefs = load_rows(str(REPO / "recipes" / "data" / "tiny_prefs.jsonl"), "preference").rows
    prompts = load_rows(str(REPO / "recipes" / "data" / "tiny_prompts.jsonl"), "prompts").rows
    pk = [prompt_key(r, "preference") for r in prefs]
    held = set(held_out(pk, 0.1, 0))
    reward_train = {k for i, k in enumerate(pk) if i not in held}
    qk = [prompt_key(r, "prompts") for r in prompts]
    ppo_held = {qk[i] for i in held_out(qk, 0.1, 0)}
    assert len(ppo_held) >= 32 and not ppo_held & reward_train


def test_eval_data_overlap_counts(tmp_path):
    planted_sft(tmp_path / "d.jsonl")
    evals = [sft("unique 1", "a1"),  # verbatim training row
             sft("repeated 2", "a new answer"),  # training prompt, new answer
             sft("repeated 2", "answer 0"),  # verbatim training row, same prompt as the one above
             sft("brand new", "x")]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    s = stage(tmp_path / "d.jsonl", eval_data=str(tmp_path / "e.jsonl"))
    train, held = load_split(s, "sft", out_dir=tmp_path)
    assert held == evals
    report = json.loads((tmp_path / "split.json").read_text())
    assert report == {"data": str(tmp_path / "d.jsonl"), "eval_data": str(tmp_path / "e.jsonl"), "eval_rows": [],
                      "duplicate_rows": 2, "shared_prompts": 2}
    s.strict_eval = True
    with pytest.raises(AlignError, match="2 shared prompts, 2 duplicate rows"):
        load_split(s, "sft")
    (tmp_path / "e.jsonl").write_text(json.dumps(sft("brand new", "x")) + "\n")
    assert load_split(s, "sft", out_dir=tmp_path)[1] == [sft("brand new", "x")]
    assert json.loads((tmp_path / "split.json").read_text())["shared_prompts"] == 0


def test_strict_eval_refuses_before_anything_trains(tiny_model, tmp_path):
    planted_sft(tmp_path / "d.jsonl")
    (tmp_path / "e.jsonl").write_text(json.dumps(sft("unique 1", "a1")) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out", {
        "sft": tiny_sft_stage(tiny_model, epochs=1),
        "again": tiny_sft_stage("${sft}", type="sft", data=str(tmp_path / "d.jsonl"),
                                eval_data=str(tmp_path / "e.jsonl"), strict_eval=True)})
    result = subprocess.run([sys.executable, "-m", "align", "run", str(recipe)], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("align: error: stages.again.strict_eval: ")
    assert str(tmp_path / "d.jsonl") in lines[0] and str(tmp_path / "e.jsonl") in lines[0]
    assert "1 shared prompts, 1 duplicate rows" in lines[0]
    assert not (tmp_path / "out" / "sft" / "model").exists()


def test_a_stage_writes_split_json(tiny_model, tmp_path):
    from align.runner import run_recipe
    from align.stages import load_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out", {"sft": tiny_sft_stage(tiny_model, max_steps=1)})
    run_recipe(load_recipe(recipe))
    report = json.loads((tmp_path / "out" / "sft" / "split.json").read_text())
    rows = load_rows(tiny_sft_stage(tiny_model)["data"], "sft").rows
    assert report["data"] == tiny_sft_stage(tiny_model)["data"]
    assert len(report["eval_rows"]) == 60 and report["duplicate_rows"] == 0 and report["shared_prompts"] == 0
    held = {prompt_key(rows[i], "sft") for i in report["eval_rows"]}
    assert not held & {prompt_key(r, "sft") for i, r in enumerate(rows) if i not in set(report["eval_rows"])}
