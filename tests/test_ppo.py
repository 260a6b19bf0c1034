"""The PPO stage on the tiny model: it learns what the reward model prefers, resumes exactly after
kill -9, survives NaN rewards and a reward model with another tokenizer, and refuses bad input."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from align.config import load_recipe
from align.errors import AlignError
from align.runner import run_recipe
from conftest import REPO

RECIPE = REPO / "recipes" / "tiny-sft-rm-ppo.yaml"
STEP_KEYS = ("reward", "kl", "entropy", "clip_frac", "approx_kl", "value_loss", "explained_variance",
             "tokens_per_s", "gen_seconds", "train_seconds", "peak_rss_mb")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The shipped tiny SFT -> reward -> PPO recipe, run once."""
    out = tmp_path_factory.mktemp("ppo-pipeline")
    return out, run_recipe(load_recipe(RECIPE, [f"output_dir={out}"]))


def log_rows(out, stage="ppo"):
    return [json.loads(line) for line in (out / stage / "log.jsonl").read_text().splitlines()]


def fresh_copy(pipeline, tmp_path, name="run"):
    """A new output folder holding the fixture's finished SFT and reward stages (they are skipped)."""
    src, _ = pipeline
    out = tmp_path / name
    out.mkdir()
    for stage in ("sft", "reward"):
        shutil.copytree(src / stage, out / stage)
    return out


def test_ppo_raises_the_held_out_reward_with_bounded_kl(pipeline):
    out, metrics = pipeline
    ppo = metrics["ppo"]
    assert ppo["eval_reward_after"] > ppo["eval_reward_before"] + 1.0
    assert ppo["eval_win_rate"] >= 0.8
    assert ppo["train_reward_last"] > ppo["train_reward_first"]
    assert 0 < ppo["kl_last"] < 10
    rows = log_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in STEP_KEYS:
        assert all(isinstance(r[key], float) for r in rows), key
    # What the reward model was taught: the SFT habit "I hope this helps!" goes away.
    samples = [json.loads(line) for line in (out / "ppo" / "samples.jsonl").read_text().splitlines()]
    with_filler = lambda key: sum("I hope this helps" in s[key] for s in samples)  # noqa: E731
    assert with_filler("before") >= len(samples) // 2
    assert with_filler("after") <= len(samples) // 10
    assert len({json.dumps(s["prompt"]) for s in samples}) == len(samples)


def test_killed_ppo_resumes_and_matches_an_uninterrupted_run(pipeline, tmp_path, python):
    overrides = ["stages.ppo.max_steps=7", "stages.ppo.save_steps=3", "stages.ppo.eval_prompts=4"]
    straight = fresh_copy(pipeline, tmp_path, "straight")
    run_recipe(load_recipe(RECIPE, [f"output_dir={straight}", *overrides]))

    killed = fresh_copy(pipeline, tmp_path, "killed")
    cmd = [python, "-m", "align", "run", str(RECIPE), f"output_dir={killed}", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "ppo" / "checkpoints" / "checkpoint-3" / "align_checkpoint_ok"
    deadline = time.time() + 180
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "no checkpoint before the deadline"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((killed / "ppo" / "manifest.json").read_text())["status"] == "running"

    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((killed / "ppo" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] in (3, 6)
    resumed, reference = log_rows(killed), log_rows(straight)
    assert [row["step"] for row in resumed] == list(range(1, 8))  # no step lost or repeated
    for a, b in zip(resumed, reference):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-4)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-4)


def test_a_nan_reward_skips_the_step_and_training_goes_on(pipeline, tmp_path):
    out = fresh_copy(pipeline, tmp_path)
    metrics = run_recipe(load_recipe(RECIPE, [f"output_dir={out}", "stages.ppo.max_steps=4",
                                              "stages.ppo.reward_fn=ppo_reward_fns:nan_on_second_batch",
                                              "stages.ppo.rollout_batch_size=8", "stages.ppo.eval_prompts=4"]))["ppo"]
    rows = log_rows(out)
    assert rows[1] == {"step": 2, "skipped": True, "nan_rewards": 1}
    assert [r["step"] for r in rows if not r.get("skipped")] == [1, 3, 4]
    assert metrics["skipped_steps"] == 1
    assert all(r["policy_loss"] == r["policy_loss"] for r in rows if not r.get("skipped"))  # no NaN crept in


def test_rewards_that_stay_nan_stop_the_stage(pipeline, tmp_path):
    out = fresh_copy(pipeline, tmp_path)
    recipe = load_recipe(RECIPE, [f"output_dir={out}", "stages.ppo.max_steps=20", "stages.ppo.rollout_batch_size=4",
                                  "stages.ppo.response_length=4", "stages.ppo.reward_fn=ppo_reward_fns:always_nan",
                                  "stages.ppo.eval_prompts=0"])
    with pytest.raises(AlignError, match="NaN in 10 batches in a row"):
        run_recipe(recipe)
    assert json.loads((out / "ppo" / "manifest.json").read_text())["status"] == "failed"
    assert not (out / "ppo" / "model").exists()


