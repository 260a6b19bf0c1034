"""GRPO and RLOO on the tiny model: learning from the reward model and from a Python reward_fn,
NaN rewards, reward_fn and engine errors, over-long prompts."""

import json
import logging
import math
import os
import shutil
import subprocess

import pytest
import torch

from align.stages import load_recipe
from align.errors import AlignError
from align.runner import run_recipe
from conftest import REPO, SEED, copy_stages, record_learning, write_recipe

PROMPTS = REPO / "recipes" / "data" / "tiny_prompts.jsonl"
GRPO_RECIPE = REPO / "recipes" / "tiny-sft-rm-grpo.yaml"
FILLER = "I hope this helps"


# Reward functions the recipes below name as `test_grpo:<function>` (pytest puts tests/ on sys.path).
def no_filler(prompts, completions):
    return [0.0 if FILLER in c else 1.0 for c in completions]


def brevity(prompts, completions):
    """Shorter is better: minus a tenth of the word count."""
    return [-len(c.split()) / 10 for c in completions]


def no_filler_or_nan(prompts, completions):
    """no_filler, except NaN for every other completion and +inf for every seventh."""
    return [math.inf if i % 7 == 3 else math.nan if i % 2 else r
            for i, r in enumerate(no_filler(prompts, completions))]


NOT_A_FUNCTION = 3


def online_stage(model, **overrides) -> dict:
    """Settings that move the tiny chatty policy within ~15 steps on 2 cores."""
    stage = dict(model=model, data=str(PROMPTS), eval_fraction=0.1, max_length=64, response_length=16,
                 num_generations=8, batch_size=32, lr=5e-4, lr_scheduler="constant", max_steps=15, beta=0.1,
                 logging_steps=5, save_steps=50, eval_prompts=16, max_new_tokens=16)
    stage.update(overrides)
    return stage


@pytest.fixture(scope="module")
def base(ppo_upstream, tmp_path_factory):
    """A chatty SFT policy (adds the filler by habit) and a reward model that dislikes the filler: the shipped
    tiny recipes' SFT and reward stages (the same in the PPO, GRPO and DPO recipes; trained once, conftest)."""
    return copy_stages(ppo_upstream, tmp_path_factory.mktemp("grpo-base") / "run"), None


