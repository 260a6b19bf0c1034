"""Seconds per PPO update and peak memory: TRL 1.12.0's PPOTrainer versus align's PPO stage.

    python bench/ppo_step.py                 # ~5 min on 2 CPU cores (+1-2 min the first time: the TRL venv)
    python bench/ppo_step.py --profile       # also cProfile both runs and print where the time goes
    python bench/ppo_step.py --model smollm2 --rollout-batch-size 8 --mini-batch-size 8 --ppo-epochs 1 \
        --response-length 16 --updates 3     # the real 135M model (49k vocab), ~4 min per round
    python bench/ppo_step.py --model smollm2 --rollout-batch-size 8 --mini-batch-size 8 --ppo-epochs 1 \
        --response-length 16 --updates 3 --lora 16 [--rss-phases]   # LoRA PPO on it; align's RSS by phase

The last line is `RESULT {json}`: speed ratio (median of per-round TRL/align time ratios), seconds per
update and peak RSS of each side, their ratio, the model and the settings.

TRL dropped PPO after 1.12.0, so its side runs in a throwaway venv, `.bench-venvs/trl112`
(torch 2.13.0 pinned, then trl 1.12.0 with the main venv's transformers/accelerate/datasets/peft),
created here if missing. Both sides get the same random-weight 4-layer, 256-wide policy, the
same random-weight reward model (1-output sequence classifier, also the value model's start),
the same prompts and the same rollout batch, mini-batch, PPO epochs, response length, lr and
sampling temperature (1.0), without activation checkpointing. A random model rarely emits EOS,
so both sample close to rollout_batch x response_length tokens per update.

One update = one batch of rollouts, scoring, GAE and all its PPO epochs. Each side times its
updates inside its own process (model loading and start-up excluded); the first update is a
warm-up and dropped; the median of the rest is reported. Peak RSS is each child's ru_maxrss,
so it includes the models. Target: align >= 1.5x faster than TRL with no more memory.

The sides run one after the other, alternating for `--rounds`, each with one torch thread by
default: on a shared 2-core machine, two OpenMP threads per process made a forward+backward up
to 40x slower under load, which swamped the difference being measured.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".bench-venvs" / "trl112"
VENV_PY = VENV / "bin" / "python"
PROMPTS = REPO / "recipes" / "data" / "tiny_prompts.jsonl"
# The main venv's versions of TRL's dependencies, so both sides run the same transformers and torch.
PINS = ["torch==2.13.0", "transformers==5.23.0", "accelerate==1.15.0", "datasets==5.2.0", "peft==0.21.2"]


def ensure_trl_venv() -> None:
    ok = VENV_PY.exists() and subprocess.run(
        [str(VENV_PY), "-c", "import trl, torch, peft; assert trl.__version__ == '1.12.0' and torch.__version__.startswith('2.13.0')"],
        capture_output=True).returncode == 0
    if ok:
        return
    print(f"creating {VENV.relative_to(REPO)} (torch 2.13.0 CPU, trl 1.12.0): a minute or two ...", file=sys.stderr,
          flush=True)
    subprocess.run(["python3", "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV_PY), "-m", "pip", "install", "-q"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(PINS) + "\n")  # keeps torch pinned: a bare torch would pull a multi-GB CUDA build
    try:
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["-c", f.name, "trl==1.12.0", *PINS[1:]], check=True)
    finally:
        os.unlink(f.name)


def build_models(work: Path, model: str, hidden: int, layers: int) -> tuple[str, str]:
    """The policy folder and a random-weight reward model of the same architecture beside it."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if model == "tiny":
        from align.tiny import build_tiny_model

        policy_dir = build_tiny_model(work / "policy", hidden=hidden, layers=layers, seed=0)
    else:
        from align.models import resolve_model

        policy_dir = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    config = AutoConfig.from_pretrained(policy_dir, num_labels=1)
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(1)
    reward = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    reward_dir = work / "reward"
    reward.save_pretrained(reward_dir)
    tok.save_pretrained(reward_dir)
    return str(policy_dir), str(reward_dir)


