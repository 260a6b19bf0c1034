"""The PPO stage on the tiny model: it learns what the reward model prefers, resumes exactly after
kill -9, survives NaN rewards and a reward model with another tokenizer, and refuses bad input."""

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import REPO, SEED, copy_stages, record_learning

from align.errors import AlignError
from align.runner import run_recipe
from align.stages import load_recipe

RECIPE = REPO / "recipes" / "tiny-sft-rm-ppo.yaml"
STEP_KEYS = ("reward", "kl", "entropy", "clip_frac", "approx_kl", "value_loss", "explained_variance",
             "tokens_per_s", "gen_seconds", "train_seconds", "peak_rss_mb")


@pytest.fixture(scope="module")
def pipeline(ppo_upstream, tmp_path_factory):
    """The shipped tiny SFT -> reward -> PPO recipe, run once (its SFT and reward stages shared: conftest)."""
    out = copy_stages(ppo_upstream, tmp_path_factory.mktemp("ppo-pipeline"))
    return out, run_recipe(load_recipe(RECIPE, [f"output_dir={out}", f"seed={SEED}"]))


def log_rows(out, stage="ppo"):
    return [json.loads(line) for line in (out / stage / "log.jsonl").read_text().splitlines()]


def fresh_copy(pipeline, tmp_path, name="run"):
    """A new output folder holding the fixture's finished SFT and reward stages (they are skipped)."""
    return copy_stages(pipeline[0], tmp_path / name)


def test_ppo_raises_the_held_out_reward_with_bounded_kl(pipeline):
    out, metrics = pipeline
    ppo = metrics["ppo"]
    samples = [json.loads(line) for line in (out / "ppo" / "samples.jsonl").read_text().splitlines()]

    def with_filler(key):
        return sum("I hope this helps" in s[key] for s in samples)

    record_learning("test_ppo_raises_the_held_out_reward_with_bounded_kl",
                    reward_gain=ppo["eval_reward_after"] - ppo["eval_reward_before"],
                    win_rate=ppo["eval_win_rate"], win_rate_lo=ppo["eval_win_rate_ci"][0],
                    train_reward_gain=ppo["train_reward_last"] - ppo["train_reward_first"], kl_last=ppo["kl_last"],
                    ref_nll_rise=ppo["eval_ref_nll_after"] - ppo["eval_ref_nll_before"],
                    hacking=float(ppo["hacking_suspected"]), filler_before=with_filler("before") / len(samples),
                    filler_after=with_filler("after") / len(samples))
    # spread over seeds 0-4 x 1 and 2 torch threads (tests/spread.py): reward gain 2.83-4.51, win rate 1.00 in all 10,
    # train reward gain 1.17-1.83, filler in 53-69% of the answers before and none after
    assert ppo["eval_reward_after"] > ppo["eval_reward_before"] + 1.0
    assert ppo["eval_win_rate"] >= 0.8
    assert ppo["train_reward_last"] > ppo["train_reward_first"]
    assert 0 < ppo["kl_last"] < 10
    assert ppo["hacking_suspected"] is False  # reference NLL up 0.25-0.80 nats/token over the 10, under NLL_RISE
    rows = log_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in STEP_KEYS:
        assert all(isinstance(r[key], float) for r in rows), key
    # The reference is the starting policy: before the first update they agree up to float error.
    assert abs(rows[0]["kl"]) < 1e-3
    # eval_steps (50) > max_steps: the held-out reward is measured once, at the end.
    assert [r["step"] for r in rows if "eval_reward" in r] == [20]
    assert rows[-1]["eval_reward"] == pytest.approx(ppo["eval_reward_after"])
    # What the reward model was taught: the SFT habit "I hope this helps!" goes away.
    assert with_filler("before") >= len(samples) // 3
    assert with_filler("after") <= len(samples) // 10
    assert len({json.dumps(s["prompt"]) for s in samples}) == len(samples)


