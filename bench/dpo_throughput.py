"""DPO throughput: TRL's DPOTrainer used directly, in two configurations, versus the align DPO stage.

    python bench/dpo_throughput.py                  # a 4-layer, 256-wide random model, the tiny data (~4 min)
    python bench/dpo_throughput.py --long-prompts   # chat-shaped pairs: ~210-token prompts, ~44-token answers
    python bench/dpo_throughput.py --model smollm2  # the real 135M model (slow on a CPU)

One run of this script measures four configurations on the same model, data and settings:

  trl             DPOTrainer with its defaults: a second (reference) model loaded, and a reference
                  forward over each batch at every step.
  trl-precompute  DPOTrainer with `precompute_ref_log_probs=True`, TRL's best configuration here:
                  no reference model is loaded; the reference log-probs are computed once, through
                  the policy before its first step, then read from the dataset (TRL's own
                  `precompute_ref_batch_size`, default the training batch size).
  align-cold      the align DPO stage with its defaults, empty cache: the same one-off precompute (at 4x
                  the training batch), stored on disk; every pair one shared-prompt sequence
                  (`prefix_sharing: auto`, packed), so the prompt is computed once for chosen and
                  rejected, in the reference pass and in training.
  align-warm      the same stage again: the reference log-probs are read from that cache, no
                  reference pass at all.

Each is a child process of its own, so its peak RSS is its own; each child times model loading,
tokenization, reference passes, training and saving the model (everything a user waits for; TRL's
children call `trainer.save_model()` as a TRL script would), and counts the same tokens (prompt + chosen
and prompt + rejected, per epoch). Activation checkpointing is off in all four; each child runs `--threads`
torch threads (default 1). The configurations run in turn `--rounds` times (default 3; each round with a
new, empty align cache); reported are the median seconds, the largest peak RSS, and as speed the median of
the per-round ratios (a round's four runs are back to back, so load from other work on a shared machine
touches their ratios least).

The last line is `RESULT {json}`: `vs_trl_default` and `vs_trl_best` (TRL's seconds over align cold's, against
TRL's defaults and against its precompute), `warm_vs_trl_best`, and `rss_vs_trl_best` (align's larger peak RSS
over TRL precompute's). Targets: `vs_trl_best` >= 1.3 with --long-prompts and >= 1.1 on the tiny data;
`rss_vs_trl_best` <= 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "data" / "tiny_prefs.jsonl"


def settings(args) -> dict:
    return dict(lr=1e-4, beta=0.1, batch_size=args.batch_size, max_length=320 if args.long_prompts else 64,
                epochs=args.epochs, seed=0, pairs=args.pairs, long_prompts=args.long_prompts)


SYSTEM = ("You are a careful assistant. Answer the last question in the conversation, use the earlier turns "
          "as context, keep to plain words, and do not add greetings, apologies or closing remarks.")


def pairs(n: int, long_prompts: bool = False) -> list[dict]:
    """`n` preference pairs from the tiny data. With `long_prompts`, chat-shaped: a system turn and earlier
    user/assistant turns before the question (about 200 tokens of prompt), and answers of about 40 tokens
    (the chosen answer and the rejected one each followed by the answers to the next rows' questions)."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    out = []
    for i in range(n):
        r = rows[i % len(rows)]
        prompt = [{"role": "user", "content": r["prompt"]}]
        chosen, rejected = r["chosen"], r["rejected"]
        if long_prompts:
            history = [rows[(i + 7 * k + 1) % len(rows)] for k in range(3)]
            prompt = [{"role": "system", "content": SYSTEM}]
            for h in history:
                prompt += [{"role": "user", "content": h["prompt"]}, {"role": "assistant", "content": h["chosen"]}]
            prompt.append({"role": "user", "content": r["prompt"]})
            more = [rows[(i + k + 1) % len(rows)] for k in range(2)]
            chosen = " ".join([chosen] + [m["chosen"] for m in more])
            rejected = " ".join([rejected] + [m["rejected"] for m in more])
        out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]})
    return out


