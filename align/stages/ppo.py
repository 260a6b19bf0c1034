"""PPO-based RLHF, our own (TRL dropped its PPOTrainer after 1.12.0).

One PPO step, top to bottom:

1. rollouts: `rollout_batch_size` prompts, one sampled completion each, from the rollout
   engine (`hf`: the live policy; `vllm`: a vLLM engine that gets the new weights after
   every step);
2. scores: the reward model scores each completion's TEXT (so a reward model with another
   tokenizer works), plus an optional `reward_fn`; a completion that never reached EOS
   loses `missing_eos_penalty`; a batch with a NaN score is skipped and logged;
3. per-token rewards: -β·KL(π || π_ref) at every token (k1 or k3 estimator), the score
   added at the last token; β fixed or adapted towards `kl_target`;
4. GAE(γ, λ) over the value model's per-token values, advantages whitened;
5. `ppo_epochs` passes over shuffled mini-batches: clipped policy loss + `vf_coef` × clipped
   value loss - `entropy_coef` × entropy, one optimizer over policy and value parameters.

Models: the policy (full or LoRA), a value model (a sequence-classification model whose
score head is read at every token; weights from the reward model, or from the policy), the
frozen reference (under LoRA, the policy with its adapter disabled: no second copy), and
the reward model. The math is `align.losses` (one copy, tested by hand).

What makes a step cheap: the rollout's log-probs come from generation itself when the
policy samples at temperature 1 on the HF engine (no second policy pass); the LM head
runs only over completion positions (`logits_to_keep`); rows stop at EOS and the batch is
trimmed to its longest completion.

Checkpoints (`save_steps`) hold the trainable weights, value model, optimizer, scheduler,
KL coefficient and step; a killed run resumes from the last complete one. Prompts and
sampling seeds are a function of the step, so a resumed run sees the same batches.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from align.artifacts import CHECKPOINT_OK, StepLog, Timer, complete_checkpoints, peak_rss_mb
from align.config import PPOStage
from align.data import unique_prompts
from align.errors import AlignError
from align.losses import (adaptive_kl_coef, entropy_from_logits, explained_variance, gae, kl_estimate,
                          masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss)
from align.models import apply_lora, load_model, load_tokenizer
from align.policy_eval import completions_before, reward_report
from align.rollouts import Sampling, make_engine
from align.stages.online import load_reward_fn, prompt_rows
from align.training import resume_point, save_model

log = logging.getLogger("align")

MAX_NAN_STEPS = 10  # consecutive skipped batches before the stage gives up


class Rewards:
    """Scores completion texts: the reward model (re-tokenizing with its own tokenizer) plus `reward_fn`."""

    def __init__(self, reward_path: str | None, reward_fn, device: str):
        from reward.score import RewardScorer

        self.scorer = RewardScorer(reward_path, device=device) if reward_path else None
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


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits of the distribution the completions were sampled from (greedy and T=1 read the raw ones)."""
    return logits / temperature if temperature not in (0.0, 1.0) else logits


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
    args = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    if isinstance(value_model, SharedValueHead):
        inner = _unwrapped(policy)
        hidden = getattr(inner, inner.base_model_prefix)(**args, use_cache=False).last_hidden_state[:, -(T + 1):]
        logits = inner.get_output_embeddings()(hidden)[:, :-1].float()
        return _tempered(logits, temperature), value_model.head(hidden).squeeze(-1).float()[:, :-1]
    logits = completion_logits(policy, **args, T=T, temperature=temperature)
    # V(s_t): the state before token t is position P-1+t, the T positions ending one before the last.
    return logits, per_token_values(value_model, **args, keep=T + 1)[:, :-1]


def completion_logits(policy, input_ids, attention_mask, position_ids, T: int, temperature: float) -> torch.Tensor:
    """Logits that predict the T completion tokens: (B, T, V). The LM head runs on T+1 positions only."""
    out = policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 logits_to_keep=T + 1, use_cache=False)
    return _tempered(out.logits[:, :-1].float(), temperature)


