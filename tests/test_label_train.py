"""The loop closes: votes exported by the labeling app train a reward model and a DPO policy unchanged."""

import json
import math
import subprocess
import sys

from align.artifacts import read_json
from align.stages import recipe_from_dict
from align.runner import run_recipe
from conftest import TINY_PREFS
from labeling_app.passwords import hash_password
from labeling_app.store import LabelStore

PAIRS = 24


def test_exported_votes_train_reward_and_dpo_stages(tiny_model, tmp_path):
    source = tmp_path / "to_label.jsonl"
    originals = [json.loads(line) for line in TINY_PREFS.read_text().splitlines()[:PAIRS]]
    source.write_text("".join(json.dumps(r) + "\n" for r in originals))
    db = tmp_path / "labels.sqlite"
    cli = [sys.executable, "-m", "labeling_app"]
    imported = subprocess.run([*cli, "import", str(source), "--db", str(db)], capture_output=True, text=True)
    unique = list({json.dumps(r): r for r in originals}.values())  # the set repeats some pairs
    assert f"imported {len(unique)} pairs" in imported.stdout
    assert f"skipped {PAIRS - len(unique)} duplicates" in imported.stdout

    # Three annotators prefer the answer without filler; the third dissents on every fourth pair,
    # so every majority still agrees with the originals (2 of 3).
    with LabelStore(db) as store:
        for name in ("ann", "bob", "cat"):
            store.add_user(name, hash_password("password123"))
        for name in ("ann", "bob", "cat"):
            shown = store.present(name, overlap=3, lease_seconds=600)
            while shown:
                pair = next(p for p in store.pairs() if p.id == shown.pair_id)
                likes_a = "I hope this helps" not in pair.response_a
                if name == "cat" and shown.pair_id % 4 == 0:
                    likes_a = not likes_a
                picked = "left" if (shown.left_side == "a") == likes_a else "right"
                shown = store.record_vote(name, shown.presentation_id, picked, "", 3, 600).next

    prefs = tmp_path / "prefs.jsonl"
    exported = subprocess.run([*cli, "export", "--db", str(db), "--out", str(prefs), "--min-votes", "2"],
                              capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert rows == [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in unique]

    stage = dict(model=str(tiny_model), data=str(prefs), eval_fraction=0.2, max_length=64, lr=1e-3, max_steps=2,
                 batch_size=4, save_steps=100, logging_steps=1, eval_steps=0)
    recipe = recipe_from_dict({"output_dir": str(tmp_path / "run"), "seed": 0,
                               "stages": {"reward": {"type": "reward", **stage},
                                          "dpo": {"type": "dpo", **stage, "eval_prompts": 4,
                                                  "max_new_tokens": 8}}})
    metrics = run_recipe(recipe)
    for name in ("reward", "dpo"):
        manifest = read_json(tmp_path / "run" / name / "manifest.json")
        assert manifest["status"] == "complete" and (tmp_path / "run" / name / "model").is_dir()
        assert all(math.isfinite(v) for v in metrics[name].values() if isinstance(v, float))
    assert 0.0 <= metrics["reward"]["eval_accuracy"] <= 1.0
    assert "eval_rewards/accuracies" in metrics["dpo"]
