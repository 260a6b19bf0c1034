"""The vLLM engine against the HF engine on one CUDA GPU: same prompts in, same kind of rows out,
and weight sync that really changes what vLLM samples. Run with `pytest -m gpu`.

Both sides run in bf16, whose kernels differ between vLLM and transformers, so greedy tokens
are compared where the model's logits are far apart (an untied lm_head of std 1) and
log-probs within bf16 tolerance (`logp_tolerance`). The tensor-parallel tests need two GPUs.
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

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (tensor parallelism)")

# bf16 keeps 8 significant bits (~2.4 decimal digits): a logit z is stored to within |z| * 2**-8, and each
# engine's kernels (fused attention and norms in vLLM, eager in transformers) round the hidden states a few
# more times. Every logit may be off by EPS * max|z|, EPS = 2**-6 (four bf16 roundings). A log-prob,
# log p_t = z_t - logsumexp(z), has the gradient onehot(t) - softmax(z), whose L1 norm is 2 (1 - p_t); so it
# moves by at most 2 (1 - p_t) * EPS * max|z|, plus 1e-3 for the float32 softmax itself. Here |z| reaches ~50
# (an lm_head of std 1 over 256 dims): an unlikely token may be off by ~1.5 and a near-certain one by almost
# nothing, which no single atol fits (0.1 fails the first, 1.5 would pass anything for the second).
BF16_LOGIT_EPS = 2 ** -6


def logp_tolerance(logits: torch.Tensor, token: int) -> float:
    """How far a bf16 engine's log-prob of `token` may be from the reference whose float `logits` are given."""
    p = torch.softmax(logits, -1)[token].item()
    return 2 * (1 - p) * BF16_LOGIT_EPS * logits.abs().max().item() + 1e-3


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
            logits = a(full).logits.float()[0]  # (T, V), bf16 logits as float
        start = len(c.prompt_ids) - 1  # position t predicts token t + 1
        for k, (token, got) in enumerate(zip(c.token_ids, c.logps)):
            z = logits[start + k]
            expected = torch.log_softmax(z, -1)[token].item()
            assert abs(got - expected) <= logp_tolerance(z, token), (k, got, expected)


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


def test_a_one_gpu_sync_takes_no_timeout(engine, models):
    # vLLM's in-process UniProcExecutor ignores collective_rpc's timeout: the sync runs to its end.
    _, a, _, tokenizer = models
    engine.sync_timeout = 1e-6
    try:
        engine.load_weights(a)
    finally:
        engine.sync_timeout = 120.0
    assert engine.last_sync_seconds > 1e-6
    assert first_tokens(greedy(engine)) == first_tokens(greedy(hf(a, tokenizer)))


@pytest.mark.parametrize("tensor_parallel", [1, pytest.param(2, marks=two_gpus)])
def test_cli_writes_greedy_vllm_rows(models, tmp_path, tensor_parallel):
    path = models[0]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "rollouts.jsonl"
    result = subprocess.run([sys.executable, "-m", "align", "rollouts", "--model", str(path), "--prompts", str(prompts),
                             "--n", "3", "--temperature", "0", "--max-new-tokens", "8", "--engine", "vllm",
                             "--tensor-parallel-size", str(tensor_parallel), "--gpu-memory-utilization", "0.25",
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(r["engine"] == "vllm" and len(r["completions"]) == 3 for r in rows)
    assert all(len(set(r["completions"])) == 1 for r in rows)  # greedy: one completion, copied


@two_gpus
def test_tensor_parallel_sync_and_its_timeout(models):
    # Last in the file: after the timeout the workers may still be loading, and this engine is left unusable.
    from align.errors import AlignError
    from align.rollouts import make_engine

    path, a, b, tokenizer = models
    engine = make_engine("vllm", str(path), tokenizer, gpu_memory_utilization=0.3, dtype="bfloat16",
                         tensor_parallel_size=2)
    assert engine.executor == "mp" and first_tokens(greedy(engine)) == first_tokens(greedy(hf(a, tokenizer)))
    engine.load_weights(b)  # through /dev/shm, each worker loading its shard
    assert first_tokens(greedy(engine)) == first_tokens(greedy(hf(b, tokenizer)))
    engine.sync_timeout = 1e-6
    with pytest.raises(AlignError, match="weight sync timed out"):
        engine.load_weights(a)
    with pytest.raises(AlignError, match="cannot be used after a weight sync that timed out"):
        greedy(engine)
