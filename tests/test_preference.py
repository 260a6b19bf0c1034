"""Reward models, DPO (every TRL loss, reference cache) and KTO on the tiny model."""

import json

import pytest
import torch

from align.config import DPO_LOSS_TYPES
from align.stages import load_recipe
from align.errors import AlignError
from align.runner import run_recipe
from conftest import REPO, SEED, TINY_PREFS, copy_stages, record_learning, tiny_pref_stage, write_recipe


@pytest.fixture(scope="module")
def pipeline(ppo_upstream, tmp_path_factory):
    """The shipped tiny SFT -> reward -> DPO recipe, run once for the tests below (its SFT and reward stages are
    the PPO recipe's, trained once: conftest)."""
    out = copy_stages(ppo_upstream, tmp_path_factory.mktemp("pipeline"))
    recipe = load_recipe(REPO / "recipes" / "tiny-sft-rm-dpo.yaml", [f"output_dir={out}", f"seed={SEED}"])
    return out, run_recipe(recipe)


def test_reward_model_learns_the_preference(pipeline):
    _, metrics = pipeline
    reward = metrics["reward"]
    record_learning("test_reward_model_learns_the_preference", accuracy=reward["eval_accuracy"],
                    accuracy_gain=reward["eval_accuracy"] - reward["eval_accuracy_before"],
                    loss_drop=reward["eval_loss_before"] - reward["eval_loss"])
    # spread over seeds 0-4 x 1 and 2 torch threads (tests/spread.py): held-out accuracy 1.00 in all
    # 10 (0.23-0.73 before: an untrained head is a coin toss, so "+0.3" could not hold from 0.73), loss
    # down 0.67-0.71 (from ~0.69, ln 2)
    assert reward["eval_accuracy"] >= 0.9
    assert reward["eval_accuracy"] > reward["eval_accuracy_before"]
    assert reward["eval_loss"] < reward["eval_loss_before"] - 0.4


def test_dpo_learns_and_the_reward_model_sees_it(pipeline):
    out, metrics = pipeline
    dpo = metrics["dpo"]
    samples = [json.loads(line) for line in (out / "dpo" / "samples.jsonl").read_text().splitlines()]
    with_filler = lambda key: sum("I hope this helps" in s[key] for s in samples)  # noqa: E731
    record_learning("test_dpo_learns_and_the_reward_model_sees_it", accuracy=dpo["eval_rewards/accuracies"],
                    loss_drop=dpo["eval_loss_before"] - dpo["eval_loss"],
                    reward_gain=dpo["eval_reward_after"] - dpo["eval_reward_before"],
                    win_rate=dpo["eval_win_rate"], win_rate_lo=dpo["eval_win_rate_ci"][0],
                    ref_nll_rise=dpo["eval_ref_nll_after"] - dpo["eval_ref_nll_before"],
                    hacking=float(dpo["hacking_suspected"]), filler_before=with_filler("before") / len(samples),
                    filler_after=with_filler("after") / len(samples))
    assert dpo["eval_rewards/accuracies"] >= 0.9
    assert dpo["eval_loss"] < dpo["eval_loss_before"]
    # spread over seeds 0-4 x 1 and 2 torch threads (tests/spread.py): reward gain 2.81-4.50, win
    # rate 0.69-1.00 (bootstrap lower end 0.53-1.00), held-out accuracy 1.00, loss down 0.54-0.62, reference
    # NLL up 0.39-0.74, filler in 53-69% of the answers before and none after
    assert dpo["eval_reward_after"] > dpo["eval_reward_before"] + 1.0
    assert dpo["eval_win_rate"] > 0.5
    lo, hi = dpo["eval_win_rate_ci"]
    assert lo <= dpo["eval_win_rate"] <= hi and 0 <= dpo["eval_lc_win_rate"] <= 1
    # Dropping the filler is what the pairs ask: no sign of reward hacking (tests/test_hacking.py has one)
    assert dpo["hacking_suspected"] is False and dpo["hacking_reasons"] == []
    assert dpo["eval_ref_nll_after"] - dpo["eval_ref_nll_before"] < 1.2
    # The behaviour the pairs teach: the filler sentence disappears from greedy answers.
    assert with_filler("before") >= len(samples) // 3
    assert with_filler("after") <= len(samples) // 10
    assert dpo["eval_prompts"] == len({json.dumps(s["prompt"]) for s in samples})  # distinct prompts


