"""The vLLM engine: rollouts on a CUDA GPU, with weight sync from the training policy.

    engine = VLLMEngine("runs/x/sft/model", tokenizer)      # a model folder vLLM can load
    groups = engine.generate(prompts, n=4, sampling=Sampling(seed=0), return_logps=True)
    engine.load_weights(policy)                             # after each optimizer step

vLLM is imported here and nowhere else: it is an optional, GPU-only extra, and `import
align` must work without it.

Prompts are rendered and tokenized by our tokenizer (the chat template every stage uses)
and handed to vLLM as token ids, so both engines sample from the same prompt tokens;
completions are decoded by our tokenizer too. Decisions where vLLM and the HF engine
could differ:

- EOS: sampling stops at `tokenizer.eos_token_id` and nowhere else (passed as the one stop
  token, as the HF engine passes it to `generate`); vLLM keeps it in `token_ids`.
- top_k 0 (off) is sent as -1, which every vLLM release reads as "off".
- seed: prompt i is sampled with seed `seed + i`, so a prompt's completions depend on the
  seed and the prompt alone (not on the batch, unlike the HF engine), and two prompts
  never share a random stream.
- logps: vLLM's default logprobs are the raw model distribution (before temperature,
  top-k, top-p), the same quantity the HF engine returns. (vLLM's old V0 engine returned
  processed log-probs; V0 is gone from current releases.)

Weight sync (`load_weights`): vLLM's workers get one extra method, through vLLM's
`worker_extension_cls` (`WeightSyncExtension` below), called by name with
`LLM.collective_rpc`, so nothing but a name and plain data crosses a process boundary.
The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set before vLLM
is imported unless the user set it), as TRL's colocate mode does, so with one GPU the
weights reach vLLM's model by reference, with no copy. With tensor parallelism (or
multiprocessing turned back on) the workers are other processes: the weights go through
one safetensors file in /dev/shm (RAM, not disk) and each worker reads the shard it needs
(vLLM's `load_weights` shards full tensors). Either way vLLM receives full weights under
their Hugging Face names; a PEFT model is merged first into new tensors (W + scaling *
B @ A) so the training model is never touched. The sync runs under `sync_timeout`; a
failure or a timeout raises `AlignError`, and after a timeout the engine may hold a mix of
old and new weights, so the message says to restart.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
import threading
import time
from pathlib import Path

import torch

from align.errors import AlignError
from align.rollouts import Completion, Sampling, encode_prompts

INSTALL_HINT = "engine vllm needs a CUDA GPU and `pip install 'align[vllm]'`"


def import_vllm():
    """The vllm module, or one AlignError line saying what is missing."""
    if not torch.cuda.is_available():
        raise AlignError(f"{INSTALL_HINT} (no CUDA GPU is visible to torch)")
    # In-process engine core: weight sync by reference (see the module docstring). Must be set
    # before vLLM reads its environment; setdefault keeps a user's explicit choice.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except Exception as e:  # ImportError, or a CUDA/driver mismatch raised while importing
        first = str(e).splitlines()[0] if str(e) else ""
        raise AlignError(f"{INSTALL_HINT} (import vllm failed: {e.__class__.__name__}: {first})") from None
    return vllm


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
        path = Path(str(model_path))
        if not (path / "config.json").is_file():
            raise AlignError(f"{model_path}: engine vllm needs a full model folder (config.json and weights); "
                             "merge an adapter first")
        from align.models import use_bf16

        # bf16 on GPUs that have it, as the HF engine loads the policy (our folders are saved in fp32).
        dtype = dtype or ("bfloat16" if use_bf16() else "auto")
        try:
            self.llm = vllm.LLM(model=str(path), tokenizer=str(path), dtype=dtype,
                                gpu_memory_utilization=gpu_memory_utilization,
                                tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, seed=seed,
                                worker_extension_cls=f"{__name__}.WeightSyncExtension")
        except Exception as e:  # vLLM raises plain ValueError/RuntimeError for bad configs and OOM
            first = str(e).splitlines()[0] if str(e) else ""
            raise AlignError(f"{model_path}: vLLM could not start ({e.__class__.__name__}: {first})") from None
        self._SamplingParams = vllm.SamplingParams

    def max_context(self) -> int | None:
        return self.llm.llm_engine.model_config.max_model_len

    def generate(self, prompts: list, n: int = 1, sampling: Sampling | None = None,
                 return_logps: bool = False) -> list[list[Completion]]:
        sampling = sampling or Sampling()
        tok = self.tokenizer
        eos = tok.eos_token_id
        encoded = encode_prompts(tok, prompts, sampling.max_new_tokens, self.max_context())
        greedy = sampling.temperature <= 0
        params = [self._SamplingParams(
            n=n,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=-1 if greedy or sampling.top_k <= 0 else sampling.top_k,
            max_tokens=sampling.max_new_tokens,
            seed=None if sampling.seed is None else sampling.seed + i,
            # Stop at our EOS and only there, as the HF engine does: ignore_eos drops the model's own
            # EOS ids (generation_config may list several); stop_token_ids still applies.
            ignore_eos=True,
            stop_token_ids=[eos],
            logprobs=0 if return_logps else None,  # 0: only the sampled token's log-prob
            detokenize=False,  # we decode with our tokenizer, as the HF engine does
        ) for i in range(len(prompts))]
        start = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=self.progress)
        seconds = time.perf_counter() - start
        groups, new_tokens = [], 0
        for ids, output in zip(encoded, outputs):
            group = []
            for sample in sorted(output.outputs, key=lambda o: o.index):
                tokens = list(sample.token_ids)
                finished = bool(tokens) and tokens[-1] == eos
                logps = None
                if return_logps:
                    logps = [step[token].logprob for step, token in zip(sample.logprobs, tokens)]
                group.append(Completion(prompt_ids=list(ids), token_ids=tokens, finished=finished,
                                        text=tok.decode(tokens, skip_special_tokens=True).strip(), logps=logps))
                new_tokens += len(tokens)
            groups.append(group)
        self.last_stats = {"tokens": new_tokens, "seconds": seconds}
        return groups

    def load_weights(self, model) -> None:
        """Push `model`'s current weights (merged, if it is a PEFT model) into the running engine."""
        weights = full_weights(model)
        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1").lower() in ("0", "false")
        if in_process and self.tensor_parallel_size == 1:
            self._sync(weights)  # the worker is this process: tensors pass by reference
            return
        from safetensors.torch import save_file

        shm = Path("/dev/shm")
        with tempfile.TemporaryDirectory(prefix="align-vllm-sync-", dir=shm if shm.is_dir() else None) as tmp:
            path = str(Path(tmp) / "weights.safetensors")
            save_file({name: t.detach().to("cpu").contiguous() for name, t in weights}, path)
            self._sync(path)

    def _sync(self, source) -> None:
        result: dict = {}

        def call():
            try:
                result["loaded"] = self.llm.collective_rpc("align_load_weights", timeout=self.sync_timeout,
                                                           args=(source,))
            except BaseException as e:  # reported to the caller below, in one line
                result["error"] = e

        # A thread, so a hung sync surfaces as an error after sync_timeout instead of freezing training.
        # It is a daemon: a thread stuck inside vLLM cannot be killed, and must not block exit.
        thread = threading.Thread(target=call, name="align-vllm-weight-sync", daemon=True)
        start = time.perf_counter()
        thread.start()
        thread.join(self.sync_timeout)
        if thread.is_alive():
            raise AlignError(f"vllm weight sync timed out after {self.sync_timeout:.0f} s; the engine may hold a mix "
                             "of old and new weights: restart the run (or raise sync_timeout)")
        if "error" in result:
            e = result["error"]
            first = str(e).splitlines()[0] if str(e) else ""
            raise AlignError(f"vllm weight sync failed ({e.__class__.__name__}: {first})") from None
        # Cached KV blocks were computed by the old weights; a prefix hit would reuse them.
        self.llm.reset_prefix_cache()
        self.last_sync_seconds = time.perf_counter() - start


