"""The `reward` stage: a Bradley-Terry reward model over TRL's `RewardTrainer`.

Loss: -log σ(r(x, y_chosen) - r(x, y_rejected) - margin), the margin taken from the
data's optional `margin` column. Pairs are tokenized by `reward.score.encode`, the same
function `RewardScorer` uses, and handed to TRL already tokenized, so training and
scoring can never format a pair differently. The reward model is saved with its LoRA
merged (one folder that `AutoModelForSequenceClassification` loads) plus
`align_reward.json` holding the max_length the scorer must use.
"""

from __future__ import annotations

import logging
from pathlib import Path

from align.artifacts import StepLog, Timer, save_folder_atomically, write_json
from align.config import RewardStage
from align.data import as_preference, load_split
from align.models import apply_lora, load_quantized, load_tokenizer, merge_into_unquantized
from align.training import AlignCallback, finite, gathered_state_dict, train_with_eval, trainer_args
from reward.score import SCORER_CONFIG
from reward.train import init_reward_model, tokenize_pairs

log = logging.getLogger("align")


def run(stage: RewardStage, name: str, out_dir: Path, model_path: str) -> dict:
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    timer = Timer()
    tokenizer = load_tokenizer(model_path)
    train_pairs, eval_pairs = load_split(stage, "preference", as_preference, out_dir)
    train_rows, too_long = tokenize_pairs(train_pairs, tokenizer, stage.max_length, stage.too_long,
                                          f"{name}: {stage.data}")
    eval_rows = tokenize_pairs(eval_pairs, tokenizer, stage.max_length, stage.too_long,
                               f"{name}: held-out pairs")[0] if eval_pairs else []
    train_ds = Dataset.from_list(train_rows)
    eval_ds = Dataset.from_list(eval_rows) if eval_rows else None
    log.info("%s: %d training pairs, %d held out", name, len(train_ds), len(eval_rows))

    torch.manual_seed(stage.seed)  # the new score head: the same draw whatever ran before in this process
    model = (load_quantized(model_path, stage.quantization, stage.gradient_checkpointing, num_labels=1)
             if stage.quantization else init_reward_model(model_path))
    model.config.pad_token_id = tokenizer.pad_token_id
    if stage.lora:
        model = apply_lora(model, stage.lora, task_type="SEQ_CLS")  # the score head trains in full
    step_log = StepLog(out_dir / "log.jsonl")
    args = RewardConfig(**trainer_args(stage, out_dir, has_eval=eval_ds is not None), max_length=None,
                        center_rewards_coefficient=stage.center_rewards, dataset_num_proc=None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer, callbacks=[AlignCallback(step_log)])

    before, metrics, after = train_with_eval(trainer, out_dir, step_log, has_eval=eval_ds is not None)
    if eval_ds is not None:
        metrics.update(eval_accuracy_before=finite(before.get("eval_accuracy")), eval_loss_before=before["eval_loss"],
                       eval_accuracy=finite(after.get("eval_accuracy")), eval_loss=after["eval_loss"],
                       eval_margin=finite(after.get("eval_margin")))

    state_dict = gathered_state_dict(trainer.accelerator, trainer.model_wrapped)  # FSDP/ZeRO-3: every rank takes part
    trained = trainer.model
    if stage.quantization:  # merged into the base loaded afresh in bf16, never into the quantized weights
        trained = merge_into_unquantized(trained, init_reward_model(model_path))
    elif hasattr(trained, "merge_and_unload"):
        trained = trained.merge_and_unload()

    def save(tmp: Path) -> None:
        trained.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(tmp)
        write_json(tmp / SCORER_CONFIG, {"max_length": stage.max_length})

    save_folder_atomically(out_dir / "model", save)
    metrics.update(train_pairs=len(train_ds), eval_pairs=len(eval_rows), pairs_too_long=too_long,
                   seconds=round(timer.seconds(), 1))
    return metrics
