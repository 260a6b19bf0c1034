"""Supervised fine-tuning over TRL's `SFTTrainer`.

Every row becomes a message list rendered by the model's (ChatML) template; with
`assistant_only_loss` the loss falls on assistant turns only, the closing `<|im_end|>`
included, so the model learns to stop. Held-out loss is measured before and after
training so `metrics.json` shows what the stage did.
"""

from __future__ import annotations

import logging
from pathlib import Path

from align.artifacts import StepLog, Timer
from align.config import SFTStage
from align.data import apply_too_long, as_messages, load_split
from align.models import apply_lora, load_model, load_tokenizer
from align.training import AlignCallback, finite, save_model, train_with_eval, trainer_args

log = logging.getLogger("align")


def run(stage: SFTStage, name: str, out_dir: Path, model_path: str) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    timer = Timer()
    tokenizer = load_tokenizer(model_path)

    train_rows, eval_rows = load_split(stage, "sft", as_messages, out_dir)
    def fit(rows, what):  # TRL cuts the rows that stay at max_length
        lengths = [len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in rows]
        return apply_too_long(rows, lengths, stage.max_length, stage.too_long, what)

    train_rows, train_too_long = fit(train_rows, f"{name}: {stage.data}")
    if eval_rows:
        eval_rows, _ = fit(eval_rows, f"{name}: {stage.eval_data or stage.data} (held out)")
    train_ds = Dataset.from_list([{"messages": m} for m in train_rows])
    eval_ds = Dataset.from_list([{"messages": m} for m in eval_rows]) if eval_rows else None
    log.info("%s: %d training rows, %d held out", name, len(train_ds), len(eval_rows))

    model = load_model(model_path, quantization=stage.quantization, gradient_checkpointing=stage.gradient_checkpointing)
    if stage.lora:
        model = apply_lora(model, stage.lora)
    step_log = StepLog(out_dir / "log.jsonl")
    config = SFTConfig(
        **trainer_args(stage, out_dir, has_eval=eval_ds is not None),
        max_length=stage.max_length,
        packing=stage.packing,
        assistant_only_loss=stage.assistant_only_loss,
        completion_only_loss=None,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=[AlignCallback(step_log)])

    before, metrics, after = train_with_eval(trainer, out_dir, step_log, has_eval=eval_ds is not None)
    if eval_ds is not None:
        metrics["eval_loss_before"] = finite(before["eval_loss"])
        metrics["eval_loss"] = finite(after["eval_loss"])
    save_model(trainer.model, tokenizer, out_dir / "model", stage.merge_lora, trainer=trainer)
    metrics.update(train_rows=len(train_ds), eval_rows=len(eval_rows), rows_too_long=train_too_long,
                   seconds=round(timer.seconds(), 1))
    return metrics
