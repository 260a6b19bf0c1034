"""Direct preference optimization over TRL's `DPOTrainer`, with a disk cache of reference log-probs.

Reference: the stage's starting model (`models.reference_model`), handed to TRL as
`ref_model`. Under LoRA it is that model with the adapter disabled, so no second copy is
held. With `ref_cache` (default) the reference forward passes run once over the data,
before the first step, through the policy, still the starting model (TRL's
`precompute_ref_log_probs` with no `ref_model`), and are stored under
`$ALIGN_CACHE/ref_logps/`, keyed by the reference weights' hash, the rows, the chat
template and `max_length`; the next run with the same reference and data reads them and
skips every reference pass. The loss is TRL's (one copy of the math).

Several processes: each rank computes the reference log-probs of its share of the rows and TRL
gathers them (`gather_for_metrics`), so every rank holds all of them; rank 0 alone writes the
cache file, and the decision to read it is rank 0's (`distributed.decide`). The datasets are
written once to `<stage>/datasets/` (`data.trainer_dataset`) so that the files TRL's rank 0
writes beside them can be opened by the other ranks.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from align import distributed
from align.artifacts import StepLog, Timer, hash_json
from align.config import DPOStage
from align.data import apply_too_long, as_preference, load_split, trainer_dataset
from align.models import apply_lora, cache_dir, drop_ref_adapter, load_model, load_tokenizer, reference_model
from align.policy_eval import BeforeAfter
from align.training import AlignCallback, finite, save_model, train_with_eval, trainer_args

log = logging.getLogger("align")


def weights_hash(model) -> str:
    """sha256 over every parameter and buffer, fed to hashlib in place (TRL's `hash_module` makes a
    bytes copy of each tensor first)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def rows_hash(dataset) -> str:
    """sha256 of a dataset's tokenized columns, read from its Arrow buffers without copying."""
    h = hashlib.sha256()
    table = dataset.data.table
    # A filtered or shuffled dataset is the full table plus an indices mapping: hash both.
    tables = [("rows", table)] + ([("indices", dataset._indices.table)] if dataset._indices is not None else [])
    for label, t in tables:
        for name in sorted(c for c in t.column_names if not c.startswith("ref_")):
            h.update(f"{label}:{name}".encode())
            for chunk in t.column(name).chunks:
                for buffer in chunk.buffers():
                    if buffer is not None:
                        h.update(memoryview(buffer))
    return h.hexdigest()


def make_trainer_class():
    from trl import DPOTrainer

    class CachedRefDPOTrainer(DPOTrainer):
        """DPOTrainer whose precomputed reference log-probs persist across runs."""

        def __init__(self, *args, ref_cache_key: dict | None = None, **kwargs):
            self.ref_cache_key = ref_cache_key
            self.ref_cache_hits: list[str] = []
            super().__init__(*args, **kwargs)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if self.ref_cache_key is None:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            key = hash_json({**self.ref_cache_key, "split": name, "rows": rows_hash(dataset)})
            path = cache_dir() / "ref_logps" / f"{key}.pt"
            # Several processes: rank 0 looks, every rank follows; TRL computes each rank's share and gathers.
            if distributed.decide(path.exists):
                cached = torch.load(path)
                if len(cached["chosen"]) == len(dataset):
                    self.ref_cache_hits.append(name)
                    log.info("reference log-probs for %s read from cache (%s)", name, path.name)
                    return (dataset.add_column("ref_chosen_logps", cached["chosen"].tolist())
                            .add_column("ref_rejected_logps", cached["rejected"].tolist()))
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            if not distributed.is_main():
                return out
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{id(self)}")
            torch.save({"chosen": torch.tensor(out["ref_chosen_logps"]),
                        "rejected": torch.tensor(out["ref_rejected_logps"])}, tmp)
            tmp.replace(path)
            return out

    return CachedRefDPOTrainer


