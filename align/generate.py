"""Greedy completions for evaluation and the demo: batched, left-padded, KV-cached, stopped at EOS."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[str | list[dict]], max_new_tokens: int = 64,
                       batch_size: int = 8) -> list[str]:
    """One greedy completion per prompt (a string is a single user turn), rendered with the chat template."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end aligned
    out: list[str] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=f"greedy completions ({len(prompts)} prompts)", disable=len(starts) < 2):
            chats = [[{"role": "user", "content": p}] if isinstance(p, str) else p
                     for p in prompts[start:start + batch_size]]
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            new = ids[:, enc["input_ids"].shape[1]:]  # (B, T_new)
            out += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
