"""The `reward` stage: a Bradley-Terry reward model over TRL's `RewardTrainer`.

Loss: -log σ(r(x, y_chosen) - r(x, y_rejected) - margin), the margin taken from the
data's optional `margin` column. Pairs are tokenized by `reward.score.encode`, the same
function `RewardScorer` uses, and handed to TRL already tokenized, so training and
scoring can never format a pair differently. The reward model is saved with its LoRA
merged (one folder that `AutoModelForSequenceClassification` loads) plus
`align_reward.json` holding the max_length the scorer must use.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from align.artifacts import StepLog, Timer, save_folder_atomically, write_json
from align.config import RewardStage
from align.data import as_preference, load_split
from align.errors import AlignError
from align.models import adapter_base, load_model, load_tokenizer, use_bf16
from align.training import AlignCallback, finite, train_with_eval, trainer_args
from reward.score import SCORER_CONFIG, encode

log = logging.getLogger("align")


def init_reward_model(path: str):
    """A 1-output sequence classifier whose body is the causal LM at `path` (a folder or an adapter)."""
    from transformers import AutoModelForSequenceClassification

    dtype = torch.bfloat16 if use_bf16() else torch.float32
    if adapter_base(path):
        causal = load_model(path, dtype=dtype)  # base + adapter, merged
        config = copy.deepcopy(causal.config)
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        model.base_model.load_state_dict(causal.base_model.state_dict())
        return model
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)


def tokenize_pairs(pairs: list[dict], tokenizer, max_length: int, policy: str, what: str) -> tuple[list[dict], int]:
    rows, too_long = [], 0
    for pair in pairs:
        chosen = encode(tokenizer, pair["prompt"], pair["chosen"])
        rejected = encode(tokenizer, pair["prompt"], pair["rejected"])
        if max(len(chosen), len(rejected)) > max_length:
            too_long += 1
            if policy == "drop":
                continue
            chosen, rejected = chosen[-max_length:], rejected[-max_length:]
        row = {"chosen_ids": chosen, "rejected_ids": rejected}
        if "margin" in pair:
            row["margin"] = pair["margin"]
        rows.append(row)
    if too_long:
        verb = "dropped" if policy == "drop" else "cut to their last max_length tokens"
        log.warning("%s: %d of %d pairs are longer than max_length=%d tokens and were %s",
                    what, too_long, len(pairs), max_length, verb)
    if not rows:
        raise AlignError(f"{what}: no pairs left after dropping those longer than max_length={max_length}")
    if len({("margin" in r) for r in rows}) > 1:
        raise AlignError(f"{what}: some rows have a 'margin' and some do not; give it on every row or none")
    return rows, too_long


def run(stage: RewardStage, name: str, out_dir: Path, model_path: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import RewardConfig, RewardTrainer

    timer = Timer()
    tokenizer = load_tokenizer(model_path)
    train_pairs, eval_pairs = load_split(stage, "preference", as_preference)
    train_rows, too_long = tokenize_pairs(train_pairs, tokenizer, stage.max_length, stage.too_long,
                                          f"{name}: {stage.data}")
    eval_rows = tokenize_pairs(eval_pairs, tokenizer, stage.max_length, stage.too_long,
                               f"{name}: held-out pairs")[0] if eval_pairs else []
    train_ds = Dataset.from_list(train_rows)
    eval_ds = Dataset.from_list(eval_rows) if eval_rows else None
    log.info("%s: %d training pairs, %d held out", name, len(train_ds), len(eval_rows))

    model = init_reward_model(model_path)
    model.config.pad_token_id = tokenizer.pad_token_id
    if stage.lora:
        config = LoraConfig(r=stage.lora.r, lora_alpha=stage.lora.alpha, lora_dropout=stage.lora.dropout,
                            target_modules=stage.lora.target_modules, task_type="SEQ_CLS")
        model = get_peft_model(model, config)  # the score head is trained in full (modules_to_save)
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

    trained = trainer.model
    if hasattr(trained, "merge_and_unload"):
        trained = trained.merge_and_unload()

    def save(tmp: Path) -> None:
        trained.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / SCORER_CONFIG, {"max_length": stage.max_length})

    save_folder_atomically(out_dir / "model", save)
    metrics.update(train_pairs=len(train_ds), eval_pairs=len(eval_rows), pairs_too_long=too_long,
                   seconds=round(timer.seconds(), 1))
    return metrics
