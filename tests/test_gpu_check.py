"""bench/gpu_check.py, the prepared GPU check, on a machine without a GPU: the plan `make gpu-check DRY=1`
prints (every step, its command and timeout, nothing run), the recipes and overrides its `align run` steps
pass (loaded by align's own recipe loader), the step runner for real (ok, timeout, skips), the readers of
a run's files and of the scripts' output, and the JSON summary's shape."""

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["env", "models", "qlora-sft-dpo", "fsdp2-sft", "zero2-sft", "ppo-vllm", "rollouts", "pytest-gpu"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gc = load("gpu_check")


def plan_from_output(text: str) -> dict[str, dict]:
    """{step: {"timeout": s, "command": [...]}} from the printed plan."""
    steps, name = {}, None
    for line in text.splitlines():
        head = re.match(r"^\d+\. (\S+) \(timeout (\d+) s", line)
        if head:
            name = head[1]
            steps[name] = {"timeout": int(head[2])}
        elif line.strip().startswith("$ ") and name:
            steps[name]["command"] = shlex.split(line.strip()[2:])
    return steps


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_check_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    start = time.monotonic()
    done = subprocess.run(["make", "-s", "gpu-check", "DRY=1"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - start < 45  # plans only: no torch import, nothing run
    plan = plan_from_output(done.stdout)
    assert list(plan) == STEPS
    assert all(step["timeout"] > 0 and step["command"] for step in plan.values())
    budget = float(re.search(r"budget (\d+) s in all", done.stdout)[1])
    assert budget <= 480  # under 8 minutes, whatever the steps' own limits add up to
    assert f"summary {tmp_path / 'gpu_check.json'}" in done.stdout
    assert not (tmp_path / "gpu_check.json").exists()

    joined = {name: " ".join(step["command"]) for name, step in plan.items()}
    assert "-m pytest -m gpu" in joined["pytest-gpu"] and "tests/test_rollouts_vllm.py" in joined["pytest-gpu"]
    assert "bench/rollouts.py" in joined["rollouts"]
    assert "recipes/smollm2-sft-rm-dpo.yaml" in joined["qlora-sft-dpo"]
    for stage in ("sft", "dpo"):
        assert f"stages.{stage}.quantization=nf4" in joined["qlora-sft-dpo"]
    assert "stages.ppo.engine=vllm" in joined["ppo-vllm"]
    for name, config in (("fsdp2-sft", "fsdp2"), ("zero2-sft", "zero2")):
        assert (f"-m accelerate.commands.launch --config_file recipes/accelerate/{config}.yaml --num_processes 1 "
                "-m align run recipes/tiny-sft.yaml") in joined[name]
    assert "--preflight" in joined["env"]


def test_dry_run_with_a_random_model_builds_it_first():
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--model", "random",
                           "--work", "runs/elsewhere"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    plan = plan_from_output(done.stdout)
    assert plan["models"]["command"][1:] == ["-m", "align", "tiny-model", "runs/elsewhere/random-4x256",
                                             "--hidden", "256", "--layers", "4"]
    for name in ("qlora-sft-dpo", "ppo-vllm"):
        assert "stages.sft.model=runs/elsewhere/random-4x256" in plan[name]["command"]
    assert plan["rollouts"]["command"][plan["rollouts"]["command"].index("--model") + 1] == \
        "runs/elsewhere/random-4x256"
    assert not (REPO / "runs" / "elsewhere").exists()


@pytest.mark.parametrize("model", ["smollm2", "random"])
def test_every_align_run_step_passes_recipe_and_overrides_that_load(model, tmp_path):
    """A renamed key would fail the GPU session minutes in; align's recipe loader catches it here."""
    from align.stages import load_recipe

    plan = gc.build_plan(gc.parse_args(["--model", model, "--work", str(tmp_path)]))
    runs = [s for s in plan if "align" in s.command and "run" in s.command]
    assert {s.name for s in runs} == {"qlora-sft-dpo", "fsdp2-sft", "zero2-sft", "ppo-vllm"}
    for step in runs:
        args = step.command[step.command.index("run") + 1:]
        recipe = load_recipe(REPO / args[0], args[1:])
        assert recipe.output_dir == step.output_dir and Path(step.output_dir).parent == tmp_path
        if step.name == "qlora-sft-dpo":
            assert [recipe.stages[n].quantization for n in ("sft", "reward", "dpo")] == ["nf4", None, "nf4"]
            assert recipe.stages["sft"].lora.r == recipe.stages["dpo"].lora.r == 8
        if step.name == "ppo-vllm":
            assert recipe.stages["ppo"].engine == "vllm" and recipe.stages["ppo"].max_steps == 3
    for step in plan:
        for word in step.command:
            if word.startswith("recipes/") or word.startswith("bench/") or word.startswith("tests/"):
                assert (REPO / word).exists(), f"{step.name}: {word}"


def fake_results():
    R = gc.StepResult
    return [
        R("env", "versions", "python bench/gpu_check.py --preflight", 60, "ok", seconds=2.5, returncode=0,
          details={"cuda": True}),
        R("qlora-sft-dpo", "QLoRA", "python -m align run ...", 180, "ok", seconds=61.2, returncode=0,
          peak_gpu_mb=2048.5, peak_gpu_mb_device=4100.0, tokens_per_s={"sft": 5000.0, "dpo": 3100.0},
          stages={"sft": {"status": "complete", "seconds": 20.1, "tokens_per_s": 5000.0, "peak_gpu_mb": 2048.5}}),
        R("ppo-vllm", "PPO", "python -m align run ...", 240, "failed", reason="timed out after 240 s", seconds=240.0),
        R("zero2-sft", "ZeRO-2", "python -m accelerate.commands.launch ...", 150, "skipped",
          reason="needs deepspeed (not importable)"),
    ]


def test_summary_has_the_documented_shape(tmp_path):
    results = fake_results()
    summary = gc.summarize(results, {"cuda": True, "device": "NVIDIA H100"}, started_at="2026-01-01T00:00:00+00:00",
                           seconds=303.04, budget_s=450, remaining=[])
    out = tmp_path / "deep" / "gpu_check.json"
    gc.write_summary(out, summary)
    got = json.loads(out.read_text())
    assert [p.name for p in tmp_path.joinpath("deep").iterdir()] == ["gpu_check.json"]  # no temporary left

    assert set(got) == {"schema", "started_at", "seconds", "budget_s", "complete", "remaining", "ok", "counts", "env",
                        "steps"}
    assert got["schema"] == "align-gpu-check/1" and got["seconds"] == 303.0 and got["complete"] is True
    assert got["counts"] == {"ok": 2, "failed": 1, "skipped": 1}
    assert got["ok"] is False  # a step failed
    assert got["env"]["device"] == "NVIDIA H100"
    step_keys = {"name", "what", "command", "timeout_s", "status", "reason", "seconds", "returncode", "peak_gpu_mb",
                 "peak_gpu_mb_device", "tokens_per_s", "stages", "details", "output_tail"}
    assert [set(s) for s in got["steps"]] == [step_keys] * 4
    assert [s["name"] for s in got["steps"]] == ["env", "qlora-sft-dpo", "ppo-vllm", "zero2-sft"]
    qlora = got["steps"][1]
    assert qlora["tokens_per_s"] == {"sft": 5000.0, "dpo": 3100.0} and qlora["peak_gpu_mb"] == 2048.5
    assert qlora["stages"]["sft"]["status"] == "complete"
    assert all(s["status"] in ("ok", "failed", "skipped") for s in got["steps"])
    assert all(s["reason"] for s in got["steps"] if s["status"] != "ok")

    partial = gc.summarize(results[:1], {}, started_at="t", seconds=1, budget_s=450, remaining=["models"])
    assert (partial["complete"], partial["ok"], partial["remaining"]) == (False, False, ["models"])
    clean = gc.summarize([results[0], results[3]], {}, started_at="t", seconds=1, budget_s=450)
    assert clean["ok"] is True  # nothing failed; the skip says why
    with pytest.raises(ValueError, match="pending"):
        gc.summarize([gc.StepResult("x", "", "", 1, "pending")], {}, started_at="t", seconds=1, budget_s=1)


def test_without_vllms_gpu_build_the_summary_names_the_cpu_verified_vllm_tests():
    results = fake_results()
    without = gc.summarize(results, {"cuda": True, "importable": {"vllm": False}}, started_at="t", seconds=1,
                           budget_s=450)
    tests = without["vllm_cpu_coverage"]["tests"]
    names = [t.rpartition("::")[2] for t in tests]
    assert "test_ppo_on_vllm_learns_as_with_the_hf_engine" in names
    assert "test_load_weights_switches_the_policy_and_back" in names
    assert "test_tensor_parallel_sync_and_its_timeout" not in names  # two GPUs: not run on the CPU build
    assert all(t.startswith("tests/test_rollouts_vllm.py::test_") for t in tests)
    source = (REPO / "tests" / "test_rollouts_vllm.py").read_text()
    assert all(f"def {name}(" in source for name in names)
    present = gc.summarize(results, {"cuda": True, "importable": {"vllm": True}}, started_at="t", seconds=1,
                           budget_s=450)
    assert "vllm_cpu_coverage" not in present


def test_run_step_for_real(tmp_path):
    env = {"cuda": False, "importable": {}}
    ok = gc.Step("hello", "prints", [sys.executable, "-c", "print('hello from a step')"], 30, needs_cuda=False)
    r = gc.run_step(ok, env, 100, tmp_path)
    assert (r.status, r.returncode, r.reason) == ("ok", 0, None) and "hello from a step" in r.output_tail
    assert (tmp_path / "hello.log").read_text().strip() == "hello from a step"

    slow = gc.Step("slow", "sleeps", [sys.executable, "-c", "import time; print('started', flush=True); "
                                      "time.sleep(60)"], 1, needs_cuda=False)
    start = time.monotonic()
    r = gc.run_step(slow, env, 100, tmp_path)
    assert time.monotonic() - start < 15
    assert (r.status, r.returncode, r.reason) == ("failed", None, "timed out after 1 s")

    broken = gc.Step("broken", "fails", [sys.executable, "-c", "raise SystemExit('bad input')"], 30, needs_cuda=False)
    r = gc.run_step(broken, env, 100, tmp_path)
    assert r.status == "failed" and r.reason == "exit code 1: bad input"

    def reason(step, left=100, done=None):
        return gc.run_step(step, env, left, tmp_path, done or {}).reason

    assert reason(gc.Step("gpu", "", ["true"], 5)) == "no CUDA GPU (torch.cuda.is_available() is False)"
    assert reason(gc.Step("lib", "", ["true"], 5, needs=("no_such_module_xyz",), needs_cuda=False)) == \
        "needs no_such_module_xyz (not importable)"
    assert reason(gc.Step("late", "", ["true"], 5, needs_cuda=False), left=3).startswith("time budget spent")
    assert reason(gc.Step("dep", "", ["true"], 5, needs_cuda=False, after=("models",)), done={"models": "failed"}) \
        == "needs step models failed"


def test_an_align_run_step_reads_the_runs_own_files(tmp_path):
    out = tmp_path / "run"
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "stale").write_text("a complete run left here would be skipped, measuring nothing")
    step = gc.Step("tiny-sft", "2 steps", [sys.executable, "-m", "align", "run", "recipes/tiny-sft.yaml",
                                          f"output_dir={out}", "stages.sft.max_steps=2", "stages.sft.eval_steps=0",
                                          "stages.sft.logging_steps=1"], 120, needs_cuda=False, **gc.runs_in(out))
    r = gc.run_step(step, {"cuda": False}, 200, tmp_path / "logs")
    assert r.status == "ok", r.output_tail
    assert not (out / "sft" / "stale").exists()
    sft = r.stages["sft"]
    assert sft["status"] == "complete" and sft["model_saved"] and sft["seconds"] > 0
    assert r.tokens_per_s["sft"] == sft["tokens_per_s"] > 0
    assert r.peak_gpu_mb is None  # no GPU here


def test_stage_stats_take_the_highest_gpu_peak(tmp_path):
    stage = tmp_path / "ppo"
    (stage / "model").mkdir(parents=True)
    (stage / "model" / "adapter_config.json").write_text("{}")
    (stage / "manifest.json").write_text(json.dumps({
        "status": "complete", "started_at": "2026-01-01T00:00:00+00:00", "ended_at": "2026-01-01T00:01:30+00:00",
        "world_size": 2, "launcher": "torchrun", "peak_memory_mb_per_rank": [{"rss": 900, "gpu": 3000.5},
                                                                             {"rss": 800, "gpu": 3100.0}]}))
    (stage / "metrics.json").write_text(json.dumps({"tokens_per_s": 812.5}))
    (stage / "log.jsonl").write_text("\n".join(json.dumps(r) for r in [{"step": 1, "peak_gpu_mb": 2500.0},
                                                                       {"step": 2, "peak_gpu_mb": 3050.0}]) + "\n")
    got = gc.stage_stats(stage)
    assert got == {"status": "complete", "seconds": 90.0, "tokens_per_s": 812.5, "peak_gpu_mb": 3100.0,
                   "world_size": 2, "launcher": "torchrun", "model_saved": True, "error": None}

    (stage / "manifest.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: CUDA OOM"}))
    fields = gc.collect_stages(gc.Step("x", "", [], 1, output_dir=str(tmp_path)), "")
    assert fields["status"] == "failed" and fields["reason"] == "ppo: failed (RuntimeError: CUDA OOM)"


