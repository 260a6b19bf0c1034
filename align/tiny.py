"""Tiny random-weight causal LMs, built offline in seconds, for tests and quick recipes.

The tokenizer is a byte-level BPE trained with `tokenizers` on a text file shipped
inside the package (`align/tokenizer_corpus.txt`), so any input encodes and no
network is needed. It carries the ChatML template of `align.chat_template` and the
special tokens `<|im_start|>`, `<|im_end|>` (EOS), `<|pad|>` and `<|endoftext|>`.
Both halves reload with plain `AutoTokenizer` / `AutoModelForCausalLM`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from align.chat_template import BOS, CHATML_TEMPLATE, EOS, PAD, SPECIAL_TOKENS
from align.errors import AlignError

CORPUS = Path(__file__).parent / "tokenizer_corpus.txt"
ARCHS = ("llama", "qwen2")


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes, so no <unk>
        show_progress=False,
    )
    # Extra lines in the chat format teach the merges for the markup the template emits.
    chat_lines = ["<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_start|>system\n"] * 20
    tok.train_from_iterator([*CORPUS.read_text().splitlines(), *chat_lines], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
        padding_side="right",
    )


def build_model(tokenizer, arch: str = "llama", hidden: int = 64, layers: int = 2, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if arch not in ARCHS:
        raise AlignError(f"tiny-model: unknown --arch '{arch}'; expected one of: {', '.join(ARCHS)}")
    if hidden % 16:
        raise AlignError(f"tiny-model: --hidden must be a multiple of 16 (4 heads of width 4k); got {hidden}")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def build_tiny_model(out: str | Path, arch: str = "llama", vocab: int = 512, hidden: int = 64,
                     layers: int = 2, seed: int = 0) -> Path:
    """Write tokenizer and model to `out`, atomically: a crash leaves no half-built folder."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise AlignError(f"{out}: folder exists and is not empty; choose a new path")
    if vocab < 300:
        raise AlignError(f"tiny-model: --vocab must be at least 300 (256 bytes plus merges); got {vocab}")
    if layers < 1:
        raise AlignError(f"tiny-model: --layers must be at least 1; got {layers}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = build_tokenizer(vocab)
        model = build_model(tokenizer, arch=arch, hidden=hidden, layers=layers, seed=seed)
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
