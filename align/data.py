"""Datasets: read, detect the format, validate every row, split.

Formats are TRL's (see ARCHITECTURE.md, "Data formats"), so Hugging Face datasets work unchanged:

- sft: `{"messages": [...]}` or `{"prompt": ..., "completion": ...}` (strings or message lists)
- preference: `{"prompt": ..., "chosen": ..., "rejected": ...}`
- prompts: `{"prompt": ...}`

Sources: a JSONL, JSON, Parquet or CSV file, a folder written by `save_to_disk`, or a
hub dataset name where a network exists. Every problem is raised as an `AlignError`
naming the file, the row (the 1-based line for JSONL), the field and what was expected.

Decision: SFT rows in prompt/completion form are turned into messages (user prompt,
assistant completion) so the one chat template renders every row the same way; the
loss then falls on the completion only through the assistant mask.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import AlignError, where

log = logging.getLogger("align")

ROLES = ("system", "user", "assistant")
KINDS = {
    "sft": "{'messages': [...]} or {'prompt': ..., 'completion': ...}",
    "preference": "{'prompt': ..., 'chosen': ..., 'rejected': ...}",
    "prompts": "{'prompt': ...}",
    "unpaired": "{'prompt': ..., 'completion': ..., 'label': true|false}",
    "kto": "{'prompt': ..., 'completion': ..., 'label': true|false} or preference pairs",
}


@dataclass
class Rows:
    """Validated rows plus where they came from, for error messages and hashes."""

    source: str
    rows: list[dict]
    numbers: list[int]  # the row (or JSONL line) number of each row, for messages
    by_line: bool  # numbers are JSONL line numbers

    def at(self, i: int) -> str:
        return where(self.source, self.numbers[i], line=self.by_line)

    def __len__(self) -> int:
        return len(self.rows)


def read_rows(source: str) -> Rows:
    """Read raw rows from a file, a save_to_disk folder or the hub; no validation yet."""
    path = Path(source)
    if path.is_dir():
        return _read_saved_dataset(path)
    if path.exists():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".parquet":
            return _read_table(path, "parquet")
        if suffix == ".csv":
            return _read_table(path, "csv")
        raise AlignError(f"{path}: unsupported file type '{suffix}'; expected .jsonl, .json, .parquet, .csv "
                         "or a folder written by datasets' save_to_disk")
    if _looks_like_path(source):
        raise AlignError(f"{source}: no such file or folder")
    return _read_hub(source)


def _looks_like_path(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or source.count("/") != 1
            or Path(source).suffix.lower() in (".jsonl", ".json", ".parquet", ".csv", ".ndjson"))


def _read_jsonl(path: Path) -> Rows:
    rows, numbers = [], []
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AlignError(f"{path}: cannot read file ({e.__class__.__name__}: {e})") from None
    for n, chunk in enumerate(raw.split(b"\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        try:
            line = chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            raise AlignError(f"{where(path, n, line=True)}: not UTF-8 text (byte {chunk[e.start]:#04x} at column "
                             f"{e.start + 1})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise AlignError(f"{where(path, n, line=True)}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise AlignError(f"{where(path, n, line=True)}: expected a JSON object per line, got {_kind(row)}")
        rows.append(row)
        numbers.append(n)
    return Rows(str(path), rows, numbers, by_line=True)


def _read_json(path: Path) -> Rows:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise AlignError(f"{path}: cannot read file ({e.__class__.__name__}: {e})") from None
    except json.JSONDecodeError as e:
        raise AlignError(f"{path}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise AlignError(f"{path}: expected a JSON list of objects (or {{'data': [...]}}), got {_kind(data)}")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise AlignError(f"{where(path, i)}: expected a JSON object, got {_kind(row)}")
    return Rows(str(path), data, list(range(1, len(data) + 1)), by_line=False)


def _read_table(path: Path, kind: str) -> Rows:
    import datasets

    try:
        ds = datasets.Dataset.from_parquet(str(path)) if kind == "parquet" else datasets.Dataset.from_csv(str(path))
    except Exception as e:  # pyarrow and pandas raise many types for a bad file
        raise AlignError(f"{path}: cannot read as {kind} ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    rows = [_from_table_cell(r) for r in ds.to_list()]
    return Rows(str(path), rows, list(range(1, len(rows) + 1)), by_line=False)


def _from_table_cell(row: dict) -> dict:
    # CSV cannot hold a list, so message lists there are JSON text; decode them.
    out = {}
    for k, v in row.items():
        if isinstance(v, str) and v.startswith("[{") and v.endswith("}]"):
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        out[k] = v
    return out


def _read_saved_dataset(path: Path) -> Rows:
    import datasets

    if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        raise AlignError(f"{path}: folder is not a dataset written by save_to_disk "
                         "(no dataset_info.json or dataset_dict.json)")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise AlignError(f"{path}: DatasetDict has no 'train' split; splits: {', '.join(ds)}")
        ds = ds["train"]
    rows = ds.to_list()
    return Rows(str(path), rows, list(range(1, len(rows) + 1)), by_line=False)


def _read_hub(name: str) -> Rows:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, missing, gated: all say the same thing to the user
        first = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise AlignError(f"{name}: not a local file or folder, and loading it from the hub failed ({first})") from None
    rows = ds.to_list()
    return Rows(name, rows, list(range(1, len(rows) + 1)), by_line=False)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "true/false", type(None): "null"}.get(type(value), type(value).__name__)


def detect_format(row: dict) -> str:
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "messages" in row:
        return "messages"
    if "completion" in row:
        return "prompt_completion"
    if "prompt" in row:
        return "prompts"
    return "unknown"


def load_rows(source: str, kind: str) -> Rows:
    """Read `source` and validate every row as `kind` ('sft', 'preference' or 'prompts')."""
    data = read_rows(source)
    if not data.rows:
        raise AlignError(f"{source}: dataset is empty; expected rows like {KINDS[kind]}")
    for i, row in enumerate(data.rows):
        _check_row(row, kind, data.at(i))
    return data


def _check_row(row: dict, kind: str, at: str) -> None:
    fmt = detect_format(row)
    if kind == "sft":
        if fmt == "messages":
            _check_messages(row["messages"], "messages", at, must_end_with="assistant")
        elif fmt == "prompt_completion":
            _check_required(row, ("prompt", "completion"), at)
            check_turn(row["prompt"], "prompt", at, last_role="user")
            check_turn(row["completion"], "completion", at, last_role="assistant")
        else:
            _missing(row, ("messages",) if "prompt" not in row else ("completion",), kind, at)
    elif kind == "preference":
        _check_required(row, ("chosen", "rejected"), at)
        if "prompt" in row:
            check_turn(row["prompt"], "prompt", at, last_role="user")
        elif not isinstance(row["chosen"], list):
            _missing(row, ("prompt",), kind, at)
        check_turn(row["chosen"], "chosen", at, last_role="assistant", implicit=("prompt" not in row))
        check_turn(row["rejected"], "rejected", at, last_role="assistant", implicit=("prompt" not in row))
        if row["chosen"] == row["rejected"]:
            raise AlignError(f"{at}: 'chosen' and 'rejected' are identical; a preference pair needs two "
                             "different responses")
        if "prompt" not in row and row["chosen"][:-1] != row["rejected"][:-1]:
            raise AlignError(f"{at}: 'chosen' and 'rejected' have different prompt turns; without a 'prompt' "
                             "field, every message before the final assistant turn must be the same in both")
        margin = row.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
            raise AlignError(f"{at}: field 'margin': expected a number, got {_kind(margin)}")
        if margin is not None and not math.isfinite(margin):
            raise AlignError(f"{at}: field 'margin': expected a finite number, got {margin}")
    elif kind == "kto":
        _check_row(row, "preference" if ("chosen" in row or "rejected" in row) else "unpaired", at)
    elif kind == "unpaired":
        _check_required(row, ("prompt", "completion", "label"), at)
        check_turn(row["prompt"], "prompt", at, last_role="user")
        check_turn(row["completion"], "completion", at, last_role="assistant")
        if not isinstance(row["label"], bool):
            raise AlignError(f"{at}: field 'label': expected true (desirable) or false (undesirable), "
                             f"got {row['label']!r}")
    elif kind == "prompts":
        _check_required(row, ("prompt",), at)
        check_turn(row["prompt"], "prompt", at, last_role="user")
    else:
        raise ValueError(kind)


def _check_required(row: dict, fields: tuple[str, ...], at: str) -> None:
    missing = [f for f in fields if f not in row or row[f] is None]
    if missing:
        raise AlignError(f"{at}: missing field '{missing[0]}'; row has {sorted(row)}")


def _missing(row: dict, fields, kind: str, at: str) -> None:
    raise AlignError(f"{at}: missing field '{fields[0]}'; expected rows like {KINDS[kind]}, row has {sorted(row)}")


def check_turn(value: Any, field: str, at: str, last_role: str, implicit: bool = False) -> None:
    """A string, or a message list (a prompt ends with a user turn; a response is assistant turns)."""
    if isinstance(value, str):
        if implicit:
            raise AlignError(f"{at}: field '{field}': without a 'prompt' field it must be a message list "
                             "holding the prompt turns too")
        if not value.strip():
            raise AlignError(f"{at}: field '{field}' is empty; expected non-empty text")
        return
    if not isinstance(value, list):
        raise AlignError(f"{at}: field '{field}': expected a string or a list of messages, got {_kind(value)}")
    if last_role == "assistant" and not implicit:
        if not value:
            raise AlignError(f"{at}: field '{field}' is an empty list; expected an assistant message")
        for j, msg in enumerate(value):
            _check_message(msg, f"{field}[{j}]", at)
            if msg["role"] != "assistant":
                raise AlignError(f"{at}: field '{field}[{j}].role' is '{msg['role']}'; a response holds "
                                 "assistant messages only")
        return
    _check_messages(value, field, at, must_end_with=last_role)


def _check_message(msg: Any, field: str, at: str) -> None:
    if not isinstance(msg, dict):
        raise AlignError(f"{at}: field '{field}': expected a message object, got {_kind(msg)}")
    for key in ("role", "content"):
        if key not in msg:
            raise AlignError(f"{at}: field '{field}' has no '{key}'; expected {{'role': ..., 'content': ...}}")
    if msg["role"] not in ROLES:
        raise AlignError(f"{at}: field '{field}.role' is {msg['role']!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(msg["content"], str):
        raise AlignError(f"{at}: field '{field}.content': expected a string, got {_kind(msg['content'])}")
    if not msg["content"].strip():
        raise AlignError(f"{at}: field '{field}.content' is empty; expected non-empty text")


def _check_messages(messages: Any, field: str, at: str, must_end_with: str) -> None:
    """An optional system turn, then user and assistant turns alternating, starting with user."""
    if not isinstance(messages, list):
        raise AlignError(f"{at}: field '{field}': expected a list of messages, got {_kind(messages)}")
    if not messages:
        raise AlignError(f"{at}: field '{field}' is an empty list; expected at least one message")
    expected = "user"
    for j, msg in enumerate(messages):
        _check_message(msg, f"{field}[{j}]", at)
        role = msg["role"]
        if role == "system" and j == 0:
            continue
        if role != expected:
            raise AlignError(f"{at}: field '{field}[{j}].role' is '{role}' where '{expected}' was expected; "
                             "roles must be an optional system turn, then user and assistant alternating")
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != must_end_with:
        raise AlignError(f"{at}: field '{field}' ends with a '{messages[-1]['role']}' turn; "
                         f"expected it to end with '{must_end_with}'")


def as_messages(row: dict) -> list[dict]:
    """An SFT row as one message list (prompt/completion rows become user + assistant turns)."""
    if "messages" in row:
        return as_turns(row["messages"], "user")
    return as_turns(row["prompt"], "user") + as_turns(row["completion"], "assistant")


def as_turns(value, role: str) -> list[dict]:
    """A string as one message of `role`, or a message list reduced to role and content."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def as_preference(row: dict) -> dict:
    """A validated preference row as message lists: {prompt, chosen, rejected} (+ margin when given).

    The implicit-prompt form (chosen/rejected holding the whole chat) is split at the final
    assistant turn, so every stage sees the prompt on its own."""
    if "prompt" in row:
        prompt = as_turns(row["prompt"], "user")
        chosen, rejected = as_turns(row["chosen"], "assistant"), as_turns(row["rejected"], "assistant")
    else:
        prompt = as_turns(row["chosen"][:-1], "user")
        chosen, rejected = as_turns(row["chosen"][-1:], "assistant"), as_turns(row["rejected"][-1:], "assistant")
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if row.get("margin") is not None:
        out["margin"] = float(row["margin"])
    return out


