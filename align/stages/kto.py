"""KTO over TRL's `KTOTrainer`, for unpaired thumbs-up / thumbs-down data.

Rows are `{"prompt", "completion", "label": true|false}` (what `align label export --kto`
writes); preference pairs are accepted too and unpaired (chosen -> true, rejected ->
false). Reference: the starting model, with the adapter disabled under LoRA.
"""

from __future__ import annotations

import logging
from pathlib import Path

from align.artifacts import StepLog, Timer
from align.config import KTOStage
from align.data import as_unpaired, load_split, unique_prompts
from align.models import apply_lora, load_model, load_tokenizer
from align.policy_eval import completions_before, reward_report
from align.training import AlignCallback, finite, save_model, train_with_eval, trainer_args

log = logging.getLogger("align")


def run(stage: KTOStage, name: str, out_dir: Path, model_path: str, reward_path: str | None = None) -> dict:
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    timer = Timer()
    tokenizer = load_tokenizer(model_path)
    train_src, held_src = load_split(stage, "kto")  # split before unpairing: a pair's halves stay together
    train = [u for r in train_src for u in as_unpaired(r)]
    held = [u for r in held_src for u in as_unpaired(r)]
    desirable = sum(r["label"] for r in train)
    log.info("%s: %d training rows (%d desirable, %d undesirable), %d held out", name, len(train), desirable,
             len(train) - desirable, len(held))
    train_ds = Dataset.from_list(train)
    eval_ds = Dataset.from_list(held) if held else None

    model = load_model(model_path)
    eval_prompts = unique_prompts(held, stage.eval_prompts)
    before_texts = None
    if reward_path and eval_prompts:
        before_texts = completions_before(model, tokenizer, eval_prompts, out_dir, stage.max_new_tokens)
    if stage.lora:
        model = apply_lora(model, stage.lora)
    step_log = StepLog(out_dir / "log.jsonl")
    config = KTOConfig(**trainer_args(stage, out_dir, has_eval=eval_ds is not None), beta=stage.beta,
                       desirable_weight=stage.desirable_weight, undesirable_weight=stage.undesirable_weight,
                       max_length=stage.max_length, dataset_num_proc=None)
    trainer = KTOTrainer(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=[AlignCallback(step_log)])

    before, metrics, after = train_with_eval(trainer, out_dir, step_log, has_eval=eval_ds is not None)
    if eval_ds is not None:
        metrics.update(eval_loss_before=finite(before.get("eval_loss")), eval_loss=finite(after.get("eval_loss")),
                       **{k: finite(v) for k, v in after.items() if k.startswith("eval_rewards/")})
    save_model(trainer.model, tokenizer, out_dir / "model", stage.merge_lora)
    if before_texts is not None:
        from align.generate import greedy_completions

        after_texts = greedy_completions(trainer.model, tokenizer, eval_prompts, max_new_tokens=stage.max_new_tokens)
        metrics.update(reward_report(reward_path, eval_prompts, before_texts, after_texts, out_dir))
    metrics.update(train_rows=len(train), eval_rows=len(held), seconds=round(timer.seconds(), 1))
    return metrics
