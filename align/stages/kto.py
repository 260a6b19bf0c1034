"""KTO over TRL's `KTOTrainer`, for unpaired thumbs-up / thumbs-down data.

Rows are `{"prompt", "completion", "label": true|false}` (what `align label export --kto`
writes); preference pairs are accepted too and unpaired (chosen -> true, rejected ->
false). Reference: the starting model (`models.reference_model`), handed to TRL as
`ref_model`; under LoRA the policy with its adapter disabled. Rows longer than `max_length`
tokens follow `too_long`: dropped, or cut to their first `max_length` tokens (TRL's cut).
The held-out loss and rewards are measured before and after training; before the first
step the policy is the reference, so `eval_rewards/*_before` are 0.
"""

from __future__ import annotations

import logging
from pathlib import Path

from align.artifacts import StepLog, Timer
from align.config import KTOStage
from align.data import apply_too_long, as_unpaired, load_split, trainer_dataset
from align.models import apply_lora, drop_ref_adapter, load_model, load_tokenizer, reference_model
from align.policy_eval import BeforeAfter
from align.training import AlignCallback, finite, save_model, train_with_eval, trainer_args

log = logging.getLogger("align")


def run(stage: KTOStage, name: str, out_dir: Path, model_path: str, reward_path: str | None = None) -> dict:
    from trl import KTOConfig, KTOTrainer

    timer = Timer()
    tokenizer = load_tokenizer(model_path)
    # split before unpairing: a pair's halves stay together
    train_src, held_src = load_split(stage, "kto", out_dir=out_dir)
    train = [u for r in train_src for u in as_unpaired(r)]
    held = [u for r in held_src for u in as_unpaired(r)]

    def fit(rows: list[dict], what: str) -> tuple[list[dict], int]:
        lengths = [len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True,
                                                     return_dict=True)["input_ids"]) for r in rows]
        return apply_too_long(rows, lengths, stage.max_length, stage.too_long, what,
                              truncated="cut to their first max_length tokens")

    train, too_long = fit(train, f"{name}: {stage.data}")
    if held:
        held, _ = fit(held, f"{name}: {stage.eval_data or stage.data} (held out)")
    desirable = sum(r["label"] for r in train)
    log.info("%s: %d training rows (%d desirable, %d undesirable), %d held out", name, len(train), desirable,
             len(train) - desirable, len(held))
    train_ds = trainer_dataset(train, out_dir / "datasets" / "train")
    eval_ds = trainer_dataset(held, out_dir / "datasets" / "eval") if held else None

    model = load_model(model_path, quantization=stage.quantization, gradient_checkpointing=stage.gradient_checkpointing)
    report = BeforeAfter(stage, name, held, out_dir, reward_path, start_path=model_path)
    report.before(model, tokenizer)
    ref_model = reference_model(model, stage.lora)
    if stage.lora:
        model = apply_lora(model, stage.lora)
    step_log = StepLog(out_dir / "log.jsonl")
    config = KTOConfig(**trainer_args(stage, out_dir, has_eval=eval_ds is not None), beta=stage.beta,
                       desirable_weight=stage.desirable_weight, undesirable_weight=stage.undesirable_weight,
                       max_length=stage.max_length, dataset_num_proc=None)
    trainer = KTOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=train_ds,
                         eval_dataset=eval_ds, processing_class=tokenizer, callbacks=[AlignCallback(step_log)])
    drop_ref_adapter(trainer.model)

    before, metrics, after = train_with_eval(trainer, out_dir, step_log, has_eval=eval_ds is not None)
    if eval_ds is not None:
        for k in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
            metrics[f"eval_{k}_before"] = finite(before.get(f"eval_{k}"))
            metrics[f"eval_{k}"] = finite(after.get(f"eval_{k}"))
    save_model(trainer.model, tokenizer, out_dir / "model", stage.merge_lora, trainer=trainer)
    metrics.update(report.after(trainer.model, tokenizer))
    metrics.update(train_rows=len(train), eval_rows=len(held), rows_too_long=too_long,
                   seconds=round(timer.seconds(), 1))
    return metrics