class WeightSyncExtension:
    """Mixed into every vLLM worker by `worker_extension_cls`; `self` is the worker."""

    def align_load_weights(self, source) -> int:
        """Load full HF-named weights, from (name, tensor) pairs or a safetensors file path."""
        model = self.model_runner.model
        if isinstance(source, str):
            from safetensors import safe_open

            with safe_open(source, framework="pt", device="cpu") as f:
                names = list(f.keys())
                model.load_weights((name, f.get_tensor(name)) for name in names)
            return len(names)
        model.load_weights(iter(source))
        return len(source)


def full_weights(model) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight under the names of the plain HF checkpoint.

    For a PEFT LoRA model the update is added into new tensors, W + scaling * B @ A per active
    adapter (`get_delta_weight`), and `modules_to_save` copies replace their originals; the
    model itself is not changed (no merge_adapter / unmerge round trip, which drifts in bf16).
    Other PEFT methods (DoRA, IA3, ...) are merged on a deep copy with `merge_and_unload`.
    Tied weights appear once, as `named_parameters` yields them.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(model, PeftModel):
        return [(name, p.detach()) for name, p in model.named_parameters()]
    tuner_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    plain_lora = all(isinstance(m, LoraLayer) and not any(m.use_dora.values()) for _, m in tuner_layers)
    if not plain_lora:
        with torch.no_grad():
            merged = copy.deepcopy(model).merge_and_unload()
        return [(name, p.detach()) for name, p in merged.named_parameters()]
    deltas = {}
    for module_name, module in tuner_layers:
        if module.disable_adapters or module.merged:
            continue  # disabled: base weights only; merged: the base already holds the update
        active = [a for a in module.active_adapters if a in module.lora_A or a in module.lora_embedding_A]
        if active:
            with torch.no_grad():
                deltas[module_name + ".base_layer.weight"] = sum(module.get_delta_weight(a) for a in active)
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