def samples(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_grpo_raises_the_reward_models_score(base, tmp_path):
    run, _ = base
    # The recipe's answer length (24 tokens: the filler comes after the answer) and 32 held-out prompts
    grpo = {k: v for k, v in online_stage("${sft}", response_length=24, max_new_tokens=24, eval_prompts=32).items()
            if k not in ("model", "data")}
    recipe = load_recipe(GRPO_RECIPE, [f"output_dir={run}", f"seed={SEED}",
                                       *(f"stages.grpo.{k}={v}" for k, v in grpo.items())])
    metrics = run_recipe(recipe)["grpo"]  # the SFT and reward stages are skipped: complete, same inputs
    rows = samples(run / "grpo" / "samples.jsonl")
    with_filler = lambda key: sum(FILLER in s[key] for s in rows)  # noqa: E731
    record_learning("test_grpo_raises_the_reward_models_score",
                    reward_gain=metrics["eval_reward_after"] - metrics["eval_reward_before"],
                    win_rate=metrics["eval_win_rate"], win_rate_lo=metrics["eval_win_rate_ci"][0],
                    train_reward_gain=metrics["train_reward_last"] - metrics["train_reward_first"],
                    filler_before=with_filler("before") / len(rows), filler_after=with_filler("after") / len(rows))
    # spread over seeds 0-4 x 1 and 2 torch threads (tests/spread.py): held-out reward up 2.69-4.50, the filler in
    # 53-69% of the answers before and none after, train reward up 1.15-2.18; win rate 0.59-1.00 (answers that
    # had no filler tie, at 0.5 each, so the rate sits nearer 0.5 than the reward gain suggests)
    assert metrics["eval_reward_after"] > metrics["eval_reward_before"] + 1.0
    assert metrics["eval_win_rate"] > 0.5
    assert metrics["train_reward_last"] > metrics["train_reward_first"]
    assert with_filler("after") < with_filler("before") / 2
    steps = [json.loads(line) for line in (run / "grpo" / "log.jsonl").read_text().splitlines()]
    trained = [s for s in steps if "loss" in s]
    assert trained and all(s["tokens_per_s"] > 0 and s["peak_rss_mb"] > 0 for s in trained)
    assert all("rewards/reward_model/mean" in s and "kl" in s for s in trained)
    assert (run / "grpo" / "model" / "config.json").exists()


def test_rloo_learns_from_a_reward_fn(base, tmp_path):
    run, _ = base
    stage = online_stage(str(run / "sft" / "model"), type="rloo", reward_fn="test_grpo:brevity", beta=0.05,
                         max_steps=10)
    recipe = write_recipe(tmp_path / "rloo.yaml", tmp_path / "run", {"rloo": stage}, seed=SEED)
    metrics = run_recipe(load_recipe(recipe))["rloo"]
    record_learning("test_rloo_learns_from_a_reward_fn", reward_fn_before=metrics["eval_reward_fn_before"],
                    reward_fn_after=metrics["eval_reward_fn_after"],
                    train_reward_gain=metrics["train_reward_last"] - metrics["train_reward_first"])
    # brevity is minus a tenth of the word count: the held-out greedy answers (new prompts) lose more than half
    # their words (over seeds 0-4 x 1 and 2 threads: 5.5-6.5 words before, 1.3-1.9 after)
    assert metrics["eval_reward_fn_before"] < -0.1
    assert metrics["eval_reward_fn_after"] > metrics["eval_reward_fn_before"] / 2
    assert metrics["train_reward_last"] > metrics["train_reward_first"]
    assert "eval_reward_before" not in metrics  # no reward stage, so no reward-model scores


def test_nan_rewards_are_counted_and_left_out(base, tmp_path, caplog):
    """Half the rewards NaN, some infinite: training stays finite, every one is counted and the run says so."""
    run, _ = base
    caplog.set_level(logging.WARNING, logger="align")
    stage = online_stage(str(run / "sft" / "model"), reward_fn="test_grpo:no_filler_or_nan", max_steps=4,
                         eval_fraction=0.0)
    recipe = write_recipe(tmp_path / "nan.yaml", tmp_path / "run", {"grpo": stage})
    metrics = run_recipe(load_recipe(recipe))["grpo"]
    scored = metrics["reward_scored"]
    assert scored == 4 * 32  # one call per step, on its 4 prompts x 8 completions
    expected = sum(1 for i in range(32) if i % 7 == 3 or i % 2) * 4
    assert metrics["reward_non_finite"] == expected
    assert "NaN or infinite" in caplog.text
    steps = [json.loads(line) for line in (tmp_path / "run" / "grpo" / "log.jsonl").read_text().splitlines()]
    trained = [s for s in steps if "loss" in s]
    assert all(s["rewards/no_filler_or_nan/non_finite"] > 0 for s in trained)
    assert all(math.isfinite(s["loss"]) and math.isfinite(s["reward"]) for s in trained)
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run" / "grpo" / "model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_lora_grpo_saves_only_its_adapter(base, tmp_path):
    run, _ = base
    stage = online_stage(str(run / "sft" / "model"), reward_fn="test_grpo:no_filler", max_steps=2, batch_size=16,
                         lora={"r": 8, "alpha": 16}, eval_fraction=0.0)
    recipe = write_recipe(tmp_path / "lora.yaml", tmp_path / "run", {"grpo": stage})
    run_recipe(load_recipe(recipe))
    model_dir = tmp_path / "run" / "grpo" / "model"
    assert (model_dir / "adapter_config.json").exists()
    assert not (model_dir / "ref").exists()  # TRL's copy of the fresh adapter is not saved with it


def test_grpo_run_resumes_from_its_last_checkpoint(base, tmp_path):
    run, _ = base
    stage = online_stage(str(run / "sft" / "model"), reward_fn="test_grpo:no_filler", max_steps=3, save_steps=2,
                         batch_size=16, eval_fraction=0.0, logging_steps=1)
    recipe = write_recipe(tmp_path / "resume.yaml", tmp_path / "run", {"grpo": stage})
    run_recipe(load_recipe(recipe))
    # What a run killed after its step-2 checkpoint leaves behind: a running manifest and no final model.
    out = tmp_path / "run" / "grpo"
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    shutil.rmtree(out / "model")
    (out / "metrics.json").unlink()
    for ckpt in (out / "checkpoints").glob("checkpoint-*"):
        if int(ckpt.name.split("-")[1]) > 2:
            shutil.rmtree(ckpt)
    again = run_recipe(load_recipe(recipe))["grpo"]
    assert again["resumed_from_step"] == 2 and again["global_step"] == 3
    assert (out / "model" / "config.json").exists()
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3]  # the log keeps steps 1-2 and gets step 3 once