def prompt_ids(policy_dir: str) -> list[list[int]]:
    """Prompt token ids as align's engine renders them, handed to TRL so both sample from the same ids."""
    from align.models import load_tokenizer
    from align.rollouts import render_prompt

    tok = load_tokenizer(policy_dir)
    rows = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    return [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in rows]


class PhaseRSS:
    """Peak resident memory of each phase of a run (`--rss-phases`): Linux's VmHWM read at every phase
    boundary and reset there (writing 5 to /proc/self/clear_refs), so a phase's peak is its own. Nested
    phases also count towards the phases around them. Per call: (peak, resident after) in MB."""

    def __init__(self):
        self.stack, self.calls = [["whole run", 0.0]], {}

    @staticmethod
    def _status_mb(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _fold(self) -> None:
        hwm = self._status_mb("VmHWM")
        for frame in self.stack:
            frame[1] = max(frame[1], hwm)
        Path("/proc/self/clear_refs").write_text("5")

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def wrapper(*a, **k):
            self._fold()
            self.stack.append([name, 0.0])
            try:
                return fn(*a, **k)
            finally:
                self._fold()
                _, peak = self.stack.pop()
                self.calls.setdefault(name, []).append((round(peak, 1), round(self._status_mb("VmRSS"), 1)))
        setattr(owner, attr, wrapper)

    def report(self) -> dict:
        self._fold()
        return {"whole run": [(round(self.stack[0][1], 1), round(self._status_mb("VmRSS"), 1))], **self.calls}


def instrument(phases: PhaseRSS) -> None:
    """Phase boundaries of align's PPO stage: loading, setup, and each part of a step."""
    import align.stages.ppo as ppo
    from align.rollouts.hf import HFEngine

    for attr, name in [("load_model", "load policy"), ("BeforeAfter", "before/after report setup"),
                       ("build_models", "build models (ref, LoRA, value, reward, engine)"),
                       ("make_optimizer", "optimizer"), ("make_rollout", "rollout (whole)"),
                       ("old_logps_and_values", "rollout: old log-probs + values"),
                       ("reference_logps", "rollout: reference log-probs"), ("ppo_update", "PPO update (whole)"),
                       ("minibatch_loss", "update: forward + loss"), ("backward", "update: backward")]:
        phases.wrap(ppo, attr, name)
    phases.wrap(ppo.Rewards, "score", "rollout: reward model scores")
    phases.wrap(HFEngine, "generate", "rollout: generation")


def child_ours(settings_path: str, result_path: str) -> None:
    """Our PPO stage, called as a Python function, on the bench's folders and settings."""
    import torch

    s = json.loads(Path(settings_path).read_text())
    phases = PhaseRSS() if s.get("rss_phases") else None
    if phases:
        instrument(phases)
    from align.config import LoraSettings, PPOStage
    from align.stages.ppo import run

    stage = PPOStage(model=s["model"], data=s["prompts"], rollout_batch_size=s["rollout_batch_size"],
                     batch_size=s["mini_batch_size"], ppo_epochs=s["ppo_epochs"], response_length=s["response_length"],
                     max_steps=s["updates"], eval_fraction=0.0, eval_prompts=0, save_steps=10**9, logging_steps=1,
                     seed=s["seed"], lr=s["lr"], lr_scheduler="constant", temperature=s["temperature"],
                     kl_coef=s["kl_coef"], kl_estimator=s["kl_estimator"], vf_coef=s["vf_coef"],
                     clip_eps=s["clip_eps"], value_clip_eps=s["clip_eps"], missing_eos_penalty=s["missing_eos_penalty"],
                     max_grad_norm=s["max_grad_norm"], value_model=s["value_model"],
                     lora=LoraSettings(r=s["lora_r"], alpha=2 * s["lora_r"], dropout=0.0) if s.get("lora_r") else None)
    stage.type = "ppo"
    out = Path(s["out"])
    metrics = run(stage, "ppo", out, s["model"], s["reward"])
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if not r.get("skipped")]
    result = {
        "step_seconds": [r["step_seconds"] for r in rows],
        "gen_seconds": [r.get("gen_seconds") for r in rows],
        "train_seconds": [r.get("train_seconds") for r in rows],
        "response_length": [r.get("response_length") for r in rows],
        "peak_rss_mb": metrics.get("peak_rss_mb"),
        "peak_rss_mb_getrusage": __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 1024,
        "scores": [r.get("reward") for r in rows],
        "kl": [r.get("kl") for r in rows],
        "torch_threads": torch.get_num_threads(),
    }
    if phases:  # resetting VmHWM at each boundary resets ru_maxrss too: the whole run's peak is the root phase's
        result["rss_phases"] = phases.report()
        result["peak_rss_mb"] = result["rss_phases"]["whole run"][0][0]
    Path(result_path).write_text(json.dumps(result, indent=1))


