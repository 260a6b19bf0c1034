"""What a person sees while `align run` works: per stage our one-line messages, one progress bar
and one summary line. Everything the libraries say (TRL's per-step dicts, `datasets`' map bars,
transformers/TRL/accelerate/peft/torch log records, Python warnings) goes to `<stage>/run.log`;
`align run --verbose` shows it on the terminal too.

`configure` is called once by the CLI; `capture_stage_output` wraps one stage.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger("align")

LIBRARY_LOGGERS = ("transformers", "trl", "datasets", "accelerate", "peft", "torch", "huggingface_hub", "bitsandbytes")

# Set once by `configure` (the CLI's --verbose / --quiet); code that never calls it gets the quiet terminal.
terminal = {"verbose": False, "quiet": False}


def configure(verbose: bool = False, quiet: bool = False) -> None:
    """Terminal logging for the whole process: `<logger>: message` lines on stderr. Outside a stage the
    libraries say only errors and draw no bars unless verbose; inside one, `capture_stage_output` decides."""
    from align.distributed import is_main

    quiet = quiet or not is_main()  # several processes: rank 0 speaks for all
    terminal.update(verbose=verbose, quiet=quiet)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(name)s: %(message)s",
                        stream=sys.stderr)
    if not is_main():  # the other ranks' warnings repeat rank 0's: their terminal shows errors, run.rank<N>.log all
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.ERROR)
    if verbose:
        return
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns at import about kernels
    with contextlib.suppress(ImportError):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"


def progress_bar(desc: str, total: int, initial: int = 0) -> tqdm:
    """The stage's one bar: steps, ETA and whatever postfix the caller sets (loss, tokens/s)."""
    return tqdm(desc=desc, total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=terminal["quiet"])


class _LinesToLog(io.TextIOBase):
    """A stdout stand-in: each printed line becomes a record in run.log (and, when verbose, is
    written above the progress bar)."""

    def __init__(self, handler: logging.Handler, echo, descriptor):
        self.handler, self.echo, self.pending, self.descriptor = handler, echo, "", descriptor

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        """The replaced stdout's descriptor: what C code writes to (vLLM silences it with dup2 around gloo's start)."""
        return self.descriptor.fileno()

    def write(self, s: str) -> int:
        *lines, self.pending = (self.pending + s).split("\n")
        for line in lines:
            self._emit(line)
        return len(s)

    def flush(self) -> None:
        if self.pending:
            self._emit(self.pending)
            self.pending = ""

    def _emit(self, line: str) -> None:
        if not line.strip():
            return
        self.handler.handle(logging.LogRecord("stdout", logging.INFO, "", 0, line, None, None))
        if self.echo is not None:
            tqdm.write(line, file=self.echo)


@contextlib.contextmanager
def capture_stage_output(stage_dir: Path, verbose: bool | None = None):
    """Route library output during one stage to `stage_dir/run.log` (appended to, so a resumed
    stage keeps its earlier log); restore every logger, bar switch and warning hook on exit."""
    # Importing these configures their loggers (torch and transformers attach stderr handlers); done
    # before the snapshot below, so restoring it cannot undo their set-up.
    import datasets.utils
    import torch  # noqa: F401
    import transformers.utils.logging as hf_logging

    from align.distributed import rank

    verbose = terminal["verbose"] if verbose is None else verbose
    stage_dir.mkdir(parents=True, exist_ok=True)
    # Rank 0 writes run.log; another rank (several processes) keeps its own, for when it is the one that fails.
    log_name = "run.log" if rank() == 0 else f"run.rank{rank()}.log"
    handler = logging.FileHandler(stage_dir / log_name, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
    log.addHandler(handler)  # our own lines: terminal and run.log

    saved = {}
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = (list(lg.handlers), lg.propagate, lg.level)
        if not verbose:
            lg.handlers, lg.propagate = [], False  # transformers keeps its own stderr handler; the rest propagate
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.WARNING:  # the CLI silences transformers outside stages
            lg.setLevel(logging.WARNING)

    datasets_bars_off = datasets.utils.are_progress_bars_disabled()
    hf_bars_on = hf_logging.is_progress_bar_enabled()
    if not verbose:
        datasets.utils.disable_progress_bars()  # "Tokenizing train dataset", "Map", ...
        hf_logging.disable_progress_bar()
    # TRL reads this at call time for its reference log-prob pass (DPO, KTO); tqdm itself read its
    # TQDM_* variables at import, so our bar and PPO's are unaffected.
    env = {} if verbose else {"TQDM_DISABLE": "1"}

    original_showwarning = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        handler.handle(logging.LogRecord("py.warnings", logging.WARNING, filename, lineno, text, None, None))
        if verbose:
            original_showwarning(message, category, filename, lineno, file, line)

    stdout = _LinesToLog(handler, sys.stdout if verbose else None, sys.stdout)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(stdout), _environ(env):
            warnings.showwarning = showwarning
            yield
    finally:
        stdout.flush()
        for name, (handlers, propagate, level) in saved.items():
            lg = logging.getLogger(name)
            added = [h for h in lg.handlers if h is not handler and h not in handlers]
            lg.handlers, lg.propagate = handlers + added, propagate
            lg.setLevel(level)
        if not datasets_bars_off:
            datasets.utils.enable_progress_bars()
        if hf_bars_on:
            hf_logging.enable_progress_bar()
        log.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    import os

    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