@pytest.mark.parametrize("spec, expected", [
    ("no_such_module_xyz:score", "cannot import module 'no_such_module_xyz'"),
    ("test_grpo:NOT_A_FUNCTION", "is a int, not a function"),
])
def test_reward_fn_errors_exit_2_with_one_line(python, tiny_model, tmp_path, spec, expected):
    stage = online_stage(str(tiny_model), reward_fn=spec)
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"grpo": stage})
    r = subprocess.run([python, "-m", "align", "run", str(recipe)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("align: error: stages.grpo.reward_fn: ") and expected in last
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("spec, expected", [
    ("test_grpo", "expected module:function"),
    ("test_grpo:no_filer", "has no function 'no_filer' (did you mean 'no_filler'?)"),
])
def test_reward_fn_spec_errors_name_the_key(spec, expected):
    from align.stages.grpo import load_reward_fn

    with pytest.raises(AlignError, match="stages.grpo.reward_fn") as e:
        load_reward_fn(spec, "grpo")
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_vllm_engine_on_cpu_exits_2_with_one_line(python, tiny_model, tmp_path):
    stage = online_stage(str(tiny_model), reward_fn="test_grpo:no_filler", engine="vllm")
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"grpo": stage})
    r = subprocess.run([python, "-m", "align", "run", str(recipe)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("align: error: stages.grpo.engine: ") and "CUDA GPU" in last
    assert "Traceback" not in r.stderr


def test_unknown_grpo_key_suggests_the_nearest(tiny_model, tmp_path):
    stage = online_stage(str(tiny_model), reward_fn="test_grpo:no_filler")
    stage["num_generation"] = stage.pop("num_generations")
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"grpo": stage})
    hint = r"unknown key 'stages.grpo.num_generation' \(did you mean 'num_generations'\?\)"
    with pytest.raises(AlignError, match=hint):
        load_recipe(recipe)


def test_batch_must_hold_whole_groups(tiny_model, tmp_path):
    stage = online_stage(str(tiny_model), reward_fn="test_grpo:no_filler", batch_size=12)
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"grpo": stage})
    with pytest.raises(AlignError, match=r"stages.grpo.batch_size: .*multiple of num_generations \(8\)"):
        run_recipe(load_recipe(recipe))


