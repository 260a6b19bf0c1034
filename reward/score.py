"""Scoring (prompt, completion) pairs with a trained reward model.

`encode` is the one place a conversation becomes reward-model input: the reward stage
tokenizes its training pairs with it and `RewardScorer` tokenizes what it scores with
it, so a pair scores the same value the trainer saw. The chat template renders the
prompt turns and the assistant's completion closed by `<|im_end|>` (no EOS is appended
by hand). Conversations longer than `max_length` keep their last `max_length` tokens:
the end of the response is what the score is read from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from align.data import as_turns
from align.sequences import right_pad

SCORER_CONFIG = "align_reward.json"  # written next to the saved reward model


def encode(tokenizer, prompt, completion, max_length: int | None = None) -> list[int]:
    """Token ids of prompt (string or turns) followed by completion (string or assistant turns)."""
    messages = as_turns(prompt, "user") + as_turns(completion, "assistant")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    return ids[-max_length:] if max_length else ids


def load_reward_model(path: str, dtype=None):
    """A sequence-classification model with one output and `pad_token_id` set (unset, the last-token
    lookup picks the wrong position and accuracy falls to chance)."""
    from transformers import AutoModelForSequenceClassification

    from align.models import load_tokenizer

    tokenizer = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype or torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


class RewardScorer:
    """`RewardScorer(path).score(prompts, completions)` -> one float per pair, batched with padding."""

    def __init__(self, path: str | Path, device: str | None = None, max_length: int | None = None):
        self.path = str(path)
        self.model, self.tokenizer = load_reward_model(self.path)
        config = Path(self.path) / SCORER_CONFIG
        saved = json.loads(config.read_text()) if config.exists() else {}
        self.max_length = max_length or saved.get("max_length")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()

    @torch.no_grad()
    def score(self, prompts: list, completions: list, batch_size: int = 16) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        ids = [encode(self.tokenizer, p, c, self.max_length) for p, c in zip(prompts, completions)]
        return self.score_ids(ids, batch_size)

    @torch.no_grad()
    def score_ids(self, ids: list[list[int]], batch_size: int = 16) -> list[float]:
        pad = self.tokenizer.pad_token_id
        scores: list[float] = []
        for start in range(0, len(ids), batch_size):
            # Right padding: the model reads each row's score at its last non-pad token.
            input_ids, attention_mask = right_pad(ids[start:start + batch_size], pad)  # (B, T)
            logits = self.model(input_ids=input_ids.to(self.device),
                                attention_mask=attention_mask.to(self.device)).logits  # (B, 1)
            scores += logits[:, 0].float().cpu().tolist()
        return scores
