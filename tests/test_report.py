"""report.md opens with one summary table (the numbers that say whether each stage worked, before -> after)
and leaves the trainer's counters in metrics.json. Built from hand-written stage folders: no training."""

import json

from align.report import summary_line, write_report
from align.stages import recipe_from_dict

COUNTERS = {"total_flos": 4.5e10, "train_samples_per_second": 32.5, "train_steps_per_second": 2.0, "epoch": 4.0,
            "train_runtime": 66.5}


def stage_folder(out, name, metrics, log_rows=()):
    d = out / name
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"status": "complete", "started_at": "t0", "ended_at": "t1"}))
    (d / "metrics.json").write_text(json.dumps({**COUNTERS, **metrics}))
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_rows))


def test_report_opens_with_the_summary_table_and_drops_counters(tmp_path):
    out = tmp_path / "run"
    recipe = recipe_from_dict({"output_dir": str(out), "stages": {
        "sft": {"model": "tiny", "data": "sft.jsonl"},
        "rm": {"type": "reward", "model": "${sft}", "data": "prefs.jsonl"},
        "dpo": {"model": "${sft}", "data": "prefs.jsonl"},
        "grpo": {"model": "${sft}", "data": "prompts.jsonl", "reward_model": "${rm}"},
        "ppo": {"model": "${sft}", "data": "prompts.jsonl", "reward_model": "${rm}"}}})
    stage_folder(out, "sft", {"train_loss": 1.638, "eval_loss_before": 6.196, "eval_loss": 0.7269, "seconds": 67.9})
    stage_folder(out, "rm", {"eval_accuracy_before": 0.1875, "eval_accuracy": 1.0, "eval_loss_before": 0.7345,
                             "eval_loss": 0.008629, "seconds": 54.4})
    stage_folder(out, "dpo", {"eval_rewards/accuracies_before": 0.02083, "eval_rewards/accuracies": 1.0,
                              "eval_loss_before": 1.65, "eval_loss": 0.937, "eval_reward_before": -2.051,
                              "eval_reward_after": 2.362, "eval_win_rate": 1.0, "seconds": 119.6})
    # GRPO writes no kl_last: the table takes the last logged KL.
    stage_folder(out, "grpo", {"eval_reward_before": -1.0, "eval_reward_after": 0.5, "eval_win_rate": 0.75,
                               "seconds": 30.0}, log_rows=[{"step": 1, "kl": 0.0}, {"step": 2, "kl": 0.0123}])

    write_report(recipe)
    report = (out / "report.md").read_text()

    head = report.split("\n## ")[0].splitlines()
    assert head[:5] == ["# recipe", "", f"Output: `{out}`", "",
                        "| stage | type | status | results (before → after) | minutes |"]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in head[6:] if line.startswith("|")}
    assert rows["sft"] == "| sft | sft | complete | loss 6.196 → 0.7269 | 1.1 |"
    assert rows["rm"] == "| rm | reward | complete | accuracy 0.1875 → 1; loss 0.7345 → 0.008629 | 0.9 |"
    assert rows["dpo"] == ("| dpo | dpo | complete | rewards/accuracies 0.02083 → 1; loss 1.65 → 0.937; "
                           "reward-model score -2.051 → 2.362; win rate 1 | 2.0 |")
    assert rows["grpo"] == "| grpo | grpo | complete | reward-model score -1 → 0.5; win rate 0.75; KL 0.0123 | 0.5 |"
    assert rows["ppo"] == "| ppo | ppo | not run |  |  |"

    assert "## sft (sft)" in report and "| eval_loss_before | 6.196 |" in report  # the detail stays
    for counter in COUNTERS:
        assert counter not in report
    assert "total_flos" in (out / "sft" / "metrics.json").read_text()  # still kept there


def test_summary_line_falls_back_to_train_loss():
    assert summary_line("sft", {"train_loss": 1.5, "seconds": 30}) == "0.5 min, train loss 1.5"
    assert summary_line("ppo", {"eval_reward_before": 0.1, "eval_reward_after": 0.3, "eval_win_rate": 0.5,
                                "kl_last": 0.02}) == "reward-model score 0.1 → 0.3; win rate 0.5; KL 0.02"
