"""PPO-based RLHF, our own (TRL dropped its PPOTrainer after 1.12.0).

One PPO step, top to bottom (`run` loops over `make_rollout` -> `ppo_update` -> log):

1. rollouts: `rollout_batch_size` prompts, one sampled completion each, from the rollout
   engine (`hf`: the live policy; `vllm`: a vLLM engine that gets the new weights after
   every step);
2. scores: the reward model scores each completion's TEXT (so a reward model with another
   tokenizer works), plus an optional `reward_fn`; a completion that never reached EOS
   loses `missing_eos_penalty`; a batch with a NaN score is skipped and logged;
3. per-token rewards: -β·KL(π || π_ref) at every token (k1 or k3 estimator), the score
   added at the last token (`align.losses.ppo_rewards`); β fixed or adapted towards `kl_target`;
4. GAE(γ, λ) over the value model's per-token values, advantages whitened;
5. `ppo_epochs` passes over shuffled mini-batches: clipped policy loss + `vf_coef` × clipped
   value loss - `entropy_coef` × entropy, one optimizer over policy and value parameters.

Models: the policy (full or LoRA), a value model (a sequence-classification model whose
score head is read at every token; weights from the reward model, or from the policy), the
frozen reference (an in-memory copy of the starting policy; under LoRA, the policy with its
adapter disabled: no second copy), and the reward model. The math is `align.losses` (one
copy, tested by hand); padding and log-probs are `align.sequences`.

What makes a step cheap: the rollout's log-probs come from generation itself when the
policy samples at temperature 1 on the HF engine (no second policy pass); the LM head
runs only over completion positions (`logits_to_keep`); rows stop at EOS and the batch is
trimmed to its longest completion.

Logging: a log.jsonl record every `logging_steps` steps (the mean of the steps since the last
one; see `StepRecords`), TensorBoard scalars too with `report_to: tensorboard`, and every
`eval_steps` steps (0: only at the end) the reward model's mean score of the policy's greedy
completions of the held-out prompts as `eval_reward`.

Checkpoints (`save_steps`) hold the trainable weights, value model, optimizer, scheduler,
KL coefficient, step and the steps not yet logged; a killed run resumes from the last complete
one, and refuses one whose saved weights do not fit the model. Prompts and sampling seeds are a
function of the step, so a resumed run sees the same batches.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align import distributed
from align.artifacts import (
    CHECKPOINT_OK,
    StepLog,
    Timer,
    complete_checkpoints,
    peak_rss_mb,
    write_text,
)
from align.config import PPOStage
from align.console import progress_bar
from align.errors import AlignError
from align.losses import (
    adaptive_kl_coef,
    entropy_from_logits,
    explained_variance,
    gae,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_rewards,
    ppo_value_loss,
)
from align.models import apply_lora, frozen_copy, load_model, load_tokenizer
from align.policy_eval import BeforeAfter
from align.rollouts import Sampling, make_engine
from align.sequences import (
    completion_logits,
    pack,
    right_pad,
    rows_of,
    tempered,
    token_logps,
)
from align.stages.online import load_reward_fn, prompt_rows
from align.training import gathered_state_dict, resume_point, save_model
from reward.score import SCORER_CONFIG, RewardScorer

log = logging.getLogger("align")

MAX_NAN_STEPS = 10  # consecutive skipped batches before the stage gives up


class Rewards:
    """Scores completion texts: the reward model (re-tokenizing with its own tokenizer) plus `reward_fn`.
    `scorer`: a reward model the stage already holds (`AdapterOffScorer`); else one is loaded."""

    def __init__(self, reward_path: str | None, reward_fn, device: str, scorer=None):
        self.scorer = scorer or (RewardScorer(reward_path, device=device) if reward_path else None)
        self.fn = reward_fn

    def score(self, prompts: list, completions: list[str]) -> torch.Tensor:
        total = torch.zeros(len(prompts))
        if self.scorer is not None:
            total += torch.tensor(self.scorer.score(prompts, completions), dtype=torch.float32)
        if self.fn is not None:
            extra = self.fn(prompts, completions)
            if len(extra) != len(prompts):
                raise AlignError(f"reward_fn returned {len(extra)} values for {len(prompts)} completions")
            total += torch.tensor([math.nan if v is None else float(v) for v in extra], dtype=torch.float32)
        return total


class AdapterOffScorer(RewardScorer):
    """The reward model without a second copy of its weights. Under LoRA with `value_model: reward`, the
    value model is the reward model (same file, same dtype) plus an adapter and a trained copy of the score
    head; with the adapter disabled PEFT runs the original weights and head, so this scores exactly what
    `RewardScorer(reward_path)` scores, and the stage holds one reward-model copy instead of two."""

    def __init__(self, value_model, reward_path: str, device: str):
        saved = Path(reward_path) / SCORER_CONFIG
        self.path, self.model, self.device = reward_path, value_model, device
        self.tokenizer = load_tokenizer(reward_path)
        self.max_length = json.loads(saved.read_text()).get("max_length") if saved.exists() else None

    def score_ids(self, ids: list[list[int]], batch_size: int = 16) -> list[float]:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return super().score_ids(ids, batch_size)
        finally:
            self.model.train(was_training)


def shared_scorer(stage: PPOStage, value_model, value_source: str, reward_path: str | None, device: str):
    """An `AdapterOffScorer` over the value model where it is the reward model under an adapter; else None
    (the reward model is loaded on its own). One process only: under FSDP the value model's weights are
    sharded, and the scorer runs outside the wrapped module."""
    if not (reward_path and stage.lora and value_source == "reward" and distributed.world_size() == 1):
        return None
    scorer = AdapterOffScorer(value_model, reward_path, device)
    same = next(value_model.parameters()).dtype == torch.float32 and \
        value_model.config.pad_token_id == scorer.tokenizer.pad_token_id  # RewardScorer loads fp32, its own pad id
    return scorer if same else None


class SharedValueHead(torch.nn.Module):
    """`value_model: shared`: V(s_t) = w·h_t + b on the policy's last hidden state; starts at 0."""

    def __init__(self, hidden_size: int, dtype):
        super().__init__()
        self.head = torch.nn.Linear(hidden_size, 1, dtype=dtype)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)