def count_tokens(model_path: str, rows: list[dict], epochs: int) -> tuple[int, float, float]:
    """Tokens per epoch counted as two sequences (prompt + chosen, prompt + rejected), times epochs; and the
    mean prompt and answer lengths in tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)

    def length(messages, generation_prompt=False):
        return len(tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           add_generation_prompt=generation_prompt)["input_ids"])

    n = sum(length(r["prompt"] + r[k]) for r in rows for k in ("chosen", "rejected"))
    prompt = statistics.mean(length(r["prompt"], True) for r in rows)
    return n * epochs, prompt, n / (2 * len(rows)) - prompt


def child_trl(model_path: str, s: dict, out: str, precompute: bool = False) -> None:
    """What a TRL user writes: DPOTrainer with its defaults (a reference model, forwards every step),
    except activation checkpointing, set as align sets it so both run the same computation. With
    `precompute`, `precompute_ref_log_probs=True`: no reference model, reference log-probs computed
    once through the policy before training."""
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
                       gradient_checkpointing=False,  # TRL defaults to True; align's default is False
                       precompute_ref_log_probs=precompute)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs(s["pairs"], s["long_prompts"])),
                         processing_class=tok)
    trainer.train()
    t_save = time.perf_counter()
    trainer.save_model()  # as a TRL script does; align's stage saves its model too
    report(time.perf_counter() - t0, save_seconds=time.perf_counter() - t_save)


def child_align(model_path: str, s: dict, out: str) -> None:
    from trl import DPOConfig, DPOTrainer  # noqa: F401  imported before the clock starts, as in child_trl

    import align.stages.dpo  # noqa: F401
    from align.stages import recipe_from_dict
    from align.runner import run_stage

    stage = dict(model=model_path, data=str(Path(out) / "pairs.jsonl"), eval_fraction=0.0, lr=s["lr"],
                 beta=s["beta"], batch_size=s["batch_size"], epochs=s["epochs"], max_length=s["max_length"],
                 save_steps=10_000, logging_steps=50, ref_cache=True)
    Path(stage["data"]).write_text("".join(json.dumps(r) + "\n" for r in pairs(s["pairs"], s["long_prompts"])))
    recipe = recipe_from_dict({"output_dir": out, "seed": s["seed"], "stages": {"dpo": stage}})
    t0 = time.perf_counter()
    metrics = run_stage(recipe, "dpo")  # the stage itself; the run's report.md is not DPO work
    report(time.perf_counter() - t0, cache_hits=metrics["ref_cache_hits"])


def report(seconds: float, **extra) -> None:
    import resource

    print("RESULT " + json.dumps({"seconds": seconds,
                                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  **extra}), flush=True)


def run_child(kind: str, model_path: str, s: dict, cache: str, threads: int) -> dict:
    env = {**os.environ, "ALIGN_CACHE": cache, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
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
    p.add_argument("--rounds", type=int, default=3, help="run every configuration this many times, alternating")
    p.add_argument("--long-prompts", action="store_true",
                   help="chat-shaped pairs: a system turn and earlier turns (~200-token prompts), ~40-token answers")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per child (OMP_NUM_THREADS). 1 by default, as in bench/ppo_step.py: on a "
                        "shared 2-core machine two OpenMP threads per process made runs 10-40x slower under load")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        s = json.loads(args.settings)
        if args.child == "align":
            child_align(args.model_path, s, args.out)
        else:
            child_trl(args.model_path, s, args.out, precompute=args.child == "trl-precompute")
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
    tokens, prompt_len, answer_len = count_tokens(model_path, pairs(args.pairs, args.long_prompts), args.epochs)
    configs = (("trl", "trl"), ("trl-precompute", "trl-precompute"), ("align-cold", "align"),
               ("align-warm", "align"))
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    for i in range(args.rounds):
        cache = str(work / f"cache-{i}")  # align-cold starts from an empty cache every round
        for name, kind in configs:
            print(f"round {i + 1}/{args.rounds}: running {name} ...", file=sys.stderr, flush=True)
            runs[name].append(run_child(kind, model_path, s, cache, args.threads))
        assert runs["align-cold"][-1].get("cache_hits") == [], runs["align-cold"][-1]
        assert runs["align-warm"][-1].get("cache_hits") == ["train"], runs["align-warm"][-1]
    # Each round runs the four back to back, so a round's ratios are the least touched by load from other
    # work that comes and goes between rounds: the speed columns are the medians of the per-round ratios.
    results = {}
    for name, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        results[name] = {
            "seconds": statistics.median(secs), "all_seconds": secs,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "speed_vs_trl": [a["seconds"] / r["seconds"] for a, r in zip(runs["trl"], rs)],
            "speed_vs_trl_precompute": [a["seconds"] / r["seconds"] for a, r in zip(runs["trl-precompute"], rs)],
        }

    data = "long chat prompts" if args.long_prompts else "the tiny data"
    print(f"\nDPO, model {args.model}, {args.pairs} pairs of {data} (prompt {prompt_len:.0f} tokens, answer "
          f"{answer_len:.0f}, mean), batch {args.batch_size}, {args.epochs} epoch(s), {tokens} tokens, full fine-tuning, {os.cpu_count()} CPU cores, {args.threads} torch thread(s) per run, "
          f"{args.rounds} round(s)"
          + (" (median seconds, largest peak RSS, median of per-round speed ratios)" if args.rounds > 1 else ""))
    print(f"{'run':<16}{'seconds':>9}{'tokens/s':>10}{'peak RSS MB':>13}"
          f"{'speed vs trl':>14}{'vs trl-precompute':>19}{'RSS vs trl':>12}{'vs trl-precompute':>19}")
    base, best = results["trl"], results["trl-precompute"]
    for name, r in results.items():
        print(f"{name:<16}{r['seconds']:>9.1f}{tokens / r['seconds']:>10.0f}{r['peak_rss_mb']:>13.0f}"
              f"{statistics.median(r['speed_vs_trl']):>13.2f}x{statistics.median(r['speed_vs_trl_precompute']):>18.2f}x"
              f"{r['peak_rss_mb'] / base['peak_rss_mb']:>11.2f}x{r['peak_rss_mb'] / best['peak_rss_mb']:>18.2f}x")
    if args.rounds > 1:
        for name, r in results.items():
            print(f"  {name:<16} seconds per round {' '.join(f'{x:.1f}' for x in r['all_seconds'])}; speed vs trl "
                  f"{' '.join(f'{x:.2f}' for x in r['speed_vs_trl'])}; vs trl-precompute "
                  f"{' '.join(f'{x:.2f}' for x in r['speed_vs_trl_precompute'])}")
    cold, warm = results["align-cold"], results["align-warm"]
    summary = {
        "model": args.model, "long_prompts": args.long_prompts, "pairs": args.pairs, "batch_size": args.batch_size,
        "epochs": args.epochs, "rounds": args.rounds, "threads": args.threads, "tokens": tokens,
        "prompt_tokens": round(prompt_len, 1), "answer_tokens": round(answer_len, 1),
        "seconds": {name: round(r["seconds"], 2) for name, r in results.items()},
        "peak_rss_mb": {name: round(r["peak_rss_mb"]) for name, r in results.items()},
        # Speed ratios: the other side's seconds over align's, median of the per-round ratios (> 1: align faster).
        "vs_trl_default": round(statistics.median(cold["speed_vs_trl"]), 3),
        "vs_trl_best": round(statistics.median(cold["speed_vs_trl_precompute"]), 3),
        "warm_vs_trl_best": round(statistics.median(warm["speed_vs_trl_precompute"]), 3),
        "rss_vs_trl_best": round(max(cold["peak_rss_mb"], warm["peak_rss_mb"]) / best["peak_rss_mb"], 3),
        "targets": {"vs_trl_best": 1.3 if args.long_prompts else 1.1, "rss_vs_trl_best": 1.0},
    }
    print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
    main()
