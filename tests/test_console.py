"""What a person sees during `align run`: per stage a bar and one summary line on the terminal;
the trainer's per-step dicts, library log records, warnings and data bars in `<stage>/run.log`."""

import logging
import re
import subprocess
import sys
import warnings

import pytest
from conftest import REPO, TINY_SFT, write_recipe

from align.console import capture_stage_output

# A library talking on the terminal: TRL's per-step dicts, datasets' map bars, warnings.
NOISE = re.compile(r"\{'(loss|eval_loss|train_runtime)'|Tokenizing|Map|Warning")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("console")
    stage = {"model": str(tiny_model), "data": str(TINY_SFT), "eval_fraction": 0.02, "max_length": 64, "lr": 3e-3,
             "batch_size": 8, "max_steps": 4, "logging_steps": 1, "eval_steps": 2, "save_steps": 50}
    return write_recipe(tmp / "r.yaml", tmp / "run", {"sft": stage})


def align_run(recipe, out, *flags) -> tuple[str, str]:
    r = subprocess.run([sys.executable, "-m", "align", "run", *flags, str(recipe), f"output_dir={out}"],
                       capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr, (out / "sft" / "run.log").read_text()


def test_terminal_shows_bar_and_summary_and_run_log_gets_the_rest(recipe, tmp_path):
    terminal, run_log = align_run(recipe, tmp_path / "run")

    assert not NOISE.search(terminal), terminal
    lines = terminal.replace("\r", "\n").splitlines()
    summaries = [line for line in lines if line.startswith("align: stage sft: complete")]
    assert len(summaries) == 1
    summary = summaries[0]
    assert re.search(r"min, loss \d\.\d+ → \d\.\d+", summary), summary
    bar = [line for line in lines if line.startswith("sft:") and "4/4" in line]
    assert bar and "loss=" in bar[-1] and "tok/s=" in bar[-1]

    assert run_log.count("{'loss': ") == 4  # logging_steps 1, max_steps 4
    assert "{'eval_loss': " in run_log
    assert "sft: 588 training rows, 12 held out" in run_log  # our own lines go to both


def test_verbose_shows_the_library_output_on_the_terminal(recipe, tmp_path):
    terminal, run_log = align_run(recipe, tmp_path / "run", "--verbose")

    assert terminal.count("{'loss': ") == 4 and "Tokenizing train dataset" in terminal
    assert run_log.count("{'loss': ") == 4
    assert terminal.count("align: stage sft: complete") == 1


def test_captured_stdout_keeps_the_real_descriptor_for_c_code(tmp_path, capfd):
    """vLLM silences C libraries by dup2 over sys.stdout.fileno() while gloo starts (vllm/utils/system_utils.py,
    suppress_stdout); a stand-in without fileno stopped engine vllm on a CPU ("UnsupportedOperation: fileno")."""
    import os

    real = sys.stdout.fileno()
    with capture_stage_output(tmp_path, verbose=False):
        assert sys.stdout.fileno() == real
        saved, devnull = os.dup(real), os.open(os.devnull, os.O_WRONLY)  # what suppress_stdout does
        os.dup2(devnull, sys.stdout.fileno())
        os.write(real, b"silenced\n")
        os.dup2(saved, real)
        os.close(saved), os.close(devnull)
        os.write(real, b"heard\n")
    out, _ = capfd.readouterr()
    assert "heard" in out and "silenced" not in out


def test_capture_routes_records_warnings_and_prints_to_run_log_and_restores(tmp_path, capfd):
    import transformers  # noqa: F401  (its import attaches its own stderr handler; capture keeps it)

    hf = logging.getLogger("transformers")
    before = (list(hf.handlers), hf.propagate, hf.level, warnings.showwarning)
    with capture_stage_output(tmp_path, verbose=False):
        logging.getLogger("trl.trainer").warning("trl says hello")
        logging.getLogger("transformers.trainer").warning("transformers says hello")
        warnings.warn("a library UserWarning", UserWarning)
        print({"loss": 1.5})
    with capture_stage_output(tmp_path, verbose=False):  # a resumed stage appends
        print("second attempt")

    out, err = capfd.readouterr()
    assert out == "" and "hello" not in err and "UserWarning" not in err
    run_log = (tmp_path / "run.log").read_text()
    for text in ("trl says hello", "transformers says hello", "UserWarning: a library UserWarning",
                 "{'loss': 1.5}", "second attempt"):
        assert text in run_log
    assert (list(hf.handlers), hf.propagate, hf.level, warnings.showwarning) == before
