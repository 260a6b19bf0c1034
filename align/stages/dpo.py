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

from align import distributed, prefix_sharing
from align.artifacts import StepLog, Timer, hash_json
from align.config import DPOStage
from align.data import apply_too_long, as_preference, load_split, trainer_dataset
from align.errors import AlignError
from align.models import apply_lora, cache_dir, drop_ref_adapter, load_model, load_tokenizer, reference_model
from align.policy_eval import BeforeAfter
from align.training import AlignCallback, finite, save_model, train_with_eval, trainer_args

log = logging.getLogger("align")
# The probe's largest tolerated mean gap per completion token, in nats: fp32 (True) and half precision (False).
# Parity on the tiny Llama is ~1e-7; a model that ignores the 4D mask or the position ids is off by far more.
PROBE_TOLERANCE = {True: 1e-4, False: 2e-2}


def compute_dtype(model) -> torch.dtype:
    """The dtype a forward pass computes its matmuls in, which sets the probe's tolerance. Under QLoRA the model
    reports float32 (its norms and LoRA weights) while bitsandbytes' 4-bit layers compute in
    `bnb_4bit_compute_dtype` (bf16 in our recipes): measured on an H200, the probe's 1.1e-4 nats per token under
    nf4 was judged by the fp32 bound and turned prefix sharing off. Else the dtype of the linear layers' weights."""
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    if quantization is not None:
        get = quantization.get if isinstance(quantization, dict) else lambda key: getattr(quantization, key, None)
        if get("load_in_4bit") or get("load_in_8bit"):
            dtype = get("bnb_4bit_compute_dtype") if get("load_in_4bit") else torch.float16
            dtype = getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
            return dtype or torch.float32
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.is_floating_point():
            return module.weight.dtype
    return model.dtype


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


class SharedPrefixCollator:
    """TRL's preference collator plus the shared-prompt layout of the same (truncated) pairs
    (`align.prefix_sharing.layout`) under `shared_layout`; the model's wrapped forward reads that and
    ignores the two-sequence `input_ids`, which TRL still uses for labels and masks."""

    def __init__(self, inner, pack: bool):
        self.inner, self.pack, self.enabled = inner, pack, True

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.inner(examples)
        if not self.enabled:
            return batch
        limit = self.inner.max_length
        prompts = [list(e["prompt_ids"]) for e in examples]

        def cut(prompt, answer):  # TRL's keep_start truncation of prompt + answer, applied to the answer
            return list(answer) if limit is None else list(answer)[:max(limit - len(prompt), 0)]

        chosen = [cut(p, e["chosen_ids"]) for p, e in zip(prompts, examples)]
        rejected = [cut(p, e["rejected_ids"]) for p, e in zip(prompts, examples)]
        batch["shared_layout"] = prefix_sharing.layout(prompts, chosen, rejected, pad_id=self.inner.pad_token_id,
                                                       seq_len=batch["input_ids"].size(1), pack=self.pack)
        return batch


