"""What a stage leaves on disk, written so that a crash never fakes completion.

`OUTPUT_DIR/<stage>/` holds:

- `manifest.json`: resolved config, input hashes, library versions, start/end time, `status`
- `metrics.json`: the final numbers
- `log.jsonl`: one line of metrics per logging step (tokens/s and peak memory included)
- `model/`: the trained model (`save_pretrained`), loadable by plain transformers/peft
- `checkpoints/checkpoint-N/`: trainer checkpoints; the ones we finished writing hold
  `align_checkpoint_ok`, so a checkpoint cut short by a kill is never resumed from

Every file is written to a temporary name in the same folder and renamed, and the model
folder is saved to `model.tmp-*` and renamed, so a reader sees all of it or none of it.

Several processes (`align.distributed`): the writers here do nothing on ranks other than 0, so
one process writes every artifact; `any_rank=True` is for a rank's own failure record.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from align.distributed import is_main

CHECKPOINT_OK = "align_checkpoint_ok"


def write_json(path: str | Path, data: Any, any_rank: bool = False) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", any_rank=any_rank)


def write_text(path: str | Path, text: str, any_rank: bool = False) -> None:
    if not (any_rank or is_main()):
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path) -> Any | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def save_folder_atomically(out: Path, save) -> None:
    """Call `save(tmp_folder)`, then swap the folder into place at `out` (rank 0 only)."""
    if not is_main():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        save(tmp)
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def hash_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("align", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class StepLog:
    """Appends one JSON line per logging step; on resume, drops lines past the checkpoint."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        if not is_main():
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        if not is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        return rows


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints that were written to the end, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*") if (p / CHECKPOINT_OK).exists()]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))


def drop_incomplete_checkpoints(folder: Path) -> list[str]:
    if not is_main():
        return []
    dropped = []
    for p in folder.glob("checkpoint-*") if folder.is_dir() else []:
        if not (p / CHECKPOINT_OK).exists():
            shutil.rmtree(p, ignore_errors=True)
            dropped.append(p.name)
    return dropped


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