def test_reward_model_with_another_tokenizer(pipeline, tmp_path):
    """The reward model re-tokenizes text, so its vocabulary need not be the policy's; the value model
    then starts from the policy."""
    from align.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "tiny300", vocab=300, seed=1)
    out = fresh_copy(pipeline, tmp_path)
    metrics = run_recipe(load_recipe(RECIPE, [f"output_dir={out}", f"stages.reward.model={other}",
                                              "stages.reward.max_steps=4", "stages.ppo.max_steps=3",
                                              "stages.ppo.eval_prompts=4"]))
    assert metrics["ppo"]["value_model_from"] == "policy"
    assert all(r["reward"] == r["reward"] for r in log_rows(out))
    assert "eval_reward_after" in metrics["ppo"]


def test_lora_ppo_uses_the_disabled_adapter_as_reference(pipeline, tmp_path):
    """LoRA's B starts at 0, so at step 1 the policy equals the reference (KL exactly 0); once the
    adapter trains, KL to the adapter-disabled model grows. k3 with a KL target adapts β."""
    out = fresh_copy(pipeline, tmp_path)
    metrics = run_recipe(load_recipe(RECIPE, [
        f"output_dir={out}", "stages.ppo.max_steps=4", "stages.ppo.lora={r: 8, alpha: 32, dropout: 0.0}",
        "stages.ppo.lr=3e-3", "stages.ppo.kl_estimator=k3", "stages.ppo.kl_target=0.01",
        "stages.ppo.eval_prompts=4"]))["ppo"]
    rows = log_rows(out)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["kl"] > 1e-3
    assert metrics["kl_coef_final"] > 0.05  # KL above target: β grows
    assert (out / "ppo" / "model" / "adapter_config.json").exists()


def test_bad_prompt_sets_end_with_one_line(pipeline, tmp_path, python):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = fresh_copy(pipeline, tmp_path)
    r = subprocess.run([python, "-m", "align", "run", str(RECIPE), f"output_dir={out}", f"stages.ppo.data={empty}"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"align: error: {empty}: dataset is empty; expected rows like " \
                                                "{'prompt': ...}"

    too_long = load_recipe(RECIPE, [f"output_dir={out}", "stages.ppo.max_length=26", "stages.ppo.too_long=drop"])
    with pytest.raises(AlignError, match=r"no prompts to train on \(\d+ longer than max_length - response_length\)"):
        run_recipe(too_long)
    assert not (out / "ppo" / "model").exists()

    r = subprocess.run([python, "-m", "align", "run", str(RECIPE), f"output_dir={out}",
                        "stages.ppo.reward_fn=ppo_reward_fns:not_a_function"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("align: error: stages.ppo.reward_fn: 'ppo_reward_fns:not_a_function' "
                                                 "is a int, not a function; expected function(prompts, completions) "
                                                 "-> list[float]")


def test_align_eval_judges_the_ppo_policy_against_sft(pipeline, tmp_path, python):
    out, _ = pipeline
    prompts = str(REPO / "recipes" / "data" / "tiny_prompts.jsonl")

    def align_eval(policy, name):
        r = subprocess.run([python, "-m", "align", "eval", "--policy", str(out / policy / "model"), "--baseline",
                            str(out / "sft" / "model"), "--reward-model", str(out / "reward" / "model"),
                            "--prompts", prompts, "--max-prompts", "24", "--out", str(tmp_path / name)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "win rate" in r.stdout
        return json.loads((tmp_path / name).read_text())

    ppo = align_eval("ppo", "ppo.json")
    assert ppo["prompts"] == 24
    assert ppo["win_rate"] >= 0.8 and ppo["reward_policy"] > ppo["reward_baseline"] + 1.0
    assert ppo["kl"] > 0.1 and ppo["words_policy"] < ppo["words_baseline"]
    same = align_eval("sft", "same.json")  # a model against itself: all ties, no divergence
    assert same["win_rate"] == 0.5 and same["kl"] == pytest.approx(0.0, abs=1e-4)


def test_shared_value_head_learns_without_a_second_model(pipeline, tmp_path):
    """`value_model: shared` reads values off the policy's own trunk: one model trains, and it still learns."""
    out = fresh_copy(pipeline, tmp_path)
    metrics = run_recipe(load_recipe(RECIPE, [f"output_dir={out}", "stages.ppo.value_model=shared",
                                              "stages.ppo.max_steps=8", "stages.ppo.eval_prompts=12"]))["ppo"]
    assert metrics["value_model_from"] == "shared"
    assert metrics["eval_reward_after"] > metrics["eval_reward_before"] + 1.0
    assert all(r["value_loss"] == r["value_loss"] for r in log_rows(out))  # the head trains, nothing NaN