def token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(token) for each position: (B, T, V), (B, T) -> (B, T)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def pack(completions, pad_id: int, device) -> dict:
    """Left-padded prompts, right-padded completions: [pad..prompt][completion..pad], (B, P + T).

    position_ids count real tokens only, so a left-padded row sees the same positions as it
    would alone; completion positions are the last T columns."""
    P = max(len(c.prompt_ids) for c in completions)
    T = max(1, max(len(c.token_ids) for c in completions))
    B = len(completions)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + T), dtype=torch.long)
    completion_mask = torch.zeros((B, T))
    for i, c in enumerate(completions):
        input_ids[i, P - len(c.prompt_ids):P] = torch.tensor(c.prompt_ids)
        input_ids[i, P:P + len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
        attention_mask[i, P - len(c.prompt_ids):P + len(c.token_ids)] = 1
        completion_mask[i, :len(c.token_ids)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "position_ids": position_ids.to(device), "completion_mask": completion_mask.to(device),
            "tokens": input_ids[:, P:].to(device), "T": T,
            "prompt_lengths": torch.tensor([len(c.prompt_ids) for c in completions]), "P": P}


def rows_of(batch: dict, idx: torch.Tensor, per_token: dict) -> tuple[dict, dict]:
    """The rows `idx` of a packed batch, cut to their own longest prompt and completion (columns that
    are padding in every chosen row change nothing but cost time), and the same rows of the per-token
    (B, T) tensors in `per_token`."""
    P = batch["P"]
    T = max(1, int(batch["completion_mask"][idx].sum(1).max()))
    left = P - int(batch["prompt_lengths"][idx.cpu()].max())
    mb = {k: batch[k][idx, left:P + T] for k in ("input_ids", "attention_mask", "position_ids")}
    mb.update(tokens=batch["tokens"][idx, :T], completion_mask=batch["completion_mask"][idx, :T], T=T)
    return mb, {k: v[idx, :T] for k, v in per_token.items()}


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


class Checkpoints:
    """`checkpoints/checkpoint-N/state.pt` + the done marker; the last `keep` are kept."""

    def __init__(self, out_dir: Path, keep: int):
        self.folder = out_dir / "checkpoints"
        self.keep = keep

    def save(self, step: int, state: dict) -> None:
        ckpt = self.folder / f"checkpoint-{step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        tmp = ckpt / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(ckpt / "state.pt")
        (ckpt / CHECKPOINT_OK).write_text(str(step))
        for old in complete_checkpoints(self.folder)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


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


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def run(stage: PPOStage, name: str, out_dir: Path, model_path: str, reward_path: str | None = None) -> dict:
    timer = Timer()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(stage.seed)
    tokenizer = load_tokenizer(model_path)
    reward_fn = load_reward_fn(stage.reward_fn, name) if stage.reward_fn else None
    train_rows, held_rows, too_long = prompt_rows(stage, name, tokenizer)
    train, held = [r["prompt"] for r in train_rows], [r["prompt"] for r in held_rows]
    log.info("%s: %d training prompts, %d held out", name, len(train), len(held))

    policy = load_model(model_path).to(device)
    eval_prompts = unique_prompts(held_rows, stage.eval_prompts)
    before_texts = None
    if reward_path and eval_prompts:
        before_texts = completions_before(policy, tokenizer, eval_prompts, out_dir, stage.max_new_tokens)
    ref = None
    if stage.lora:
        policy = apply_lora(policy, stage.lora)  # reference = this model with the adapter disabled
    else:
        ref = load_model(model_path).to(device).eval().requires_grad_(False)
    if stage.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    value_model, value_source = value_model_for(stage, name, model_path, reward_path, tokenizer, policy)
    if stage.lora and value_source != "shared":
        from peft import LoraConfig, get_peft_model

        value_model = get_peft_model(value_model, LoraConfig(
            r=stage.lora.r, lora_alpha=stage.lora.alpha, lora_dropout=stage.lora.dropout,
            target_modules=stage.lora.target_modules, task_type="SEQ_CLS"))
    value_model.to(device).train()
    for model in (policy, value_model):
        disable_dropout(model)
    rewards = Rewards(reward_path, reward_fn, device)

    total_steps = stage.max_steps if stage.max_steps > 0 else \
        max(1, math.ceil(stage.epochs * len(train) / stage.rollout_batch_size))
    mini = stage.batch_size * stage.grad_accum
    updates_per_step = stage.ppo_epochs * math.ceil(stage.rollout_batch_size / mini)
    params = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
    # The fused kernel updates all tensors in one pass: 3-5x faster steps than the per-tensor loop on CPU.
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, eps=1e-5,
                                  fused=all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params))
    from transformers import get_scheduler

    scheduler = get_scheduler(stage.lr_scheduler, optimizer,
                              num_warmup_steps=int(stage.warmup_ratio * total_steps * updates_per_step),
                              num_training_steps=total_steps * updates_per_step)

    if stage.engine == "vllm":
        engine = make_engine("vllm", vllm_model_folder(model_path, out_dir), tokenizer, gpu_memory_utilization=stage.gpu_memory_utilization,
                             tensor_parallel_size=stage.tensor_parallel_size, sync_timeout=stage.sync_timeout,
                             max_model_len=stage.max_length, seed=stage.seed)
    else:
        engine = make_engine("hf", policy, tokenizer, batch_size=max(stage.rollout_batch_size, 1))

    step_log = StepLog(out_dir / "log.jsonl")
    checkpoints = Checkpoints(out_dir, stage.save_total_limit)
    kl_coef, start_step, skipped = stage.kl_coef, 0, 0
    ckpt = resume_point(out_dir)
    if ckpt is not None:
        state = torch.load(ckpt / "state.pt", weights_only=False)
        policy.load_state_dict(state["policy"], strict=False)
        value_model.load_state_dict(state["value"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        kl_coef, start_step, skipped = state["kl_coef"], state["step"], state["skipped"]
        step_log.truncate_after(start_step)
        log.info("%s: resuming from %s (step %d)", name, ckpt, start_step)
        if stage.engine == "vllm":
            engine.load_weights(policy)

    sampling = Sampling(max_new_tokens=stage.response_length, temperature=stage.temperature, top_p=stage.top_p,
                        top_k=stage.top_k)
    # The engine's log-probs are the raw model's; they are the policy's own only at temperature 1 on the
    # live model. Otherwise (vLLM kernels, a temperature) one more forward pass computes them.
    reuse_logps = stage.engine == "hf" and stage.temperature == 1.0
    nan_streak = 0
    bar = tqdm(range(start_step, total_steps), desc=f"{name}: PPO steps", unit="step", initial=start_step,
               total=total_steps)
    for step in bar:
        t0 = time.perf_counter()
        prompts = prompts_for_step(train, step, stage.rollout_batch_size, stage.seed)
        sampling.seed = stage.seed * 1_000_003 + step
        groups = engine.generate(prompts, n=1, sampling=sampling, return_logps=reuse_logps)
        completions = [g[0] for g in groups]
        t_gen = time.perf_counter() - t0

        scores = rewards.score(prompts, [c.text for c in completions])  # (B,)
        if not torch.isfinite(scores).all():
            bad = int((~torch.isfinite(scores)).sum())
            skipped, nan_streak = skipped + 1, nan_streak + 1
            log.warning("%s: step %d skipped: %d of %d rewards are NaN or infinite", name, step + 1, bad, len(scores))
            step_log.append({"step": step + 1, "skipped": True, "nan_rewards": bad})
            if nan_streak >= MAX_NAN_STEPS:
                raise AlignError(f"{name}: rewards were NaN in {MAX_NAN_STEPS} batches in a row; check the reward "
                                 "model and reward_fn")
            continue
        nan_streak = 0
        finished = torch.tensor([c.finished for c in completions])
        raw_scores = scores.clone()
        scores = scores - stage.missing_eos_penalty * (~finished).float()

        batch = pack(completions, tokenizer.pad_token_id, device)
        T, mask = batch["T"], batch["completion_mask"]  # mask: (B, T)
        with torch.no_grad():
            policy.eval()
            value_model.eval()
            if reuse_logps and value_source != "shared":
                old_logps = torch.zeros_like(mask)
                for i, c in enumerate(completions):
                    old_logps[i, :len(c.logps)] = torch.tensor(c.logps)
                old_values = per_token_values(value_model, batch["input_ids"], batch["attention_mask"],
                                              batch["position_ids"], T + 1)[:, :-1]
            else:  # the policy's pass is needed anyway (shared values, vLLM kernels or a temperature)
                logits, old_values = logits_and_values(policy, value_model, batch, stage.temperature)
                old_logps = token_logps(logits, batch["tokens"])
                del logits
            if ref is None:
                with policy.disable_adapter():
                    ref_logits = completion_logits(policy, batch["input_ids"], batch["attention_mask"],
                                                   batch["position_ids"], T, stage.temperature)
            else:
                ref_logits = completion_logits(ref, batch["input_ids"], batch["attention_mask"],
                                               batch["position_ids"], T, stage.temperature)
            ref_logps = token_logps(ref_logits, batch["tokens"])
            del ref_logits
            old_logps, ref_logps, old_values = old_logps * mask, ref_logps * mask, old_values * mask

            kl = kl_estimate(old_logps, ref_logps, stage.kl_estimator) * mask  # (B, T)
            token_rewards = -kl_coef * kl
            last = (mask.sum(1).long() - 1).clamp(min=0)  # index of each row's last real token
            token_rewards[torch.arange(len(completions)), last] += scores.to(device)
            advantages, returns = gae(token_rewards, old_values, mask, stage.gamma, stage.lam)
            if stage.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
        policy.train()
        value_model.train()
        t_train = time.perf_counter()

        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_frac", "approx_kl",
                                                         "value_clip_frac", "entropy")}
        B = len(completions)
        per_token = {"old_logps": old_logps, "old_values": old_values, "advantages": advantages, "returns": returns}
        gen = torch.Generator().manual_seed(stage.seed * 7919 + step)
        for ppo_epoch in range(stage.ppo_epochs):
            order = torch.randperm(B, generator=gen)
            for m0 in range(0, B, mini):
                optimizer.zero_grad(set_to_none=True)
                mb_idx = order[m0:m0 + mini]
                tokens_in_mb = mask[mb_idx.to(device)].sum().clamp(min=1)
                for u0 in range(0, len(mb_idx), stage.batch_size):
                    mb, old = rows_of(batch, mb_idx[u0:u0 + stage.batch_size].to(device), per_token)
                    m = mb["completion_mask"]
                    logits, values = logits_and_values(policy, value_model, mb, stage.temperature)
                    logps = token_logps(logits, mb["tokens"])
                    pg_loss, pg_stats = ppo_policy_loss(logps, old["old_logps"], old["advantages"], m, stage.clip_eps)
                    vf_loss, vf_stats = ppo_value_loss(values, old["old_values"], old["returns"], m,
                                                       stage.value_clip_eps)
                    loss = pg_loss + stage.vf_coef * vf_loss
                    entropy = None
                    if stage.entropy_coef:
                        entropy = masked_mean(entropy_from_logits(logits), m)
                        loss = loss - stage.entropy_coef * entropy
                    # Micro-batches weigh by their share of the mini-batch's tokens.
                    (loss * m.sum() / tokens_in_mb).backward()
                    if ppo_epoch == 0:  # entropy is logged from the policy that sampled (one pass suffices)
                        with torch.no_grad():
                            entropy = entropy if entropy is not None else masked_mean(entropy_from_logits(logits), m)
                            stats["entropy"].append(entropy.item())
                    stats["policy_loss"].append(pg_loss.item())
                    stats["value_loss"].append(vf_loss.item())
                    for k, v in {**pg_stats, **vf_stats}.items():
                        stats[k].append(v.item())
                torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm)
                optimizer.step()
                scheduler.step()
        if stage.engine == "vllm":
            engine.load_weights(policy)

        seq_kl = (kl.sum(1)).mean().item()
        if stage.kl_target:
            kl_coef = adaptive_kl_coef(kl_coef, seq_kl, stage.kl_target, B, stage.kl_horizon)
        now = time.perf_counter()
        n_tokens = int(mask.sum().item())
        record = {
            "step": step + 1,
            "reward": raw_scores.mean().item(),
            "reward_penalized": scores.mean().item(),
            "kl": seq_kl,
            "kl_coef": kl_coef,
            "non_score_reward": (-kl_coef * kl).sum(1).mean().item(),
            **{k: statistics.fmean(v) for k, v in stats.items() if v},
            "explained_variance": explained_variance(old_values, returns, mask).item(),
            "eos_rate": finished.float().mean().item(),
            "response_length": n_tokens / B,
            "lr": scheduler.get_last_lr()[0],
            "gen_seconds": round(t_gen, 4),
            "train_seconds": round(now - t_train, 4),
            "step_seconds": round(now - t0, 4),
            "tokens_per_s": round(n_tokens / (now - t0), 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        if torch.cuda.is_available():
            record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        step_log.append(record)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{seq_kl:.3f}")
        if (step + 1) % stage.save_steps == 0 and step + 1 < total_steps:
            checkpoints.save(step + 1, {"policy": trainable_state(policy), "value": trainable_state(value_model),
                                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                        "rng": torch.get_rng_state(), "kl_coef": kl_coef, "step": step + 1,
                                        "skipped": skipped})
    bar.close()

    save_model(policy, tokenizer, out_dir / "model", stage.merge_lora)
    metrics = summarize(step_log.read(), start_step)
    if before_texts is not None:
        from align.generate import greedy_completions

        after_texts = greedy_completions(policy, tokenizer, eval_prompts, max_new_tokens=stage.max_new_tokens)
        metrics.update(reward_report(reward_path, eval_prompts, before_texts, after_texts, out_dir,
                                     scorer=rewards.scorer))
    metrics.update(steps=total_steps, skipped_steps=skipped, resumed_from_step=start_step or None,
                   train_prompts=len(train), eval_prompts=len(eval_prompts), prompts_too_long=too_long,
                   value_model_from=value_source, kl_coef_final=kl_coef, peak_rss_mb=round(peak_rss_mb(), 1),
                   seconds=round(timer.seconds(), 1))
    return metrics


def summarize(rows: list[dict], start_step: int) -> dict:
    """Final numbers from the step log: first and last rewards (means over 5 steps), KL, timings."""
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