def test_long_prompts_are_cut_from_the_left_or_dropped(tiny_model, tmp_path, caplog):
    from align.config import GRPOStage
    from align.models import load_tokenizer
    from align.stages.grpo import prompt_rows

    tokenizer = load_tokenizer(str(tiny_model))
    long_question = "Repeat: " + " ".join(["red blue green"] * 30) + " Count from 1 to 4."
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "What color is the sky?"}, {"prompt": long_question},
            {"prompt": [{"role": "user", "content": "Repeat: cat dog " * 20}, {"role": "assistant", "content": "ok"},
                        {"role": "user", "content": "What color is the snow?"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = GRPOStage(model="x", data=str(data), eval_fraction=0.0, max_length=48, response_length=16, seed=0)
    length = lambda m: len(tokenizer.apply_chat_template(m, add_generation_prompt=True,  # noqa: E731
                                                         return_dict=True)["input_ids"])

    caplog.set_level(logging.WARNING, logger="align")
    stage.eval_data = str(data)  # held-out prompts follow the same rule
    train, held, too_long = prompt_rows(stage, "grpo", tokenizer)
    assert too_long == 2 and "2 of 3 prompts are longer" in caplog.text and held == train
    assert len(train) == 3 and all(length(r["prompt"]) <= 32 for r in train)
    assert train[0]["prompt"] == [{"role": "user", "content": "What color is the sky?"}]
    assert train[1]["prompt"][-1]["content"].endswith("Count from 1 to 4.")  # the end of the question stays
    assert train[2]["prompt"][-1]["content"] == "What color is the snow?"

    stage.too_long = "drop"
    train, held, too_long = prompt_rows(stage, "grpo", tokenizer)
    assert too_long == 2 and [r["prompt"][0]["content"] for r in train] == ["What color is the sky?"] and held == train

    stage.max_length = 20  # the template alone does not fit
    with pytest.raises(AlignError, match="no training prompts left"):
        prompt_rows(stage, "grpo", tokenizer)


def vllm_stage(stage_type: str, **settings):
    from align.stages import STAGES

    return STAGES[stage_type].config(**{"model": "tiny", "data": str(PROMPTS), "type": stage_type, "engine": "vllm",
                                        **settings})


@pytest.mark.parametrize("stage_type", ["grpo", "rloo"])
def test_engine_settings_map_colocate_server_and_tensor_parallel(stage_type):
    import dataclasses

    from trl import GRPOConfig, RLOOConfig

    from align.stages.grpo import engine_settings

    trl_fields = {f.name for f in dataclasses.fields(GRPOConfig if stage_type == "grpo" else RLOOConfig)}
    hf = engine_settings(vllm_stage(stage_type, engine="hf"))
    colocate = engine_settings(vllm_stage(stage_type, tensor_parallel_size=2, gpu_memory_utilization=0.4,
                                          max_length=96))
    server = engine_settings(vllm_stage(stage_type, vllm_mode="server", vllm_server_host="10.0.0.2",
                                        vllm_server_port=8011, vllm_server_timeout=30.0))
    by_url = engine_settings(vllm_stage(stage_type, vllm_mode="server", vllm_server_base_url="http://gpu7:8000"))
    assert hf == {}
    assert colocate == dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.4,
                            vllm_tensor_parallel_size=2, vllm_max_model_length=96)
    assert server == dict(use_vllm=True, vllm_mode="server", vllm_server_base_url=None, vllm_server_host="10.0.0.2",
                          vllm_server_port=8011, vllm_server_timeout=30.0)
    assert by_url["vllm_server_base_url"] == "http://gpu7:8000"
    assert set(colocate) | set(server) <= trl_fields  # TRL's own names, or its config would refuse them


VLLM_LAYOUTS = {
    "ppo server": ("ppo", dict(vllm_mode="server"), "stages.ppo.vllm_mode: 'server' is for grpo and rloo"),
    "ppo server on hf": ("ppo", dict(engine="hf", vllm_mode="server"), "stages.ppo.vllm_mode: 'server' is for grpo"),
    "server without vllm": ("grpo", dict(engine="hf", vllm_mode="server"), "stages.grpo.vllm_mode: 'server' samples "
                                                                          "from a vLLM server; set engine: vllm"),
    "server with tp": ("rloo", dict(vllm_mode="server", tensor_parallel_size=2),
                       "stages.rloo.tensor_parallel_size: with vllm_mode: server the server's own"),
    "colocated tp over one process": ("grpo", dict(tensor_parallel_size=2), "stages.grpo.tensor_parallel_size: 2 "
                                                                            "must divide the 1 training processes"),
    "tp zero": ("ppo", dict(tensor_parallel_size=0), "<recipe>: 'stages.ppo.tensor_parallel_size' must be >= 1; got 0"),
}


@pytest.mark.parametrize("case", sorted(VLLM_LAYOUTS))
def test_vllm_layout_mistakes_are_one_line_before_anything_loads(case, tiny_model, monkeypatch):
    from align.stages import check_recipe, recipe_from_dict

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    stage_type, settings, expected = VLLM_LAYOUTS[case]
    stage = dict(model=str(tiny_model), data=str(PROMPTS), reward_fn="test_grpo:no_filler", engine="vllm",
                 **({"num_generations": 2, "batch_size": 4} if stage_type != "ppo" else {}))
    with pytest.raises(AlignError) as e:  # ranges when the recipe loads, the rest in check_recipe
        check_recipe(recipe_from_dict({"output_dir": "unused", "seed": 0,
                                       "stages": {stage_type: {**stage, **settings}}}))
    assert str(e.value).startswith(expected) and "\n" not in str(e.value), str(e.value)


def test_colocated_tensor_parallel_passes_with_a_multiple_of_its_processes():
    from align.stages.checks import check_tensor_parallel

    check_tensor_parallel(vllm_stage("grpo", tensor_parallel_size=2), "stages.grpo", 4)
    check_tensor_parallel(vllm_stage("ppo", tensor_parallel_size=2), "stages.ppo", 4)  # ppo: our engine, its workers
    with pytest.raises(AlignError, match="stages.grpo.tensor_parallel_size: 3 must divide the 4 training processes"):
        check_tensor_parallel(vllm_stage("grpo", tensor_parallel_size=3), "stages.grpo", 4)


def test_server_keys_are_unknown_to_ppo(tiny_model, tmp_path):
    stage = dict(model=str(tiny_model), data=str(PROMPTS), reward_fn="test_grpo:no_filler", vllm_server_port=8001)
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"ppo": stage})
    with pytest.raises(AlignError, match="unknown key 'stages.ppo.vllm_server_port'"):
        load_recipe(recipe)


def test_ppo_in_server_mode_exits_2_with_one_line(python, tiny_model, tmp_path):
    stage = dict(model=str(tiny_model), data=str(PROMPTS), reward_fn="test_grpo:no_filler", engine="vllm",
                 vllm_mode="server")
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"ppo": stage})
    r = subprocess.run([python, "-m", "align", "run", "--dry-run", str(recipe)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "tests")}, timeout=120)
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("align: error: stages.ppo.vllm_mode: 'server' is for grpo and rloo; ppo runs its vLLM")
