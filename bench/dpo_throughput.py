"""DPO throughput: TRL's DPOTrainer used directly versus the align DPO stage (cache cold, then warm).

    python bench/dpo_throughput.py                  # a 4-layer, 256-wide random model (~2 min)
    python bench/dpo_throughput.py --model smollm2  # the real 135M model (slow on a CPU)

One run of this script measures all three on the same model, data and settings. Each is a
child process of its own, so its peak RSS is its own; each child times model loading,
tokenization, reference passes and training (everything a user waits for), and counts the
same tokens (prompt + chosen and prompt + rejected, per epoch). Reported: tokens/s, peak
RSS, and the ratios against TRL. Targets: cold >= 0.95x TRL, warm >= 1.25x TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "data" / "tiny_prefs.jsonl"


def settings(args) -> dict:
    return dict(lr=1e-4, beta=0.1, batch_size=args.batch_size, max_length=64, epochs=args.epochs, seed=0,
                pairs=args.pairs)


def pairs(n: int) -> list[dict]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:n]
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]


def count_tokens(model_path: str, rows: list[dict], epochs: int) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    n = sum(len(tok.apply_chat_template(r["prompt"] + r[k], tokenize=True, return_dict=True)["input_ids"])
            for r in rows for k in ("chosen", "rejected"))
    return n * epochs


def child_trl(model_path: str, s: dict, out: str) -> None:
    """What a TRL user writes: DPOTrainer with its defaults (a reference model, forwards every step),
    except activation checkpointing, set as align sets it so both run the same computation."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_path)
    config = DPOConfig(output_dir=out, learning_rate=s["lr"], beta=s["beta"], per_device_train_batch_size=s["batch_size"],
                       num_train_epochs=s["epochs"], max_length=s["max_length"], seed=s["seed"], bf16=False,
                       report_to=[], save_strategy="no", logging_steps=50, disable_tqdm=True,
                       gradient_checkpointing=False)  # TRL defaults to True; align's default is False
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs(s["pairs"])),
                         processing_class=tok)
    trainer.train()
    report(time.perf_counter() - t0)


def child_align(model_path: str, s: dict, out: str) -> None:
    from trl import DPOConfig, DPOTrainer  # noqa: F401  imported before the clock starts, as in child_trl

    import align.stages.dpo  # noqa: F401
    from align.stages import recipe_from_dict
    from align.runner import run_stage

    stage = dict(model=model_path, data=str(Path(out) / "pairs.jsonl"), eval_fraction=0.0, lr=s["lr"],
                 beta=s["beta"], batch_size=s["batch_size"], epochs=s["epochs"], max_length=s["max_length"],
                 save_steps=10_000, logging_steps=50, ref_cache=True)
    Path(stage["data"]).write_text("".join(json.dumps(r) + "\n" for r in pairs(s["pairs"])))
    recipe = recipe_from_dict({"output_dir": out, "seed": s["seed"], "stages": {"dpo": stage}})
    t0 = time.perf_counter()
    metrics = run_stage(recipe, "dpo")  # the stage itself; the run's report.md is not DPO work
    report(time.perf_counter() - t0, cache_hits=metrics["ref_cache_hits"])


def report(seconds: float, **extra) -> None:
    import resource

    print("RESULT " + json.dumps({"seconds": seconds,
                                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  **extra}), flush=True)


def run_child(kind: str, model_path: str, s: dict, cache: str) -> dict:
    env = {**os.environ, "ALIGN_CACHE": cache, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, __file__, "--child", kind, "--model-path", model_path,
                               "--settings", json.dumps(s), "--out", out],
                              capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wide", help="'wide' (4x256 random model), 'smollm2', or a folder")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        s = json.loads(args.settings)
        (child_trl if args.child == "trl" else child_align)(args.model_path, s, args.out)
        return

    sys.path.insert(0, str(REPO))
    work = Path(tempfile.mkdtemp(prefix="align-bench-"))
    if args.model == "wide":
        from align.tiny import build_tiny_model

        model_path = str(build_tiny_model(work / "wide", hidden=256, layers=4))
    elif args.model == "smollm2":
        from align.models import resolve_model

        model_path = resolve_model("smollm2")
    else:
        model_path = args.model
    s = settings(args)
    tokens = count_tokens(model_path, pairs(args.pairs), args.epochs)
    cache = str(work / "cache")
    results = {}
    for name, kind in (("trl", "trl"), ("align-cold", "align"), ("align-warm", "align")):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_child(kind, model_path, s, cache)
    assert results["align-warm"].get("cache_hits") == ["train"], results["align-warm"]

    print(f"\nDPO, model {args.model}, {args.pairs} pairs, batch {args.batch_size}, {args.epochs} epoch(s), "
          f"{tokens} tokens, full fine-tuning, CPU threads {os.cpu_count()}")
    print(f"{'run':<12}{'seconds':>10}{'tokens/s':>12}{'peak RSS MB':>14}{'speed vs TRL':>14}{'RSS vs TRL':>12}")
    base = results["trl"]
    for name, r in results.items():
        print(f"{name:<12}{r['seconds']:>10.1f}{tokens / r['seconds']:>12.0f}{r['peak_rss_mb']:>14.0f}"
              f"{base['seconds'] / r['seconds']:>13.2f}x{r['peak_rss_mb'] / base['peak_rss_mb']:>11.2f}x")


if __name__ == "__main__":
    main()
