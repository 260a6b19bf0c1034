"""Reward models to train: a sequence classifier built on a causal LM, and preference pairs tokenized for it.

The `reward` stage (`align/stages/reward.py`) trains with these over TRL's `RewardTrainer`.
"""

from __future__ import annotations

import copy

import torch

from align.data import apply_too_long
from align.errors import AlignError
from align.models import adapter_base, load_model, use_bf16
from reward.score import encode


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
    """Pairs as `{"chosen_ids", "rejected_ids"[, "margin"]}`; over-long pairs follow `too_long` (truncate keeps
    the last max_length tokens: the end of the response is what the score is read from)."""
    encoded = [(encode(tokenizer, p["prompt"], p["chosen"]), encode(tokenizer, p["prompt"], p["rejected"]), p)
               for p in pairs]
    kept, too_long = apply_too_long(encoded, [max(len(c), len(r)) for c, r, _ in encoded], max_length, policy, what,
                                    truncated="cut to their last max_length tokens", noun="pairs")
    rows = []
    for chosen, rejected, pair in kept:
        row = {"chosen_ids": chosen[-max_length:], "rejected_ids": rejected[-max_length:]}
        if "margin" in pair:
            row["margin"] = pair["margin"]
        rows.append(row)
    if len({("margin" in r) for r in rows}) > 1:
        raise AlignError(f"{what}: some rows have a 'margin' and some do not; give it on every row or none")
    return rows, too_long