def test_rollouts_output_is_read_as_bench_rollouts_prints_it(capsys):
    rollouts = load("rollouts")

    class Engine:
        def generate(self, prompts, n, sampling):
            return [[SimpleNamespace(token_ids=[1] * 32) for _ in range(n)] for _ in prompts]

    sampling = SimpleNamespace(seed=0)
    rollouts.timed("hf batched (64)", Engine(), ["a", "b", "c"], 4, sampling)
    rollouts.timed("vllm", Engine(), ["a", "b", "c"], 4, sampling)
    printed = capsys.readouterr().out + ("  vllm / hf batched: 12.5x (target >= 10x)\n"
                                         "  peak GPU memory (torch): 2345 MiB\n")
    got = gc.parse_rollouts(printed)
    assert set(got["tokens_per_s"]) == {"hf_batched", "vllm"} and all(v > 0 for v in got["tokens_per_s"].values())
    assert got["details"]["vllm_over_hf"] == 12.5 and got["peak_gpu_mb"] == 2345.0
    assert "reason" not in got

    source = (REPO / "bench" / "rollouts.py").read_text()
    assert "vllm: not installed" in source and "vllm / hf batched:" in source and "peak {'GPU memory (torch)'" in source
    without = gc.parse_rollouts("  hf batched (64)   4096 tokens in  2.00 s =    2048.0 tokens/s\n"
                                "  vllm: not installed (pip install 'align[vllm]'); skipped\n")
    assert without["tokens_per_s"] == {"hf_batched": 2048.0}
    assert without["reason"] == "vLLM side skipped: vllm not importable"


def test_pytest_output_is_read():
    out = ("ss\nSKIPPED [4] tests/test_rollouts_vllm.py:20: needs vllm: pip install 'align[vllm]'\n"
           "SKIPPED [2] tests/test_qlora.py:12: needs a CUDA GPU\n4 skipped, 3 deselected in 1.20s\n")
    parsed = gc.parse_pytest(out)
    assert parsed == {"counts": {"skipped": 4, "deselected": 3},
                      "skip_reasons": ["needs a CUDA GPU", "needs vllm: pip install 'align[vllm]'"]}
    fields = gc.collect_pytest(None, out)
    assert fields["status"] == "skipped" and "needs vllm" in fields["reason"]
    assert "status" not in gc.collect_pytest(None, "5 passed, 1 skipped in 30.1s\n")
    assert gc.parse_pytest("1 failed, 2 passed, 1 error in 3s")["counts"] == {"failed": 1, "passed": 2, "error": 1}
