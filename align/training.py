"""What every TRL-backed stage shares: trainer arguments from the recipe, the per-step log,
checkpoint markers, resume, and the atomic save of the final model.

A stage module reads top to bottom as setup (data, model, `trainer_args`), loop
(`train_with_resume`), save (`save_model`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from align import distributed
from align.artifacts import (CHECKPOINT_OK, StepLog, complete_checkpoints, drop_incomplete_checkpoints,
                             peak_rss_mb, read_json, save_folder_atomically, write_json, write_text)
from align.config import TrainStage
from align.console import progress_bar
from align.models import use_bf16

log = logging.getLogger("align")


def trainer_args(stage: TrainStage, out_dir: Path, has_eval: bool) -> dict:
    """Keyword arguments shared by every TRL config class (SFTConfig, DPOConfig, ...)."""
    bf16 = use_bf16()
    if stage.report_to == "tensorboard":
        # transformers 5 dropped `logging_dir`; its TensorBoard callback reads this variable instead.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out_dir / "tensorboard")
    eval_every = stage.eval_steps if has_eval and stage.eval_steps > 0 else None
    return dict(
        output_dir=str(out_dir / "checkpoints"),
        learning_rate=stage.lr,
        num_train_epochs=stage.epochs,
        max_steps=stage.max_steps,
        per_device_train_batch_size=stage.batch_size,
        per_device_eval_batch_size=stage.batch_size,
        gradient_accumulation_steps=stage.grad_accum,
        warmup_steps=stage.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type=stage.lr_scheduler,
        weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm,
        activation_checkpointing=stage.gradient_checkpointing,
        bf16=bf16,  # TRL defaults to bf16, which fails or crawls on most CPUs (and gloo cannot all-reduce it)
        # Without it accelerate picks no distributed mode for CPU processes under torchrun (MULTI_CPU needs cpu).
        use_cpu=not torch.cuda.is_available(),
        fp16=False,
        logging_steps=stage.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=stage.save_steps,
        save_total_limit=stage.save_total_limit,
        report_to=[] if stage.report_to == "none" else [stage.report_to],
        seed=stage.seed,
        data_seed=stage.seed,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every trainable weight takes part in each forward; True costs a graph walk
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True,  # AlignCallback draws the bar; the per-step dicts go to run.log (align.console)
        save_only_model=False,  # optimizer, scheduler and RNG go into checkpoints: resume is exact
    )


class AlignCallback(TrainerCallback):
    """Writes `log.jsonl` (with tokens/s and peak memory), marks finished checkpoints and draws the
    stage's progress bar (loss, tokens/s, ETA) in place of transformers' own bar and dicts."""

    def __init__(self, step_log: StepLog):
        self.step_log = step_log
        self.last_time = None
        self.last_tokens = 0
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time = time.perf_counter()
        self.last_tokens = state.num_input_tokens_seen or 0
        if state.is_world_process_zero:
            # global_step is already the checkpoint's on resume; out_dir/checkpoints names the stage.
            self.bar = progress_bar(Path(args.output_dir).parent.name, state.max_steps, initial=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        # transformers checkpoints the last step whatever save_steps says; the stage saves its model right
        # after training, so that checkpoint would only write the optimizer state (twice the weights) again.
        if state.global_step >= state.max_steps and state.save_steps and state.global_step % state.save_steps:
            control.should_save = False

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        t = time.perf_counter()
        tokens = state.num_input_tokens_seen or 0
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        if "loss" in logs and t > self.last_time:
            record["tokens_per_s"] = round((tokens - self.last_tokens) / (t - self.last_time), 1)
            self.last_time, self.last_tokens = t, tokens
            if self.bar is not None and isinstance(logs["loss"], (int, float)):
                self.bar.set_postfix({"loss": f"{logs['loss']:.4g}", "tok/s": f"{record['tokens_per_s']:.0f}"})
        record["peak_rss_mb"] = round(peak_rss_mb(), 1)
        import torch

        if torch.cuda.is_available():
            record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.step_log.append(record)

    def on_save(self, args, state, control, **kwargs):
        # Called after the trainer wrote model, optimizer, scheduler, RNG and trainer_state: only now does
        # the checkpoint count as one to resume from. Several processes: each wrote its own RNG state, so
        # rank 0 marks the checkpoint once every rank is past its save.
        distributed.barrier()
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if distributed.is_main() and ckpt.is_dir():
            write_text(ckpt / CHECKPOINT_OK, str(state.global_step))


def resume_point(out_dir: Path) -> Path | None:
    ckpt_dir = out_dir / "checkpoints"
    dropped = drop_incomplete_checkpoints(ckpt_dir)
    if dropped:
        log.warning("dropped checkpoints that a killed run left half-written: %s", ", ".join(dropped))
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def _resume_point_and_tokens(out_dir: Path) -> tuple[Path | None, int]:
    ckpt = resume_point(out_dir)
    return ckpt, (read_json(ckpt / "trainer_state.json") or {}).get("num_input_tokens_seen", 0) if ckpt else 0


def train_with_resume(trainer, out_dir: Path, step_log: StepLog) -> dict:
    """Train, resuming from the newest complete checkpoint if a killed run left one."""
    # Chosen on rank 0 (which drops half-written checkpoints) and handed to every rank. Read now: checkpoint
    # rotation may delete the one we resume from during training.
    ckpt, start_tokens = distributed.decide(lambda: _resume_point_and_tokens(out_dir))
    if ckpt is not None:
        step = int(ckpt.name.rsplit("-", 1)[1])
        log.info("resuming from %s (step %d)", ckpt, step)
        step_log.truncate_after(step)
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    metrics = dict(result.metrics)
    metrics["global_step"] = trainer.state.global_step
    metrics["resumed_from_step"] = int(ckpt.name.rsplit("-", 1)[1]) if ckpt else None
    metrics["num_input_tokens_seen"] = trainer.state.num_input_tokens_seen
    if metrics.get("train_runtime"):  # this run's throughput: tokens since the checkpoint, over this run's time
        metrics["tokens_per_s"] = round((metrics["num_input_tokens_seen"] - start_tokens) / metrics["train_runtime"], 1)
    return metrics


def train_with_eval(trainer, out_dir: Path, step_log: StepLog, has_eval: bool) -> tuple[dict, dict, dict]:
    """(held-out metrics of the starting model, training metrics, held-out metrics after training).

    The "before" numbers come from transformers' `eval_on_start`: the trainer evaluates once it has prepared the
    model together with its optimizer, before the first step. An `evaluate()` before `train()` prepares the model
    alone, which FSDP2 refuses at the first stage ("When using FSDP2, a model and optimizer must be passed together
    to Accelerator.prepare()", measured on an H200) and which under DDP left the model unwrapped, each rank training
    its own copy (measured: 2 ranks ended with different weights). They are kept in `eval_before.json` as soon as
    they exist, so a resumed run reports the true starting point rather than its checkpoint's."""
    before_path = out_dir / "eval_before.json"
    before = distributed.decide(lambda: read_json(before_path) or {})
    first = None
    if has_eval and not before:  # every rank evaluates (the eval set is sharded); rank 0 writes
        first = FirstEvaluation(before_path)
        trainer.add_callback(first)
        trainer.args.eval_on_start = True
    try:
        metrics = train_with_resume(trainer, out_dir, step_log)
    finally:
        if first is not None:
            trainer.remove_callback(first)
            trainer.args.eval_on_start = False
    if first is not None:
        before = first.metrics or {}
    after = trainer.evaluate() if has_eval else {}
    return before, metrics, after


class FirstEvaluation(TrainerCallback):
    """Keeps the metrics of the first evaluation (`eval_on_start`: the starting model) and writes them to `path`."""

    def __init__(self, path: Path):
        self.path, self.metrics = path, None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.metrics is None:
            self.metrics = dict(metrics or {})
            write_json(self.path, self.metrics)


def save_model(model, tokenizer, out: Path, merge_lora: bool, trainer=None, state_dict: dict | None = None) -> None:
    """Save the policy to `out` atomically: a PEFT adapter (or merged weights on request).

    Several processes: every rank calls this. Under FSDP or ZeRO-3 the weights are sharded, so the full
    state dict is gathered first (a collective: all ranks take part; from `trainer`'s accelerator, or given
    as `state_dict`) and rank 0 writes it."""
    from peft import PeftModel

    if trainer is not None:
        state_dict = gathered_state_dict(trainer.accelerator, trainer.model_wrapped)

    def save(tmp: Path) -> None:
        to_save = model
        if isinstance(model, PeftModel) and merge_lora:
            to_save = model.merge_and_unload()
        if state_dict is not None and to_save is model:
            to_save.save_pretrained(tmp, state_dict=state_dict)
        else:
            to_save.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    save_folder_atomically(out, save)
    distributed.barrier()  # no rank goes on (to the next stage) before the model is on disk


def gathered_state_dict(accelerator, wrapped) -> dict | None:
    """The full state dict of a sharded (FSDP, ZeRO-3) model, gathered; None otherwise (one process, DDP,
    ZeRO-1/2: every rank already holds all the weights)."""
    return accelerator.get_state_dict(wrapped) if sharded(accelerator) else None


def sharded(accelerator) -> bool:
    """Whether the weights are split over ranks (FSDP, DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and accelerator.deepspeed_config["zero_optimization"]["stage"] == 3)


def finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
