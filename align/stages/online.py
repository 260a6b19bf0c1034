"""What the online stages (PPO, GRPO, RLOO) share: their prompts and the optional Python reward function."""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
from pathlib import Path

from align.data import apply_too_long, as_turns, load_split
from align.errors import AlignError

log = logging.getLogger("align")


def load_reward_fn(spec: str, name: str, key: str | None = None):
    """`module:function` -> the function; any problem is one line naming the key (`stages.<name>.reward_fn`)."""
    key = key or f"stages.{name}.reward_fn"
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AlignError(f"{key}: expected module:function, such as my_rewards:brevity; got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `align run` from a folder holding the module finds it, as `python -m` would
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise AlignError(f"{key}: cannot import module '{module_name}' ({e}); expected a module on the Python path "
                         "or in the current folder") from None
    except Exception as e:  # the module's own code failed
        raise AlignError(f"{key}: importing '{module_name}' failed: {e.__class__.__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(attr, names, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise AlignError(f"{key}: module '{module_name}' has no function '{attr}'{hint}; expected "
                         "function(prompts, completions) -> list[float]")
    fn = getattr(module, attr)
    if not callable(fn):
        raise AlignError(f"{key}: '{spec}' is a {type(fn).__name__}, not a function; expected "
                         "function(prompts, completions) -> list[float]")
    return fn


def prompt_rows(stage, name: str, tokenizer, out_dir: Path | None = None) -> tuple[list[dict], list[dict], int]:
    """Training and held-out `{"prompt": messages}` rows, `too_long` applied to both; the count is of training rows."""
    train, held = load_split(stage, "prompts", lambda row: {"prompt": as_turns(row["prompt"], "user")},
                             out_dir)
    limit = stage.max_length - stage.response_length
    if limit < 1:
        raise AlignError(f"stages.{name}.response_length: {stage.response_length} leaves no room for the prompt in "
                         f"max_length={stage.max_length}")

    def length(messages) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"])

    def fit(rows: list[dict], what: str) -> tuple[list[dict], int]:
        lengths = [length(r["prompt"]) for r in rows]
        kept, n_over = apply_too_long(list(zip(rows, lengths)), lengths, limit, stage.too_long, what,
                                      truncated="cut from the left", noun="prompts",
                                      limit_name="max_length - response_length", required=False)
        out = [{"prompt": keep_end(r["prompt"], tokenizer, limit, length) if n > limit else r["prompt"]}
               for r, n in kept]
        return [r for r in out if r["prompt"] is not None], n_over

    train, too_long = fit(train, f"{name}: {stage.data}")
    if held:
        held, _ = fit(held, f"{name}: {stage.eval_data or stage.data} (held out)")
    if not train:
        raise AlignError(f"{name}: {stage.data}: no prompts to train on ({too_long} longer than max_length - "
                         f"response_length); no training prompts left of at most {limit} tokens, expected at least "
                         "one (or lower eval_fraction)")
    return train, held, too_long


def keep_end(messages: list[dict], tokenizer, limit: int, length) -> list[dict] | None:
    """The end of `messages` in at most `limit` tokens: the last turns that fit whole, plus the tail of the turn
    before them; None when not even the template's own tokens fit."""
    k = next((k for k in range(1, len(messages)) if length(messages[k:]) <= limit), len(messages))
    head, rest = messages[k - 1], messages[k:]  # rest fits whole (or is empty); keep what fits of head's end
    ids = tokenizer(head["content"], add_special_tokens=False)["input_ids"]

    def cut(drop: int) -> list[dict]:
        return [{**head, "content": tokenizer.decode(ids[drop:])}] + rest

    lo, hi = 0, len(ids)  # the fewest leading tokens of head to drop
    while lo < hi:
        mid = (lo + hi) // 2
        if length(cut(mid)) <= limit:
            hi = mid
        else:
            lo = mid + 1
    if lo < len(ids):
        return cut(lo)
    return rest if rest else None