def as_unpaired(row: dict) -> list[dict]:
    """KTO rows {prompt, completion, label} from an unpaired row, or two from a preference pair."""
    if "label" in row:
        return [{"prompt": as_turns(row["prompt"], "user"), "completion": as_turns(row["completion"], "assistant"),
                 "label": row["label"]}]
    pair = as_preference(row)
    return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]


def unique_prompts(pairs: list[dict], limit: int) -> list:
    """Up to `limit` distinct prompts, in order: repeated prompts would weigh twice in the reward means."""
    seen, out = set(), []
    for p in pairs:
        key = repr(p["prompt"])
        if key not in seen:
            seen.add(key)
            out.append(p["prompt"])
    return out[:limit]


def prompt_key(row: dict, kind: str) -> str:
    """The prompt a validated row is grouped by when a held-out share is drawn: for SFT the conversation without its
    final assistant turn(s), otherwise the prompt; as message lists, so "q" and [{"role": "user", "content": "q"}]
    are the same prompt."""
    if kind == "sft":
        turns = as_messages(row)
        while turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
    elif "chosen" in row or "rejected" in row:  # preference rows, and KTO given as pairs
        turns = as_preference(row)["prompt"]
    else:  # prompts, unpaired KTO rows
        turns = as_turns(row["prompt"], "user")
    return json.dumps(turns, ensure_ascii=False)