class SharedPrefixMixin:
    """The prefix-sharing decision of a DPOTrainer subclass: off by recipe, off where the model cannot take the
    layout (`prefix_sharing.supports`), else on after a probe pair's log-probs match the two-sequence pass;
    `prefix_sharing: true` turns every fallback into one AlignError line."""

    def setup_prefix_sharing(self) -> None:
        if self.prefix_sharing is not None:
            return
        self.prefix_sharing = False
        if self.prefix_mode is False:
            self.prefix_note = "off (prefix_sharing: false)"
            return
        why = prefix_sharing.supports(self.model, self.args.max_length)
        if why is None and self.args.truncation_mode != "keep_start":
            why = "truncation_mode keep_end cuts the prompt differently for chosen and rejected"
        if why is not None:
            return self.prefix_fallback(why)
        outputs = ("log_probs", "entropy", "mean_logits", "is_top1") + (
            ("log_sum_sq_probs",) if self.use_weighting else ())
        unwrapped = self.accelerator.unwrap_model(self.model)
        prefix_sharing.install(unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped,
                               outputs)
        if self.ref_model is not None:
            prefix_sharing.install(self.accelerator.unwrap_model(self.ref_model), ("log_probs",))
        self.data_collator = SharedPrefixCollator(self.data_collator, self.packing)
        gap, error = distributed.decide(self.prefix_probe)
        if error or gap > PROBE_TOLERANCE[compute_dtype(self.model) == torch.float32]:
            self.data_collator.enabled = False
            return self.prefix_fallback(f"the model fails on the shared layout ({error})" if error else
                                        f"a probe pair's log-probs differ by {gap:.2g} nats per token "
                                        "from the two-sequence pass")
        self.prefix_sharing = True
        self.prefix_note = "on" + (", pairs packed" if self.packing else "")

    def prefix_fallback(self, why: str) -> None:
        if self.prefix_mode is True:
            raise AlignError(f"prefix_sharing: true, but {why}; set prefix_sharing: auto or false")
        self.prefix_note = f"off ({why})"
        log.info("prefix sharing off: %s; each pair runs as two sequences", why)

    def prefix_probe(self) -> tuple[float, str]:
        """Mean per-token gap between the two-sequence and the shared log-probs on the first pairs, and the
        error the shared pass raised, if it did."""
        examples = [self.train_dataset[i] for i in range(min(2, len(self.train_dataset)))]
        batch = self._prepare_inputs(self.data_collator(examples))
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                      fused_lm_head=True, use_cache=False)
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                plain = self.model(**kwargs).log_probs
                shared = self.model(**kwargs, shared_layout=batch["shared_layout"]).log_probs
        except Exception as e:  # noqa: BLE001 - a model that refuses the layout is the answer being probed
            return float("inf"), f"{type(e).__name__}: {e}"
        finally:
            self.model.train(training)
        tokens = (labels[:, 1:] != -100).sum().clamp(min=1)
        return float((plain - shared).abs().sum() / tokens), ""


def make_trainer_class():
    from trl import DPOTrainer

    class CachedRefDPOTrainer(SharedPrefixMixin, DPOTrainer):
        """DPOTrainer whose precomputed reference log-probs persist across runs, and whose pairs go through
        the model as one shared-prompt sequence each (`align.prefix_sharing`) where the model allows it."""

        def __init__(self, *args, ref_cache_key: dict | None = None, prefix_sharing="auto", packing: bool = True,
                     **kwargs):
            self.ref_cache_key = ref_cache_key
            self.ref_cache_hits: list[str] = []
            self.prefix_mode, self.packing = prefix_sharing, packing
            self.prefix_sharing: bool | None = None  # decided once, before the first forward
            self.prefix_note = ""
            super().__init__(*args, **kwargs)
            self.setup_prefix_sharing()

        def _precompute_ref_logps(self, dataset, name, batch_size):
            self.setup_prefix_sharing()  # TRL precomputes inside __init__: the layout is decided first
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
                                   callbacks=[AlignCallback(step_log)], ref_cache_key=ref_key,
                                   prefix_sharing=stage.prefix_sharing, packing=stage.packing)
    drop_ref_adapter(trainer.model)

    before, metrics, after = train_with_eval(trainer, out_dir, step_log, has_eval=eval_ds is not None)
    if eval_ds is not None:
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
            metrics[f"eval_{k}_before"] = finite(before.get(f"eval_{k}"))
            metrics[f"eval_{k}"] = finite(after.get(f"eval_{k}"))
    metrics["ref_cache_hits"] = getattr(trainer, "ref_cache_hits", [])
    metrics["prefix_sharing"] = trainer.prefix_note
    save_model(trainer.model, tokenizer, out_dir / "model", stage.merge_lora, trainer=trainer)

    metrics.update(report.after(trainer.model, tokenizer))
    metrics.update(train_pairs=len(train), eval_pairs=len(held), pairs_too_long=too_long,
                   seconds=round(timer.seconds(), 1))
    return metrics
