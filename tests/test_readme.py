"""README.md runs as written (issue #18, item 7): the test reads the README itself, so nothing it names can drift.

- Every `align ...` command line, in a fenced block or an inline code span, runs in a temporary folder holding
  what it names (`prepared`): a fenced block's commands one after another in one folder, as a reader types them;
  an inline one alone, in a fresh copy. It must exit 0 unless `SUBSTITUTE` says otherwise; after a `$ ` line, the
  lines the README shows must be printed (`...` matches anything), with exit code 2 for `align: error:`.
- Output the README shows without its command (the folder a run leaves, an error line, the stage summary line)
  is printed or left by the command `OUTPUTS` names.
- Every fenced ```python block runs; the dotted names of our packages in inline code import; the API calls shown
  run (`API_CALLS`).
- Every `--flag` in inline code is an option of `align`, of a `bench/` script or of a tool in `FOREIGN_FLAGS`;
  every repository path in inline code or a link exists; a `make` target named exists.
- A ```yaml block headed by a recipe's path says what that file says.

A command runs exactly as written unless `SUBSTITUTE`, the one table of changes, says otherwise, and a line the
test cannot place fails it: a new README command is either run or consciously listed. Commands run in-process
through `align.cli.main`, except `align label serve`, which has to listen on a port.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import importlib
import importlib.util
import io
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DATA = REPO / "recipes" / "data"
PASSWORD = "correct horse 7"


def vllm_usable() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


VLLM = vllm_usable()  # the GPU-only commands run for real where it is, and are refused with one line elsewhere


@dataclass(frozen=True)
class Sub:
    """How a command line is run when not exactly as written, and why."""

    why: str
    put: dict = field(default_factory=dict)  # placeholder word -> what stands in for it
    add: str = ""                             # words appended
    run: str | None = None                    # the whole line replaced (`{demo}`: align.demo.DEMO_OVERRIDES)
    exit: int = 0
    shows: str | None = None                  # text the output must hold
    before: str | None = None                 # a step of `BEFORE`, run first in the same folder
    typed: str | None = None                  # typed at the terminal's password prompts
    serve: bool = False                       # started in a process on a free port, stopped once it answers
    trains: bool = False                      # a real `align run`; every other one has --dry-run or --help
    json: bool = False                        # stdout is one JSON object
    skip: str | None = None                   # not a command: the file that writes this text


DRY = Sub("trains for seconds (tiny) to minutes (SmolLM2): every check and the plan, nothing trained", add="--dry-run")
HELP = Sub("names the command in prose, without arguments", add="--help")
TINY = "recipes/tiny-sft.yaml"
NO_RECIPE = Sub("no recipe named: the tiny SFT recipe, checked and planned", add=f"{TINY} --dry-run")
RECIPE = Sub("placeholder RECIPE: the tiny SFT recipe, checked and planned", put={"RECIPE": TINY}, add="--dry-run")
TYPED = Sub("asks for the new password twice at the terminal: typed in", typed=PASSWORD)
VOTED = Sub("exports what annotators voted in the app: alice and bob vote on every pair first", before="votes")
LABELLED = "in a label database with the prepared rollouts imported and voted on"
GPU = "" if VLLM else "; without CUDA and vLLM it is refused (exit 2)"


def gpu_only(why: str, shows: str, **change) -> Sub:
    return Sub(why + GPU, exit=0 if VLLM else 2, shows=None if VLLM else shows, **change)


# The one table of changes: command line (whitespace joined, comment dropped) -> how it is run. The last entries are
# the test's own commands, for what the README shows without one (`OUTPUTS`, `YAML_FRAGMENTS`).
SUBSTITUTE = {
    "align run RECIPE.yaml [key=value ...]": Sub(
        "the synopsis filled in: the one real training run, the tiny SFT recipe cut to 2 steps with a checkpoint",
        put={"RECIPE.yaml": TINY, "[key=value ...]": "stages.sft.max_steps=2 stages.sft.save_steps=2"}, trains=True),
    "align tiny-model OUT": Sub("placeholder OUT: a new folder", put={"OUT": "out"}),
    "align demo": Sub("trains SmolLM2 for ~4 minutes: its recipe with align.demo.DEMO_OVERRIDES, checked and planned",
                      run="align run recipes/smollm2-sft-rm-dpo.yaml --dry-run {demo} output_dir=runs/demo"),
    "align run": HELP, "align label": HELP, "align rollouts": HELP, "align eval": HELP, "align label import": HELP,
    "align run --dry-run": Sub("no recipe named: the tiny SFT recipe", add=TINY),
    "align run --verbose": NO_RECIPE,
    "align run --nproc 2": NO_RECIPE,
    "align run --nproc N": Sub("placeholder N: 2; the tiny SFT recipe, checked and planned", put={"N": "2"},
                               add=f"{TINY} --dry-run"),
    "align run RECIPE": RECIPE,  # the `-m align run RECIPE` of the torchrun and accelerate lines
    "align run --nproc 2 RECIPE": RECIPE,
    "align run --nproc 2 recipes/tiny-sft.yaml [stages.sft.batch_size=8]": Sub(
        "the optional override taken; checked and planned",
        put={"[stages.sft.batch_size=8]": "stages.sft.batch_size=8"}, add="--dry-run"),
    "align run recipes/tiny-sft.yaml": DRY,
    "align run recipes/tiny-sft.yaml stages.sft.lr=1e-4 stages.sft.lora.r=8 output_dir=/tmp/x": DRY,
    "align run recipes/smollm2-sft.yaml": DRY,
    "align run recipes/tiny-sft-rm-dpo.yaml": DRY,
    "align run recipes/tiny-sft-rm-ppo.yaml": DRY,
    "align run recipes/tiny-sft-rm-grpo.yaml": DRY,
    "align run recipes/smollm2-sft-rm-ppo.yaml stages.sft.max_steps=8 stages.reward.max_steps=8 "
    "stages.ppo.max_steps=3 stages.ppo.eval_prompts=8": DRY,
    "align run recipes/tiny-sft-rm-dpo.yaml stages.reward.data=prefs.jsonl stages.dpo.data=prefs.jsonl": DRY,
    "CUDA_VISIBLE_DEVICES=2 align run my-recipe.yaml": gpu_only(
        "needs GPUs and a running `trl vllm-serve`: my-recipe.yaml (the README's grpo block after an SFT and a "
        "reward stage) checked and planned", "'vllm' is not installed", add="--dry-run"),
    "align rollouts --engine vllm": gpu_only(
        "on the tiny model and prompts.jsonl", "engine vllm needs vllm 0.30.0",
        add="--model tiny-model --prompts prompts.jsonl --out vllm.jsonl"),
    "align rollouts --engine vllm --tensor-parallel-size N": gpu_only(
        "placeholder N: 1; on the tiny model and prompts.jsonl", "engine vllm needs vllm 0.30.0", put={"N": "1"},
        add="--model tiny-model --prompts prompts.jsonl --out vllm.jsonl"),
    "align data check FILE": Sub("placeholder FILE: train.jsonl, the tiny SFT data (clean: exit 0)",
                                 put={"FILE": "train.jsonl"}),
    "align data check recipes/data/tiny_prefs.jsonl --against eval.jsonl --out clean.jsonl": Sub(
        "exit 1 ('something was found'): eval.jsonl holds two of the file's pairs", exit=1, shows="wrote clean.jsonl"),
    "align data check train.jsonl --json": Sub("as written; stdout must be one JSON object", json=True),
    "align label users add alice --admin": TYPED,
    "align label users add bob": TYPED,
    "align label serve --db labels.sqlite --overlap 3 --guidelines guidelines.md": Sub(
        "serves until stopped: started on a free port (7860 may be taken), stopped once /login answers 200",
        add="--port {port}", serve=True),
    "align label export --db labels.sqlite --out prefs.jsonl --min-votes 2 --min-agreement 0.6": VOTED,
    "align label export --db labels.sqlite --out prefs.jsonl": VOTED,
    "align label users unlock NAME": Sub(f"placeholder NAME: alice, {LABELLED}", put={"NAME": "alice"},
                                         before="label db"),
    "align label stats": Sub(LABELLED, before="label db"),
    "align label leaderboard": Sub(LABELLED, before="label db"),
    "align --nproc N": Sub("not a command: the `launcher` value manifest.json records", skip="align/launch.py"),
    # the test's own
    "align data check data.jsonl": Sub("for the README's data error line: data.jsonl's line 7 starts with an "
                                       "assistant turn", exit=2),
    "align run qlora.yaml --dry-run": gpu_only("the README's QLoRA block as a recipe", "needs a CUDA GPU"),
}

# Output the README shows without a command in front of it (the start of it) -> the command whose run shows it,
# and whether its numbers vary from run to run.
OUTPUTS = {
    "runs/tiny-sft/": ("align run RECIPE.yaml [key=value ...]", False),
    "align: stage sft: complete, 0.4 min, loss 6.223 → 5.717": ("align run RECIPE.yaml [key=value ...]", True),
    "align: error: data.jsonl, line 7:": ("align data check data.jsonl", False),
}

# ```yaml blocks not headed by a recipe's path -> (the file of the prepared folder they go into, the command run on
# it when no README command names that file).
YAML_FRAGMENTS = {"  grpo:": ("my-recipe.yaml", None), "stages:": ("qlora.yaml", "align run qlora.yaml --dry-run")}

# Fenced lines that start another program: not run here, for the reason given. The files and make targets they
# name must exist, and the `-m align ...` in them is an align command line like any other.
OTHER_PROGRAMS = {
    "make": "`make demo` trains for minutes and `make test` is the whole suite",
    "torchrun": "several processes: tests/test_distributed.py launches them",
    "accelerate": "tests/test_launch_configs.py launches the CPU forms; the others need GPUs",
    "sbatch": "needs Slurm",
    "trl": "`trl vllm-serve` needs CUDA GPUs and vLLM",
}

# Inline calls of our API -> (set-up run first in the prepared folder, what `...` in the call stands for, a check of
# `result`). Any other call on a dotted name must be in NOT_OUR_API.
API_CALLS = {
    "reward.RewardScorer(path).score(prompts, completions)": (
        "import reward\npath = 'runs/tiny-sft-rm-ppo/reward/model'\n"
        "prompts = ['Count from 3 to 6.', [{'role': 'user', 'content': 'Repeat: red'}]]\n"
        "completions = ['3 4 5 6', 'red']",
        "", "len(result) == 2 and all(isinstance(s, float) for s in result)"),
    "engine.generate(prompts, n, Sampling(...))": (
        "from align.models import load_model, load_tokenizer\nfrom align.rollouts import Sampling, make_engine\n"
        "engine = make_engine('hf', load_model('tiny-model'), load_tokenizer('tiny-model'))\n"
        "prompts, n = ['Count from 3 to 6.', 'Repeat: red'], 3",
        "max_new_tokens=4, seed=0", "len(result) == 2 and all(len(c) == 3 for c in result)"),
}
NOT_OUR_API = {"gc.collect()"}  # Python's, in the comparison with TRL's PPO

FOREIGN_FLAGS = {  # flags of other tools, in inline code
    "accelerate launch": {"--config_file", "--num_processes", "--machine_rank", "--main_process_ip", "--num_machines",
                          "--multi_gpu", "--cpu"},
    "torchrun": {"--nproc_per_node"},
}


# -- reading the README


@dataclass(frozen=True)
class Block:
    lang: str
    body: str
    line: int  # of the opening fence


@dataclass
class Command:
    text: str  # as the README writes it: continuations joined, trailing comment dropped
    line: int
    shows: list[str] = field(default_factory=list)  # what the README shows it printing or leaving
    numbers_vary: bool = False

    @property
    def key(self) -> str:
        return " ".join(self.text.split())


FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SHELL = ("bash", "sh", "shell", "console", "")


def blocks(text: str) -> list[Block]:
    return [Block(m[1], m[2], text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def spans(text: str) -> list[tuple[str, int]]:
    """Inline code outside fenced blocks, whitespace joined (a span may wrap a line), with its line."""
    prose = FENCE.sub(lambda m: "\n" * m[0].count("\n"), text)
    return [(" ".join(m[1].split()), prose.count("\n", 0, m.start()) + 1)
            for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose) if "\n\n" not in m[1]]


def shell_lines(block: Block) -> list[tuple[str, int, bool]]:
    """(line with continuations joined and comment dropped, its line number, whether it follows `$ `)."""
    out, pending, start = [], "", 0
    for number, raw in enumerate(block.body.splitlines(), block.line + 1):
        if not pending:
            start = number
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line, pending = pending + raw, ""
        prompt = line.startswith("$ ")
        line = re.sub(r"(^|\s)#.*$", "", line[2:] if prompt else line).strip()
        if line or prompt:
            out.append((line, start, prompt))
    return out


def env_and_words(line: str) -> tuple[dict, list[str]]:
    """`A=1 B=2 prog args` -> ({A: 1, B: 2}, [prog, args])."""
    try:
        words = shlex.split(line)
    except ValueError:  # not a command line: an unmatched quote in output or prose
        words = line.split()
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


def read_readme(text: str) -> tuple[list[list[Command]], list[str]]:
    """The README's commands in groups (a fenced block's commands share a folder; an inline one is alone), and the
    lines it could not place."""
    groups, problems, shown = [], [], []
    for block in blocks(text):
        first = block.body.splitlines()[0] if block.body else ""
        if block.lang == "yaml":
            launch = re.search(r"launch:\s*(align .*)$", first)
            own = YAML_FRAGMENTS.get(first, (None, None))[1]
            if launch or own:
                groups.append([Command(launch[1].strip() if launch else own, block.line + 1)])
            continue
        if block.lang not in SHELL:
            continue
        if any(first.startswith(prefix) for prefix in OUTPUTS):
            shown.append(block.body.rstrip("\n"))
            continue
        commands, transcript = [], None
        for line, number, prompt in shell_lines(block):
            if transcript is not None and not prompt:
                transcript.shows.append(line)
                continue
            words = env_and_words(line)[1]
            if words[:1] == ["align"]:
                commands.append(Command(line, number))
                transcript = commands[-1] if prompt else None
            elif words[:1] and words[0] in OTHER_PROGRAMS:
                module = words.index("-m") + 1 if "-m" in words else len(words)
                if words[module:module + 1] == ["align"]:
                    commands.append(Command(" ".join(words[module:]), number))
            else:
                problems.append(f"README.md:{number}: cannot place `{line}`: not an align command, nor a program of "
                                "OTHER_PROGRAMS, nor in a block of OUTPUTS")
        if commands:
            groups.append(commands)
    for span, number in spans(text):
        if re.match(r"align\s+\S", span):
            groups.append([Command(span, number)])
        elif span.startswith("align:"):
            if any(span.startswith(prefix) for prefix in OUTPUTS):
                shown.append(span)
            else:
                problems.append(f"README.md:{number}: `{span}`: output with no command in OUTPUTS")
    unique, seen = [], set()
    for group in groups:  # an inline command the README repeats runs once
        keys = tuple(c.key for c in group)
        if len(group) > 1 or keys not in seen:
            seen.add(keys)
            unique.append(group)
    for output in shown:
        command_key, numbers_vary = next(v for prefix, v in OUTPUTS.items() if output.startswith(prefix))
        owner = next((c for group in unique for c in group if c.key == command_key), None)
        if owner is None:
            owner = Command(command_key, 0)
            unique.append([owner])
        owner.shows.append(output)
        owner.numbers_vary |= numbers_vary
    return unique, problems


GROUPS, PROBLEMS = read_readme(README.read_text())


def as_run(command: Command, sub: Sub) -> str:
    if sub.run:
        from align.demo import DEMO_OVERRIDES

        return sub.run.format(demo=" ".join(DEMO_OVERRIDES))
    text = command.key
    for placeholder, value in sub.put.items():
        text = re.sub(rf"(?<!\S){re.escape(placeholder)}(?!\S)", value, text)
    return f"{text} {sub.add}".strip()


# -- running a command


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@contextlib.contextmanager
def patched(owner, name: str, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


@contextlib.contextmanager
def terminal_output(out: io.StringIO, level: int):
    """stdout, stderr and the `align: ...` log lines into `out`. In a process of its own `align.console.configure`
    gives the root logger a stderr handler through basicConfig; under pytest, whose handlers are there first,
    basicConfig does nothing, so this adds the handler it would have."""
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.setLevel(level)
    root, before = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(min(before, level))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(before)


def align_main(argv: list[str], typed: str | None = None) -> tuple[int, str]:
    """`align ARGV` in this process: (exit code, what it printed)."""
    from align.cli import main

    out = io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(terminal_output(out, logging.WARNING if {"-q", "--quiet"} & set(argv) else logging.INFO))
        if typed is not None:
            stack.enter_context(patched(sys, "stdin", Terminal()))
            stack.enter_context(patched(getpass, "getpass", lambda prompt="": typed))
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help, or a usage error
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return code, out.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(argv: list[str], folder: Path) -> tuple[int, str]:
    """`align ARGV` (a server) in a process: 0 once /login answers 200, else its exit code (-1: still silent
    after 2 minutes); then stopped."""
    import httpx

    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in argv]
    log = folder / "serve.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "align", *argv], cwd=folder, stdout=out,
                                   stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/login", timeout=2).status_code == 200:
                    return 0, log.read_text()
            time.sleep(0.2)
        return -1 if process.poll() is None else process.returncode, log.read_text()
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def pattern(shown: str, numbers_vary: bool) -> re.Pattern:
    """The README's line as a pattern: `...` matches anything, and with `numbers_vary` any number matches one."""
    pieces = re.split(r"(\.\.\.|\d+(?:\.\d+)?)" if numbers_vary else r"(\.\.\.)", shown)
    return re.compile("".join(".*?" if p == "..." else r"\d+(?:\.\d+)?" if i % 2 else re.escape(p)
                              for i, p in enumerate(pieces)))


