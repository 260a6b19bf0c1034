"""QLoRA: `quantization: nf4 | int8` with `lora:` (bitsandbytes + PEFT's prepare_model_for_kbit_training).

On CPU every such recipe is refused before anything is written, in one line that says why
(bitsandbytes' 4-bit CPU path repacks its weights after a no-grad pass and LoRA gradients
silently stop), and a direct library call refuses too. The `gpu` tests train the tiny model
quantized on a CUDA GPU: `pytest -m gpu tests/test_qlora.py`.
"""

import importlib.util
import json
import math
import os
import subprocess

import pytest
import torch

from align import models
from align.cli import main
from align.config import LoraSettings
from align.errors import AlignError
from align.stages import recipe_from_dict
from conftest import REPO, TINY_PREFS, TINY_SFT, tiny_pref_stage, tiny_sft_stage, write_recipe

PROMPTS = REPO / "recipes" / "data" / "tiny_prompts.jsonl"
LORA = {"r": 4, "alpha": 8}
CPU_REASON = "needs a CUDA GPU and none is visible: bitsandbytes on CPU repacks its 4-bit weights after a no-grad pass"


def quantized_stage(stage_type: str, model, quantization: str = "nf4", **overrides) -> dict:
    """A short stage of `stage_type` on `model`, QLoRA."""
    base = dict(max_steps=3, batch_size=4, eval_fraction=0.2, max_length=64, logging_steps=1, eval_steps=0,
                save_steps=50, lora=LORA, quantization=quantization)
    if stage_type == "sft":
        stage = tiny_sft_stage(model, **base, type="sft")
    elif stage_type in ("reward", "dpo", "kto"):
        stage = tiny_pref_stage(model, **base, type=stage_type)
    else:
        stage = dict(model=str(model), data=str(PROMPTS), type=stage_type, response_length=8,
                     reward_fn="ppo_reward_fns:nan_on_second_batch", **base)
        if stage_type == "ppo":
            stage.update(rollout_batch_size=4, ppo_epochs=1)
        else:
            stage.update(num_generations=2)
    stage.update(overrides)
    return stage


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("align: error: "), lines
    return lines[0]


# --- the recipe ------------------------------------------------------------------------------------------------


def test_quantization_without_lora_is_refused():
    stage = dict(model="tiny", data=str(TINY_SFT), quantization="nf4")
    with pytest.raises(AlignError) as e:
        recipe_from_dict({"stages": {"sft": stage}})
    assert "'stages.sft.quantization: nf4' needs 'stages.sft.lora'" in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_quantization_value_is_refused():
    stage = dict(model="tiny", data=str(TINY_SFT), lora=LORA, quantization="fp4")
    with pytest.raises(AlignError, match="'stages.sft.quantization' must be one of nf4, int8; got 'fp4'"):
        recipe_from_dict({"stages": {"sft": stage}})


def test_quantization_is_a_key_of_every_training_stage():
    recipe = recipe_from_dict({"stages": {"sft": dict(model="tiny", data=str(TINY_SFT), lora=LORA,
                                                      quantization="int8"),
                                          "reward": dict(model="${sft}", data=str(TINY_PREFS), lora=LORA,
                                                         quantization="nf4")}})
    assert recipe.stages["sft"].quantization == "int8" and recipe.stages["reward"].quantization == "nf4"
    assert recipe_from_dict({"stages": {"sft": dict(model="tiny", data=str(TINY_SFT))}}).stages["sft"].quantization \
        is None


# --- refused on CPU, through `align run`, before anything is written -------------------------------------------


