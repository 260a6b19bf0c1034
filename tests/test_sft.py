"""SFT on the tiny model: learning shown by held-out loss, and outputs that plain libraries load."""

import json

import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.stages import load_recipe
from align.runner import run_recipe
from conftest import SEED, record_learning, tiny_sft_stage, write_recipe


def held_out_loss(model, tok, rows) -> float:
    """Mean loss over assistant tokens of `rows`, computed here without TRL."""
    losses = []
    model.eval()
    for messages in rows:
        enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = torch.tensor([enc["input_ids"]])
        labels = ids.clone()
        labels[0, torch.tensor(enc["assistant_masks"]) == 0] = -100
        with torch.no_grad():
            losses.append(model(input_ids=ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


def test_full_sft_lowers_held_out_loss(tiny_model, tmp_path):
    out = tmp_path / "run"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", out, {"sft": tiny_sft_stage(tiny_model, epochs=3)},
                                      seed=SEED))
    metrics = run_recipe(recipe)["sft"]
    saved = out / "sft" / "model"
    model = AutoModelForCausalLM.from_pretrained(saved)
    tok = AutoTokenizer.from_pretrained(saved)
    rows = [json.loads(line)["messages"] for line in open(tiny_sft_stage(tiny_model)["data"])][:40]
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    trained_over_base = held_out_loss(model, tok, rows) / held_out_loss(base, tok, rows)
    log = [json.loads(line) for line in (out / "sft" / "log.jsonl").read_text().splitlines()]
    train_logs = [r for r in log if "loss" in r]
    record_learning("test_full_sft_lowers_held_out_loss", eval_loss_before=metrics["eval_loss_before"],
                    eval_loss=metrics["eval_loss"], eval_loss_ratio=metrics["eval_loss"] / metrics["eval_loss_before"],
                    trained_over_base=trained_over_base, train_loss_drop=train_logs[0]["loss"] - train_logs[-1]["loss"])

    # Random weights over a 512-token vocabulary start near ln(512) = 6.24.
    assert 5.5 < metrics["eval_loss_before"] < 7.0
    # spread over seeds 0-4 x 1 and 2 torch threads (tests/spread.py): 1.89-2.09 from
    # 6.19-6.21 on prompts training never saw (ratio 0.30-0.34); the saved model's loss on 40 rows 0.363-0.371
    # of the untrained one's; the training loss down 4.12-4.19.
    assert metrics["eval_loss"] < 2.4
    assert metrics["eval_loss"] < 0.4 * metrics["eval_loss_before"]
    assert metrics["global_step"] == 102  # ceil(540 / 16) * 3 epochs

    # The saved model is a plain transformers folder, and it is the trained one.
    assert trained_over_base < 0.45

    manifest = json.loads((out / "sft" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["config"]["lr"] == 3e-3
    assert {"torch", "transformers", "trl"} <= set(manifest["versions"])
    assert train_logs[-1]["loss"] < train_logs[0]["loss"] - 2
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in train_logs)
    report = (out / "report.md").read_text()
    assert report.count("eval_loss") >= 2 and "![sft curves](sft/curves.png)" in report
    assert (out / "sft" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lora_sft_on_an_earlier_stage_saves_an_adapter_that_peft_loads(tiny_model, tmp_path):
    # LoRA cannot sharpen a random model's logits (the frozen embeddings bound them), so as in real
    # use it refines a model that already learned something: a short full SFT first.
    out = tmp_path / "run"
    stages = {"sft": tiny_sft_stage(tiny_model, epochs=1),
              "sft_lora": tiny_sft_stage("${sft}", type="sft", lr=1e-2, epochs=4,
                                         lora={"r": 16, "alpha": 32, "dropout": 0.0})}
    metrics = run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", out, stages, seed=SEED)))
    first, second = metrics["sft"], metrics["sft_lora"]
    saved = out / "sft_lora" / "model"
    model = AutoPeftModelForCausalLM.from_pretrained(saved)
    start = AutoModelForCausalLM.from_pretrained(out / "sft" / "model")
    tok = AutoTokenizer.from_pretrained(saved)
    rows = [json.loads(line)["messages"] for line in open(stages["sft"]["data"])][:40]
    held_out_drop = held_out_loss(start, tok, rows) - held_out_loss(model, tok, rows)
    record_learning("test_lora_sft_on_an_earlier_stage_saves_an_adapter_that_peft_loads",
                    eval_loss_drop=second["eval_loss_before"] - second["eval_loss"], held_out_drop=held_out_drop)
    assert abs(second["eval_loss_before"] - first["eval_loss"]) < 1e-4  # it started from the first stage's model
    # spread over seeds 0-4 x 1 and 2 torch threads (tests/spread.py): held-out loss down
    # 0.21-0.26 in the stage's eval, 0.20-0.24 on 40 rows loaded through PEFT
    assert second["eval_loss"] < second["eval_loss_before"] - 0.12

    assert (saved / "adapter_config.json").exists() and not (saved / "model.safetensors").exists()
    assert held_out_drop > 0.12


def test_lora_merged_on_request_is_a_full_model(tiny_model, tmp_path):
    out = tmp_path / "run"
    stage = tiny_sft_stage(tiny_model, max_steps=5, lora={"r": 4, "target_modules": ["q_proj", "v_proj"]},
                           merge_lora=True)
    run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", out, {"sft": stage})))
    saved = out / "sft" / "model"
    assert not (saved / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_assistant_only_loss_ignores_prompt_tokens(tiny_model, tmp_path):
    """With assistant-only loss the model learns answers, not prompts: prompt-token loss stays high."""
    out = tmp_path / "run"
    stage = tiny_sft_stage(tiny_model, epochs=3)
    run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", out, {"sft": stage}, seed=SEED)))
    model = AutoModelForCausalLM.from_pretrained(out / "sft" / "model").eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    answer_loss = held_out_loss(model, tok, [[{"role": "user", "content": "Count from 4 to 7."},
                                              {"role": "assistant", "content": "4 5 6 7"}]])
    ids = torch.tensor([tok.encode("<|im_start|>user\nCount from 4 to 7.<|im_end|>\n")])
    with torch.no_grad():
        prompt_loss = model(input_ids=ids, labels=ids).loss.item()
    record_learning("test_assistant_only_loss_ignores_prompt_tokens", answer_loss=answer_loss,
                    prompt_minus_answer=prompt_loss - answer_loss)
    # spread over seeds 0-4 x 1 and 2 torch threads (tests/spread.py): answer loss
    # 2.19-2.33, prompt loss above it by 3.50-3.78
    assert answer_loss < 2.6
    assert prompt_loss > answer_loss + 2.0, (prompt_loss, answer_loss)


def test_prompt_completion_rows_and_drop_policy(tiny_model, tmp_path):
    data = tmp_path / "pc.jsonl"
    rows = [{"prompt": f"Count from {a} to {a + 3}.", "completion": " ".join(str(i) for i in range(a, a + 4))}
            for a in range(1, 16)] * 4
    rows.append({"prompt": "Repeat: " + "cat " * 80, "completion": "cat " * 80})  # far past max_length
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = tiny_sft_stage(tiny_model, data=str(data), too_long="drop", max_steps=10, eval_fraction=0.0)
    metrics = run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"sft": stage})))["sft"]
    assert metrics["rows_too_long"] == 1
    assert metrics["train_rows"] == 60


