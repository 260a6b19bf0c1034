"""Item by item against the real server: gold pairs mixed into the queue unmarked, the uncertainty-first order, and
the admin view's annotator quality and model leaderboard (labeling_app/quality.py)."""

import json
import subprocess
import sys

from labeling_app.client import LabelingClient
from labeling_app.loadtest import PASSWORD, ServerProcess, seed_database
from labeling_app.passwords import hash_password
from labeling_app.store import LabelStore, NewPair


def test_gold_first_then_least_certain_first_and_the_admin_view(tmp_path):
    db = tmp_path / "labels.sqlite"
    seed_database(db, ["ann"], pairs=0)
    gaps = {"gap three": 3.0, "gap tenth": -0.1, "gap one": 1.0}
    with LabelStore(db) as store:
        store.add_user("root", hash_password("admin-password-1"), is_admin=True)
        store.add_pairs([NewPair(prompt, f"{prompt} answer A", f"{prompt} answer B",
                                 {"reward_gap": gap, "model_a": "new", "model_b": "old"})
                         for prompt, gap in gaps.items()])
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"prompt": "gold question", "chosen": "right", "rejected": "wrong"}) + "\n")
    imported = subprocess.run([sys.executable, "-m", "labeling_app", "import", "--gold", str(gold), "--db", str(db)],
                              capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    with ServerProcess(db, overlap=1, extra=["--order", "uncertainty", "--gold-rate", "1"]) as server:
        ann = LabelingClient(server.url, "ann", PASSWORD)
        ann.login()
        page = ann.load()
        assert "gold question" in page.prompt  # gold rate 1: the gold pair first, looking like any other
        assert set(json.loads(json.dumps(page.__dict__))) == {"presentation_id", "last_vote_id", "prompt", "left",
                                                             "right", "progress", "status"}
        ann.vote("left" if "right" in page.left else "right")  # answered as known
        shown = []
        while ann.page.presentation_id:
            shown.append(next(p for p in gaps if p in ann.page.prompt))
            ann.vote("left" if "answer A" in ann.page.left else "right")  # always A: "new" wins
        assert shown == ["gap tenth", "gap one", "gap three"]  # smallest |reward gap| first

        from gradio_client import Client

        admin_view = Client(server.url, auth=("root", "admin-password-1"), verbose=False).predict(
            api_name="/admin_report")
    assert "### Annotator quality" in admin_view and "| ann | 4 |" in admin_view and "100% (1) |" in admin_view
    assert "### Model leaderboard" in admin_view and "| new |" in admin_view and "| old |" in admin_view
