"""The staged runner: skip when done, start over when inputs change, resume after kill -9."""

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from align.stages import load_recipe
from align.runner import run_recipe
from conftest import REPO, tiny_sft_stage, write_recipe


def test_complete_stage_is_skipped_and_changed_inputs_rerun(tiny_model, tmp_path, caplog):
    out = tmp_path / "run"
    recipe_path = write_recipe(tmp_path / "r.yaml", out, {"sft": tiny_sft_stage(tiny_model, max_steps=6)})
    first = run_recipe(load_recipe(recipe_path))["sft"]
    manifest = json.loads((out / "sft" / "manifest.json").read_text())
    weights = (out / "sft" / "model" / "model.safetensors").stat().st_mtime_ns

    caplog.set_level(logging.INFO, logger="align")
    t0 = time.perf_counter()
    again = run_recipe(load_recipe(recipe_path))["sft"]
    assert time.perf_counter() - t0 < 5
    assert "skipping" in caplog.text
    assert again == first
    assert json.loads((out / "sft" / "manifest.json").read_text()) == manifest
    assert (out / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == weights

    caplog.clear()
    changed = run_recipe(load_recipe(recipe_path, ["stages.sft.lr=1e-3"]))["sft"]
    assert "inputs changed" in caplog.text
    assert changed["train_loss"] != first["train_loss"]
    assert json.loads((out / "sft" / "manifest.json").read_text())["config"]["lr"] == 1e-3


def test_a_stage_from_the_tiny_model_is_complete_in_a_copy_under_another_cache(tmp_path, monkeypatch, caplog):
    """`model: tiny` is built into each cache byte for byte the same: a stage trained under one cache and copied
    is skipped under another (what a second machine, or a second pytest-xdist worker, sees); a tiny model whose
    bytes differ is another input, and the stage reruns."""
    import shutil

    from align.models import resolve_model

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache_a"))
    first = tmp_path / "a"
    run_recipe(load_recipe(write_recipe(tmp_path / "a.yaml", first, {"sft": tiny_sft_stage("tiny", max_steps=2)})))
    copy = tmp_path / "b"
    shutil.copytree(first / "sft", copy / "sft")

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache_b"))
    caplog.set_level(logging.INFO, logger="align")
    recipe = load_recipe(write_recipe(tmp_path / "b.yaml", copy, {"sft": tiny_sft_stage("tiny", max_steps=2)}))
    run_recipe(recipe)
    assert "stage sft: complete with the same inputs" in caplog.text
    assert json.loads((copy / "sft" / "manifest.json").read_text())["attempts"] == 1

    tokenizer = Path(resolve_model("tiny")) / "tokenizer_config.json"  # cache_b's copy, one byte more
    tokenizer.write_text(tokenizer.read_text() + " ")
    caplog.clear()
    run_recipe(recipe)
    assert "inputs changed since the last run" in caplog.text


def test_downstream_stage_reruns_when_upstream_model_changes(tiny_model, tmp_path, caplog):
    out = tmp_path / "run"
    stages = {"a": tiny_sft_stage(tiny_model, type="sft", max_steps=3),
              "b": tiny_sft_stage("${a}", type="sft", max_steps=3)}
    path = write_recipe(tmp_path / "r.yaml", out, stages)
    run_recipe(load_recipe(path))
    caplog.set_level(logging.INFO, logger="align")
    run_recipe(load_recipe(path, ["stages.a.max_steps=4"]))
    assert caplog.text.count("inputs changed") == 2  # a's config changed, so b's starting model changed


def test_bad_data_leaves_no_completed_artifacts(tiny_model, tmp_path, python):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"messages": [{"role": "assistant", "content": "first?"}]}\n')
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", out, {"sft": tiny_sft_stage(tiny_model, data=str(data))})
    r = subprocess.run([python, "-m", "align", "run", str(path)], capture_output=True, text=True)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("align: error: ") and f"{data}, line 2" in last and "messages[0].role" in last
    assert "Traceback" not in r.stderr
    assert not out.exists()  # the rows are checked before anything is written


