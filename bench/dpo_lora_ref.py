"""LoRA DPO on SmolLM2-135M: seconds per step with and without the reference cache, with and without prefix sharing.

    python bench/dpo_lora_ref.py              # 4 configurations x 4 steps, ~6 min on 2 CPU cores
    python bench/dpo_lora_ref.py --steps 8

The demo's DPO stage (LoRA r=16, batch 8, max_length 128, `nll_weight` 0.5, `data/concise_prefs.jsonl`,
no held-out split) started from SmolLM2 itself, each configuration a child process of its own:

  ref_cache on    reference log-probs computed once over the training pairs before step 1 (then kept
                  on disk), so a step is the policy's forward and backward only;
  ref_cache off   every step also runs the reference forward (the adapter disabled) over its batch;
  prefix sharing  `auto` (one prompt+chosen+rejected sequence per pair, only completion positions through
                  the LM head) or `false` (two sequences per pair; on a CPU TRL's fused LM head then scores
                  every position, the prompt's included, against the 49k-token vocabulary).

Reported: seconds per optimizer step (`train_runtime / steps`, which includes nothing before step 1),
the stage's wall time (loading, the one-off precompute when cached, saving), and peak RSS. Last line:
`RESULT {json}`.
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
CONFIGS = [(True, "auto"), (False, "auto"), (True, False), (False, False)]


def child(ref_cache: bool, prefix, steps: int) -> None:
    import resource

    sys.path.insert(0, str(REPO))
    from align.runner import run_stage
    from align.stages import recipe_from_dict

    out = tempfile.mkdtemp()
    stage = dict(model="smollm2", data=str(REPO / "recipes" / "data" / "concise_prefs.jsonl"), eval_fraction=0.0,
                 max_length=128, beta=0.1, nll_weight=0.5, lr=2e-4, max_steps=steps, batch_size=8, logging_steps=1,
                 eval_steps=0, save_steps=1000, lora={"r": 16, "alpha": 32, "dropout": 0.0}, ref_cache=ref_cache,
                 prefix_sharing=prefix)
    recipe = recipe_from_dict({"output_dir": out, "seed": 0, "stages": {"dpo": stage}})
    t0 = time.perf_counter()
    metrics = run_stage(recipe, "dpo")
    print("RESULT " + json.dumps({"seconds_per_step": metrics["train_runtime"] / steps,
                                  "stage_seconds": time.perf_counter() - t0, "note": metrics["prefix_sharing"],
                                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per child (OMP_NUM_THREADS)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        ref_cache, prefix = json.loads(args.child)
        return child(ref_cache, prefix, args.steps)
    sys.path.insert(0, str(REPO))
    from align.models import resolve_model

    results = []
    for ref_cache, prefix in CONFIGS:
        print(f"running ref_cache={ref_cache} prefix_sharing={prefix} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as cache:
            # An empty reference cache for every configuration; the converted SmolLM2 folder is linked in.
            converted = Path(resolve_model("smollm2"))
            (Path(cache) / converted.name).symlink_to(converted)
            env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(args.threads), "ALIGN_CACHE": cache}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps([ref_cache, prefix]),
                                   "--steps", str(args.steps)], capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"ref_cache={ref_cache} prefix_sharing={prefix} failed:\n{proc.stderr[-3000:]}")
        results.append({"ref_cache": ref_cache, "prefix_sharing": prefix, **json.loads(lines[-1][7:])})
    print(f"\nSmolLM2-135M LoRA DPO, batch 8, max_length 128, {args.steps} steps, {os.cpu_count()} CPU cores, "
          f"{args.threads} torch thread(s)")
    print(f"{'ref_cache':<11}{'prefix_sharing':<16}{'s/step':>8}{'stage s':>9}{'peak RSS MB':>13}  what ran")
    for r in results:
        print(f"{str(r['ref_cache']):<11}{str(r['prefix_sharing']):<16}{r['seconds_per_step']:>8.2f}"
              f"{r['stage_seconds']:>9.1f}{r['peak_rss_mb']:>13.0f}  {r['note']}")
    print("RESULT " + json.dumps({"steps": args.steps, "threads": args.threads, "runs": results}))


if __name__ == "__main__":
    main()
