"""The wheel: recipes and their data ship inside it, once, and `align demo` finds them from anywhere.

The wheel is built offline from a copy of the sources (a stale `build/` in the checkout can leak
deleted files into a wheel), unzipped rather than installed (a venv install takes minutes), and
imported through PYTHONPATH from a folder that is not the checkout.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from align.cli import main

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("align", "reward", "labeling_app", "recipes", "pyproject.toml", "README.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=120)
    (path,) = out.glob("align-*.whl")
    return path


def test_wheel_ships_recipes_and_their_data_once(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    files = [*REPO.glob("recipes/*.yaml"), *REPO.glob("recipes/data/*.jsonl")]
    shipped = {p.relative_to(REPO).as_posix() for p in files}
    assert {"recipes/smollm2-sft-rm-dpo.yaml", "recipes/data/chatty_sft.jsonl",
            "recipes/data/concise_prefs.jsonl", "recipes/tiny-sft.yaml", "recipes/data/tiny_sft.jsonl"} <= shipped
    assert shipped <= names, f"missing from the wheel: {sorted(shipped - names)}"
    assert {"recipes/__init__.py", "align/tokenizer_corpus.txt"} <= names
    assert not any(n.startswith("align/assets/") for n in names)

    digests: dict[str, str] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in names:
            if name.endswith((".yaml", ".jsonl", ".txt")) and ".dist-info/" not in name:
                digest = hashlib.sha256(zf.read(name)).hexdigest()
                assert digest not in digests, f"{name} is a copy of {digests[digest]}"
                digests[digest] = name


def test_demo_recipe_loads_from_unzipped_wheel_in_another_folder(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import json, align, recipes\n"
        "from align.demo import demo_recipe\n"
        "recipe = demo_recipe('out', ['stages.dpo.beta=0.2'])\n"
        "print(json.dumps({'align': align.__file__, 'recipes': recipes.__file__, 'name': recipe.name,\n"
        "    'dpo': [recipe.stages['dpo'].max_steps, recipe.stages['dpo'].beta],\n"
        "    'data': {n: s.data for n, s in recipe.stages.items()}}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", script], check=False, cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(got["align"]).is_relative_to(site) and Path(got["recipes"]).is_relative_to(site)
    assert got["name"] == "demo"
    assert got["dpo"] == [16, 0.2]  # the demo's override, then the caller's
    assert set(got["data"]) == {"sft", "reward", "dpo"}
    for stage, data in got["data"].items():
        assert Path(data).is_file(), f"{stage}: {data}"
        assert Path(data).resolve().is_relative_to(site / "recipes" / "data"), f"{stage}: {data}"


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "recipes/smollm2-sft-rm-dpo.yaml" in capsys.readouterr().out