@pytest.mark.parametrize("args, expected", [
    (["run", "missing.yaml"], "missing.yaml: recipe file not found"),
    (["run", "recipes/tiny-sft.yaml", "stages.sft.learning_rate=1"], "did you mean 'lr'?"),
    (["run", "recipes/tiny-sft.yaml", "stages.sft.data=/nope/x.jsonl"], "/nope/x.jsonl: no such file or folder"),
    (["run", "recipes/tiny-sft.yaml", "stages.sft.model=/nope/model"],
     "stages.sft.model: no such model folder /nope/model"),
    (["tiny-model", "/tmp/x", "--hidden", "30"], "multiple of 16"),
])
def test_cli_errors_are_one_line_and_exit_2(args, expected, python, tmp_path):
    r = subprocess.run([python, "-m", "align", *args], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "ALIGN_CACHE": str(tmp_path)})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("align: error: ")
    assert expected in r.stderr and "Traceback" not in r.stderr


def test_console_script_and_module_agree(python):
    script = os.path.join(os.path.dirname(python), "align")
    by_module = subprocess.run([python, "-m", "align", "run", "--help"], capture_output=True, text=True)
    by_script = subprocess.run([script, "run", "--help"], capture_output=True, text=True)
    assert by_module.returncode == by_script.returncode == 0
    assert by_module.stdout.replace("__main__.py", "align") == by_script.stdout
    assert "overrides" in by_script.stdout


def _run_killed_after_first_checkpoint(python, recipe, out):
    """Start `align run`, SIGKILL it once a checkpoint is complete, return the step it reached."""
    proc = subprocess.Popen([python, "-m", "align", "run", str(recipe)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            done = list((out / "sft" / "checkpoints").glob("checkpoint-*/align_checkpoint_ok"))
            if done:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            assert proc.poll() is None, "run ended before its first checkpoint"
            time.sleep(0.02)
        pytest.fail("no checkpoint within 120 s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_model, tmp_path, python):
    # 45 steps: the kill lands after checkpoint 15 and well before the end (it polls every 20 ms)
    stage = tiny_sft_stage(tiny_model, max_steps=45, save_steps=15, eval_steps=0, lr_scheduler="linear")
    straight = run_recipe(load_recipe(write_recipe(tmp_path / "a.yaml", tmp_path / "a", {"sft": stage})))["sft"]

    out = tmp_path / "b"
    recipe = write_recipe(tmp_path / "b.yaml", out, {"sft": stage})
    _run_killed_after_first_checkpoint(python, recipe, out)
    manifest = json.loads((out / "sft" / "manifest.json").read_text())
    assert manifest["status"] == "running"  # the kill left it unfinished, and it says so
    assert not (out / "sft" / "model").exists() and not (out / "sft" / "metrics.json").exists()

    r = subprocess.run([python, "-m", "align", "run", str(recipe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr
    resumed = json.loads((out / "sft" / "metrics.json").read_text())
    assert resumed["resumed_from_step"] and resumed["resumed_from_step"] % 15 == 0
    assert resumed["global_step"] == straight["global_step"] == 45
    assert abs(resumed["eval_loss"] - straight["eval_loss"]) < 1e-3
    # Every token was seen once overall, but this run's throughput counts only the tokens after its checkpoint.
    assert resumed["num_input_tokens_seen"] == straight["num_input_tokens_seen"]
    assert resumed["tokens_per_s"] * resumed["train_runtime"] < 0.99 * resumed["num_input_tokens_seen"]
    manifest = json.loads((out / "sft" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["attempts"] == 2
    steps = [json.loads(line)["step"] for line in (out / "sft" / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)), "the per-step log repeats steps after resume"


def test_checkpoints_only_at_save_steps_not_again_at_the_end(tiny_model, tmp_path):
    """The last step is not checkpointed unless save_steps says so: the stage saves its model right after,
    and a checkpoint would write the optimizer state again for nothing."""
    stage = tiny_sft_stage(tiny_model, max_steps=5, save_steps=2, eval_steps=0)
    run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "out", {"sft": stage})))
    ckpts = sorted(p.name for p in (tmp_path / "out" / "sft" / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "out" / "sft" / "model" / "config.json").exists()