def value_model_for(stage: PPOStage, name: str, model_path: str, reward_path: str | None, policy_tokenizer,
                    policy=None):
    """A 1-output sequence classifier read at every token. From the reward model when it shares the
    policy's vocabulary (its head already knows what scores well), else from the policy; or, with
    `shared`, only a head on the policy's trunk."""
    from reward.train import init_reward_model

    source = stage.value_model
    if source == "shared":
        return SharedValueHead(policy.config.hidden_size, next(policy.parameters()).dtype), source
    if source == "reward" and reward_path:
        rm_tokenizer = load_tokenizer(reward_path)
        if rm_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
            log.warning("%s: the reward model's tokenizer differs from the policy's; the value model starts "
                        "from the policy instead (rewards still score text)", name)
            source = "policy"
    elif source == "reward":
        source = "policy"
    if source == "reward":
        from align.models import use_bf16
        from reward.score import load_reward_model

        model = load_reward_model(reward_path, dtype=torch.bfloat16 if use_bf16() else torch.float32)[0]
    else:
        model = init_reward_model(model_path)
        with torch.no_grad():  # a zero head: values start at 0 rather than at noise
            _value_parts(model)[1].weight.zero_()
    model.config.pad_token_id = policy_tokenizer.pad_token_id
    return model, source


def _unwrapped(model):
    """The transformers model inside a PEFT wrapper (its LoRA layers sit in it, in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _value_parts(model):
    """(backbone, score head) of a sequence-classification model, through a PEFT wrapper if any."""
    inner = _unwrapped(model)
    return getattr(inner, inner.base_model_prefix), inner.score


def per_token_values(value_model, input_ids, attention_mask, position_ids, keep: int) -> torch.Tensor:
    """V(s_t) for the last `keep` positions: (B, keep)."""
    backbone, head = _value_parts(value_model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state[:, -keep:]
    return head(hidden).squeeze(-1).float()


def logits_and_values(policy, value_model, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits predicting the T completion tokens (B, T, V), V(s_t) before each of them (B, T)).

    With a shared head, one pass of the policy's trunk gives both; otherwise the value model runs its own."""
    T = batch["T"]
    if isinstance(value_model, SharedValueHead):
        inner = _unwrapped(policy)
        hidden = getattr(inner, inner.base_model_prefix)(**model_args(batch),
                                                         use_cache=False).last_hidden_state[:, -(T + 1):]
        logits = inner.get_output_embeddings()(hidden)[:, :-1].float()
        return tempered(logits, temperature), value_model.head(hidden).squeeze(-1).float()[:, :-1]
    return policy_logits(policy, batch, temperature), values_before_tokens(value_model, batch)


def model_args(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}


def policy_logits(policy, batch: dict, temperature: float) -> torch.Tensor:
    """The policy's logits predicting the T completion tokens of a packed batch (B, T, V)."""
    return completion_logits(policy, **model_args(batch), T=batch["T"], temperature=temperature)


def values_before_tokens(value_model, batch: dict) -> torch.Tensor:
    """V(s_t) of a separate value model (B, T): the state before token t is position P-1+t, the T positions
    ending one before the last."""
    return per_token_values(value_model, **model_args(batch), keep=batch["T"] + 1)[:, :-1]