def test_scorer_gives_the_value_the_trainer_saw(pipeline):
    """TRL's own tokenization and collation of the raw pairs, through the saved reward model, versus
    RewardScorer on the same (prompt, completion) text."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from reward.score import RewardScorer

    out, _ = pipeline
    rows = [json.loads(line) for line in TINY_PREFS.read_text().splitlines()[:12]]
    scorer = RewardScorer(out / "reward" / "model")
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    args = RewardConfig(output_dir=str(out / "tmp-trl"), bf16=False, report_to=[], per_device_eval_batch_size=12)
    trainer = RewardTrainer(model=scorer.model, args=args, train_dataset=Dataset.from_list(conv),
                            eval_dataset=Dataset.from_list(conv), processing_class=scorer.tokenizer)
    batch = next(iter(trainer.get_eval_dataloader()))
    with torch.no_grad():
        seen = scorer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    chosen_seen, rejected_seen = seen.chunk(2)
    prompts = [r["prompt"] for r in rows]
    chosen = scorer.score(prompts, [r["chosen"] for r in rows], batch_size=5)
    rejected = scorer.score(prompts, [r["rejected"] for r in rows], batch_size=5)
    assert torch.allclose(torch.tensor(chosen), chosen_seen, atol=1e-5)
    assert torch.allclose(torch.tensor(rejected), rejected_seen, atol=1e-5)
    assert all(c > r for c, r in zip(chosen, rejected))


def test_second_run_skips_every_stage(pipeline, caplog):
    import logging

    out, metrics = pipeline
    caplog.set_level(logging.INFO, logger="align")
    again = run_recipe(load_recipe(REPO / "recipes" / "tiny-sft-rm-dpo.yaml", [f"output_dir={out}", f"seed={SEED}"]))
    assert caplog.text.count("skipping") == 3
    assert again["dpo"]["eval_reward_after"] == metrics["dpo"]["eval_reward_after"]
    assert "eval_win_rate" in (out / "report.md").read_text()


def _dpo_losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "dpo" / "log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_reference_cache_is_reused_and_changes_no_loss(tiny_model, tmp_path):
    stage = tiny_pref_stage(tiny_model, max_steps=6, lr=1e-3, logging_steps=1, eval_steps=3)
    runs = {}
    for name, cache in (("plain", False), ("cold", True), ("warm", True)):
        out = tmp_path / name
        recipe = write_recipe(tmp_path / f"{name}.yaml", out, {"dpo": {**stage, "ref_cache": cache}})
        runs[name] = (run_recipe(load_recipe(recipe))["dpo"], _dpo_losses(out))
    assert runs["plain"][0]["ref_cache_hits"] == [] and runs["cold"][0]["ref_cache_hits"] == []
    assert runs["warm"][0]["ref_cache_hits"] == ["train", "eval"]
    assert len(runs["plain"][1]) == 6
    for name in ("cold", "warm"):
        assert runs[name][1] == pytest.approx(runs["plain"][1], abs=1e-5)
        assert runs[name][0]["eval_loss"] == pytest.approx(runs["plain"][0]["eval_loss"], abs=1e-5)

    # One training pair changed: the train split misses (the held-out split, unchanged, may hit);
    # another max_length: both miss.
    rows = TINY_PREFS.read_text().splitlines()
    changed = json.loads(rows[5])
    changed["rejected"] += " Bye."
    data = tmp_path / "changed.jsonl"
    data.write_text("\n".join(rows[:5] + [json.dumps(changed)] + rows[6:]) + "\n")
    for name, extra, hits in (("other-rows", {"data": str(data)}, {"eval"}),
                              ("other-length", {"max_length": 48}, set())):
        recipe = write_recipe(tmp_path / f"{name}.yaml", tmp_path / name, {"dpo": {**stage, **extra}})
        assert set(run_recipe(load_recipe(recipe))["dpo"]["ref_cache_hits"]) == hits, name


def test_every_trl_dpo_loss_is_selectable(tiny_model, tmp_path):
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    offered = help_text.split("Possible values are:")[1].split(". If")[0]
    assert sorted(DPO_LOSS_TYPES) == sorted(v.strip(" `'") for v in offered.split(","))
    for loss in DPO_LOSS_TYPES:  # one optimizer step each: TRL accepts it and the loss is finite
        out = tmp_path / loss
        stage = tiny_pref_stage(tiny_model, max_steps=1, loss_type=loss, eval_fraction=0.0, batch_size=4,
                                label_smoothing=0.1 if loss in ("robust", "exo_pair") else 0.0)
        metrics = run_recipe(load_recipe(write_recipe(tmp_path / f"{loss}.yaml", out, {"dpo": stage})))["dpo"]
        assert metrics["global_step"] == 1 and torch.isfinite(torch.tensor(_dpo_losses(out)[0])), loss


def test_unknown_loss_type_lists_the_valid_ones(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "o", {"dpo": tiny_pref_stage(tiny_model)})
    with pytest.raises(AlignError) as e:
        load_recipe(recipe, ["stages.dpo.loss_type=sigmoidd"])
    assert "did you mean 'sigmoid'" in str(e.value)
    assert all(loss in str(e.value) for loss in DPO_LOSS_TYPES)


def test_lora_dpo_holds_no_second_model(tiny_model, tmp_path):
    """Under LoRA the reference is the base with adapters disabled: the saved output is an adapter,
    and without the cache the trainer keeps no reference model."""
    from trl import DPOTrainer

    seen = {}
    init = DPOTrainer.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen["ref_model"] = self.ref_model

    DPOTrainer.__init__ = spy
    try:
        stage = tiny_pref_stage(tiny_model, max_steps=4, lora={"r": 8}, ref_cache=False, lr=5e-3)
        metrics = run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "o", {"dpo": stage},
                                                      seed=SEED)))["dpo"]
    finally:
        DPOTrainer.__init__ = init
    record_learning("test_lora_dpo_holds_no_second_model", margin=metrics["eval_rewards/margins"])
    assert seen["ref_model"] is None
    assert (tmp_path / "o" / "dpo" / "model" / "adapter_config.json").exists()
    assert metrics["eval_rewards/margins"] > 0  # 0.55-0.61 over seeds 0-4 x 1 and 2 threads


def test_kto_learns_from_unpaired_labels(tiny_model, tmp_path):
    rows = [json.loads(line) for line in TINY_PREFS.read_text().splitlines()]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}) + "\n"
                            for r in rows for k in ("chosen", "rejected")))
    stage = tiny_pref_stage(tiny_model, data=str(data), lr=1e-3, epochs=1)
    metrics = run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "o", {"kto": stage},
                                                  seed=SEED)))["kto"]
    record_learning("test_kto_learns_from_unpaired_labels",
                    loss_drop=metrics["eval_loss_before"] - metrics["eval_loss"],
                    reward_gap=metrics["eval_rewards/chosen"] - metrics["eval_rewards/rejected"])
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    # over seeds 0-4 x 1 and 2 threads: loss down 0.30, the chosen-rejected reward gap 2.90-2.97
    assert metrics["eval_rewards/chosen"] > metrics["eval_rewards/rejected"]


def test_reward_stage_starts_from_a_lora_sft_adapter(tiny_model, tmp_path):
    from conftest import tiny_sft_stage

    stages = {"sft": tiny_sft_stage(tiny_model, max_steps=3, lora={"r": 4}),
              "reward": tiny_pref_stage("${sft}", epochs=1)}
    metrics = run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "o", stages, seed=SEED)))
    record_learning("test_reward_stage_starts_from_a_lora_sft_adapter", accuracy=metrics["reward"]["eval_accuracy"])
    assert (tmp_path / "o" / "sft" / "model" / "adapter_config.json").exists()
    assert metrics["reward"]["eval_accuracy"] >= 0.9  # 1.00 in 10 runs: seeds 0-4 x 1 and 2 threads


def test_kto_drops_or_counts_rows_longer_than_max_length(tiny_model, tmp_path, caplog):
    """`too_long` holds for KTO: over-long rows are counted and warned about, and dropped on request."""
    import logging

    from align.models import load_tokenizer

    rows = [json.loads(line) for line in TINY_PREFS.read_text().splitlines()[:16]]
    tokenizer = load_tokenizer(str(tiny_model))
    lengths = [len(tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                                  {"role": "assistant", "content": r[k]}], tokenize=True,
                                                 return_dict=True)["input_ids"])
               for r in rows for k in ("chosen", "rejected")]
    max_length = sorted(lengths)[len(lengths) // 2]
    over = sum(n > max_length for n in lengths)
    assert 0 < over < len(lengths)
    caplog.set_level(logging.WARNING, logger="align")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = tiny_pref_stage(tiny_model, data=str(data), eval_fraction=0.0, max_length=max_length, too_long="drop",
                            max_steps=1, batch_size=4)
    metrics = run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "o", {"kto": stage})))["kto"]
    assert metrics["rows_too_long"] == over
    assert metrics["train_rows"] == len(lengths) - over
    assert f"{over} of {len(lengths)} rows are longer than max_length={max_length}" in caplog.text

    stage.update(max_length=min(lengths) - 1)
    with pytest.raises(AlignError, match="longer than max_length"):
        run_recipe(load_recipe(write_recipe(tmp_path / "r2.yaml", tmp_path / "o2", {"kto": stage})))