def row_key(row: Any) -> str:
    """A row's exact content, for counting verbatim duplicates."""
    return json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)


def held_out(keys: list, eval_fraction: float, seed: int) -> list[int]:
    """The 0-based indices (ascending) of the rows to hold out: whole groups of rows sharing a key.

    The groups are ordered by a hash of `seed` and their key and taken until ceil(n * eval_fraction) rows are held
    out (at least one group when asked, never every group), so no key is on both sides and the held-out share
    overshoots by at most one group's rows. With distinct keys this is a plain shuffled split of rows."""
    n = len(keys)
    groups: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    if eval_fraction <= 0 or len(groups) < 2:
        return []
    # groups in the order of a seeded hash of their key, not of their place in the file: a prompt's rank is the same
    # in every file that holds it, so stages sharing a seed hold out the same prompts (the smaller share is a subset)
    order = [groups[k] for k in sorted(groups, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).digest())]
    # round first: 100 * 0.07 is 7.000000000000001, whose ceil would hold out 8 rows
    n_eval = max(1, math.ceil(round(n * eval_fraction, 9)))
    held: list[int] = []
    for group in order[:-1]:  # the last group always trains
        if len(held) >= n_eval:
            break
        held.extend(group)
    return sorted(held)


def split(rows: list, eval_fraction: float, seed: int, keys: list | None = None) -> tuple[list, list]:
    """Shuffle with `seed`, hold out about ceil(n * eval_fraction) rows (at least 1 when asked, never all), keeping
    rows with the same key (default: the same content) on one side."""
    keys = [row_key(r) for r in rows] if keys is None else keys
    held = set(held_out(keys, eval_fraction, seed))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def duplicate_count(rows: list) -> int:
    """How many rows repeat an earlier row verbatim."""
    return len(rows) - len({row_key(r) for r in rows})