def test_killed_ppo_resumes_and_matches_an_uninterrupted_run(pipeline, tmp_path, python):
    overrides = ["stages.ppo.max_steps=7", "stages.ppo.save_steps=3", "stages.ppo.eval_prompts=4"]
    straight = fresh_copy(pipeline, tmp_path, "straight")
    run_recipe(load_recipe(RECIPE, [f"output_dir={straight}", f"seed={SEED}", *overrides]))

    killed = fresh_copy(pipeline, tmp_path, "killed")
    cmd = [python, "-m", "align", "run", str(RECIPE), f"output_dir={killed}", f"seed={SEED}", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "ppo" / "checkpoints" / "checkpoint-3" / "align_checkpoint_ok"
    deadline = time.time() + 180
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "no checkpoint before the deadline"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((killed / "ppo" / "manifest.json").read_text())["status"] == "running"

    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
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
    metrics = run_recipe(load_recipe(RECIPE, [f"output_dir={out}", f"seed={SEED}", "stages.ppo.max_steps=4",
                                              "stages.ppo.reward_fn=ppo_reward_fns:nan_on_second_batch",
                                              "stages.ppo.rollout_batch_size=8", "stages.ppo.eval_prompts=4"]))["ppo"]
    rows = log_rows(out)
    assert rows[1] == {"step": 2, "skipped": True, "nan_rewards": 1}
    assert [r["step"] for r in rows if not r.get("skipped")] == [1, 3, 4]
    assert metrics["skipped_steps"] == 1
    assert all(r["policy_loss"] == r["policy_loss"] for r in rows if not r.get("skipped"))  # no NaN crept in


def test_rewards_that_stay_nan_stop_the_stage(pipeline, tmp_path):
    out = fresh_copy(pipeline, tmp_path)
    recipe = load_recipe(RECIPE, [f"output_dir={out}", f"seed={SEED}", "stages.ppo.max_steps=20",
                                  "stages.ppo.rollout_batch_size=4", "stages.ppo.response_length=4",
                                  "stages.ppo.reward_fn=ppo_reward_fns:always_nan", "stages.ppo.eval_prompts=0"])
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
    metrics = run_recipe(load_recipe(RECIPE, [f"output_dir={out}", f"seed={SEED}", f"stages.reward.model={other}",
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
        f"output_dir={out}", f"seed={SEED}", "stages.ppo.max_steps=4",
        "stages.ppo.lora={r: 8, alpha: 32, dropout: 0.0}", "stages.ppo.lr=3e-3", "stages.ppo.kl_estimator=k3",
        "stages.ppo.kl_target=0.01", "stages.ppo.eval_prompts=4"]))["ppo"]
    rows = log_rows(out)
    record_learning("test_lora_ppo_uses_the_disabled_adapter_as_reference", kl_last=rows[-1]["kl"],
                    kl_coef_final=metrics["kl_coef_final"])
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["kl"] > 1e-3  # 3.9-6.5 over seeds 0-4 x 1 and 2 threads
    assert metrics["kl_coef_final"] > 0.05  # KL above target: β grows
    assert (out / "ppo" / "model" / "adapter_config.json").exists()


def test_bad_prompt_sets_end_with_one_line(pipeline, tmp_path, python):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = fresh_copy(pipeline, tmp_path)
    r = subprocess.run([python, "-m", "align", "run", str(RECIPE), f"output_dir={out}", f"seed={SEED}",
                        f"stages.ppo.data={empty}"], capture_output=True, text=True, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"align: error: stages.ppo.data: {empty}: dataset is empty; " \
                                                "expected rows like {'prompt': ...}"

    too_long = load_recipe(RECIPE, [f"output_dir={out}", f"seed={SEED}", "stages.ppo.max_length=26",
                                    "stages.ppo.too_long=drop"])
    with pytest.raises(AlignError, match=r"no prompts to train on \(\d+ longer than max_length - response_length\)"):
        run_recipe(too_long)
    assert not (out / "ppo" / "model").exists()

    r = subprocess.run([python, "-m", "align", "run", str(RECIPE), f"output_dir={out}", f"seed={SEED}",
                        "stages.ppo.reward_fn=ppo_reward_fns:not_a_function"], capture_output=True, text=True,
                       check=False, env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("align: error: stages.ppo.reward_fn: 'ppo_reward_fns:not_a_function' "
                                                 "is a int, not a function; expected function(prompts, completions) "
                                                 "-> list[float]")


def test_align_eval_judges_the_ppo_policy_against_sft(pipeline, tmp_path, python):
    out, _ = pipeline
    prompts = str(REPO / "recipes" / "data" / "tiny_prompts.jsonl")

    general = str(REPO / "recipes" / "data" / "general_text.txt")

    def align_eval(policy, name):
        r = subprocess.run([python, "-m", "align", "eval", "--policy", str(out / policy / "model"), "--baseline",
                            str(out / "sft" / "model"), "--reward-model", str(out / "reward" / "model"),
                            "--prompts", prompts, "--max-prompts", "24", "--out", str(tmp_path / name),
                            "--forgetting-data", general, "--seed", str(SEED)], capture_output=True, text=True,
                           check=False)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "win rate" in r.stdout
        return json.loads((tmp_path / name).read_text())

    ppo = align_eval("ppo", "ppo.json")
    record_learning("test_align_eval_judges_the_ppo_policy_against_sft", win_rate=ppo["win_rate"],
                    win_rate_lo=ppo["win_rate_ci"][0], reward_gain=ppo["reward_policy"] - ppo["reward_baseline"],
                    kl=ppo["kl"], words_drop=ppo["words_baseline"] - ppo["words_policy"])
    # spread over seeds 0-4 x 1 and 2 torch threads (tests/spread.py): win rate 0.81-1.00, the
    # bootstrap 95% interval's lower end 0.69-1.00, reward gain 2.44-4.65, KL 2.3-4.2, 1.1-7.0 fewer words. A
    # machine whose floats differ measured a win rate of 0.73 (24 prompts): a point bound tuned on one machine
    # fails there, so the bound is the interval's: the policy wins more than it loses, with 95% confidence.
    assert ppo["prompts"] == 24
    assert ppo["win_rate_ci"][0] > 0.5 and ppo["reward_policy"] > ppo["reward_baseline"] + 1.0
    assert ppo["kl"] > 0.1 and ppo["words_policy"] < ppo["words_baseline"]
    assert ppo["forgetting_ppl_policy"] > 1 and ppo["forgetting_ppl_policy"] != ppo["forgetting_ppl_baseline"]
    same = align_eval("sft", "same.json")  # a model against itself: all ties, no divergence
    assert same["win_rate"] == 0.5 and same["kl"] == pytest.approx(0.0, abs=1e-4)
    assert same["forgetting_ppl_policy"] == pytest.approx(same["forgetting_ppl_baseline"], rel=1e-6)


def test_shared_value_head_learns_without_a_second_model(pipeline, tmp_path):
    """`value_model: shared` reads values off the policy's own trunk: one model trains, and it still learns."""
    out = fresh_copy(pipeline, tmp_path)
    metrics = run_recipe(load_recipe(RECIPE, [f"output_dir={out}", f"seed={SEED}", "stages.ppo.value_model=shared",
                                              "stages.ppo.max_steps=8", "stages.ppo.eval_prompts=12"]))["ppo"]
    record_learning("test_shared_value_head_learns_without_a_second_model",
                    reward_gain=metrics["eval_reward_after"] - metrics["eval_reward_before"])
    assert metrics["value_model_from"] == "shared"
    assert metrics["eval_reward_after"] > metrics["eval_reward_before"] + 1.0  # spread ov: 1.69-3.73 over 10 runs
    assert all(r["value_loss"] == r["value_loss"] for r in log_rows(out))  # the head trains, nothing NaN


def test_logging_steps_eval_steps_and_tensorboard(pipeline, tmp_path):
    """logging_steps=2 writes steps 1 (always), 2, 4 and 5 (the last), each the mean of the steps since the
    last record; eval_steps=2 adds eval_reward at 2, 4 and the end; TensorBoard gets the same scalars. The
    first five steps are the fixture's (same seed, constant lr), so its per-step rows give the means."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = fresh_copy(pipeline, tmp_path)
    metrics = run_recipe(load_recipe(RECIPE, [f"output_dir={out}", f"seed={SEED}", "stages.ppo.max_steps=5",
                                              "stages.ppo.logging_steps=2", "stages.ppo.eval_steps=2",
                                              "stages.ppo.eval_prompts=4", "stages.ppo.report_to=tensorboard"]))["ppo"]
    rows, every_step = log_rows(out), log_rows(pipeline[0])
    assert [r["step"] for r in rows] == [1, 2, 4, 5]
    assert [r["step"] for r in rows if "eval_reward" in r] == [2, 4, 5]
    assert rows[-1]["eval_reward"] == pytest.approx(metrics["eval_reward_after"])
    for row, steps in zip(rows, ([1], [2], [3, 4], [5])):
        for key in ("reward", "kl"):
            expected = sum(every_step[s - 1][key] for s in steps) / len(steps)
            assert row[key] == pytest.approx(expected, abs=1e-4), (row["step"], key)
    events = EventAccumulator(str(out / "ppo" / "tensorboard"))
    events.Reload()
    for key in ("reward", "kl", "tokens_per_s", "policy_loss"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [
            (r["step"], pytest.approx(r[key], rel=1e-5)) for r in rows], key
    assert [e.step for e in events.Scalars("eval_reward")] == [2, 4, 5]


def test_log_window_is_saved_with_the_checkpoint(tmp_path):
    """logging_steps=2 over 5 steps with a kill after the checkpoint at step 3: step 3 waits in the window,
    the checkpoint keeps it, and the resumed run writes step 4 as the mean of 3 and 4 (lr and kl_coef: the
    last value, peak memory: the max). A record the killed run wrote past the checkpoint is dropped."""
    from types import SimpleNamespace

    from align.stages.ppo import StepRecords, due

    stage = SimpleNamespace(logging_steps=2, report_to="none")

    def rec(s):
        return {"step": s, "reward": float(s), "lr": s / 10, "kl_coef": s / 100, "peak_rss_mb": 10.0 * s}

    records = StepRecords(tmp_path, stage, 0, [])
    for s in (1, 2, 3):
        records.add(rec(s), last_step=5)
    saved_window = list(records.window)
    records.add(rec(4), last_step=5)  # written, then the process is killed
    resumed = StepRecords(tmp_path, stage, 3, saved_window)
    for s in (4, 5):
        resumed.add(rec(s), last_step=5)
    resumed.close()
    rows = log_rows(tmp_path, stage=".")
    assert rows == [rec(1), rec(2), {"step": 4, "reward": 3.5, "lr": 0.4, "kl_coef": 0.04, "peak_rss_mb": 40.0},
                    rec(5)]
    # eval_steps / logging_steps schedule: every N steps and the last; 0 means the last only
    assert [s for s in range(1, 8) if due(s, 3, 7)] == [3, 6, 7]
    assert [s for s in range(1, 8) if due(s, 0, 7)] == [7]


def test_resume_refuses_a_checkpoint_whose_keys_do_not_fit(tmp_path):
    """The saved trainable weights must be exactly the model's trainable ones: a missing or unexpected key
    (say a LoRA checkpoint resumed without lora) is an error naming the checkpoint and the key."""
    import torch

    from align.stages.ppo import load_trainable, trainable_state

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)  # frozen: not saved, not expected
    saved = {k: torch.full_like(v, 0.5) for k, v in trainable_state(model).items()}
    assert sorted(saved) == ["1.bias", "1.weight"]
    load_trainable(model, saved, tmp_path, "policy")
    assert model[1].weight.tolist() == [[0.5, 0.5]] and model[1].bias.tolist() == [0.5]

    ckpt = tmp_path / "checkpoint-3"
    with pytest.raises(AlignError, match=rf"{ckpt}: the saved policy weights .*missing '1.bias'; 1 missing"):
        load_trainable(model, {"1.weight": saved["1.weight"]}, ckpt, "policy")
    with pytest.raises(AlignError, match=rf"{ckpt}: the saved value model weights .*unexpected '0.weight'"):
        load_trainable(model, {**saved, "0.weight": torch.zeros(2, 2)}, ckpt, "value model")
    with pytest.raises(AlignError, match=r"'1.weight' has shape \(1, 3\)"):
        load_trainable(model, {**saved, "1.weight": torch.zeros(1, 3)}, ckpt, "policy")
