import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.errors import AlignError
from align.tiny import build_tiny_model

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Count from 3 to 7."},
    {"role": "assistant", "content": "3 4 5 6 7"},
    {"role": "user", "content": "Repeat: red cat"},
    {"role": "assistant", "content": "red cat"},
]


def test_reloads_with_plain_auto_classes(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.num_hidden_layers == 2
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.vocab_size == len(tok)
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 500_000
    out = model(torch.tensor([tok.encode("hello world")]))
    assert out.logits.shape[-1] == len(tok)


def test_tokenizer_round_trips_any_text(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for text in ["The quick brown fox.", "Ünïcødé ✓ 日本語", "  spaces\tand\nnewlines  "]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids


def test_chat_template_renders_chatml_and_round_trips(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nCount from 3 to 7.<|im_end|>\n"
        "<|im_start|>assistant\n3 4 5 6 7<|im_end|>\n"
        "<|im_start|>user\nRepeat: red cat<|im_end|>\n"
        "<|im_start|>assistant\nred cat<|im_end|>\n"
    )
    ids = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode(ids) == text


def test_assistant_mask_covers_answers_and_stop_token_only(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    out = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "3 4 5 6 7<|im_end|>red cat<|im_end|>"


def test_prompt_is_prefix_of_prompt_plus_answer(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=True, add_generation_prompt=True, return_dict=True)
    full = tok.apply_chat_template(CHAT[:3], tokenize=True, return_dict=True)
    assert full["input_ids"][: len(prompt["input_ids"])] == prompt["input_ids"]


def test_cli_builds_qwen2_with_options(tmp_path, python):
    out = tmp_path / "q"
    r = subprocess.run([python, "-m", "align", "tiny-model", str(out), "--arch", "qwen2", "--vocab", "400",
                        "--hidden", "32", "--layers", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "qwen2"
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert len(AutoTokenizer.from_pretrained(out)) == 400


def test_refuses_non_empty_folder_and_bad_sizes(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep me")
    with pytest.raises(AlignError, match="not empty"):
        build_tiny_model(tmp_path / "x")
    assert (tmp_path / "x" / "f").read_text() == "keep me"
    with pytest.raises(AlignError, match="multiple of 16"):
        build_tiny_model(tmp_path / "y", hidden=40)
    assert not (tmp_path / "y").exists()
