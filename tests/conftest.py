"""Fixtures: a tiny offline model built once per session, and a cache folder of our own."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_SFT = REPO / "recipes" / "data" / "tiny_sft.jsonl"

# Keep tests off the user's cache and off any network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def align_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("align-cache")
    os.environ["ALIGN_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random-weight Llama with align's BPE tokenizer and ChatML template."""
    from align.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


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
