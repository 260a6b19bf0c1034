"""The controlled-sentiment bench (`bench/frontier.py --quick`): SFT, judge-labelled pairs, a proxy reward model,
DPO at two betas and PPO at two kl_coefs through align's own stages, then the reward/KL points and the figure."""

import json
import re
import subprocess
import sys

from conftest import REPO, SEED, record_learning

from align.judges import sentiment

DATA = REPO / "recipes" / "data"


def test_sentiment_data_is_reproducible_and_holds_out_unseen_titles(tmp_path):
    sys.path.insert(0, str(DATA))
    try:
        import make_sentiment_data
    finally:
        sys.path.remove(str(DATA))
    make_sentiment_data.make(tmp_path)
    names = ("sentiment_sft.jsonl", "sentiment_prompts.jsonl", "sentiment_eval_prompts.jsonl")
    for name in names:
        assert (tmp_path / name).read_text() == (DATA / name).read_text(), f"{name} is not what the generator writes"
    prompts = {name: [json.loads(line)["prompt"] for line in (DATA / name).read_text().splitlines()] for name in names}
    titles = {name: {re.search(r"The \w+ \w+", p).group(0) for p in ps} for name, ps in prompts.items()}
    held = titles["sentiment_eval_prompts.jsonl"]
    assert held and not held & (titles["sentiment_sft.jsonl"] | titles["sentiment_prompts.jsonl"])
    for ps in prompts.values():
        assert len(set(ps)) == len(ps)  # align holds out by prompt: no prompt twice
    reviews = [json.loads(line)["completion"] for line in (DATA / "sentiment_sft.jsonl").read_text().splitlines()]
    scores = sentiment(None, reviews)
    assert min(scores) < -0.3 and max(scores) > 0.3 and sum(s == 0 for s in scores) > len(scores) / 8


def test_quick_frontier_run(tmp_path):
    out, result_path, png = tmp_path / "work", tmp_path / "frontier.json", tmp_path / "frontier.png"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "frontier.py"), "--quick", "--out", str(out),
                           "--json", str(result_path), "--png", str(png), "--seed", str(SEED)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    points = {(p["method"], p["setting"]): p for p in result["points"]}
    assert set(points) == {("sft", None), *(("dpo", b) for b in result["betas"]),
                           *(("ppo", k) for k in result["kl_coefs"])}
    assert len(result["betas"]) >= 2 and len(result["kl_coefs"]) >= 2
    # every point was trained by align's own stages, from the recipe the bench wrote
    recipe = (out / "frontier.yaml").read_text()
    for p in result["points"]:
        assert json.loads((out / p["stage"] / "manifest.json").read_text())["status"] == "complete"
    assert recipe.count("type: dpo") == len(result["betas"]) and recipe.count("type: ppo") == len(result["kl_coefs"])

    sft = points[("sft", None)]
    trained = [p for p in result["points"] if p["method"] != "sft"]
    lo, hi = min(result["kl_coefs"]), max(result["kl_coefs"])
    record_learning("test_quick_frontier_run", min_kl=min(p["kl"] for p in trained),
                    min_judge_gain=min(p["judge"] - sft["judge"] for p in trained),
                    ppo_kl_lo_minus_hi=points[("ppo", lo)]["kl"] - points[("ppo", hi)]["kl"],
                    pair_judge_gap=result["pairs"]["chosen_judge_mean"] - result["pairs"]["rejected_judge_mean"],
                    proxy_eval_accuracy=result["proxy_eval_accuracy"])
    assert abs(sft["kl"]) < 0.05  # the SFT model against itself
    # spread over seeds 0-4 x 1 and 2 torch threads (tests/spread.py): every trained
    # policy's KL 0.80 or more, its judge above the SFT model's by 0.078 or more (0.12-0.29 but for seed 3), the
    # weakest KL penalty's PPO KL above the strongest's by 4.8-12.1
    assert all(p["kl"] > 0.1 for p in trained)  # every policy moved away from the SFT model
    assert all(p["judge"] > sft["judge"] + 0.02 for p in trained)  # ... towards happier reviews
    assert points[("ppo", lo)]["kl"] > points[("ppo", hi)]["kl"]  # a weaker KL penalty lets PPO move further
    for p in result["points"]:
        assert -1 <= p["judge"] <= 1 and -1 <= p["judge_greedy"] <= 1
        assert all(isinstance(p[k], float) for k in ("proxy", "kl", "judge"))

    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert result["pairs"]["pairs"] == len(pairs) > 50
    chosen, rejected = sentiment(None, [r["chosen"] for r in pairs]), sentiment(None, [r["rejected"] for r in pairs])
    assert all(c > r for c, r in zip(chosen, rejected))  # the judge picked every pair; ties were dropped
    assert result["pairs"]["chosen_judge_mean"] > result["pairs"]["rejected_judge_mean"] + 0.2
    assert result["proxy_eval_accuracy"] > 0.5  # the proxy learned the judge's preference on held-out pairs

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "finding:" in proc.stdout