def eval_overlap(data: Rows, eval_data: Rows, kind: str) -> tuple[int, int]:
    """(shared_prompts, duplicate_rows) between a training file and its `eval_data`: the distinct prompts present in
    both, and the held-out rows that are verbatim training rows."""
    train_rows = {row_key(r) for r in data.rows}
    train_prompts = {prompt_key(r, kind) for r in data.rows}
    shared = len({prompt_key(r, kind) for r in eval_data.rows} & train_prompts)
    return shared, sum(row_key(r) in train_rows for r in eval_data.rows)


def overlap_error(strict: bool, kind: str, data: Rows, eval_data: Rows, key: str = "strict_eval") -> tuple[int, int]:
    """`eval_overlap`, raised as an AlignError when `strict` (a stage's `strict_eval`) and the files overlap."""
    shared, dups = eval_overlap(data, eval_data, kind)
    if strict and (shared or dups):
        raise AlignError(f"{key}: held-out {eval_data.source} overlaps training "
                         f"{data.source}: {shared} shared prompts, {dups} duplicate rows; remove them from one file "
                         "or set strict_eval: false")
    return shared, dups


def load_split(stage, kind: str, convert=lambda row: row, out_dir: Path | None = None) -> tuple[list, list]:
    """A stage's training and held-out rows: its `eval_data`, or `eval_fraction` of `data` held out by prompt.

    Rows are grouped by their prompt (`prompt_key`) before the held-out share is drawn, so no held-out prompt is
    trained on and verbatim duplicates stay on one side. `out_dir/split.json` records the split:
    `{"data", "eval_rows" (0-based rows of data held out), "duplicate_rows", "shared_prompts"}`; with `eval_data`
    (and "eval_data" in it) the counts are the overlap of the two files, which `strict_eval: true` refuses."""
    from align.artifacts import write_json

    data, strict = load_rows(stage.data, kind), stage.strict_eval
    if stage.eval_data:
        evals = load_rows(stage.eval_data, kind)
        shared, dups = overlap_error(strict, kind, data, evals)
        report = {"data": stage.data, "eval_data": stage.eval_data, "eval_rows": [], "duplicate_rows": dups,
                  "shared_prompts": shared}
        train, held = data.rows, evals.rows
    else:
        keys = [prompt_key(r, kind) for r in data.rows]
        index = held_out(keys, stage.eval_fraction, stage.seed)
        chosen = set(index)
        train = [r for i, r in enumerate(data.rows) if i not in chosen]
        held = [data.rows[i] for i in index]
        shared = len({keys[i] for i in index} & {k for i, k in enumerate(keys) if i not in chosen})
        report = {"data": stage.data, "eval_rows": index, "duplicate_rows": duplicate_count(data.rows),
                  "shared_prompts": shared}
    if out_dir is not None:
        write_json(Path(out_dir) / "split.json", report)
    return [convert(r) for r in train], [convert(r) for r in held]


