"""Turn a rollouts, pairs or preference file into pairs to label, checking every row first.

Accepted rows (JSONL, JSON, Parquet, CSV or a save_to_disk folder, read by align.data):

- rollouts: `{"prompt": ..., "completions": [...], "rewards": [...], "model": ...}`, the
  format `align rollouts` writes. Every two different completions of a prompt make a pair
  (capped by `max_pairs_per_prompt`, a seeded sample, so N=16 does not become 120 pairs);
  their rewards and model go into the pair's metadata.
- pairs: `{"prompt": ..., "response_a": ..., "response_b": ..., "metadata": {...}}`; any
  other field (model_a, reward_b, ...) is kept in the metadata too.
- preference: `{"prompt": ..., "chosen": ..., "rejected": ...}`, to have people re-judge an
  existing set; the old verdict is kept in the metadata (`prior_choice`), never shown.

The prompt may be a string or a message list ending with a user turn; responses are
strings. Metadata is for the admin and the raw export; annotators never see it, so
model names and scores cannot sway a vote. A bad row stops the import before anything
is written, with the file, line, field and what was expected. Besides the formats, every
row is checked for what JSON can hold and the database cannot: half of a UTF-16 surrogate
pair (`"\ud800"`, which no UTF-8 text can hold) and nesting deeper than `MAX_DEPTH`
(`tests/test_label_import_fuzz.py` draws malformed files to keep it so).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from align.data import check_turn, read_rows
from align.errors import AlignError, where

from labeling_app.store import NewPair

FORMATS = ("auto", "rollouts", "pairs", "preference")
MAX_DEPTH = 100  # lists and objects inside each other; JSON allows any, Python's reader and writer stop near 1000
EXAMPLES = {
    "rollouts": "{'prompt': ..., 'completions': [...], 'rewards': [...], 'model': ...}",
    "pairs": "{'prompt': ..., 'response_a': ..., 'response_b': ..., 'metadata': {...}}",
    "preference": "{'prompt': ..., 'chosen': ..., 'rejected': ...}",
}


def read_pairs(source: str, fmt: str = "auto", max_pairs_per_prompt: int = 0, seed: int = 0) -> list[NewPair]:
    data = _read(source)
    if not data.rows:
        raise AlignError(f"{source}: file is empty; expected rows like {EXAMPLES['rollouts']} "
                         f"or {EXAMPLES['pairs']}")
    if fmt == "auto":
        fmt = detect(data.rows[0], data.at(0))
    rng = random.Random(seed)
    pairs: list[NewPair] = []
    for i, row in enumerate(data.rows):
        at = data.at(i)
        _check_values(row, at)
        if fmt == "rollouts":
            pairs.extend(_from_rollout(row, at, max_pairs_per_prompt, rng))
        elif fmt == "pairs":
            pairs.append(_from_pair(row, at))
        else:
            pairs.append(_from_preference(row, at))
    if not pairs:
        raise AlignError(f"{source}: no pairs to label; every rollout row has fewer than 2 different completions")
    return pairs


def _read(source: str):
    """`align.data.read_rows`, with what it lets through as a Python exception turned into one line: JSON nested
    too deeply for Python's reader (RecursionError; the line named for JSONL), and a folder that is not a
    save_to_disk dataset after all (datasets raises many types)."""
    try:
        return read_rows(source)
    except RecursionError:
        raise AlignError(f"{_deep_line(source)}: JSON nested too deeply (more than {MAX_DEPTH} lists or objects "
                         "inside each other)") from None
    except AlignError:
        raise
    except Exception as e:  # noqa: BLE001 -- only for a folder: datasets' and pyarrow's many error types
        if not Path(source).is_dir():
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        raise AlignError(f"{source}: cannot read the folder as a save_to_disk dataset ({e.__class__.__name__}: "
                         f"{first})") from None


def _deep_line(source: str) -> str:
    """`file, line N` for the first line of a JSONL file too deeply nested to read, else the file."""
    import json

    if Path(source).suffix.lower() in (".jsonl", ".ndjson"):
        with open(source, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, start=1):
                try:
                    json.loads(line)
                except RecursionError:
                    return where(source, n, line=True)
                except ValueError:
                    pass
    return str(source)


def _check_values(row: dict, at: str) -> None:
    """Every string is text UTF-8 can hold (no lone surrogate), and nothing is nested deeper than MAX_DEPTH."""
    stack = [(key, value, 1) for key, value in row.items()]
    while stack:
        name, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise AlignError(f"{at}: field '{name.split('[')[0].split('.')[0]}' is nested too deeply (more than "
                             f"{MAX_DEPTH} lists or objects inside each other)")
        if isinstance(value, str):
            bad = next((c for c in value if "\ud800" <= c <= "\udfff"), None)
            if bad is not None:
                raise AlignError(f"{at}: field '{name}' holds a lone UTF-16 surrogate ({ascii(bad)}): JSON escapes "
                                 "\\ud800-\\udfff come in pairs; not text")
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and any("\ud800" <= c <= "\udfff" for c in key):
                    raise AlignError(f"{at}: field '{name}' has a key holding a lone UTF-16 surrogate; not text")
                stack.append((f"{name}.{key}", item, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{name}[{j}]", item, depth + 1) for j, item in enumerate(value))


def detect(row: dict, at: str) -> str:
    if "completions" in row:
        return "rollouts"
    if "response_a" in row or "response_b" in row:
        return "pairs"
    if "chosen" in row or "rejected" in row:
        return "preference"
    raise AlignError(f"{at}: cannot tell the format; expected rollouts rows like {EXAMPLES['rollouts']} "
                     f"or pairs rows like {EXAMPLES['pairs']}; row has {sorted(row)}")


def _from_rollout(row: dict, at: str, cap: int, rng: random.Random) -> list[NewPair]:
    prompt = _prompt(row, at, "rollouts")
    completions = row.get("completions")
    if not isinstance(completions, list) or len(completions) < 2:
        raise AlignError(f"{at}: field 'completions': expected a list of at least 2 strings, got {_kind(completions)}")
    for j, text in enumerate(completions):
        if text != "" and not (isinstance(text, str) and not text.strip()):  # an empty answer is left out below
            _response(text, f"completions[{j}]", at)
    rewards = row.get("rewards")
    if rewards is not None and (not isinstance(rewards, list) or len(rewards) != len(completions)
                                or not all(_is_number(r) for r in rewards)):
        raise AlignError(f"{at}: field 'rewards': expected a list of {len(completions)} numbers "
                         f"(one per completion), got {_kind(rewards)}")
    model = row.get("model")
    if model is not None and not isinstance(model, str) and not (
            isinstance(model, list) and len(model) == len(completions) and all(isinstance(m, str) for m in model)):
        raise AlignError(f"{at}: field 'model': expected a string, or a list of {len(completions)} strings "
                         "(one per completion)")
    # First copy of each distinct completion: identical texts cannot be told apart. An empty completion
    # (a rollout that stopped at once) is nothing to judge, so it is left out rather than failing the file.
    distinct = {}
    for j, text in enumerate(completions):
        if text.strip():
            distinct.setdefault(text.strip(), j)
    combos = list(itertools.combinations(sorted(distinct.values()), 2))
    if cap and len(combos) > cap:
        combos = sorted(rng.sample(combos, cap))
    extra = {k: v for k, v in row.items() if k not in ("prompt", "completions", "rewards", "model")}
    pairs = []
    for i, j in combos:
        meta = {"source": "rollouts", "completion_a": i, "completion_b": j, **extra}
        if rewards is not None:
            meta["reward_a"], meta["reward_b"] = rewards[i], rewards[j]
        if isinstance(model, list):
            meta["model_a"], meta["model_b"] = model[i], model[j]
        elif model is not None:
            meta["model"] = model
        pairs.append(NewPair(prompt, completions[i], completions[j], meta))
    return pairs


def _from_pair(row: dict, at: str) -> NewPair:
    prompt = _prompt(row, at, "pairs")
    a = _response(row.get("response_a"), "response_a", at)
    b = _response(row.get("response_b"), "response_b", at)
    _different(a, b, "response_a", "response_b", at)
    meta = row.get("metadata", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise AlignError(f"{at}: field 'metadata': expected an object (model names, scores, ...), got {_kind(meta)}")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "response_a", "response_b", "metadata")}
    return NewPair(prompt, a, b, {**extra, **meta})


def _from_preference(row: dict, at: str) -> NewPair:
    prompt = _prompt(row, at, "preference")
    chosen = _response(row.get("chosen"), "chosen", at)
    rejected = _response(row.get("rejected"), "rejected", at)
    _different(chosen, rejected, "chosen", "rejected", at)
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    return NewPair(prompt, chosen, rejected, {"source": "preference", "prior_choice": "a", **extra})


def _prompt(row: dict, at: str, fmt: str):
    if row.get("prompt") is None:
        raise AlignError(f"{at}: missing field 'prompt'; expected rows like {EXAMPLES[fmt]}, row has {sorted(row)}")
    check_turn(row["prompt"], "prompt", at, last_role="user")
    if isinstance(row["prompt"], list):
        return [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
    return row["prompt"]


def _response(value, field: str, at: str) -> str:
    if value is None:
        raise AlignError(f"{at}: missing field '{field}'; expected non-empty text")
    if not isinstance(value, str):
        raise AlignError(f"{at}: field '{field}': expected a string, got {_kind(value)}")
    if not value.strip():
        raise AlignError(f"{at}: field '{field}' is empty; expected non-empty text")
    return value


def _different(a: str, b: str, field_a: str, field_b: str, at: str) -> None:
    if a.strip() == b.strip():
        raise AlignError(f"{at}: '{field_a}' and '{field_b}' are identical; a pair needs two different responses")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return {dict: "an object", str: "a string", int: "a number", float: "a number", bool: "true/false",
            type(None): "nothing"}.get(type(value), type(value).__name__)

