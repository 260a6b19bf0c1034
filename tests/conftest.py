"""Fixtures: a tiny offline model built once per session, caches of our own, and the seed and thread count
that learning tests run under.

Learning tests (a trained model got better) take their seed from `ALIGN_TEST_SEED` (default 0) and run with
`ALIGN_TEST_THREADS` torch threads (default: torch's own choice; 1 per worker under pytest-xdist). Their bounds
were set from the spread over seeds 0-4 and 1 and 2 threads (`tests/spread.py` runs that matrix); each
test's comment gives the spread it measured.
"""

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_SFT = REPO / "recipes" / "data" / "tiny_sft.jsonl"

# Keep tests off any network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED = int(os.environ.get("ALIGN_TEST_SEED", "0"))
THREADS = os.environ.get("ALIGN_TEST_THREADS")


WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if not THREADS and WORKERS > 1:  # pytest -n N: the cores shared out, not N x all of them fighting
    THREADS = str(max(1, (os.cpu_count() or 1) // WORKERS))
if THREADS:  # children (align run in a subprocess, torchrun ranks) inherit it through OpenMP's variable
    os.environ["OMP_NUM_THREADS"] = THREADS

# Caches a test run may write, each moved under pytest's temporary folder (pytest_configure below), so the
# suite never writes to the user's home: align's (models, ref_logps), Hugging Face's (datasets' builder locks
# and Arrow files), matplotlib's font list, and anything else that follows XDG.
CACHE_VARIABLES = {"ALIGN_CACHE": "align", "HF_HOME": "huggingface", "HF_DATASETS_CACHE": "huggingface/datasets",
                   "MPLCONFIGDIR": "matplotlib", "XDG_CACHE_HOME": "xdg", "TRITON_CACHE_DIR": "triton",
                   "VLLM_CACHE_ROOT": "vllm"}
# vLLM's CPU build sizes its KV cache from gpu_memory_utilization x the machine's memory (0.3 x 24 GiB: 7 GiB per
# engine, measured); the vLLM tests' tiny models need far less, and several engines live in one test process.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
HOME_CACHES = [Path.home() / ".cache" / name for name in ("align", "huggingface", "matplotlib", "torch", "vllm")]


def snapshot(folders: list[Path]) -> dict[str, tuple[int, int]]:
    """Every file under `folders` with its size and modification time."""
    files = {}
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                with contextlib.suppress(OSError):
                    st = os.stat(os.path.join(root, name))
                    files[os.path.join(root, name)] = (st.st_size, st.st_mtime_ns)
    return files


@pytest.hookimpl(trylast=True)  # after pytest's own configure made the temporary-folder factory
def pytest_configure(config):
    root = config._tmp_path_factory.mktemp("caches", numbered=True)
    for variable, sub in CACHE_VARIABLES.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(root / sub)
    config.home_caches_before = snapshot(HOME_CACHES)


@pytest.fixture(scope="session", autouse=True)
def home_is_left_alone(request):
    """Fails the session's last test (an error at its teardown) if anything under ~/.cache/{align,huggingface,
    matplotlib,torch} was written while the tests ran."""
    yield
    before, after = request.config.home_caches_before, snapshot(HOME_CACHES)
    changed = sorted(path for path in set(before) | set(after) if before.get(path) != after.get(path))
    assert not changed, f"the tests wrote to the user's home: {changed[:5]}"


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    if THREADS:
        import torch

        torch.set_num_threads(int(THREADS))


def record_learning(test: str, **values: float) -> None:
    """A learning test's measured values, appended to `ALIGN_SPREAD_LOG` (JSONL) when set, with the seed and
    thread count they were measured under: `tests/spread.py` reads them to give each bound its spread."""
    log = os.environ.get("ALIGN_SPREAD_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"test": test, "seed": SEED, "threads": THREADS, **values}) + "\n")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random-weight Llama with align's BPE tokenizer and ChatML template."""
    from align.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


PPO_RECIPE = REPO / "recipes" / "tiny-sft-rm-ppo.yaml"


@pytest.fixture(scope="session")
def ppo_upstream(tmp_path_factory) -> Path:
    """The shipped tiny SFT -> reward -> PPO recipe's SFT and reward stages at SEED, trained once per test run:
    under pytest-xdist the first worker to ask trains them under a file lock in the folder all workers share,
    the others wait and read the result. Read-only: a test copies the stages into its own output folder,
    where `align run` skips them (complete, same inputs)."""
    from filelock import FileLock

    from align.runner import run_recipe
    from align.stages import load_recipe

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    out = shared / f"ppo-upstream-seed{SEED}"
    with FileLock(f"{out}.lock"):
        done = out / "reward" / "manifest.json"
        if not (done.exists() and json.loads(done.read_text())["status"] == "complete"):
            run_recipe(load_recipe(PPO_RECIPE, [f"output_dir={out}", f"seed={SEED}"]), only=["sft", "reward"])
    return out


def copy_stages(src: Path, out: Path, stages=("sft", "reward")) -> Path:
    """`out` made, holding a copy of each finished stage folder of `src`."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        shutil.copytree(src / stage, out / stage)
    return out


@pytest.fixture
def python() -> str:
    return sys.executable


def write_recipe(path: Path, output_dir: Path, stages: dict, seed: int = 0) -> Path:
    """A recipe file for tests; `stages` maps stage name to its settings."""
    import yaml

    path.write_text(yaml.safe_dump({"output_dir": str(output_dir), "seed": seed, "stages": stages}, sort_keys=False))
    return path


def tiny_sft_stage(model, **overrides) -> dict:
    """SFT settings that learn the tiny task in a few seconds on 2 cores."""
    stage = dict(model=str(model), data=str(TINY_SFT), eval_fraction=0.1, max_length=64, lr=3e-3, epochs=2,
                 batch_size=16, warmup_ratio=0.05, lr_scheduler="cosine", logging_steps=10, eval_steps=0,
                 save_steps=20, save_total_limit=2)
    stage.update(overrides)
    return stage


TINY_PREFS = REPO / "recipes" / "data" / "tiny_prefs.jsonl"


def tiny_pref_stage(model, **overrides) -> dict:
    """Reward/DPO settings for the tiny preference set (bare answer preferred over answer + filler)."""
    stage = dict(model=str(model), data=str(TINY_PREFS), eval_fraction=0.1, max_length=64, lr=1e-3, epochs=1,
                 batch_size=16, logging_steps=2, eval_steps=0, save_steps=50)
    stage.update(overrides)
    return stage