def apply_too_long(rows: list, lengths: list[int], max_length: int, policy: str, what: str,
                   truncated: str = "truncated", noun: str = "rows", limit_name: str = "max_length",
                   required: bool = True) -> tuple[list, int]:
    """The one `too_long` policy of every stage: (the rows to train on, how many were over `max_length`).

    `lengths` are the rows' token counts as the stage renders them. Over-long rows are counted and
    warned about in one line; with `drop` they are left out (none left is an error), with `truncate`
    they stay and the stage cuts them (`truncated` says how, for the warning). `required=False`: an empty
    result is the caller's to judge (a held-out set may end up empty)."""
    over = [n > max_length for n in lengths]
    n_over = sum(over)
    if n_over:
        verb = "dropped" if policy == "drop" else truncated
        log.warning("%s: %d of %d %s are longer than %s=%d tokens and were %s (too_long: truncate|drop)",
                    what, n_over, len(rows), noun, limit_name, max_length, verb)
    if policy == "drop":
        rows = [r for r, o in zip(rows, over) if not o]
        if not rows and required:
            raise AlignError(f"{what}: every one of the {len(over)} {noun} is longer than {limit_name}={max_length} "
                             f"tokens; raise {limit_name} or set too_long: truncate")
    return rows, n_over


def fingerprint(source: str) -> str:
    """sha256 of a file, of every file in a folder (names and bytes), or of a hub name."""
    path = Path(source)
    h = hashlib.sha256()
    if path.is_file():
        _hash_file(h, path)
    elif path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + b"\0")
            _hash_file(h, f)
    elif _looks_like_path(source):
        raise AlignError(f"{source}: no such file or folder")
    else:
        h.update(b"hub:" + source.encode())
    return h.hexdigest()


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def trainer_dataset(rows: list[dict], folder: Path):
    """`rows` as a `datasets.Dataset` for a TRL trainer. One process: in memory. Several: written once by rank 0
    to `folder` and opened by every rank, so the cache files TRL's rank 0 writes next to it (DPO's and KTO's
    precomputed reference log-probs) are files the other ranks can open; an in-memory dataset keeps them in a
    temporary folder of each process's own, where the other ranks fail to find them."""
    import shutil

    from datasets import Dataset, load_from_disk

    from align.distributed import barrier, is_main, world_size

    if world_size() == 1:
        return Dataset.from_list(rows)
    if is_main():
        shutil.rmtree(folder, ignore_errors=True)
        Dataset.from_list(rows).save_to_disk(str(folder))
    barrier()
    return load_from_disk(str(folder))