def test_packing_and_tensorboard(tiny_model, tmp_path):
    out = tmp_path / "run"
    stage = tiny_sft_stage(tiny_model, packing=True, max_steps=12, report_to="tensorboard", eval_steps=6,
                           logging_steps=2)
    metrics = run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", out, {"sft": stage}, seed=SEED)))["sft"]
    record_learning("test_packing_and_tensorboard", eval_loss_drop=metrics["eval_loss_before"] - metrics["eval_loss"])
    # Packed rows fill max_length=64, so 12 steps of 16 rows see far more tokens than unpacked rows (~27 each).
    assert metrics["num_input_tokens_seen"] > 12 * 16 * 40
    assert metrics["eval_loss"] < metrics["eval_loss_before"]  # down 1.24-1.32 over seeds 0-4 x 1 and 2 threads
    assert list((out / "sft" / "tensorboard").glob("events.out.tfevents.*"))


def test_dry_run_checks_data_and_trains_nothing(tiny_model, tmp_path, python):
    import subprocess

    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", out, {"sft": tiny_sft_stage(tiny_model)})
    r = subprocess.run([python, "-m", "align", "run", str(path), "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "sft (sft)" in r.stdout and "600 rows" in r.stdout and "not run" in r.stdout
    assert not (out / "sft").exists()


def test_the_starting_model_is_evaluated_after_model_and_optimizer_are_prepared_together(tiny_model, tmp_path,
                                                                                         monkeypatch):
    """Issue #20 item 1: FSDP2 crashed at the first stage, "When using FSDP2, a model and optimizer must be passed
    together to Accelerator.prepare()" (accelerate/accelerator.py, `prepare`): the held-out "before" evaluation ran
    `trainer.evaluate()` before `train()`, and transformers' evaluation loop prepares a model it finds unprepared
    alone (transformers/trainer.py, `evaluation_loop`). accelerate 1.15 turns an FSDP2 plugin on a CPU into
    MULTI_CPU or NO, so FSDP2 itself cannot run here; this test applies accelerate's FSDP2 rule to every `prepare`
    of a real SFT stage instead (it failed before the fix: the model came alone). The "before" loss is still the
    starting model's, measured once."""
    from accelerate import Accelerator

    prepare, prepare_model = Accelerator.prepare, Accelerator.prepare_model
    calls, inside = [], []

    def fsdp2_rule(self, *args, **kwargs):  # accelerate's own check when is_fsdp2, applied whatever the plugin
        models = sum(isinstance(a, torch.nn.Module) for a in args)
        optimizers = sum(isinstance(a, torch.optim.Optimizer) for a in args)
        calls.append((models, optimizers))
        if (models < 1 and optimizers > 0) or (models > 0 and optimizers < 1):
            raise ValueError("When using FSDP2, a model and optimizer must be passed together to "
                             "`Accelerator.prepare()`")
        inside.append(True)
        try:
            return prepare(self, *args, **kwargs)
        finally:
            inside.pop()

    def model_alone(self, model, *args, **kwargs):
        # Without FSDP, transformers' evaluation loop prepares an unprepared model with prepare_model(model,
        # evaluation_mode=True); under FSDP the same line is prepare(model): the model alone, the crash.
        if not inside:
            return fsdp2_rule(self, model)
        return prepare_model(self, model, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "prepare", fsdp2_rule)
    monkeypatch.setattr(Accelerator, "prepare_model", model_alone)
    out = tmp_path / "run"
    stage = tiny_sft_stage(tiny_model, epochs=1, max_steps=3, save_steps=50)
    metrics = run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", out, {"sft": stage}, seed=SEED)))["sft"]
    assert (1, 1) in calls and all(c == (1, 1) or c[0] == 0 == c[1] for c in calls), calls
    assert 5.5 < metrics["eval_loss_before"] < 7.0  # the random starting model: near ln(512) = 6.24
    assert json.loads((out / "sft" / "eval_before.json").read_text())["eval_loss"] == metrics["eval_loss_before"]
    log = [json.loads(line) for line in (out / "sft" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval_loss" in r][0] == 0  # measured before the first step
