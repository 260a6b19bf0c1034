"""The stage table and the checks that run before any stage trains.

A recipe whose third stage is broken must fail at once, naming that stage and key, and leave
nothing on disk: not after the first two stages have spent minutes training."""

import dataclasses
import subprocess
import time

import pytest

from align.config import PolicyStage, TrainStage
from align.errors import AlignError
from align.runner import plan
from align.stages import STAGES, load_recipe
from conftest import REPO, TINY_PREFS, TINY_SFT, write_recipe

PROMPTS = REPO / "recipes" / "data" / "tiny_prompts.jsonl"


def test_every_stage_type_has_one_row_and_a_runner():
    import importlib

    for name, spec in STAGES.items():
        assert issubclass(spec.config, TrainStage), name
        module, _, function = spec.runner.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), spec.runner
        assert spec.online == hasattr(spec.config, "response_length"), name
    # The reward model is always saved merged, so it offers no merge_lora knob; every policy stage does.
    assert not issubclass(STAGES["reward"].config, PolicyStage)
    assert all(issubclass(s.config, PolicyStage) for n, s in STAGES.items() if n != "reward")


def three_stages(tmp_path, third: dict, third_type: str = "grpo") -> dict:
    return {
        "sft": dict(model="tiny", data=str(TINY_SFT), max_steps=2, batch_size=4, eval_steps=0),
        "reward": dict(model="${sft}", data=str(TINY_PREFS), max_steps=2, batch_size=4, eval_steps=0),
        third_type: {"model": "${sft}", "data": str(PROMPTS), "max_steps": 2, **third},
    }


BROKEN_THIRD = {
    "grpo batch": ("grpo", dict(batch_size=6, num_generations=4),
                   "stages.grpo.batch_size: batch_size * grad_accum (6) completions per step must be a multiple of "
                   "num_generations (4)"),
    "grpo one generation": ("grpo", dict(num_generations=1), "'stages.grpo.num_generations' must be >= 2; got 1"),
    "response_length": ("ppo", dict(max_length=32, response_length=32),
                        "stages.ppo.response_length: 32 must leave room"),
    "reward_fn module": ("rloo", dict(reward_fn="no_such_module_xyz:fn"),
                         "stages.rloo.reward_fn: cannot import module 'no_such_module_xyz'"),
    "vllm on cpu": ("ppo", dict(engine="vllm"), "stages.ppo.engine: 'vllm'"),
    "bad data row": ("ppo", dict(data="BAD"), "stages.ppo.data: "),
    "missing model": ("dpo", dict(model="/no/such/model/dir"), "stages.dpo.model: no such model folder"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_THIRD))
def test_invalid_third_stage_fails_fast_naming_stage_and_key(tmp_path, python, case):
    stage_type, third, expected = BROKEN_THIRD[case]
    third = dict(third)
    if third.get("data") == "BAD":
        bad = tmp_path / "prompts.jsonl"
        bad.write_text('{"prompt": "fine"}\n{"question": "no prompt field"}\n')
        third["data"] = str(bad)
        expected += f"{bad}, line 2: missing field 'prompt'"
    if stage_type == "dpo":
        third["data"] = str(TINY_PREFS)
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", out, three_stages(tmp_path, third, stage_type))
    t0 = time.perf_counter()
    r = subprocess.run([python, "-m", "align", "run", str(path)], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("align: error: "), r.stderr
    assert expected in lines[0], lines[0]
    assert seconds < 5, f"took {seconds:.1f} s"
    assert not out.exists()  # nothing written: not the run folder, not a manifest

    dry = subprocess.run([python, "-m", "align", "run", "--dry-run", str(path)], capture_output=True, text=True)
    assert dry.returncode == 2 and expected in dry.stderr


def test_online_stage_without_any_reward_is_refused_before_training(tmp_path):
    stages = {"sft": dict(model="tiny", data=str(TINY_SFT), max_steps=2),
              "ppo": dict(model="${sft}", data=str(PROMPTS), max_steps=2)}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "o", stages))
    with pytest.raises(AlignError, match=r"stages.ppo: stage 'ppo' \(ppo\) needs a reward"):
        plan(recipe)


def test_dry_run_prints_every_stage_with_its_row_count(tmp_path, python):
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "o", three_stages(tmp_path, {}))
    r = subprocess.run([python, "-m", "align", "run", "--dry-run", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    n_sft = sum(1 for line in TINY_SFT.read_text().splitlines() if line.strip())
    assert f"sft (sft): model tiny, data {TINY_SFT} ({n_sft} rows), status not run" in r.stdout
    assert "grpo (grpo): model ${sft}" in r.stdout
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("key, stage_type", [("merge_lora", "reward"), ("sync_timeout", "grpo"),
                                             ("sync_timeout", "rloo")])
def test_keys_a_stage_cannot_honour_are_refused(tmp_path, key, stage_type):
    stage = dict(model="tiny", data=str(TINY_PREFS if stage_type == "reward" else PROMPTS), reward_fn="m:f", **{key: 1})
    if stage_type == "reward":
        stage.pop("reward_fn")
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "o", {stage_type: stage})
    with pytest.raises(AlignError, match=rf"unknown key 'stages.{stage_type}.{key}'"):
        load_recipe(path)
    assert key not in {f.name for f in dataclasses.fields(STAGES[stage_type].config)}
