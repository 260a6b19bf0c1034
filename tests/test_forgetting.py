"""Forgetting: perplexity of general text before and after a stage."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_sft_stage, write_recipe

from align.errors import AlignError
from align.forgetting import perplexity, read_texts
from align.models import load_model, load_tokenizer
from align.runner import run_recipe
from align.stages import load_recipe

GENERAL = REPO / "recipes" / "data" / "general_text.txt"


def test_a_model_with_a_zero_head_has_the_perplexity_of_its_vocabulary(tiny_model):
    """Zero logits are the uniform distribution: every token costs log(V) nats, so perplexity is V."""
    model, tokenizer = load_model(str(tiny_model)), load_tokenizer(str(tiny_model))
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
    assert perplexity(model, tokenizer, read_texts(str(GENERAL))[:5]) == pytest.approx(model.config.vocab_size,
                                                                                        rel=1e-4)


def test_read_texts_takes_paragraphs_and_jsonl(tmp_path):
    assert len(read_texts(str(GENERAL))) == GENERAL.read_text().count("\n\n") + 1
    rows = tmp_path / "t.jsonl"
    rows.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_texts(str(rows)) == ["one", "two"]
    rows.write_text(json.dumps({"txt": "one"}) + "\n")
    with pytest.raises(AlignError, match=r"t.jsonl:1: expected a non-empty string field 'text'"):
        read_texts(str(rows))


def test_a_stage_reports_general_text_perplexity_before_and_after(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out",
                          {"sft": tiny_sft_stage(tiny_model, epochs=1, forgetting_data=str(GENERAL))})
    metrics = run_recipe(load_recipe(recipe))["sft"]
    texts = read_texts(str(GENERAL))
    start = perplexity(load_model(str(tiny_model)), load_tokenizer(str(tiny_model)), texts, 64)
    trained = tmp_path / "out" / "sft" / "model"
    after = perplexity(load_model(str(trained)), load_tokenizer(str(trained)), texts, 64)
    assert metrics["forgetting_texts"] == len(texts)
    assert metrics["forgetting_ppl_before"] == pytest.approx(start, rel=1e-5)
    assert metrics["forgetting_ppl_after"] == pytest.approx(after, rel=1e-5)
    assert math.isfinite(after) and after != pytest.approx(start)  # training moved it


def test_a_missing_forgetting_file_is_one_line_before_training(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out",
                          {"sft": tiny_sft_stage(tiny_model, forgetting_data=str(tmp_path / "nope.txt"))})
    result = subprocess.run([sys.executable, "-m", "align", "run", str(recipe)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"align: error: stages.sft.forgetting_data: {tmp_path / 'nope.txt'}: no such file; expected a .txt file or "
        "JSONL rows with a 'text' field"]
    assert not (tmp_path / "out").exists()
