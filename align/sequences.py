"""Prompt + completion sequences as tensors: padding, packing, and the log-probs of completion tokens.

A packed batch is `[pad..prompt][completion..pad]`, (B, P + T): prompts left-padded to the
longest prompt P, so every completion starts at column P, and completions right-padded to the
longest completion T. `position_ids` count real tokens only, so a left-padded row sees the
positions it would see alone. The logits at column P - 1 + t predict completion token t: the
T logits that matter are columns P - 1 .. P + T - 2, which is why the LM head runs on the last
T + 1 positions (`logits_to_keep=T + 1`) and the very last one is dropped.

Core layer: imports only torch (PPO, evaluation and any later RL stage share these).
"""

from __future__ import annotations

import torch


def left_pad(rows: list[list], pad, length: int | None = None, dtype=torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows aligned on the right: ([pad.., row], mask), both (B, length); length defaults to the longest row."""
    return _pad(rows, pad, length, dtype, left=True)


def right_pad(rows: list[list], pad, length: int | None = None, dtype=torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows aligned on the left: ([row, pad..], mask), both (B, length); length defaults to the longest row."""
    return _pad(rows, pad, length, dtype, left=False)


def _pad(rows: list[list], pad, length: int | None, dtype, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    length = max((len(r) for r in rows), default=0) if length is None else length
    values = torch.full((len(rows), length), pad, dtype=dtype)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            cols = slice(length - len(r), length) if left else slice(0, len(r))
            values[i, cols] = torch.tensor(r, dtype=dtype)
            mask[i, cols] = 1
    return values, mask


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, .. over real tokens, 0 on left padding: (B, L) -> (B, L)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def pack(completions, pad_id: int, device) -> dict:
    """Left-padded prompts, right-padded completions: [pad..prompt][completion..pad], (B, P + T).

    `completions`: objects with `prompt_ids` and `token_ids` (rollout `Completion`s). Returns
    input_ids, attention_mask, position_ids (B, P + T); completion_mask (float) and tokens
    (B, T), the completion columns; prompt_lengths (B,) on the CPU; the ints P and T.
    T is at least 1, so a batch of empty completions still has one (fully masked) column."""
    P = max(len(c.prompt_ids) for c in completions)
    T = max(1, max(len(c.token_ids) for c in completions))
    prompt_ids, prompt_mask = left_pad([list(c.prompt_ids) for c in completions], pad_id, P)
    tokens, completion_mask = right_pad([list(c.token_ids) for c in completions], pad_id, T)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    return {"input_ids": torch.cat([prompt_ids, tokens], dim=1).to(device),
            "attention_mask": attention_mask.to(device),
            "position_ids": position_ids_of(attention_mask).to(device),
            "completion_mask": completion_mask.float().to(device), "tokens": tokens.to(device), "T": T,
            "prompt_lengths": prompt_mask.sum(1), "P": P}


def rows_of(batch: dict, idx: torch.Tensor, per_token: dict) -> tuple[dict, dict]:
    """The rows `idx` of a packed batch, cut to their own longest prompt and completion (columns that
    are padding in every chosen row change nothing but cost time), and the same rows of the per-token
    (B, T) tensors in `per_token`, cut to the same T'. Returns (input_ids, attention_mask,
    position_ids (b, P' + T'), tokens, completion_mask (b, T'), T'), {name: (b, T')}."""
    P = batch["P"]
    T = max(1, int(batch["completion_mask"][idx].sum(1).max()))
    left = P - int(batch["prompt_lengths"][idx.cpu()].max())
    mb = {k: batch[k][idx, left:P + T] for k in ("input_ids", "attention_mask", "position_ids")}
    mb.update(tokens=batch["tokens"][idx, :T], completion_mask=batch["completion_mask"][idx, :T], T=T)
    return mb, {k: v[idx, :T] for k, v in per_token.items()}


def last_token_index(completion_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real completion token, (B, T) -> (B,) long; 0 for an empty row.

    Right padding puts it at (number of real tokens) - 1: where a sequence-level score is paid."""
    return (completion_mask.sum(1).long() - 1).clamp(min=0)


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits of the distribution the completions were sampled from (greedy and T=1 read the raw ones)."""
    return logits / temperature if temperature not in (0.0, 1.0) else logits


def completion_logits(model, input_ids, attention_mask, position_ids, T: int, temperature: float = 1.0) -> torch.Tensor:
    """Logits that predict the T completion tokens of a packed batch: (B, P + T) -> (B, T, V), float32.

    The LM head runs on the last T + 1 positions only; of those, the last predicts past the end."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=T + 1, use_cache=False)
    return tempered(out.logits[:, :-1].float(), temperature)


def token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(token) at each position: logits (B, T, V), tokens (B, T) -> (B, T)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def continuation_nll(model, rows: list[tuple[list[int], list[int]]], pad_id: int,
                     batch_size: int = 8) -> tuple[float, int]:
    """(summed negative log-likelihood, token count) of each row's `target` ids given its `context` ids:
    `rows` are (context, target) pairs, the context at least one token long; right-padded batches. Used for
    general-text perplexity (context: the first token) and for a reference model's NLL of answers (context:
    the rendered prompt). The model's train/eval mode is restored afterwards."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    rows = [(c, t) for c, t in rows if c and t]
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        ids, mask = right_pad([c + t for c, t in chunk], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        token = logps.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        for r, (context, target) in enumerate(chunk):  # target token j is predicted at position len(context)-1+j
            total -= token[r, len(context) - 1:len(context) - 1 + len(target)].sum().item()
            count += len(target)
    model.train(was_training)
    return total, count
