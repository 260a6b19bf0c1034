"""The vLLM engine against the HF engine on one CUDA GPU: same prompts in, same kind of rows out,
and weight sync that really changes what vLLM samples. Run with `pytest -m gpu`.

Both sides run in bf16, whose kernels differ between vLLM and transformers, so greedy tokens
are compared where the model's logits are far apart (an untied lm_head of std 1) and
log-probs within bf16 tolerance.
"""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm: pip install 'align[vllm]'"),
]

PROMPTS = ["Hello there", "What is the capital of France? Tell me more about it, please.", "x",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to ten"}],
           "a b c d e f g h i j k l m n o p"]


def lively(path, seed: int):
    """A tiny model (head width 64, which every vLLM attention backend takes) with an untied lm_head."""
    from align.models import load_model, load_tokenizer
    from align.tiny import build_tiny_model

    build_tiny_model(path, hidden=256, seed=seed)
    model, tokenizer = load_model(str(path), dtype=torch.float32), load_tokenizer(str(path))
    torch.manual_seed(seed)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(path)
    return model, tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    a, tokenizer = lively(root / "a", seed=0)
    b, _ = lively(root / "b", seed=1)
    return root / "a", a.to("cuda", torch.bfloat16), b.to("cuda", torch.bfloat16), tokenizer


@pytest.fixture(scope="module")
def engine(models):
    from align.rollouts import make_engine

    path, _, _, tokenizer = models
    return make_engine("vllm", str(path), tokenizer, gpu_memory_utilization=0.3, dtype="bfloat16")


def greedy(engine, n=1, max_new_tokens=8):
    from align.rollouts import Sampling

    return engine.generate(PROMPTS, n=n, sampling=Sampling(max_new_tokens=max_new_tokens, temperature=0))


def first_tokens(groups):
    return [g[0].token_ids[0] for g in groups]


def hf(model, tokenizer):
    from align.rollouts import make_engine

    return make_engine("hf", model, tokenizer)


def test_greedy_agrees_with_the_hf_engine(engine, models):
    _, a, _, tokenizer = models
    ours, theirs = greedy(engine, n=2), greedy(hf(a, tokenizer))
    assert first_tokens(ours) == first_tokens(theirs)
    assert sum(o[0].token_ids == t[0].token_ids for o, t in zip(ours, theirs)) >= len(PROMPTS) // 2
    assert all(g[0].token_ids == g[1].token_ids for g in ours)
    assert all(c.prompt_ids == t[0].prompt_ids for o, t in zip(ours, theirs) for c in o)


def test_rows_stop_at_eos_seeds_and_logps(engine, models):
    from align.rollouts import Sampling

    _, a, _, tokenizer = models
    eos = tokenizer.eos_token_id
    run = lambda seed: engine.generate(PROMPTS, n=4, sampling=Sampling(max_new_tokens=16, seed=seed),
                                       return_logps=True)
    first = run(0)
    tokens = lambda groups: [[c.token_ids for c in g] for g in groups]
    assert tokens(run(0)) == tokens(first)
    assert tokens(run(1)) != tokens(first)
    for c in (c for g in first for c in g):
        assert c.finished == (eos in c.token_ids)
        assert eos not in c.token_ids[:-1]
        assert c.finished or len(c.token_ids) == 16
        full = torch.tensor([c.prompt_ids + c.token_ids], device="cuda")
        with torch.no_grad():
            logps = torch.log_softmax(a(full).logits.float(), -1)[0]
        start = len(c.prompt_ids) - 1
        expected = torch.tensor([logps[start + k, t].item() for k, t in enumerate(c.token_ids)])
        torch.testing.assert_close(torch.tensor(c.logps), expected, atol=0.1, rtol=0.02)


def test_load_weights_switches_the_policy_and_back(engine, models):
    from peft import LoraConfig, get_peft_model

    _, a, b, tokenizer = models
    before = greedy(engine)
    engine.load_weights(b)
    after = greedy(engine)
    assert first_tokens(after) == first_tokens(greedy(hf(b, tokenizer)))
    assert first_tokens(after) != first_tokens(before)

    lora = get_peft_model(a, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                        init_lora_weights=False))
    engine.load_weights(lora)
    assert first_tokens(greedy(engine)) == first_tokens(greedy(hf(lora, tokenizer)))
    lora.unload()  # a is plain again for the next check

    engine.load_weights(a)
    assert first_tokens(greedy(engine)) == first_tokens(before)


def test_cli_writes_vllm_rows(models, tmp_path):
    path = models[0]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "rollouts.jsonl"
    result = subprocess.run([sys.executable, "-m", "align", "rollouts", "--model", str(path), "--prompts", str(prompts),
                             "--n", "3", "--max-new-tokens", "8", "--engine", "vllm", "--gpu-memory-utilization",
                             "0.25", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(r["engine"] == "vllm" and len(r["completions"]) == 3 for r in rows)


def test_a_sync_past_its_timeout_is_one_align_error(engine, models):
    # Last in the file: the timed-out sync may still be running in its thread afterwards.
    from align.errors import AlignError

    engine.sync_timeout = 1e-6
    with pytest.raises(AlignError, match="weight sync timed out"):
        engine.load_weights(models[2])