def run_child(name: str, cmd: list[str], settings: dict, work: Path, profile: bool, threads: int) -> dict:
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)  # a stale log.jsonl would be appended to
    settings = {**settings, "out": str(out)}
    settings_path, result_path = work / f"settings-{name}.json", work / f"result-{name}.json"
    settings_path.write_text(json.dumps(settings))
    prof = work / f"{name}.prof"
    py, script = cmd[0], cmd[1:]
    full = [py, *(["-m", "cProfile", "-o", str(prof)] if profile else []), *script, str(settings_path), str(result_path)]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO), "TRL_EXPERIMENTAL_SILENCE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(f"running {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode or not result_path.exists():
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(result_path.read_text())
    result["wall_seconds"] = time.perf_counter() - t0
    result["profile"] = str(prof) if profile else None
    return result


def summarize(r: dict) -> dict:
    steps = r["step_seconds"][1:] or r["step_seconds"]  # the first update is a warm-up
    return {"median": statistics.median(steps), "min": min(steps), "max": max(steps), "n": len(steps)}


def print_profile(name: str, path: str, top: int = 25) -> None:
    stats = pstats.Stats(path)
    print(f"\n--- {name}: cProfile, top {top} by cumulative time (whole process, loading included) ---")
    rows = []
    for (file, line, func), (cc, nc, tt, ct, callers) in stats.stats.items():
        rows.append((ct, tt, nc, f"{Path(file).parent.name}/{Path(file).name}:{line}({func})"))
    rows.sort(reverse=True)
    for ct, tt, nc, where in rows[:top]:
        print(f"  {ct:8.2f}s cum  {tt:7.2f}s own  {nc:7d} calls  {where}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rollout-batch-size", type=int, default=16)
    p.add_argument("--mini-batch-size", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--updates", type=int, default=6, help="PPO updates per side; the first is a warm-up")
    p.add_argument("--model", default="tiny", help="'tiny' (random weights, --hidden x --layers) or 'smollm2'; "
                   "the reward model is always random weights of the same architecture")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each side (load on a shared "
                   "machine comes in bursts)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per side (OMP_NUM_THREADS). 1 by default: on a shared CPU, 2 OpenMP threads "
                        "on 2 busy cores made one forward+backward 40x slower and the timings meaningless")
    p.add_argument("--profile", action="store_true", help="cProfile both children and print the top functions")
    p.add_argument("--only", choices=("trl", "ours"), help="run one side only")
    p.add_argument("--ours-value-model", choices=("reward", "shared"), default="reward",
                   help="align's value model: 'reward' (a second model from the reward model, as TRL's; the same "
                        "work) or 'shared' (a head on the policy's trunk: a different method, less work)")
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="train LoRA adapters of rank R (alpha 2R, no dropout, all linear layers) instead of all weights: "
                        "align's policy and value model, TRL's policy (TRL 1.12 trains its value model in full)")
    p.add_argument("--rss-phases", action="store_true",
                   help="align's side also reports the peak resident memory of each phase (loading, rollout, update)")
    p.add_argument("--work", help="folder for models and outputs (default: a new temp folder)")
    p.add_argument("--child", nargs=2, metavar=("SETTINGS", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_ours(*args.child)
        return

    sys.path.insert(0, str(REPO))
    ensure_trl_venv()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="align-ppo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if (work / "reward").exists():
        policy_dir, reward_dir = json.loads((work / "models.json").read_text())
    else:
        policy_dir, reward_dir = build_models(work, args.model, args.hidden, args.layers)
        (work / "models.json").write_text(json.dumps([policy_dir, reward_dir]))
    (work / "prompt_ids.json").write_text(json.dumps(prompt_ids(policy_dir)))
    if args.rollout_batch_size % args.mini_batch_size:
        sys.exit("--rollout-batch-size must be a multiple of --mini-batch-size (TRL's num_mini_batches)")
    settings = dict(model=policy_dir, reward=reward_dir, prompts=str(PROMPTS), prompt_ids=str(work / "prompt_ids.json"),
                    seed=0, lr=1e-5,
                    rollout_batch_size=args.rollout_batch_size, mini_batch_size=args.mini_batch_size,
                    ppo_epochs=args.ppo_epochs, response_length=args.response_length, updates=args.updates,
                    temperature=1.0, kl_coef=0.05, kl_estimator="k1", vf_coef=0.1, clip_eps=0.2,
                    missing_eos_penalty=1.0, max_grad_norm=1.0, value_model=args.ours_value_model,
                    lora_r=args.lora, rss_phases=args.rss_phases)
    print(f"work folder: {work}", file=sys.stderr)
    sides = {"trl 1.12.0": ("trl", [str(VENV_PY), str(REPO / "bench" / "trl112" / "run_ppo.py")]),
             "align": ("ours", [sys.executable, str(Path(__file__).resolve()), "--child"])}
    sides = {k: v for k, v in sides.items() if args.only in (None, v[0])}
    # Rounds alternate the sides, so a burst of load from other work on the machine hits both.
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for i in range(args.rounds):
        for label, (name, cmd) in sides.items():
            runs[label].append(run_child(f"{name}-{i}" if args.rounds > 1 else name, cmd, settings, work,
                                         args.profile and i == 0, args.threads))

    what = f"{args.layers}x{args.hidden} (random weights)" if args.model == "tiny" else args.model
    what += ", align with a shared value head (less work than TRL's separate value model)" \
        if args.ours_value_model == "shared" else ""
    print(f"\nPPO update: policy {what}, rollout batch {args.rollout_batch_size}, "
          f"mini-batch {args.mini_batch_size}, {args.ppo_epochs} PPO epochs, response_length {args.response_length}, "
          f"{args.updates} updates per run (first dropped), {args.rounds} round(s), CPU ({os.cpu_count()} cores), "
          f"{args.threads} torch thread(s) per side")
    print(f"{'':12} {'s/update median':>16} {'min':>7} {'max':>7} {'per-round medians':>24} {'peak RSS MB':>12}")
    table = {}
    for label, rs in runs.items():
        steps = [t for r in rs for t in (r["step_seconds"][1:] or r["step_seconds"])]
        per_round = [summarize(r)["median"] for r in rs]
        rss = max(r["peak_rss_mb"] for r in rs)
        table[label] = dict(median=statistics.median(steps), min=min(steps), max=max(steps), rounds=per_round,
                            peak_rss_mb=rss)
        print(f"{label:12} {table[label]['median']:16.3f} {min(steps):7.3f} {max(steps):7.3f} "
              f"{' '.join(f'{x:.2f}' for x in per_round):>24} {rss:12.0f}")
    if "trl 1.12.0" in runs:
        rs = runs["trl 1.12.0"]
        gen = statistics.median(x for r in rs for x in r["gen_seconds"][1:])
        gc_s = statistics.median(x for r in rs for x in r["gc_seconds"][1:])
        print(f"  trl split:   generation {gen:.3f} s, gc.collect {gc_s:.3f} s, the rest is reference/value/reward "
              f"passes and the PPO epochs")
    if "align" in runs:
        rs = runs["align"]
        gen = statistics.median(x for r in rs for x in r["gen_seconds"][1:])
        train = statistics.median(x for r in rs for x in r["train_seconds"][1:])
        lengths = [x for r in rs for x in r["response_length"]]
        print(f"  align split: generation {gen:.3f} s, PPO epochs {train:.3f} s, the rest is scoring and "
              f"reference/value passes; mean response length {statistics.fmean(lengths):.1f} tokens")
    if len(runs) == 2:
        t_trl, t_ours = table["trl 1.12.0"]["median"], table["align"]["median"]
        mem = table["align"]["peak_rss_mb"] / table["trl 1.12.0"]["peak_rss_mb"]
        # Each round's two runs are back to back, so their ratio is the least touched by load that changes
        # between rounds; the headline is the median of those ratios.
        per_round = [a / b for a, b in zip(table["trl 1.12.0"]["rounds"], table["align"]["rounds"])]
        speed = statistics.median(per_round)
        print(f"speed (trl/align time): {speed:.2f}x, median of per-round ratios "
              f"{' '.join(f'{x:.2f}' for x in per_round)} (pooled medians: {t_trl / t_ours:.2f}x)   "
              f"memory (align/trl peak RSS): {mem:.2f}x   "
              f"target >= 1.5x and <= 1.00x: {'met' if speed >= 1.5 and mem <= 1.0 else 'NOT met'}")
    if args.rss_phases and "align" in runs:
        print("\n  align, RSS by phase in MB (peak while it ran / resident after it), first call and last call:")
        for phase, calls in runs["align"][0]["rss_phases"].items():
            (p0, a0), (p1, a1) = calls[0], calls[-1]
            print(f"    {phase:48} first {p0:6.0f} / {a0:6.0f}   last {p1:6.0f} / {a1:6.0f}   x{len(calls)}")
    if args.profile:
        for label, rs in runs.items():
            print_profile(label, rs[0]["profile"])
    print(json.dumps({k: {**v, "step_seconds": [r["step_seconds"] for r in runs[k]]} for k, v in table.items()}))
    print("RESULT " + json.dumps(result_record(args, table)))


def result_record(args, table: dict) -> dict:
    """The bench's last line: the headline numbers and the settings that produced them."""
    trl, ours = table.get("trl 1.12.0"), table.get("align")
    per_round = [a / b for a, b in zip(trl["rounds"], ours["rounds"])] if trl and ours else []
    return {
        "model": f"{args.layers}x{args.hidden} random" if args.model == "tiny" else args.model,
        "settings": {"rollout_batch_size": args.rollout_batch_size, "mini_batch_size": args.mini_batch_size,
                     "ppo_epochs": args.ppo_epochs, "response_length": args.response_length, "updates": args.updates,
                     "rounds": args.rounds, "threads": args.threads, "lora_r": args.lora,
                     "align_value_model": args.ours_value_model},
        "speed_ratio": round(statistics.median(per_round), 3) if per_round else None,  # trl s/update / align s/update
        "speed_ratio_per_round": [round(x, 3) for x in per_round],
        "trl_seconds_per_update": round(trl["median"], 3) if trl else None,
        "align_seconds_per_update": round(ours["median"], 3) if ours else None,
        "trl_peak_rss_mb": round(trl["peak_rss_mb"], 1) if trl else None,
        "align_peak_rss_mb": round(ours["peak_rss_mb"], 1) if ours else None,
        "rss_ratio": round(ours["peak_rss_mb"] / trl["peak_rss_mb"], 3) if trl and ours else None,  # align / trl
    }


if __name__ == "__main__":
    main()