def preference_rows(stage, name: str, tokenizer, out_dir: Path | None = None) -> tuple[list[dict], list[dict], int]:
    """Train and held-out pairs as message lists, with the recipe's policy for over-long pairs."""
    train, held = load_split(stage, "preference", as_preference, out_dir)

    def length(pair):
        return max(len(tokenizer.apply_chat_template(pair["prompt"] + pair[k], tokenize=True,
                                                     return_dict=True)["input_ids"]) for k in ("chosen", "rejected"))

    train, too_long = apply_too_long(train, [length(p) for p in train], stage.max_length, stage.too_long,
                                     f"{name}: {stage.data}", noun="pairs")
    if held:
        held, _ = apply_too_long(held, [length(p) for p in held], stage.max_length, stage.too_long,
                                 f"{name}: {stage.eval_data or stage.data} (held out)", noun="pairs", required=False)
    for p in train + held:
        p.pop("margin", None)  # a reward-model notion; DPO has no use for it
    return train, held, too_long


def run(stage: DPOStage, name: str, out_dir: Path, model_path: str, reward_path: str | None = None) -> dict:
    from trl import DPOConfig

    timer = Timer()
    tokenizer = load_tokenizer(model_path)
    train, held, too_long = preference_rows(stage, name, tokenizer, out_dir)
    train_ds = trainer_dataset(train, out_dir / "datasets" / "train")
    eval_ds = trainer_dataset(held, out_dir / "datasets" / "eval") if held else None
    log.info("%s: %d training pairs, %d held out", name, len(train), len(held))

    model = load_model(model_path, quantization=stage.quantization, gradient_checkpointing=stage.gradient_checkpointing)
    report = BeforeAfter(stage, name, held, out_dir, reward_path, start_path=model_path)
    report.before(model, tokenizer)
    ref_key = None
    if stage.ref_cache:
        ref_key = {"ref_weights": weights_hash(model), "chat_template": tokenizer.chat_template,
                   "max_length": stage.max_length, "pad": tokenizer.pad_token_id}
    ref_model = reference_model(model, stage.lora, precomputed=stage.ref_cache)
    if stage.lora:
        model = apply_lora(model, stage.lora)

    loss_type, loss_weights = [stage.loss_type], None
    if stage.nll_weight > 0:
        loss_type, loss_weights = [stage.loss_type, "sft"], [1.0, stage.nll_weight]
    step_log = StepLog(out_dir / "log.jsonl")
    config = DPOConfig(
        **trainer_args(stage, out_dir, has_eval=eval_ds is not None),
        beta=stage.beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        label_smoothing=stage.label_smoothing,
        max_length=stage.max_length,
        precompute_ref_log_probs=stage.ref_cache,
        # Reference passes keep no activations, so larger batches cost little memory and run faster.
        precompute_ref_batch_size=stage.batch_size * 4,
        dataset_num_proc=None,
    )
    trainer = make_trainer_class()(model=model, ref_model=ref_model, args=config, train_dataset=train_ds,
                                   eval_dataset=eval_ds, processing_class=tokenizer,
                                   callbacks=[AlignCallback(step_log)], ref_cache_key=ref_key)
    drop_ref_adapter(trainer.model)

    before, metrics, after = train_with_eval(trainer, out_dir, step_log, has_eval=eval_ds is not None)
    if eval_ds is not None:
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
            metrics[f"eval_{k}_before"] = finite(before.get(f"eval_{k}"))
            metrics[f"eval_{k}"] = finite(after.get(f"eval_{k}"))
    metrics["ref_cache_hits"] = getattr(trainer, "ref_cache_hits", [])
    save_model(trainer.model, tokenizer, out_dir / "model", stage.merge_lora, trainer=trainer)

    metrics.update(report.after(trainer.model, tokenizer))
    metrics.update(train_pairs=len(train), eval_pairs=len(held), pairs_too_long=too_long,
                   seconds=round(timer.seconds(), 1))
    return metrics