class PolicyAndValue(torch.nn.Module):
    """The policy and the value model as one module, so `accelerate.prepare` wraps one model (DDP syncs the
    gradients of both in one pass; FSDP2 shards one model). Its forward is `logits_and_values`."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_values(self.policy, self.value_model, batch, temperature)


def disable_dropout(model) -> None:
    """PPO's ratio must be 1 before the first update and values must not be noisy: no dropout anywhere."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def prompts_for_step(prompts: list, step: int, per_step: int, seed: int) -> list:
    """The step's prompts: a fixed shuffle per pass over the data, so a resumed run sees the same ones."""
    start = step * per_step
    out = []
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), len(prompts))
        order = list(range(len(prompts)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        out.append(prompts[order[offset]])
    return out


def vllm_model_folder(model_path: str, out_dir: Path) -> str:
    """vLLM loads full model folders only: an adapter folder is merged onto its base once, into the stage folder."""
    from align.models import adapter_base

    if not adapter_base(model_path):
        return model_path
    folder = out_dir / "rollout_model"
    if not (folder / "config.json").exists():
        from align.artifacts import save_folder_atomically

        merged, tokenizer = load_model(model_path), load_tokenizer(model_path)
        save_folder_atomically(folder, lambda tmp: (merged.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return str(folder)


@dataclass
class Models:
    """Everything a PPO step runs, built once by `build_models`."""

    policy: torch.nn.Module
    ref: torch.nn.Module | None  # the frozen starting policy; None under LoRA (the policy, adapter disabled)
    value_model: torch.nn.Module  # a sequence classifier read at every token, or a SharedValueHead
    value_source: str  # reward, policy or shared
    tokenizer: Any
    rewards: Rewards
    engine: Any  # align.rollouts engine
    device: str
    trainable: torch.nn.Module | None = None  # PolicyAndValue, wrapped by accelerate when several processes run
    accelerator: Any = None  # the accelerate.Accelerator that wrapped it; None in one plain process


def build_models(stage: PPOStage, name: str, policy, tokenizer, model_path: str, reward_path: str | None,
                 reward_fn, out_dir: Path, device: str) -> Models:
    """Reference, LoRA, value model and rollout engine around the loaded starting `policy`."""
    ref = None
    if stage.lora:
        policy = apply_lora(policy, stage.lora)  # reference = this model with the adapter disabled
    else:
        ref = frozen_copy(policy)
    if stage.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    value_model, value_source = value_model_for(stage, name, model_path, reward_path, tokenizer, policy)
    if stage.lora and value_source != "shared":
        value_model = apply_lora(value_model, stage.lora, task_type="SEQ_CLS")
    value_model.to(device).train()
    for model in (policy, value_model):
        disable_dropout(model)
    if stage.engine == "vllm":
        engine = make_engine("vllm", vllm_model_folder(model_path, out_dir), tokenizer,
                             gpu_memory_utilization=stage.gpu_memory_utilization,
                             tensor_parallel_size=stage.tensor_parallel_size, sync_timeout=stage.sync_timeout,
                             max_model_len=stage.max_length, seed=stage.seed)
    else:
        engine = make_engine("hf", policy, tokenizer, batch_size=max(stage.rollout_batch_size, 1))
    rewards = Rewards(reward_path, reward_fn, device,
                      scorer=shared_scorer(stage, value_model, value_source, reward_path, device))
    return Models(policy, ref, value_model, value_source, tokenizer, rewards, engine, device,
                  trainable=PolicyAndValue(policy, value_model))


def make_optimizer(stage: PPOStage, models: Models, total_steps: int):
    """One AdamW over the trainable policy and value parameters, and its per-update schedule."""
    from transformers import get_scheduler

    updates_per_step = stage.ppo_epochs * math.ceil(stage.rollout_batch_size / (stage.batch_size * stage.grad_accum))
    params = [p for p in models.trainable.parameters() if p.requires_grad]  # the policy's, then the value model's
    # The fused kernel updates all tensors in one pass: 3-5x faster steps than the per-tensor loop on CPU.
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, eps=1e-5,
                                  fused=all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params))
    scheduler = get_scheduler(stage.lr_scheduler, optimizer,
                              num_warmup_steps=int(stage.warmup_ratio * total_steps * updates_per_step),
                              num_training_steps=total_steps * updates_per_step)
    return optimizer, scheduler


@dataclass
class Rollout:
    """One step's experience: B completions scored, with everything the PPO update reads."""

    batch: dict  # `align.sequences.pack`: input_ids (B, P + T), completion_mask and tokens (B, T), ...
    scores: torch.Tensor  # (B,) reward model + reward_fn
    penalized_scores: torch.Tensor  # (B,) minus missing_eos_penalty where the row never reached EOS
    finished: torch.Tensor  # (B,) bool, reached EOS
    old_logps: torch.Tensor  # (B, T) log π_old of each sampled token, 0 on padding
    ref_logps: torch.Tensor  # (B, T) log π_ref
    old_values: torch.Tensor  # (B, T) V(s_t) before each token
    kl: torch.Tensor  # (B, T) per-token KL estimate
    token_rewards: torch.Tensor  # (B, T) -β·kl, the score at the last token
    advantages: torch.Tensor  # (B, T) GAE, whitened when `whiten_advantages`
    returns: torch.Tensor  # (B, T) advantages (unwhitened) + values
    kl_coef: float  # the β these rewards used
    gen_seconds: float

    @property
    def mask(self) -> torch.Tensor:  # (B, T) 1 on real completion tokens
        return self.batch["completion_mask"]


class NonFiniteRewards(Exception):
    """A batch whose scores hold NaN or inf: the step is skipped."""

    def __init__(self, bad: int, total: int):
        super().__init__(f"{bad} of {total} rewards are NaN or infinite")
        self.bad = bad


def reuses_engine_logps(stage: PPOStage) -> bool:
    """The engine's log-probs are the raw model's; they are the policy's own only at temperature 1 on the
    live model. Otherwise (vLLM kernels, a temperature) one more forward pass computes them."""
    return stage.engine == "hf" and stage.temperature == 1.0


def old_logps_and_values(stage: PPOStage, models: Models, batch: dict, completions) -> tuple[torch.Tensor, ...]:
    """log π_old of the sampled tokens and V(s_t), both (B, T), from the models as they sampled."""
    if reuses_engine_logps(stage) and models.value_source != "shared":
        old_logps = right_pad([c.logps for c in completions], 0.0, batch["T"], dtype=torch.float32)[0]
        return old_logps.to(models.device), values_before_tokens(models.value_model, batch)
    # the policy's pass is needed anyway (shared values, vLLM kernels or a temperature)
    logits, old_values = logits_and_values(models.policy, models.value_model, batch, stage.temperature)
    return token_logps(logits, batch["tokens"]), old_values


def reference_logps(models: Models, batch: dict, temperature: float) -> torch.Tensor:
    """log π_ref of the sampled tokens: (B, T)."""
    if models.ref is None:
        with models.policy.disable_adapter():
            return token_logps(policy_logits(models.policy, batch, temperature), batch["tokens"])
    return token_logps(policy_logits(models.ref, batch, temperature), batch["tokens"])


def make_rollout(stage: PPOStage, models: Models, prompts: list, step: int, kl_coef: float,
                 seed_offset: int = 0) -> Rollout:
    """Sample one completion per prompt, score it, and compute log-probs, values, rewards and GAE.

    Raises NonFiniteRewards when a score is NaN or infinite (before any model pass)."""
    t0 = time.perf_counter()
    sampling = Sampling(max_new_tokens=stage.response_length, temperature=stage.temperature, top_p=stage.top_p,
                        top_k=stage.top_k, seed=stage.seed * 1_000_003 + step + seed_offset)
    groups = models.engine.generate(prompts, n=1, sampling=sampling, return_logps=reuses_engine_logps(stage))
    completions = [g[0] for g in groups]
    gen_seconds = time.perf_counter() - t0
    scores = models.rewards.score(prompts, [c.text for c in completions])  # (B,)
    # Several processes skip a batch together (else one would wait forever in the other's update).
    bad = int(distributed.all_sum(torch.tensor([(~torch.isfinite(scores)).sum().item()])).item())
    if bad:
        raise NonFiniteRewards(bad, len(scores) * distributed.world_size())

    batch = pack(completions, models.tokenizer.pad_token_id, models.device)
    mask = batch["completion_mask"]  # (B, T)
    finished = torch.tensor([c.finished for c in completions])
    with torch.no_grad():
        models.policy.eval()
        models.value_model.eval()
        old_logps, old_values = old_logps_and_values(stage, models, batch, completions)
        ref_logps = reference_logps(models, batch, stage.temperature)
        old_logps, ref_logps, old_values = old_logps * mask, ref_logps * mask, old_values * mask
        token_rewards, kl, penalized = ppo_rewards(scores.to(models.device), old_logps, ref_logps, mask,
                                                   finished.to(models.device), kl_coef, stage.kl_estimator,
                                                   stage.missing_eos_penalty)
        advantages, returns = gae(token_rewards, old_values, mask, stage.gamma, stage.lam)
        if stage.whiten_advantages:
            advantages = masked_whiten(advantages, mask, sum_over=distributed.all_sum)  # over every rank's tokens
    return Rollout(batch=batch, scores=scores, penalized_scores=penalized.cpu(), finished=finished,
                   old_logps=old_logps, ref_logps=ref_logps, old_values=old_values, kl=kl,
                   token_rewards=token_rewards, advantages=advantages, returns=returns, kl_coef=kl_coef,
                   gen_seconds=gen_seconds)


def policy_terms(stage: PPOStage, logits: torch.Tensor, mb: dict, old: dict, log_entropy: bool):
    """The policy's part of the PPO loss (clipped surrogate - entropy_coef × entropy) and its stats."""
    m = mb["completion_mask"]
    logps = token_logps(logits, mb["tokens"])
    loss, pg_stats = ppo_policy_loss(logps, old["old_logps"], old["advantages"], m, stage.clip_eps)
    stats = {"policy_loss": loss.item(), **{k: v.item() for k, v in pg_stats.items()}}
    entropy = None
    if stage.entropy_coef:
        entropy = masked_mean(entropy_from_logits(logits), m)
        loss = loss - stage.entropy_coef * entropy
    if log_entropy:
        with torch.no_grad():
            stats["entropy"] = (entropy if entropy is not None else masked_mean(entropy_from_logits(logits), m)).item()
    return loss, stats


def value_terms(stage: PPOStage, values: torch.Tensor, mb: dict, old: dict):
    """The value model's part of the PPO loss (vf_coef × clipped value loss) and its stats."""
    vf_loss, vf_stats = ppo_value_loss(values, old["old_values"], old["returns"], mb["completion_mask"],
                                       stage.value_clip_eps)
    return stage.vf_coef * vf_loss, {"value_loss": vf_loss.item(), **{k: v.item() for k, v in vf_stats.items()}}


def minibatch_loss(stage: PPOStage, models: Models, mb: dict, old: dict, log_entropy: bool):
    """PPO loss of one micro-batch (`rows_of`) and its stats as floats."""
    logits, values = models.trainable(mb, stage.temperature)  # through DDP/FSDP when several processes run
    pg_loss, pg_stats = policy_terms(stage, logits, mb, old, log_entropy)
    vf_loss, vf_stats = value_terms(stage, values, mb, old)
    return pg_loss + vf_loss, {**pg_stats, **vf_stats}


def minibatch_backward(stage: PPOStage, models: Models, mb: dict, old: dict, log_entropy: bool,
                       weight: torch.Tensor) -> dict:
    """Forward and backward of `weight` × the PPO loss of one micro-batch; returns its stats.

    The loss is a policy term that only the policy's weights reach plus a value term that only the value
    model's reach, so in one plain process each model runs its forward and backward in turn: the same
    gradients, with one model's activations held at a time instead of both (half the activation memory).
    Under DDP/FSDP (one wrapped module, one backward per forward) and with a shared trunk, one pass."""
    if models.accelerator is not None or isinstance(models.value_model, SharedValueHead):
        loss, stats = minibatch_loss(stage, models, mb, old, log_entropy)
        backward(models, loss * weight)
        return stats
    pg_loss, pg_stats = policy_terms(stage, policy_logits(models.policy, mb, stage.temperature), mb, old,
                                     log_entropy)
    backward(models, pg_loss * weight)
    del pg_loss
    vf_loss, vf_stats = value_terms(stage, values_before_tokens(models.value_model, mb), mb, old)
    backward(models, vf_loss * weight)
    return {**pg_stats, **vf_stats}


def ppo_update(stage: PPOStage, models: Models, rollout: Rollout, optimizer, scheduler, step: int) -> dict:
    """`ppo_epochs` passes over shuffled mini-batches of `batch_size × grad_accum` rollouts, one optimizer
    step each. Returns the mean of each loss statistic (entropy from the first pass: the sampling policy)."""
    models.policy.train()
    models.value_model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_frac", "approx_kl",
                                                     "value_clip_frac", "entropy")}
    mask, mini, B = rollout.mask, stage.batch_size * stage.grad_accum, len(rollout.scores)
    per_token = {"old_logps": rollout.old_logps, "old_values": rollout.old_values, "advantages": rollout.advantages,
                 "returns": rollout.returns}
    gen = torch.Generator().manual_seed(stage.seed * 7919 + step)
    for ppo_epoch in range(stage.ppo_epochs):
        order = torch.randperm(B, generator=gen)
        for m0 in range(0, B, mini):
            optimizer.zero_grad(set_to_none=True)
            mb_idx = order[m0:m0 + mini]
            tokens_in_mb = mask[mb_idx.to(mask.device)].sum().clamp(min=1)
            for u0 in range(0, len(mb_idx), stage.batch_size):
                mb, old = rows_of(rollout.batch, mb_idx[u0:u0 + stage.batch_size].to(mask.device), per_token)
                # Micro-batches weigh by their share of the mini-batch's tokens.
                mb_stats = minibatch_backward(stage, models, mb, old, ppo_epoch == 0,
                                              mb["completion_mask"].sum() / tokens_in_mb)
                for k, v in mb_stats.items():
                    stats[k].append(v)
            if models.accelerator is not None:
                models.accelerator.clip_grad_norm_(params, stage.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm)
            optimizer.step()
            scheduler.step()
    out = {k: statistics.fmean(v) for k, v in stats.items() if v}
    if stage.engine == "vllm":
        models.engine.load_weights(models.policy)
        out["sync_seconds"] = round(models.engine.last_sync_seconds, 4)  # merge + weight transfer into vLLM
    return out


