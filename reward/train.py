"""Reward models to train: a sequence classifier built on a causal LM, and preference pairs tokenized for it.

The `reward` stage (`align/stages/reward.py`) trains with these over TRL's `RewardTrainer`.
"""

from __future__ import annotations

import copy
import logging

import torch

from align.errors import AlignError
from align.models import adapter_base, load_model, use_bf16
from reward.score import encode

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