def test_cpu_run_refuses_qlora_in_one_line(tiny_model, tmp_path, python):
    """The whole CLI in its own process, CUDA hidden (so this holds on a GPU machine too)."""
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", out, {"sft": quantized_stage("sft", tiny_model)})
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for args in (["run", str(path)], ["run", "--dry-run", str(path)]):
        r = subprocess.run([python, "-m", "align", *args], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith("align: error: stages.sft.quantization: nf4 (QLoRA) " + CPU_REASON), lines[0]
        assert "silently stops LoRA gradients" in lines[0]
        assert not out.exists()


@pytest.mark.parametrize("stage_type, quantization", [("sft", "int8"), ("reward", "nf4"), ("dpo", "nf4"),
                                                      ("kto", "int8"), ("ppo", "nf4")])
def test_every_qlora_stage_type_is_refused_without_cuda(stage_type, quantization, tiny_model, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    stages = {"sft": tiny_sft_stage(tiny_model, max_steps=2),  # a first stage that would train: it must not
              stage_type + "_q": quantized_stage(stage_type, "${sft}", quantization)}
    assert main(["-q", "run", str(write_recipe(tmp_path / "r.yaml", out, stages))]) == 2
    line = one_line_error(capsys)
    assert f"stages.{stage_type}_q.quantization: {quantization} (QLoRA) {CPU_REASON}" in line
    assert not out.exists()


@pytest.mark.parametrize("stage_type", ["grpo", "rloo"])
def test_grpo_and_rloo_refuse_quantization(stage_type, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", out, {stage_type: quantized_stage(stage_type, tiny_model)})
    assert main(["-q", "run", "--dry-run", str(path)]) == 2
    assert f"stages.{stage_type}.quantization: not supported for {stage_type} stages" in one_line_error(capsys)
    assert not out.exists()


def test_merge_lora_with_quantization_is_refused(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", out, {"sft": quantized_stage("sft", tiny_model, merge_lora=True)})
    assert main(["-q", "run", str(path)]) == 2
    assert "stages.sft.quantization: merge_lora would merge the adapter into nf4-rounded weights" \
        in one_line_error(capsys)
    assert not out.exists()


def test_missing_bitsandbytes_is_refused_with_the_install_line(tiny_model, tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the GPU check, which comes first
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", out, {"sft": quantized_stage("sft", tiny_model)})
    assert main(["-q", "run", str(path)]) == 2
    assert one_line_error(capsys).endswith("stages.sft.quantization: nf4 (QLoRA) needs bitsandbytes: "
                                           "pip install 'align[quant]'")
    assert not out.exists()


def test_library_calls_refuse_on_cpu(tiny_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AlignError, match="quantization: nf4 \\(QLoRA\\) " + CPU_REASON):
        models.load_model(str(tiny_model), quantization="nf4")
    with pytest.raises(AlignError, match="quantization: int8 \\(QLoRA\\) needs a CUDA GPU"):
        models.load_quantized(str(tiny_model), "int8", num_labels=1)


def test_a_quantized_model_is_never_copied_as_a_reference():
    model = torch.nn.Linear(2, 2)
    model.is_loaded_in_4bit = True
    with pytest.raises(AlignError, match="never copied"):
        models.frozen_copy(model)
    assert models.reference_model(model, LoraSettings()) is None  # under LoRA: the policy, adapter disabled


# --- the pieces a GPU run relies on that a CPU can check -------------------------------------------------------


def perturbed_lora(model, task_type: str = "CAUSAL_LM"):
    """`model` with a LoRA adapter whose weights (and modules_to_save) are no longer the identity."""
    peft_model = models.apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0), task_type=task_type)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return peft_model.eval()


def test_merge_into_unquantized_copies_adapter_and_score_head(tiny_model):
    """The reward stage's save under QLoRA: the trained adapter (and its score head) merged into a fresh base."""
    from reward.train import init_reward_model

    trained = perturbed_lora(init_reward_model(str(tiny_model)), "SEQ_CLS")
    trained.config.pad_token_id = 0
    ids = torch.randint(1, 500, (2, 12))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        merged = models.merge_into_unquantized(trained, init_reward_model(str(tiny_model))).eval()
        got = merged(input_ids=ids).logits
    assert not hasattr(merged, "peft_config") and merged.config.pad_token_id == 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_merged_folder_of_an_adapter_is_a_plain_cached_folder(tiny_model, tmp_path):
    """A quantized load reads a plain folder: an adapter (a LoRA SFT's output) is merged once, in bf16."""
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    perturbed_lora(models.load_model(str(tiny_model))).save_pretrained(adapter)
    folder = models.merged_folder(str(adapter))
    assert models.merged_folder(str(adapter)) == folder and not models.adapter_base(folder)
    plain = AutoModelForCausalLM.from_pretrained(folder)
    merged = models.load_model(str(adapter), dtype=torch.bfloat16)
    assert plain.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(sorted(plain.state_dict().items()), sorted(merged.state_dict().items())):
        assert torch.equal(a, b), name


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_dpo_ref_cache_hash_reads_a_4bit_state_dict(tiny_model):
    """DPO keys its reference log-prob cache by the weights' hash: it must read packed 4-bit weights and
    their quant states, the same on every load, and tell them from the full-precision weights.
    (Loaded on CPU only to hash: nothing trains here.)"""
    from transformers import AutoModelForCausalLM

    from align.stages.dpo import weights_hash

    def nf4():
        return AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=models.quantization_config("nf4"),
                                                    device_map={"": "cpu"})

    first = nf4()
    assert any("quant_state" in k for k in first.state_dict())
    assert weights_hash(first) == weights_hash(nf4()) != weights_hash(models.load_model(str(tiny_model)))


# --- on a CUDA GPU ---------------------------------------------------------------------------------------------


def _gpu_missing() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "needs bitsandbytes: pip install 'align[quant]'"
    return None


needs_gpu = pytest.mark.skipif(_gpu_missing() is not None, reason=_gpu_missing() or "")


def lora_b_norm(state: dict) -> float:
    """Sum of |lora_B|: 0 for a fresh adapter (PEFT starts B at zero), so > 0 means training moved it."""
    return sum(t.float().abs().sum().item() for k, t in state.items() if "lora_B" in k)


def adapter_state(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def logged_losses(stage_dir, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (stage_dir / "log.jsonl").read_text().splitlines()]
    values = [r[key] for r in rows if key in r]
    assert values, f"no {key} in {stage_dir / 'log.jsonl'}"
    return values


@pytest.fixture(scope="module")
def nf4_run(tiny_model, tmp_path_factory):
    """One recipe, every QLoRA stage type: sft, then reward, dpo (twice: the second reads the ref cache),
    kto and ppo, each nf4 on the SFT adapter."""
    from align.runner import run_recipe
    from align.stages import load_recipe

    tmp = tmp_path_factory.mktemp("qlora")
    short_eval = dict(eval_prompts=4, max_new_tokens=4)  # the before/after greedy answers, scored by `reward`
    stages = {
        "sft": quantized_stage("sft", tiny_model, max_steps=6, lr=3e-3),
        "reward": quantized_stage("reward", "${sft}"),
        "dpo": quantized_stage("dpo", "${sft}", **short_eval),
        "dpo_again": quantized_stage("dpo", "${sft}", **short_eval),
        "kto": quantized_stage("kto", "${sft}", **short_eval),
        "ppo": quantized_stage("ppo", "${sft}", reward_fn=None, value_model="policy", **short_eval),
    }
    recipe = load_recipe(write_recipe(tmp / "qlora.yaml", tmp / "run", stages))
    return recipe, run_recipe(recipe)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("stage", ["sft", "dpo", "kto", "ppo"])
def test_nf4_stage_moves_its_lora_weights(nf4_run, stage):
    recipe, _ = nf4_run
    out = recipe.stage_dir(stage)
    assert lora_b_norm(adapter_state(out / "model")) > 0
    assert all(math.isfinite(x) for x in logged_losses(out, "reward" if stage == "ppo" else "loss"))


@pytest.mark.gpu
@needs_gpu
def test_nf4_sft_adapter_loads_with_plain_peft_on_the_unquantized_base(nf4_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe, metrics = nf4_run
    folder = recipe.stage_dir("sft") / "model"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model)
    assert math.isfinite(metrics["sft"]["eval_loss"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not hasattr(base.config, "quantization_config")
    model = PeftModel.from_pretrained(base, folder).eval()
    ids = torch.randint(1, 500, (1, 10))
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert torch.isfinite(tuned).all() and not torch.allclose(tuned, plain)


@pytest.mark.gpu
@needs_gpu
def test_nf4_reward_model_is_saved_merged_in_bf16(nf4_run):
    from reward.score import RewardScorer

    recipe, metrics = nf4_run
    folder = recipe.stage_dir("reward") / "model"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == ("bfloat16" if models.use_bf16() else "float32")
    assert not (folder / "adapter_config.json").exists()
    scores = RewardScorer(str(folder)).score(["2+2?"], ["4"])
    assert all(math.isfinite(s) for s in scores)
    assert all(math.isfinite(x) for x in logged_losses(recipe.stage_dir("reward")))


@pytest.mark.gpu
@needs_gpu
def test_nf4_dpo_reference_cache_is_keyed_by_the_4bit_weights(nf4_run):
    _, metrics = nf4_run
    assert metrics["dpo_again"]["ref_cache_hits"], "the second DPO run read the first one's reference log-probs"


@pytest.mark.gpu
@needs_gpu
def test_int8_sft_trains(tiny_model, tmp_path):
    from align.runner import run_recipe
    from align.stages import load_recipe

    stages = {"sft": quantized_stage("sft", tiny_model, "int8", max_steps=4, lr=3e-3)}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "run", stages))
    metrics = run_recipe(recipe)["sft"]
    assert math.isfinite(metrics["eval_loss"])
    assert lora_b_norm(adapter_state(recipe.stage_dir("sft") / "model")) > 0
    assert all(math.isfinite(x) for x in logged_losses(recipe.stage_dir("sft")))
