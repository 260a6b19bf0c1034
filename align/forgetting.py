"""Forgetting: how much worse a trained policy models general text than the model it started from.

`forgetting_data: FILE` on a policy stage (and `align eval --forgetting-data FILE`) measures the
perplexity, exp(mean per-token negative log-likelihood), of the file's texts under the starting
model and under the trained one. Fine-tuning that overwrites what the model knew shows up as a
rising perplexity on text that has nothing to do with the task (a preference stage optimised too
hard shows it too). The file: `.txt` (paragraphs separated by blank lines) or JSONL/JSON rows with a
`"text"` field. Each text is cut at `max_length` tokens; a text is scored as plain text, with no
chat template, so the number measures language modelling, not the chat format.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from align.errors import AlignError

MAX_TEXTS = 256


def read_texts(path: str, key: str = "forgetting_data") -> list[str]:
    """The texts of a forgetting file; one line naming the file and what was expected on any problem."""
    p = Path(path)
    if not p.is_file():
        raise AlignError(f"{key}: {path}: no such file; expected a .txt file or JSONL rows with a 'text' field")
    if p.suffix == ".txt":
        texts = [block.strip() for block in p.read_text(encoding="utf-8").split("\n\n") if block.strip()]
    else:
        texts = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise AlignError(f"{path}:{n}: not valid JSON; expected {{\"text\": ...}}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
                raise AlignError(f"{path}:{n}: expected a non-empty string field 'text'")
            texts.append(row["text"])
    if not texts:
        raise AlignError(f"{key}: {path}: holds no text")
    return texts[:MAX_TEXTS]


def perplexity(model, tokenizer, texts: list[str], max_length: int = 256, batch_size: int = 8) -> float:
    """exp of the mean negative log-likelihood per predicted token over all `texts` (each cut at
    `max_length` tokens; every token after the first is predicted)."""
    from align.sequences import continuation_nll

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll, count = continuation_nll(model, [(x[:1], x[1:]) for x in ids], pad, batch_size)
    return math.exp(nll / count) if count else float("nan")


def forgetting_report(start_path: str, trained_path: str, data: str, max_length: int) -> dict:
    """`forgetting_ppl_before` (the starting model) and `forgetting_ppl_after` (the trained one) on `data`."""
    from align.models import load_model, load_tokenizer

    texts = read_texts(data)
    out = {"forgetting_texts": len(texts)}
    for label, path in (("before", start_path), ("after", trained_path)):
        model = load_model(path)
        out[f"forgetting_ppl_{label}"] = perplexity(model, load_tokenizer(path), texts, max_length)
        del model
    return out
