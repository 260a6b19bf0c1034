"""`align demo`: LoRA SFT of the real SmolLM2-135M-Instruct on CPU, with a before/after table.

The embedded recipe teaches one-line answers (`align/assets/concise_sft.jsonl`): the
instruct model answers "What is the capital of Peru?" with a paragraph, the tuned one
with "Lima.". The demo prints greedy completions of held-out questions from both models
and the mean answer length, and leaves the run's `report.md`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from align.artifacts import write_text
from align.config import recipe_from_dict
from align.runner import run_recipe

log = logging.getLogger("align")

DATA = Path(__file__).parent / "assets" / "concise_sft.jsonl"
# Not in the training set: other countries, numbers and animals than the data holds.
PROMPTS = [
    "What is the capital of Australia?",
    "What is 17 plus 25?",
    "How many legs does a chicken have?",
    "What is the opposite of strong?",
]

DEMO_RECIPE = {
    "seed": 0,
    "stages": {
        "sft": {
            "model": "smollm2",
            "data": str(DATA),
            "eval_fraction": 0.1,
            "max_length": 128,
            "lr": 2e-4,
            "max_steps": 40,
            "batch_size": 8,
            "warmup_ratio": 0.05,
            "lr_scheduler": "cosine",
            "logging_steps": 5,
            "eval_steps": 0,
            "save_steps": 20,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        }
    },
}


def run_demo(output_dir: str, overrides: list[str] = ()) -> int:
    from align.config import apply_override
    from align.generate import greedy_completions
    from align.models import load_model, load_tokenizer, resolve_model

    raw = {**DEMO_RECIPE, "output_dir": output_dir}
    from_cli = {apply_override(raw, o) for o in overrides}
    recipe = recipe_from_dict(raw, source="align demo", from_cli=from_cli, default_name="demo")
    log.info("demo: LoRA SFT of SmolLM2-135M-Instruct towards one-line answers; a few minutes on 2 cores")
    metrics = run_recipe(recipe)["sft"]

    base_path = resolve_model("smollm2")
    tuned_path = str(Path(output_dir) / "sft" / "model")
    tokenizer = load_tokenizer(base_path)
    log.info("demo: greedy completions of %d held-out questions, before and after", len(PROMPTS))
    before = greedy_completions(load_model(base_path), tokenizer, PROMPTS, max_new_tokens=48)
    after = greedy_completions(load_model(tuned_path), tokenizer, PROMPTS, max_new_tokens=48)

    table = ["| prompt | before (SmolLM2-135M-Instruct) | after (align SFT) |", "|---|---|---|"]
    for p, b, a in zip(PROMPTS, before, after):
        table.append(f"| {p} | {_cell(b)} | {_cell(a)} |")
    words_before = sum(len(b.split()) for b in before) / len(before)
    words_after = sum(len(a.split()) for a in after) / len(after)
    summary = (f"mean answer length: {words_before:.1f} words before, {words_after:.1f} after; "
               f"held-out loss {metrics.get('eval_loss_before', float('nan')):.3f} -> "
               f"{metrics.get('eval_loss', float('nan')):.3f}")
    report = Path(output_dir) / "report.md"
    text = report.read_text() if report.exists() else ""
    write_text(report, text + "\n## Before / after\n\n" + "\n".join(table) + f"\n\n{summary}\n")
    print("\n".join(table))
    print(summary)
    print(f"report: {report}")
    return 0


def _cell(text: str) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= 160 else text[:157] + "..."
