"""Which pair an annotator gets next (`serve --order`), and reward gaps stored at import for the uncertainty order."""

import json
import subprocess
import sys

import pytest

from labeling_app.store import LabelStore, NewPair


def order_seen(tmp_path, order: str, gaps: list) -> list[int]:
    """The pair ids one annotator is shown, one after another, with overlap 1."""
    with LabelStore(tmp_path / f"{order}.sqlite", create=True, order=order) as store:
        store.add_pairs(NewPair(f"q{i}", f"a{i}", f"b{i}", {} if g is None else {"reward_gap": g})
                        for i, g in enumerate(gaps))
        store.add_user("u", "scrypt$unused")
        seen, shown = [], store.present("u", overlap=1, lease_seconds=600)
        while shown is not None:
            seen.append(shown.pair_id)
            shown = store.record_vote("u", shown.presentation_id, "tie", "", 1, 600).next
    return seen


def test_uncertainty_first_fifo_and_a_fixed_shuffle(tmp_path):
    gaps = [2.0, -0.1, None, 0.5, -3.0, 0.05, None, 1.0]
    # smallest |gap| first (ids from 1): 0.05 (6), -0.1 (2), 0.5 (4), 1.0 (8), 2.0 (1), -3.0 (5), then no gap: 3, 7
    assert order_seen(tmp_path, "uncertainty", gaps) == [6, 2, 4, 8, 1, 5, 3, 7]
    assert order_seen(tmp_path, "fifo", gaps) == [1, 2, 3, 4, 5, 6, 7, 8]
    shuffled = order_seen(tmp_path, "random", gaps)
    assert sorted(shuffled) == list(range(1, 9)) and shuffled != list(range(1, 9))
    (tmp_path / "again").mkdir()
    assert order_seen(tmp_path / "again", "random", gaps) == shuffled  # the same shuffle in another database
    with pytest.raises(Exception, match="order 'newest': expected one of fifo, random, uncertainty"):
        LabelStore(tmp_path / "x.sqlite", create=True, order="newest")


def test_import_stores_the_reward_models_gap(tiny_model, tmp_path):
    from reward.score import RewardScorer
    from reward.train import init_reward_model

    reward = tmp_path / "reward"
    model = init_reward_model(str(tiny_model))
    model.save_pretrained(reward)
    from align.models import load_tokenizer

    load_tokenizer(str(tiny_model)).save_pretrained(reward)
    rows = [{"prompt": f"What is {i} plus {i}?", "response_a": f"{2 * i}", "response_b": f"{2 * i} I think"}
            for i in range(5)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = tmp_path / "labels.sqlite"
    done = subprocess.run([sys.executable, "-m", "align", "label", "import", str(data), "--db", str(db),
                           "--reward-model", str(reward)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    scorer = RewardScorer(reward)
    prompts = [r["prompt"] for r in rows]
    expected_a = scorer.score(prompts, [r["response_a"] for r in rows])
    expected_b = scorer.score(prompts, [r["response_b"] for r in rows])
    with LabelStore(db) as store:
        stored = [p.metadata for p in store.pairs()]
    assert [m["reward_a"] for m in stored] == pytest.approx(expected_a, abs=1e-5)
    assert [m["reward_gap"] for m in stored] == pytest.approx([a - b for a, b in zip(expected_a, expected_b)],
                                                               abs=1e-5)
    bad = subprocess.run([sys.executable, "-m", "align", "label", "import", str(data), "--db", str(db),
                          "--reward-model", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert bad.returncode == 2 and "expected a reward model folder" in bad.stderr and bad.stderr.count("\n") == 1
    alone = subprocess.run([sys.executable, "-m", "labeling_app", "import", str(data), "--db", str(db),
                            "--reward-model", str(reward)], capture_output=True, text=True)
    assert alone.returncode == 2 and "run it as `align label import ...`" in alone.stderr