def tree_paths(tree: str) -> list[str]:
    """The paths of an indented listing: `runs/x/`, then `  name    what it is`, two spaces a level."""
    paths, stack = [], []
    for line in tree.splitlines():
        stack[(len(line) - len(line.lstrip())) // 2:] = [line.split()[0].rstrip("/")]
        paths.append("/".join(stack))
    return paths


def check_shown(command: Command, output: str, folder: Path) -> None:
    for shown in command.shows:
        if shown.splitlines()[0].endswith("/"):  # a folder listing
            missing = [p for p in tree_paths(shown) if not (folder / p).exists()]
            assert missing == [], f"`{command.text}` left no {missing}"
            continue
        for line in shown.splitlines():
            assert pattern(line, command.numbers_vary).search(output), \
                f"`{command.text}` did not print the README's\n  {line}\nbut:\n{output[-3000:]}"


def run_command(command: Command, folder: Path, monkeypatch) -> None:
    sub = SUBSTITUTE.get(command.key, Sub("as written"))
    if sub.skip:  # the text but its placeholders must be in the file that writes it
        literal = " ".join(w for w in command.key.split() if not w.isupper())
        assert literal in (REPO / sub.skip).read_text(), f"{sub.skip} no longer writes `{literal}`"
        return
    text = as_run(command, sub)
    env, argv = env_and_words(text)
    expected = 2 if any(s.startswith("align: error:") for s in command.shows) else sub.exit
    trains = argv[1:2] in (["run"], ["demo"]) and not {"--dry-run", "--help"} & set(argv)
    assert not trains or sub.trains or expected == 2, \
        f"README.md:{command.line}: `{command.text}` would train: give it --dry-run in SUBSTITUTE (or trains=True)"
    if sub.before:
        BEFORE[sub.before](folder)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, output = serve(argv[1:], folder) if sub.serve else align_main(argv[1:], sub.typed)
    where = f"README.md:{command.line}: `{command.text}`" + (f", run as `{text}`," if text != command.key else "")
    assert code == expected, f"{where} exited {code}, not {expected}:\n{output[-3000:]}"
    assert sub.shows is None or sub.shows in output, f"{where} did not print {sub.shows!r}:\n{output[-3000:]}"
    if sub.json:
        assert isinstance(json.loads(output), dict), where
    check_shown(command, output, folder)


# -- the prepared folder


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def yaml_block(first_line: str) -> dict:
    block = next(b for b in blocks(README.read_text()) if b.lang == "yaml" and b.body.startswith(first_line))
    return yaml.safe_load(block.body)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The folder every command group starts from (a copy of it).

    The commands run with one torch thread: the tiny model's matrices are too small to share out, and on 2 busy
    cores a second thread made `align eval` 3x slower (13.7 s against 4.3 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_folder(tmp_path_factory.mktemp("readme"))
    torch.set_num_threads(threads)


def make_folder(folder: Path) -> Path:
    """What the README's commands name: the recipes, a tiny model (`align tiny-model`) standing in for the PPO
    recipe's stage models, four prompts and their rollouts (`align rollouts` on it), small data files, and the
    recipes the README's error transcript and yaml blocks describe."""
    (folder / "recipes").symlink_to(REPO / "recipes")
    with contextlib.chdir(folder):
        assert align_main(["tiny-model", "tiny-model"])[0] == 0
        for stage in ("sft", "ppo", "reward"):
            shutil.copytree("tiny-model", f"runs/tiny-sft-rm-ppo/{stage}/model")
        write_jsonl(folder / "prompts.jsonl", read_jsonl(DATA / "tiny_prompts.jsonl")[:4])
        code, out = align_main(["rollouts", "--model", "tiny-model", "--prompts", "prompts.jsonl", "--n", "4",
                                "--max-new-tokens", "8", "--out", "rollouts.jsonl"])
        assert code == 0, out
    (folder / "guidelines.md").write_text("# Guidelines\n\nPrefer the answer that is correct and short.\n")
    sft, prefs = read_jsonl(DATA / "tiny_sft.jsonl"), read_jsonl(DATA / "tiny_prefs.jsonl")
    write_jsonl(folder / "train.jsonl", sft)
    write_jsonl(folder / "eval.jsonl", prefs[:2])
    bad = sft[:10]
    bad[6] = {"messages": [m for m in bad[6]["messages"] if m["role"] != "user"]}  # line 7: the assistant first
    write_jsonl(folder / "data.jsonl", bad)
    (folder / "data").mkdir()
    write_jsonl(folder / "data" / "sft.jsonl", sft[:20])  # the QLoRA block's data
    sft_stage = {"model": "tiny", "data": "recipes/data/tiny_sft.jsonl"}
    reward_stage = {"model": "${sft}", "data": "recipes/data/tiny_prefs.jsonl"}
    prompts = "recipes/data/tiny_prompts.jsonl"
    recipes = {  # `$ align run recipe.yaml   # third stage: grpo with batch_size 6, num_generations 4`
        "recipe.yaml": {"stages": {"sft": sft_stage, "reward": reward_stage, "grpo": {
            "model": "${sft}", "data": prompts, "batch_size": 6, "num_generations": 4}}},
        YAML_FRAGMENTS["  grpo:"][0]: {"output_dir": "runs/my-recipe", "stages": {
            "sft": sft_stage, "reward": reward_stage, "grpo": {**yaml_block("  grpo:")["grpo"], "data": prompts}}},
        YAML_FRAGMENTS["stages:"][0]: yaml_block("stages:"),
    }
    for name, recipe in recipes.items():
        (folder / name).write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder


def vote_on_everything(folder: Path) -> None:
    """alice and bob (added if the README did not add them) each vote for response A of every pair."""
    from labeling_app.passwords import hash_password
    from labeling_app.store import LabelStore

    with LabelStore(folder / "labels.sqlite") as store:
        for name in ("alice", "bob"):
            if store.user(name) is None:
                store.add_user(name, hash_password(PASSWORD), is_admin=name == "alice")
            shown = store.present(name, overlap=3, lease_seconds=600)
            while shown is not None:
                picked = "left" if shown.left_side == "a" else "right"
                shown = store.record_vote(name, shown.presentation_id, picked, "", 3, 600).next


def label_db(folder: Path) -> None:
    code, out = align_main(["label", "import", "rollouts.jsonl", "--db", "labels.sqlite"])
    assert code == 0, out
    vote_on_everything(folder)


BEFORE = {"votes": vote_on_everything, "label db": label_db}


# -- the tests


def test_the_reader_finds_commands_transcripts_outputs_and_python_blocks():
    sample = ("Run `align run x.yaml` or\n`align eval\n--policy p`.\n\n```bash\nalign tiny-model t   # build\n"
              "torchrun --nproc_per_node 2 -m align run x.yaml\nalign rollouts --model t \\\n    --n 2\n```\n\n"
              "```\n$ align run bad.yaml\nalign: error: ...\n```\n\n```python\nimport reward\n```\n\n"
              "```\nsomething else\n```\n")
    groups, problems = read_readme(sample)
    assert [[c.key for c in g] for g in groups] == [
        ["align tiny-model t", "align run x.yaml", "align rollouts --model t --n 2"], ["align run bad.yaml"],
        ["align run x.yaml"], ["align eval --policy p"]]
    assert groups[1][0].shows == ["align: error: ..."]
    assert len(problems) == 1 and "README.md:22: cannot place `something else`" in problems[0]
    assert [b.body for b in blocks(sample) if b.lang == "python"] == ["import reward\n"]


def test_every_line_is_placed_and_every_table_entry_used():
    assert PROBLEMS == []
    keys = {c.key for group in GROUPS for c in group}
    assert set(SUBSTITUTE) - keys == set(), "SUBSTITUTE names commands the README no longer has"
    assert len(keys) > 30  # the reader did not lose the README's commands


@pytest.mark.parametrize("group", GROUPS, ids=lambda group: f"L{group[0].line}:{group[0].key[:60]}")
def test_readme_commands_run(group, prepared, tmp_path, monkeypatch):
    folder = tmp_path / "w"
    shutil.copytree(prepared, folder, symlinks=True)
    monkeypatch.chdir(folder)
    done = set()
    for command in group:  # the accelerate and torchrun lines all hold `align run RECIPE`: once is enough
        if command.key not in done or command.shows:
            run_command(command, folder, monkeypatch)
            done.add(command.key)


def test_python_blocks_run(prepared, tmp_path, monkeypatch):
    folder = tmp_path / "w"
    shutil.copytree(prepared, folder, symlinks=True)
    monkeypatch.chdir(folder)
    for block in blocks(README.read_text()):
        if block.lang in ("python", "py", "pycon"):
            exec(compile(block.body, f"README.md:{block.line}", "exec"), {"__name__": "readme"})


def resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        with contextlib.suppress(ModuleNotFoundError):
            target = importlib.import_module(".".join(parts[:cut]))
            for name in parts[cut:]:
                target = getattr(target, name)
            return target
    raise ModuleNotFoundError(dotted)


OUR_NAME = re.compile(r"(?<![\w./-])((?:align|reward|labeling_app)(?:\.\w+)+)(?::(\w+))?((?:\([^`]*?\)\.\w+)*)")


def test_our_names_in_inline_code_import():
    """`align.hacking.sequence_kl`, `reward_fn: align.judges:sentiment`, `reward.RewardScorer(path).score(...)`."""
    checked, broken = 0, []
    for span, number in spans(README.read_text()):
        for m in OUR_NAME.finditer(span):
            try:
                target = resolve(m[1])
                for name in ([m[2]] if m[2] else []) + re.findall(r"\)\.(\w+)", m[3]):
                    target = getattr(target, name)
                checked += 1
            except (ImportError, AttributeError) as e:
                broken.append(f"README.md:{number}: `{span}`: {e!r}")
    assert broken == [] and checked >= 5


def test_api_calls_run(prepared, monkeypatch):
    calls = [span for span, _ in spans(README.read_text()) if re.match(r"[A-Za-z_]\w*(\.\w+)+\(", span)]
    assert set(calls) - set(API_CALLS) - NOT_OUR_API == set(), "a call in the README is not in API_CALLS"
    assert set(API_CALLS) <= set(calls), "API_CALLS names a call the README no longer shows"
    monkeypatch.chdir(prepared)
    for call, (setup, dots, check) in API_CALLS.items():
        scope: dict = {}
        exec(setup, scope)
        exec("result = " + call.replace("...", dots), scope)
        assert eval(check, scope), f"`{call}` gave {scope['result']!r}"


def align_flags() -> set[str]:
    from align.cli import build_parser

    flags, parsers = set(), [build_parser()]
    while parsers:
        for action in parsers.pop()._actions:  # argparse has no public walk over a parser's options
            flags.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
    return flags


def test_flags_in_inline_code_exist():
    known = align_flags() | set().union(*FOREIGN_FLAGS.values())
    for script in (REPO / "bench").glob("*.py"):
        known |= set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", script.read_text()))
    unknown = [f"README.md:{number}: {flag} in `{span}`" for span, number in spans(README.read_text())
               for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", span) if flag not in known]
    assert unknown == []


def test_paths_and_make_targets_exist():
    text = README.read_text()
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    tops = {path.split("/")[0] for path in tracked if "/" in path}
    named = [(word.rstrip(".,:;)"), number) for span, number in spans(text) for word in span.split()]
    named += [(m[1], text.count("\n", 0, m.start()) + 1) for m in re.finditer(r"\]\(([^)#:]+)\)", text)]
    named += [(path, number) for block in blocks(text) if block.lang in SHELL
              for line, number, _ in shell_lines(block) for path in re.findall(r"recipes/[\w./-]+", line)]
    missing = [f"README.md:{number}: {path}" for path, number in named
               if (path.split("/")[0] in tops and "/" in path or path in ("ARCHITECTURE.md", "README.md"))
               and not (REPO / path).exists()]
    assert missing == []
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    make = [(line, number) for block in blocks(text) if block.lang in SHELL
            for line, number, _ in shell_lines(block) if line.startswith("make ")]
    make += [(span, number) for span, number in spans(text) if span.startswith("make ")]
    assert [f"README.md:{n}: {line}" for line, n in make if line.split()[1] not in targets] == []


def test_yaml_blocks_headed_by_a_recipe_say_what_it_says():
    """A key the file leaves out must show the default the file gets."""
    from align.stages import load_recipe

    for block in blocks(README.read_text()):
        if block.lang != "yaml":
            continue
        header = re.match(r"#\s*(recipes/[\w./-]+\.yaml)", block.body)
        if not header:
            assert block.body.splitlines()[0] in YAML_FRAGMENTS, f"README.md:{block.line}: a yaml block no one checks"
            continue
        shown, raw = yaml.safe_load(block.body), yaml.safe_load((REPO / header[1]).read_text())
        recipe = load_recipe(REPO / header[1])
        if "stages" in shown:
            stages = shown.pop("stages")
        else:  # one stage's part of the file
            stages, shown = shown, {}
        checks = [(key, value, raw.get(key, getattr(recipe, key, None))) for key, value in shown.items()]
        checks += [(f"stages.{name}.{key}", value, raw["stages"][name].get(key, getattr(recipe.stages[name], key)))
                   for name, settings in stages.items() for key, value in settings.items()]
        wrong = [f"{key}: {value!r} (the file: {actual!r})" for key, value, actual in checks if value != actual]
        assert wrong == [], f"README.md:{block.line} shows {header[1]} with {wrong}"