def backward(models: Models, loss: torch.Tensor) -> None:
    if models.accelerator is not None:
        models.accelerator.backward(loss)  # DDP averages the gradients over ranks
    else:
        loss.backward()


def step_record(step: int, rollout: Rollout, stats: dict, kl_coef: float, lr: float, t0: float, t_train: float) -> dict:
    """The log.jsonl record of one trained step (1-based `step`); `kl_coef` is β after this step's update.

    Several processes: rewards, KL, EOS rate and lengths are over every rank's rollouts (sums all-reduced,
    then divided), tokens/s counts every rank's tokens, the loss statistics and explained variance are the
    mean of the ranks' (each rank runs the same number of micro-batches); peak memory is rank 0's (each
    rank's peak goes to the manifest)."""
    now = time.perf_counter()
    mask = rollout.mask
    kl_rows = rollout.kl.sum(1).cpu()
    local = torch.tensor([len(rollout.scores), mask.sum().item(), rollout.scores.sum().item(),
                          rollout.penalized_scores.sum().item(), kl_rows.sum().item(),
                          (-rollout.kl_coef * kl_rows).sum().item(), rollout.finished.float().sum().item(),
                          explained_variance(rollout.old_values, rollout.returns, mask).item(),
                          *stats.values()], dtype=torch.float64)
    total = distributed.all_sum(local)
    n, n_tokens, world = total[0].item(), total[1].item(), distributed.world_size()
    record = {
        "step": step,
        "reward": total[2].item() / n,
        "reward_penalized": total[3].item() / n,
        "kl": total[4].item() / n,
        "kl_coef": kl_coef,
        "non_score_reward": total[5].item() / n,
        **{k: v.item() / world for k, v in zip(stats, total[8:])},
        "explained_variance": total[7].item() / world,
        "eos_rate": total[6].item() / n,
        "response_length": n_tokens / n,
        "lr": lr,
        "gen_seconds": round(rollout.gen_seconds, 4),
        "train_seconds": round(now - t_train, 4),
        "step_seconds": round(now - t0, 4),
        "tokens_per_s": round(n_tokens / (now - t0), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if torch.cuda.is_available():
        record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return record


def due(step: int, every: int, last: int) -> bool:
    """Whether 1-based `step` closes a period of `every` steps. The last step always does; with every <= 0,
    only the last."""
    return step == last or (every > 0 and step % every == 0)


def window_mean(records: list[dict]) -> dict:
    """One record for several steps: the mean of each value; step, lr and kl_coef the last; peak memory the max."""
    out = {}
    for key in dict.fromkeys(k for r in records for k in r):
        values = [r[key] for r in records if key in r]
        out[key] = values[-1] if key in ("step", "lr", "kl_coef") else max(values) if key.startswith("peak_") \
            else statistics.fmean(values)
    return out


class StepRecords:
    """log.jsonl and, with `report_to: tensorboard`, the same scalars under `<stage dir>/tensorboard`.

    One record per `logging_steps` PPO steps: `window_mean` of the steps since the last record, stamped
    with the last of them. Step 1 (like TRL's logging_first_step), the last step and every evaluation step
    always write one (so `eval_reward` is logged at the step it was measured). A skipped batch is written
    at once, as its own record. `window` holds the steps not yet written; a checkpoint saves it, so a
    resumed run writes the same records as one that was never killed."""

    def __init__(self, out_dir: Path, stage: PPOStage, start_step: int, window: list[dict]):
        self.step_log = StepLog(out_dir / "log.jsonl")
        if start_step:
            self.step_log.truncate_after(start_step)
        self.every, self.window, self.writer = stage.logging_steps, list(window), None
        if stage.report_to == "tensorboard" and distributed.is_main():
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote past the checkpoint.
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def add(self, record: dict, last_step: int, force: bool = False) -> None:
        self.window.append(record)
        step = record["step"]
        if force or step == 1 or due(step, self.every, last_step):
            self.write(window_mean(self.window))
            self.window = []

    def write(self, record: dict) -> None:
        self.step_log.append(record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.window:
            self.write(window_mean(self.window))
            self.window = []
        if self.writer is not None:
            self.writer.close()

    def read(self) -> list[dict]:
        return self.step_log.read()


class Checkpoints:
    """`checkpoints/checkpoint-N/state.pt` + the done marker; the last `keep` are kept."""

    def __init__(self, out_dir: Path, keep: int):
        self.folder = out_dir / "checkpoints"
        self.keep = keep

    def save(self, step: int, state: dict) -> None:
        """Rank 0 writes (under DDP every rank holds the same weights and optimizer state)."""
        if not distributed.is_main():
            return
        ckpt = self.folder / f"checkpoint-{step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        tmp = ckpt / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(ckpt / "state.pt")
        write_text(ckpt / CHECKPOINT_OK, str(step))
        for old in complete_checkpoints(self.folder)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


@dataclass
class Progress:
    """What a checkpoint restores besides weights, optimizer, scheduler and RNG."""

    step: int = 0  # PPO steps done
    kl_coef: float = 0.05  # β, moved by the adaptive controller when kl_target is set
    skipped: int = 0  # batches skipped for NaN rewards


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, saved: dict, ckpt: Path, what: str) -> None:
    """Copy `saved` (a `trainable_state`) into `model`; its keys must be exactly the model's trainable ones."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
    if missing or unexpected:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise AlignError(f"{ckpt}: the saved {what} weights do not fit this stage's model ({first}; {len(missing)} "
                         f"missing, {len(unexpected)} unexpected): was the recipe changed (lora, value_model) "
                         "since the checkpoint?")
    with torch.no_grad():
        for n, p in params.items():
            if saved[n].shape != p.shape:
                raise AlignError(f"{ckpt}: saved {what} weight {n!r} has shape {tuple(saved[n].shape)}, the model "
                                 f"{tuple(p.shape)}")
            p.copy_(saved[n])


def save_checkpoint(checkpoints: Checkpoints, models: Models, optimizer, scheduler, progress: Progress,
                    log_window: list[dict]) -> None:
    checkpoints.save(progress.step, {
        "policy": trainable_state(models.policy), "value": trainable_state(models.value_model),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
        "kl_coef": progress.kl_coef, "step": progress.step, "skipped": progress.skipped, "log_window": log_window})


def load_checkpoint(ckpt: Path, models: Models, optimizer, scheduler) -> tuple[Progress, list[dict]]:
    """Restore a checkpoint into the models, optimizer and scheduler; returns the progress and unwritten log window."""
    state = torch.load(ckpt / "state.pt", weights_only=False)
    load_trainable(models.policy, state["policy"], ckpt, "policy")
    load_trainable(models.value_model, state["value"], ckpt, "value model")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return Progress(state["step"], state["kl_coef"], state["skipped"]), state.get("log_window", [])


def resume(stage: PPOStage, name: str, out_dir: Path, models: Models, optimizer,
           scheduler) -> tuple[Progress, list[dict]]:
    """The newest complete checkpoint restored (progress, unwritten log window), or a fresh start."""
    ckpt = distributed.decide(lambda: resume_point(out_dir))  # rank 0 chooses; every rank loads the same one
    if ckpt is None:
        return Progress(kl_coef=stage.kl_coef), []
    progress, window = load_checkpoint(ckpt, models, optimizer, scheduler)
    log.info("%s: resuming from %s (step %d)", name, ckpt, progress.step)
    if stage.engine == "vllm":
        models.engine.load_weights(models.policy)
    return progress, window


def skip_batch(name: str, step: int, error: NonFiniteRewards, progress: Progress, records: StepRecords,
               nan_streak: int) -> int:
    """Log a batch skipped for NaN rewards; the stage fails after MAX_NAN_STEPS in a row. Returns the streak."""
    progress.skipped, nan_streak = progress.skipped + 1, nan_streak + 1
    log.warning("%s: step %d skipped: %s", name, step, error)
    records.write({"step": step, "skipped": True, "nan_rewards": error.bad})
    if nan_streak >= MAX_NAN_STEPS:
        raise AlignError(f"{name}: rewards were NaN in {MAX_NAN_STEPS} batches in a row; check the reward "
                         "model and reward_fn")
    return nan_streak


def run(stage: PPOStage, name: str, out_dir: Path, model_path: str, reward_path: str | None = None) -> dict:
    timer = Timer()
    # Several ranks: an Accelerator wraps policy + value (DDP, FSDP2); what they need of the recipe (a
    # rollout_batch_size they divide, no DeepSpeed) was checked before any stage ran (align.stages.checks).
    accelerator = distributed.accelerator() if distributed.world_size() > 1 else None
    device = str(accelerator.device) if accelerator else "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(stage.seed)
    tokenizer = load_tokenizer(model_path)
    reward_fn = load_reward_fn(stage.reward_fn, name) if stage.reward_fn else None
    train_rows, held_rows, too_long = prompt_rows(stage, name, tokenizer, out_dir)
    train = [r["prompt"] for r in train_rows]
    log.info("%s: %d training prompts, %d held out", name, len(train), len(held_rows))
    policy = load_model(model_path, quantization=stage.quantization,
                        gradient_checkpointing=stage.gradient_checkpointing).to(device)
    report = BeforeAfter(stage, name, held_rows, out_dir, reward_path, start_path=model_path)  # reward model alone
    report.before(policy, tokenizer)
    models = build_models(stage, name, policy, tokenizer, model_path, reward_path, reward_fn, out_dir, device)
    report.scorer = models.rewards.scorer
    total_steps = stage.max_steps if stage.max_steps > 0 else \
        max(1, math.ceil(stage.epochs * len(train) / stage.rollout_batch_size))
    optimizer, scheduler = make_optimizer(stage, models, total_steps)
    if accelerator is not None:  # DDP (or FSDP2) around policy + value; the scheduler stays on the raw optimizer
        models.trainable, optimizer = accelerator.prepare(models.trainable, optimizer)
        models.accelerator = accelerator
    progress, window = resume(stage, name, out_dir, models, optimizer, scheduler)
    start_step = progress.step
    records = StepRecords(out_dir, stage, start_step, window)
    after_texts = train_loop(stage, name, out_dir, models, report, train, total_steps, optimizer, scheduler,
                             progress, records)
    records.close()
    state_dict = None
    if accelerator is not None:  # FSDP: the sharded weights gathered (all ranks take part), the policy's kept
        full = gathered_state_dict(accelerator, models.trainable)
        state_dict = {k[len("policy."):]: v for k, v in full.items() if k.startswith("policy.")} if full else None
    save_model(models.policy, tokenizer, out_dir / "model", stage.merge_lora, state_dict=state_dict)
    metrics = summarize(distributed.decide(records.read), start_step)
    metrics.update(report.after(models.policy, tokenizer, answers=after_texts))  # None: the last step was skipped
    metrics.update(steps=total_steps, skipped_steps=progress.skipped, resumed_from_step=start_step or None,
                   train_prompts=len(train), eval_prompts=len(report.prompts), prompts_too_long=too_long,
                   value_model_from=models.value_source, kl_coef_final=progress.kl_coef,
                   peak_rss_mb=round(peak_rss_mb(), 1), seconds=round(timer.seconds(), 1))
    return metrics


def train_loop(stage: PPOStage, name: str, out_dir: Path, models: Models, report: BeforeAfter, train: list,
               total_steps: int, optimizer, scheduler, progress: Progress, records: StepRecords) -> list | None:
    """PPO steps from `progress.step` to `total_steps`; returns the last evaluation's greedy answers."""
    checkpoints = Checkpoints(out_dir, stage.save_total_limit)
    nan_streak, after_texts, world = 0, None, distributed.world_size()
    share = stage.rollout_batch_size // world  # prompts per rank and step
    bar = progress_bar(f"{name}: PPO steps", total_steps, initial=progress.step)
    for step in range(progress.step, total_steps):
        t0 = time.perf_counter()
        # Each rank takes its contiguous block of the step's prompts.
        prompts = distributed.shard(prompts_for_step(train, step, stage.rollout_batch_size, stage.seed))
        try:
            rollout = make_rollout(stage, models, prompts, step, progress.kl_coef,
                                   seed_offset=distributed.rank() * share)
        except NonFiniteRewards as e:
            nan_streak = skip_batch(name, step + 1, e, progress, records, nan_streak)
            continue
        nan_streak, t_train = 0, time.perf_counter()
        stats = ppo_update(stage, models, rollout, optimizer, scheduler, step)
        if stage.kl_target:  # the controller sees the mean KL over every rank's samples
            kl_sum = distributed.all_sum(rollout.kl.sum(1).sum().detach().cpu().double()).item()
            progress.kl_coef = adaptive_kl_coef(progress.kl_coef, kl_sum / (len(rollout.scores) * world),
                                                stage.kl_target, len(rollout.scores) * world, stage.kl_horizon)
        progress.step = step + 1
        record = step_record(step + 1, rollout, stats, progress.kl_coef, scheduler.get_last_lr()[0], t0, t_train)
        evaluate = report.active and due(step + 1, stage.eval_steps, total_steps)
        if evaluate:
            scores, after_texts = report.held_out_rewards(models.policy, models.tokenizer)
            record["eval_reward"] = scores["eval_reward"]
        records.add(record, total_steps, force=evaluate)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}",
                        tokens_per_s=f"{record['tokens_per_s']:.0f}")
        if progress.step % stage.save_steps == 0 and progress.step < total_steps:
            save_checkpoint(checkpoints, models, optimizer, scheduler, progress, records.window)
    bar.close()
    return after_texts


def summarize(rows: list[dict], start_step: int) -> dict:
    """Final numbers from the step log: first and last rewards (means over 5 records), KL, timings."""
    done = [r for r in rows if not r.get("skipped")]
    if not done:
        return {}
    head, tail = done[:5], done[-5:]
    this_run = [r for r in done if r["step"] > start_step][1:] or done  # the first step of a run warms up
    out = {
        "train_reward_first": statistics.fmean(r["reward"] for r in head),
        "train_reward_last": statistics.fmean(r["reward"] for r in tail),
        "kl_last": statistics.fmean(r["kl"] for r in tail),
        "eos_rate_last": statistics.fmean(r["eos_rate"] for r in tail),
        "seconds_per_step": statistics.median(r["step_seconds"] for r in this_run),
        "gen_seconds_per_step": statistics.median(r["gen_seconds"] for r in this_run),
        "train_seconds_per_step": statistics.median(r["train_seconds"] for r in this_run),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in this_run),
    }
    return {k: round(v, 5) for k, v in out.items()}
